"""Appliance sections of the config (only `alga` for now) expanded into general settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def expand(data: dict[str, Any], source: str, base_dir: Path) -> dict[str, Any]:
    """Return `data` with any appliance section turned into `site` and `sync` settings."""
    if "alga" not in data:
        return data
    from agent.presets import alga

    expanded: dict[str, Any] = alga.expand(data, source, base_dir)
    return expanded
