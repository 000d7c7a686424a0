"""omni-runtime: serve Omni engines on one node."""

from __future__ import annotations

from omni_sdk import __version__

__all__ = ["__version__"]
