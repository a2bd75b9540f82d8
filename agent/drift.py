"""Does a live object already hold what the agent would apply?"""

from __future__ import annotations

from typing import Any

# Fields the server owns; never compared.
_IGNORED_METADATA = {"resourceVersion", "generation", "uid", "creationTimestamp", "managedFields"}


def differences(desired: Any, live: Any, path: str = "") -> list[str]:
    """Paths where `live` lacks or differs from a field of `desired`. Fields the server adds
    (defaults, status) are not differences; list items are compared position by position."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return [path or "."]
        out: list[str] = []
        for key, value in desired.items():
            if (path == ".metadata" and key in _IGNORED_METADATA) or (not path and key == "status"):
                continue
            out += differences(value, live.get(key), f"{path}.{key}")
        return out
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return [path]
        out = []
        for index, (want, have) in enumerate(zip(desired, live, strict=True)):
            out += differences(want, have, f"{path}[{index}]")
        return out
    return [] if desired == live else [path]
