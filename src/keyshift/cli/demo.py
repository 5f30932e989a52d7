"""`keyshift demo`: the main job on the embedded SQLite default (filled in at integration)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add `demo` to the root app."""
