"""Mock Standard Webhooks receiver used by the end-to-end tests and benchmarks.

`python -m mock_webhook` runs it as a process; `make_app(Settings(...))` embeds it.
"""

from __future__ import annotations

from .server import MODES, Receiver, Settings, make_app

__all__ = ["MODES", "Receiver", "Settings", "make_app"]
