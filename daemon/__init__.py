"""alertd: a folder-to-webhook delivery daemon."""

__version__ = "0.1.0"
