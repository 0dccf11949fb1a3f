"""TLS to the webhook: a private CA (ca_file) and client certificates (mTLS), against
local TLS servers whose CA and certificates the test makes with the openssl CLI."""
from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import uvloop
from alertd import config
from alertd.errors import ConfigError
from alertd.transport import Pool, TransportError, tls_context

from tests.procs import to_toml
from tests.test_receivers_hostile import OK, Receiver, config_for, rows_csv
from tests.test_transport import Scripted, Server, _post

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: Any) -> Any:
    def _run(coro: Any) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(asyncio.wait_for(coro, 10))
    return _run


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _issue(d: Path, name: str, ca: str, ext: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.pem"),
             "-CAkey", str(d / f"{ca}.key"), "-CAcreateserial", "-days", "2",
             "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> Path:
    """ca (signs the server), client-ca (signs the client), server, client, other-ca."""
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "client-ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", f"/CN=alertd test {ca}", "-keyout", str(d / f"{ca}.key"),
                 "-out", str(d / f"{ca}.pem"))
    _issue(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                              "extendedKeyUsage=serverAuth\n")
    _issue(d, "client", "client-ca", "extendedKeyUsage=clientAuth\n")
    for p in d.glob("*.key"):
        os.chmod(p, 0o600)
    return d


def server_context(pki: Path, mtls: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    if mtls:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki / "client-ca.pem")
    return ctx


async def _tls_server(pki: Path, mtls: bool) -> Server:
    srv = Server()
    srv.srv = await asyncio.get_running_loop().create_server(
        lambda: Scripted(srv), "127.0.0.1", 0, ssl=server_context(pki, mtls))
    srv.port = srv.srv.sockets[0].getsockname()[1]
    return srv


def _https(srv: Server, path: str = "/ok") -> str:
    return f"https://127.0.0.1:{srv.port}{path}"


# ------------------------------------------------------------------ transport


def test_a_private_ca_verifies_and_the_system_store_refuses(run: Any, pki: Path) -> None:
    async def main() -> None:
        srv = await _tls_server(pki, mtls=False)
        try:
            pool = Pool(_https(srv), size=2, timeout=5,
                        ssl_context=tls_context(ca_file=str(pki / "ca.pem")))
            for _ in range(3):
                assert (await _post(pool)).status == 200
            assert pool.connections_opened == 1
            await pool.close()
            for ctx in (tls_context(), tls_context(ca_file=str(pki / "other-ca.pem"))):
                pool = Pool(_https(srv), size=1, timeout=5, ssl_context=ctx)
                with pytest.raises(TransportError) as ei:
                    await _post(pool)
                assert (ei.value.kind, ei.value.sent) == ("connect", False)  # never a duplicate
                assert str(ei.value) == (f"connect: TLS handshake with 127.0.0.1:{srv.port} failed:"
                                         f" certificate verify failed: unable to get local issuer "
                                         f"certificate")
                await pool.close()
            assert len(srv.requests) == 3
        finally:
            srv.srv.close()
    run(main())


def test_host_names_are_verified(run: Any, pki: Path) -> None:
    async def main() -> None:
        srv = await _tls_server(pki, mtls=False)
        try:
            ctx = tls_context(ca_file=str(pki / "ca.pem"))
            ctx_pool = Pool(f"https://127.0.0.1:{srv.port}/ok", size=1, timeout=5, ssl_context=ctx)
            assert (await _post(ctx_pool)).status == 200
            await ctx_pool.close()
            # The same server under a name its certificate does not carry.
            pool = Pool(f"https://127.0.0.2:{srv.port}/ok", size=1, timeout=5, ssl_context=ctx)
            with pytest.raises(TransportError) as ei:
                await _post(pool)
            assert ei.value.kind in ("connect", "timeout") and not ei.value.sent
            await pool.close()
        finally:
            srv.srv.close()
    run(main())


