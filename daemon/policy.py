"""The delivery policy: what one attempt's answer means for its alert and for everyone.

Leaf module shared by the workers and `alertd dlq replay`; pure functions, no I/O.
Callers only schedule what a Decision says (send again after `delay`, pause all
senders for `pause`, tell the breaker, record the outcome).
"""
from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from .config import RetryConfig

DEFAULT_429_PAUSE = 1.0  # seconds, for a 429 without a usable Retry-After


class Action(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # send again after Decision.delay
    DEAD = "dead"  # give up: dead-letter with Decision.error
    HOLD = "hold"  # the endpoint is down: wait for the breaker's next probe


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    error: str | None = None  # the alert's last error, as the DLQ shows it
    delay: float = 0.0  # RETRY: seconds before this alert's next attempt (<= max_delay)
    pause: float = 0.0  # seconds no sender may start a request (<= max_delay)
    spend: bool = True  # the attempt counts toward retry.max_attempts
    failure: bool = False  # a sign the endpoint is down: the breaker counts it
    gone: bool = False  # 410: open the breaker
    throttle: bool = False  # 429: the adaptive rate cuts


DELIVERED = Decision(Action.DELIVERED)


def retryable(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


def retry_after_seconds(value: bytes | None) -> float | None:
    """Retry-After as ASCII delay-seconds or an HTTP date; None when absent or unreadable.

    bytes.isdigit() is ASCII-only: '²' or Arabic-Indic digits are not a number here.
    """
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text) if len(text) <= 12 else float("inf")  # callers cap it
    try:
        when = parsedate_to_datetime(text.decode("latin-1"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        return max(0.0, when.timestamp() - time.time())
    except (OverflowError, OSError, ValueError):
        return None


def backoff(attempts: int, retry: RetryConfig, rand: Callable[[], float] = random.random) -> float:
    """Full jitter (AWS): a random delay up to base * 2^(attempts-1), capped at max_delay.
    It spreads the retries of many rows instead of synchronising them."""
    ceiling = min(retry.max_delay, retry.base_delay * 2 ** min(64, max(0, attempts - 1)))
    return ceiling * rand()


def decide(status: int, attempts: int, retry: RetryConfig, retry_after: bytes | None = None,
           error: str | None = None, rand: Callable[[], float] = random.random) -> Decision:
    """What one attempt's result means.

    status: the HTTP status, or 0 when the request failed below HTTP (`error` says how).
    attempts: the alert's attempts that counted, this one included.
    """
    if 200 <= status < 300:
        return DELIVERED
    cap = retry.max_delay
    if status == 429:
        # The receiver's rate limit, not a bad message: everyone waits as told (capped),
        # and the alert spends no attempt (retry.max_age still bounds it).
        after = retry_after_seconds(retry_after)
        pause = min(cap, DEFAULT_429_PAUSE if after is None else after)
        delay = min(cap, max(pause, backoff(attempts - 1, retry, rand)))
        return Decision(Action.RETRY, "HTTP 429", delay=delay, pause=pause, spend=False,
                        throttle=True)
    if status == 410:
        return Decision(Action.DEAD, "HTTP 410 Gone (permanent; breaker opened)", gone=True)
    if status and not retryable(status):
        return Decision(Action.DEAD, f"HTTP {status} (permanent)")
    err = f"HTTP {status}" if status else (error or "request failed")
    pause = 0.0
    if status:
        after = retry_after_seconds(retry_after)
        pause = 0.0 if after is None else min(cap, after)
    if attempts >= retry.max_attempts:
        return Decision(Action.DEAD, err, pause=pause, failure=True)
    delay = min(cap, max(pause, backoff(attempts, retry, rand)))
    return Decision(Action.RETRY, err, delay=delay, pause=pause, failure=True)


def while_down(d: Decision) -> Decision:
    """A failure while the endpoint is down (a failed probe, or the breaker is open):
    it says nothing about this alert, so it spends no attempt and waits for a probe."""
    return Decision(Action.HOLD, d.error, spend=False, failure=True)


def internal_error(exc: BaseException, attempts: int, retry: RetryConfig,
                   rand: Callable[[], float] = random.random) -> Decision:
    """A bug in alertd while handling an attempt: retried like a failure, never silent."""
    err = f"internal error: {type(exc).__name__}: {exc}"[:500]
    if attempts >= retry.max_attempts:
        return Decision(Action.DEAD, err)
    return Decision(Action.RETRY, err, delay=min(retry.max_delay, backoff(attempts, retry, rand)))
