"""Retry policy: which answers are retried, Retry-After, backoff bounds."""
from __future__ import annotations

import time
from email.utils import formatdate

from alertd.config import RetryConfig
from alertd.policy import backoff, retry_after_seconds, retryable


def test_retryable_statuses():
    assert all(retryable(s) for s in (408, 425, 429, 500, 502, 503, 504))
    assert not any(retryable(s) for s in (400, 401, 403, 404, 410, 422))


def test_retry_after_in_seconds_and_as_http_date():
    assert retry_after_seconds(b"7") == 7.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds(b"soon") is None
    later = retry_after_seconds(formatdate(time.time() + 30, usegmt=True).encode())
    assert 28 <= later <= 31
    assert retry_after_seconds(formatdate(time.time() - 30, usegmt=True).encode()) == 0.0


def test_backoff_is_full_jitter_capped_at_max_delay():
    r = RetryConfig(base_delay=0.5, max_delay=4.0)
    for attempts, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 4.0)):
        delays = [backoff(attempts, r) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the range, not a fixed value