def test_mtls_accepts_a_client_certificate_and_refuses_without(run: Any, pki: Path) -> None:
    async def main() -> None:
        srv = await _tls_server(pki, mtls=True)
        try:
            with_cert = tls_context(str(pki / "ca.pem"), str(pki / "client.pem"),
                                    str(pki / "client.key"))
            pool = Pool(_https(srv), size=2, timeout=5, ssl_context=with_cert)
            for _ in range(3):
                assert (await _post(pool)).status == 200
            await pool.close()
            pool = Pool(_https(srv), size=1, timeout=5,
                        ssl_context=tls_context(ca_file=str(pki / "ca.pem")))
            for _ in range(2):
                with pytest.raises(TransportError) as ei:
                    await _post(pool)
                # TLS 1.3 refuses the missing certificate after the client's handshake
                # ended; it is still a handshake failure: not sent, not a duplicate.
                assert (ei.value.kind, ei.value.sent) == ("connect", False), str(ei.value)
                assert str(ei.value).startswith(f"connect: TLS handshake with 127.0.0.1:"
                                                f"{srv.port} failed: ")
                assert "certificate" in str(ei.value), str(ei.value)
            await pool.close()
            assert len(srv.requests) == 3
        finally:
            srv.srv.close()
    run(main())


# ------------------------------------------------------------------ config


def _load(tmp_path: Path, webhook: dict[str, Any]) -> config.Config:
    p = tmp_path / "c.toml"
    p.write_text(to_toml({"webhook": {"url": "https://127.0.0.1:9/hook", **webhook}}))
    return config.load(p)


def test_tls_files_are_resolved_and_checked_at_load(tmp_path: Path, pki: Path) -> None:
    for f in ("ca.pem", "client.pem", "client.key"):
        shutil.copy(pki / f, tmp_path / f)
    cfg = _load(tmp_path, {"ca_file": "ca.pem", "client_cert": "client.pem",
                           "client_key": "client.key"})
    assert (cfg.webhook.ca_file, cfg.webhook.client_cert, cfg.webhook.client_key) == (
        tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = [
        ({"ca_file": "missing.pem"},
         f"config: [webhook] ca_file {tmp_path}/missing.pem: No such file or directory"),
        ({"ca_file": "junk.pem"}, f"config: [webhook] ca_file {tmp_path}/junk.pem: no PEM "
                                  f"certificate in it"),
        ({"client_cert": "client.pem"}, "config: [webhook] client_cert and client_key go together"),
        ({"client_key": "client.key"}, "config: [webhook] client_cert and client_key go together"),
        ({"client_cert": "client.pem", "client_key": "junk.pem"},
         f"config: [webhook] client_cert {tmp_path}/client.pem / client_key {tmp_path}/junk.pem: "
         f"not a PEM certificate and its matching unencrypted key"),
        ({"ca_file": 5}, "config: [webhook] ca_file must be a string"),
    ]
    for webhook, message in cases:
        with pytest.raises(ConfigError) as ei:
            _load(tmp_path, webhook)
        assert str(ei.value).startswith(message), str(ei.value)
    p = tmp_path / "h.toml"
    p.write_text(to_toml({"webhook": {"url": "http://127.0.0.1:9/hook",
                                             "ca_file": "ca.pem"}}))
    with pytest.raises(ConfigError, match=r"\[webhook\] ca_file is set but \[webhook\] url is "
                                          r"not https://"):
        config.load(p)


def test_an_encrypted_client_key_is_a_config_error_not_a_prompt(tmp_path: Path, pki: Path) -> None:
    _openssl("pkey", "-in", str(pki / "client.key"), "-aes256", "-passout", "pass:secret",
             "-out", str(tmp_path / "enc.key"))
    shutil.copy(pki / "client.pem", tmp_path / "client.pem")
    with pytest.raises(ConfigError, match="matching unencrypted key"):
        _load(tmp_path, {"client_cert": "client.pem", "client_key": "enc.key"})


# ------------------------------------------------------------------ end to end


def test_alertd_delivers_over_mtls_with_its_own_ca(tmp_path: Path, pki: Path, alertd: Any) -> None:
    with Receiver(lambda r: OK, tls=server_context(pki, mtls=True)) as rx:
        a = alertd(config_for(tmp_path, rx.url, webhook={
            "ca_file": str(pki / "ca.pem"), "client_cert": str(pki / "client.pem"),
            "client_key": str(pki / "client.key")}))
        a.drop("t.csv", rows_csv(300))
        [s] = a.wait_summaries(1, timeout=60)
        assert (s["delivered"], s["dead"], s["possible_duplicates"]) == (300, 0, 0)
        assert len(rx.ids()) == 300
