"""Mock Standard Webhooks receiver used by the end-to-end tests and benchmarks.

`python -m mock_webhook` runs it as a process (the fast engine by default,
`--engine aiohttp` for the aiohttp one); `make_app(Settings(...))` embeds the
aiohttp engine in-process.
"""

from __future__ import annotations

from .core import MODES, Core, Settings
from .server import Receiver, make_app

__all__ = ["MODES", "Core", "Receiver", "Settings", "make_app"]
