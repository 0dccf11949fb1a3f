"""The delivery policy (policy.decide and friends), branch by branch, without a socket."""
from __future__ import annotations

import time
from email.utils import formatdate

import pytest
from alertd.config import RetryConfig
from alertd.policy import (
    DELIVERED,
    Action,
    Decision,
    backoff,
    decide,
    internal_error,
    retry_after_seconds,
    retryable,
    while_down,
)

R = RetryConfig(max_attempts=3, base_delay=0.5, max_delay=4.0)
HALF = lambda: 0.5  # noqa: E731 -- deterministic jitter: half the ceiling


def test_retryable_statuses():
    assert all(retryable(s) for s in (408, 425, 429, 500, 502, 503, 504))
    assert not any(retryable(s) for s in (400, 401, 403, 404, 410, 422))


def test_retry_after_in_seconds_and_as_http_date():
    assert retry_after_seconds(b"7") == 7.0
    assert retry_after_seconds(b" 7 ") == 7.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds(b"") is None
    assert retry_after_seconds(b"soon") is None
    later = retry_after_seconds(formatdate(time.time() + 30, usegmt=True).encode())
    assert 28 <= later <= 31
    assert retry_after_seconds(formatdate(time.time() - 30, usegmt=True).encode()) == 0.0


@pytest.mark.parametrize("raw", [
    b"\xb2",  # '\u00b2' (superscript two) in Latin-1: str.isdigit() is True, float() fails
    "\u0663".encode(),  # Arabic-Indic three, as UTF-8 bytes
    b"-5", b"1.5", b"1e3", b"0x10", b"Sun, 99 Foo 2026 99:99:99 GMT", b"\xff\xfe",
    b"Mon, 01 Jan 99999 00:00:00 GMT"])
def test_retry_after_that_is_not_ascii_digits_or_a_date_is_ignored(raw):
    assert retry_after_seconds(raw) is None


def test_an_absurd_retry_after_is_infinite_and_every_caller_caps_it():
    assert retry_after_seconds(b"9" * 5000) == float("inf")
    d = decide(429, 1, R, b"9" * 5000)
    assert d.pause == R.max_delay and d.delay == R.max_delay
    d = decide(503, 1, R, b"100000000")
    assert d.pause == R.max_delay and d.delay == R.max_delay


def test_backoff_is_full_jitter_capped_at_max_delay():
    r = RetryConfig(base_delay=0.5, max_delay=4.0)
    for attempts, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 4.0), (5000, 4.0)):
        delays = [backoff(attempts, r) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the range, not a fixed value


def test_2xx_is_delivered_and_shares_one_decision():
    for status in (200, 201, 204, 299):
        assert decide(status, 1, R) is DELIVERED
    assert DELIVERED.action is Action.DELIVERED


def test_429_pauses_everyone_spends_no_attempt_and_throttles():
    d = decide(429, 3, R, b"2", rand=HALF)  # even at max_attempts
    assert d == Decision(Action.RETRY, "HTTP 429", delay=2.0, pause=2.0, spend=False,
                         throttle=True)
    assert not d.failure  # a rate limit is not an outage
    d = decide(429, 1, R, None, rand=HALF)
    assert (d.pause, d.delay) == (1.0, 1.0)  # no usable Retry-After: a one-second pause
    d = decide(429, 1, R, b"\xb2", rand=HALF)
    assert (d.pause, d.delay) == (1.0, 1.0)
    d = decide(429, 5, R, b"0", rand=lambda: 1.0)
    assert d.pause == 0.0 and d.delay == 4.0  # backoff of the attempts spent before (4)


def test_410_is_dead_and_opens_the_breaker():
    d = decide(410, 1, R)
    assert d.action is Action.DEAD and d.gone and not d.failure
    assert d.error == "HTTP 410 Gone (permanent; breaker opened)"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 301, 304, 100, 499])
def test_other_answers_are_permanent(status):
    d = decide(status, 1, R)
    assert d == Decision(Action.DEAD, f"HTTP {status} (permanent)")


@pytest.mark.parametrize("status", [408, 425, 500, 502, 503, 504, 599, 799])
def test_5xx_and_friends_are_retried_then_dead(status):
    d = decide(status, 1, R, rand=HALF)
    assert d == Decision(Action.RETRY, f"HTTP {status}", delay=0.25, failure=True)
    d = decide(status, 2, R, rand=HALF)
    assert d.delay == 0.5
    d = decide(status, 3, R, rand=HALF)  # the last attempt
    assert d == Decision(Action.DEAD, f"HTTP {status}", failure=True)


def test_a_retry_after_on_a_5xx_is_honoured_and_capped():
    d = decide(503, 1, R, b"3", rand=HALF)
    assert (d.action, d.pause, d.delay, d.spend) == (Action.RETRY, 3.0, 3.0, True)
    d = decide(503, 3, R, b"3")
    assert (d.action, d.pause) == (Action.DEAD, 3.0)


def test_transport_errors_are_retried_with_their_text():
    d = decide(0, 1, R, None, "connect: 127.0.0.1:9: connection refused", rand=HALF)
    assert d == Decision(Action.RETRY, "connect: 127.0.0.1:9: connection refused", delay=0.25,
                         failure=True)
    assert decide(0, 3, R, None, "timeout: x").action is Action.DEAD
    assert decide(0, 1, R).error == "request failed"


def test_a_failure_while_the_endpoint_is_down_holds_without_an_attempt():
    for d in (decide(500, 3, R), decide(0, 1, R, None, "connect: refused")):
        held = while_down(d)
        assert held == Decision(Action.HOLD, d.error, spend=False, failure=True)


def test_an_internal_error_is_retried_then_dead_with_its_reason():
    e = RuntimeError("boom")
    d = internal_error(e, 1, R, rand=HALF)
    assert d == Decision(Action.RETRY, "internal error: RuntimeError: boom", delay=0.25)
    assert internal_error(e, 3, R).action is Action.DEAD
    assert len(internal_error(RuntimeError("x" * 5000), 3, R).error) <= 500
