"""A command's answer as a document, for `-o json|yaml` (`status`, `version`, `validate`,
`images`): keys sorted, so scripts and diffs see a stable shape."""

from __future__ import annotations

import json
from typing import Any

import yaml

FORMATS = ("text", "json", "yaml")


def document(value: dict[str, Any], fmt: str, stream: bool = False) -> str:
    """`value` as JSON or YAML. `stream`: one of a series of answers (`status --watch`), so
    JSON on one line, and YAML as a document that starts with `---`."""
    if fmt == "json":
        return json.dumps(value, sort_keys=True, indent=None if stream else 2)
    text = yaml.safe_dump(value, sort_keys=True, default_flow_style=False, allow_unicode=True)
    return f"---\n{text}".rstrip("\n") if stream else text.rstrip("\n")
