"""Exceptions shared by every part of alertd, and the CLI's exit codes.

Leaf module: imports nothing from the package.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and found a problem (e.g. verify found gaps)
EXIT_CONFIG = 2  # bad command line or configuration: nothing was started
EXIT_UNAVAILABLE = 3  # the daemon could not be reached


class AlertdError(Exception):
    """Base class for errors alertd reports to an operator."""


class ConfigError(AlertdError):
    """The configuration is invalid; the message names the key."""


class InputError(AlertdError):
    """A file cannot be processed at all (no ID column, binary, unreadable)."""
