"""The operations dashboard served at ``/dashboard`` (docs/dashboard.md)."""

from keyshift.api.dashboard.pages import install

__all__ = ["install"]
