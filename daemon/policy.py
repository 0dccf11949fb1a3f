"""What an HTTP answer means for a retry: retryable statuses, Retry-After, backoff.

Leaf module shared by the workers and `alertd dlq replay`; pure functions.
"""
from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

from .config import RetryConfig


def retryable(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


def retry_after_seconds(value: bytes | None) -> float | None:
    """Retry-After as seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff(attempts: int, retry: RetryConfig) -> float:
    """Full jitter (AWS): a random delay up to base * 2^(attempts-1), capped at max_delay.
    It spreads the retries of many rows instead of synchronising them."""
    return random.uniform(0, min(retry.max_delay, retry.base_delay * 2 ** max(0, attempts - 1)))
