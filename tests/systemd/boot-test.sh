#!/usr/bin/env bash
# make test-systemd: boot systemd 252 as PID 1 in a systemd-nspawn container over a
# Debian bookworm tree, `make install-systemd` inside, and run tests/systemd/checks.py
# there (start, deliver, permissions, reload, worker crash, stop, watchdog).
#
# Needs root. The tree (debootstrap, ~2 min the first time) and a wheelhouse of the
# pinned runtime requirements (built once with the tree's own python3) are cached under
# var/nspawn/. Each boot runs on a throwaway overlay of the tree (--volatile=overlay)
# with its own network namespace (only loopback: pip installs from the wheelhouse), the
# checkout bound read-only at /src. Prints one PASS/FAIL line per check, then
# "N passed, N failed"; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VAR=${ALERTD_NSPAWN_CACHE:-$ROOT/var/nspawn}  # tree, wheelhouse, results
TREE=$VAR/bookworm
WHEELS=$VAR/wheels
OUT=$VAR/out
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3-venv: install-systemd makes a venv; make: it is a make target. No procps:
# nothing in the unit may need /bin/kill.
PKGS=systemd,systemd-sysv,dbus,python3,python3-venv,make
BOOT_TIMEOUT=${BOOT_TIMEOUT:-900}
NSPAWN=(systemd-nspawn --quiet --register=no --keep-unit -D "$TREE" --volatile=overlay)

say() { echo "test-systemd: $*" >&2; }
now() { date +%s; }

if [ "$(id -u)" != 0 ]; then
    say "needs root (debootstrap, systemd-nspawn); run it as root"
    exit 2
fi
mkdir -p "$VAR"

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    say "installing ${need[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

stamp="$SUITE $PKGS"
if [ "$(cat "$TREE/.alertd-tree" 2>/dev/null)" != "$stamp" ]; then
    say "debootstrap $SUITE into $TREE (cached for later runs)"
    rm -rf "$TREE" "$TREE.tmp"
    t=$(now)
    if ! debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$TREE.tmp" "$MIRROR" \
            >"$VAR/debootstrap.log" 2>&1; then
        tail -20 "$VAR/debootstrap.log" >&2
        say "debootstrap failed (log: $VAR/debootstrap.log)"
        exit 1
    fi
    echo "$stamp" >"$TREE.tmp/.alertd-tree"
    mv "$TREE.tmp" "$TREE"
    say "debootstrap took $(($(now) - t)) s"
fi

# Can this machine run a container at all? Only then is a failure below alertd's.
if ! probe=$("${NSPAWN[@]}" --private-network /bin/true 2>&1); then
    cat >&2 <<EOF
test-systemd: ##############################################################
test-systemd: SKIPPED: this machine cannot run a systemd-nspawn container:
$(sed 's/^/test-systemd:   /' <<<"$probe")
test-systemd: ##############################################################
EOF
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
fi

# Wheels for the runtime pins (and setuptools to build alertd itself), built by the tree's
# own python3 on the host network so that they match the interpreter they install into.
# pip in there trusts the host's CA bundle (a host may reach PyPI through its own CA).
CA=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
sed '/^# tests/,$d' requirements.txt >"$VAR/requirements-run.txt"
want="$(sha256sum "$VAR/requirements-run.txt" | cut -c1-16)"
if [ "$(cat "$WHEELS/.alertd-wheels" 2>/dev/null)" != "$want" ]; then
    say "building the wheelhouse $WHEELS (cached for later runs)"
    t=$(now)
    rm -rf "$WHEELS" "$WHEELS.tmp"
    mkdir -p "$WHEELS.tmp"
    cp "$VAR/requirements-run.txt" "$WHEELS.tmp/"
    if ! "${NSPAWN[@]}" --bind="$WHEELS.tmp:/wheels" --bind-ro="$CA:/run/host-ca.crt" \
            --setenv=PIP_CERT=/run/host-ca.crt --setenv=PIP_DEFAULT_TIMEOUT=60 /bin/sh -c \
            'python3 -m venv /tmp/v && /tmp/v/bin/pip install --quiet wheel && /tmp/v/bin/pip wheel --quiet --wheel-dir /wheels \
             -r /wheels/requirements-run.txt "setuptools>=61" wheel' >"$VAR/wheels.log" 2>&1; then
        tail -20 "$VAR/wheels.log" >&2
        say "building the wheelhouse failed (log: $VAR/wheels.log)"
        exit 1
    fi
    echo "$want" >"$WHEELS.tmp/.alertd-wheels"
    mv "$WHEELS.tmp" "$WHEELS"
    say "the wheelhouse took $(($(now) - t)) s"
fi

rm -rf "$OUT"
mkdir -p "$OUT"
say "booting the container (console: $VAR/console.log)"
t=$(now)
rc=0
timeout --kill-after=30 "$BOOT_TIMEOUT" "${NSPAWN[@]}" --private-network \
    --bind-ro="$ROOT:/src" --bind-ro="$WHEELS:/wheels" --bind="$OUT:/out" \
    --bind-ro="$ROOT/tests/systemd/alertd-boottest.service:/etc/systemd/system/alertd-boottest.service" \
    --boot -- systemd.wants=alertd-boottest.service >"$VAR/console.log" 2>&1 || rc=$?
took=$(($(now) - t))

passed=0
failed=0
if [ -f "$OUT/results" ]; then
    while IFS= read -r line; do
        case $line in
            PASS*) echo "$line"; passed=$((passed + 1)) ;;
            FAIL*) echo "$line"; failed=$((failed + 1)) ;;
        esac
    done <"$OUT/results"
fi
if ! grep -qx END "$OUT/results" 2>/dev/null; then
    echo "FAIL boot: the checks did not run to the end (nspawn exit $rc after $took s;" \
        "console: $VAR/console.log)"
    tail -15 "$VAR/console.log" | sed 's/^/  console: /'
    failed=$((failed + 1))
fi
[ -f "$OUT/timings" ] && sed 's/^/test-systemd: time: /' "$OUT/timings" >&2
say "boot and checks took $took s (journal of the boot: $OUT/journal.txt)"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
