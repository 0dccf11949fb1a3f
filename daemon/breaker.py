"""The circuit breaker all workers share: it tells an outage from bad messages.

When most recent attempts fail (connection errors, timeouts, 5xx) or the
endpoint answers 410, it opens: workers stop reading rows and only probes go
out, a few per second in total, until one succeeds. Held-back sends and failed
probes never count toward an alert's attempts. State lives in shm.SharedState.
"""
from __future__ import annotations

import enum
import time

from .shm import Shared

CLOSED, OPEN = 0, 1
REASON_FAILURES, REASON_GONE = 1, 2
REASONS = {0: None, REASON_FAILURES: "most recent attempts failed", REASON_GONE: "410 Gone"}

WINDOW = 1.0  # seconds per window; the decision looks at this one and the one before
MIN_ATTEMPTS = 10  # fewer attempts than this in two windows never open it on the ratio...
FAIL_RATIO = 0.8  # ...at least this share failed opens it
CONSECUTIVE = 20  # or this many failures in a row, however slow the traffic
PROBE_INTERVAL = 0.5  # seconds between probes over all workers: two a second


class Gate(enum.Enum):
    SEND = 0  # closed: send as usual
    PROBE = 1  # open, and this attempt is the probe
    HOLD = 2  # open: do not send, do not count an attempt


class Breaker:
    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._st = shared.state

    @property
    def is_open(self) -> bool:
        return self._st.breaker_state == OPEN

    @property
    def is_closed(self) -> bool:
        """Requests go out without asking admit() (which may spend a probe slot)."""
        return self._st.breaker_state == CLOSED

    def probe_due(self) -> float:
        """time.monotonic() of the next probe slot (meaningful while open)."""
        return self._st.breaker_until

    def admit(self) -> Gate:
        st = self._st
        if st.breaker_state == CLOSED:  # the hot path: no lock
            return Gate.SEND
        with self._shared.lock:
            if st.breaker_state == CLOSED:
                return Gate.SEND
            now = time.monotonic()
            if now < st.breaker_until:
                return Gate.HOLD
            st.breaker_until = now + PROBE_INTERVAL
            st.probes += 1
            return Gate.PROBE

    def record(self, ok: int, failed: int) -> int | None:
        """Results since the last call (a worker batches its successes): `ok` successes,
        `failed` retryable failures of alerts on their first attempt. Returns OPEN or
        CLOSED when this call changed the state (its caller says so in the log), else None."""
        st = self._st
        if not ok and not failed:
            return None
        with self._shared.lock:
            now = time.monotonic()
            if now - st.win_start >= WINDOW:
                recent = now - st.win_start < 2 * WINDOW
                st.prev_ok = st.win_ok if recent else 0
                st.prev_fail = st.win_fail if recent else 0
                st.win_ok = st.win_fail = 0
                st.win_start = now
            st.win_ok += ok
            st.win_fail += failed
            if ok:
                st.consecutive_fail = 0
                if st.breaker_state == OPEN:
                    self._close()
                    return CLOSED
                return None
            st.consecutive_fail += failed
            if st.breaker_state == OPEN:
                return None
            total = st.win_ok + st.win_fail + st.prev_ok + st.prev_fail
            fails = st.win_fail + st.prev_fail
            if (total >= MIN_ATTEMPTS and fails >= FAIL_RATIO * total) or \
                    st.consecutive_fail >= CONSECUTIVE:
                self._open(now, REASON_FAILURES)
                return OPEN
            return None

    def trip(self, reason: int) -> bool:
        """Open at once (410 Gone): the endpoint says it is not there. True if it opened now."""
        with self._shared.lock:
            if self._st.breaker_state != OPEN:
                self._open(time.monotonic(), reason)
                return True
            self._st.breaker_reason = reason
            return False

    def _open(self, now: float, reason: int) -> None:
        st = self._st
        st.breaker_state = OPEN
        st.breaker_reason = reason
        st.breaker_until = now + PROBE_INTERVAL
        st.breaker_opened_at = time.time()
        st.breaker_opens += 1

    def _close(self) -> None:
        st = self._st
        st.breaker_state = CLOSED
        st.breaker_reason = 0
        st.consecutive_fail = 0
        st.win_ok = st.win_fail = st.prev_ok = st.prev_fail = 0

    def describe(self) -> dict:
        st = self._st
        return {"state": "open" if st.breaker_state == OPEN else "closed",
                "reason": REASONS.get(st.breaker_reason),
                "opened_at": st.breaker_opened_at or None, "opens": st.breaker_opens,
                "probes": st.probes}
