"""The YAML and JSON patches the agent writes for Flux, and how they add to upstream's.

Helm and Flux read YAML with Go, which takes a plain `1e5`, `12345e67`, `0x1F`, `010` or
`1_000` for a number where PyYAML reads a string: so every string is written quoted.

A patch that sets a list upstream may also set (a child Kustomization's `spec.patches`, a
HelmRelease's `spec.postRenderers`) is guarded: a JSON patch `test` that the path is null,
then the `add`. Kustomize's JSON patch (evanphx/json-patch) passes that test on a missing
key and fails it, and with it Flux's whole build, when upstream sets the list: the agent's
entries never replace upstream's silently. When the live object already shows entries of
upstream's (or anyone else's) next to the agent's, the add becomes an append (`/-`), which
keeps theirs. Both behaviours were checked with `kubectl kustomize` (kustomize v5.5.0).
"""

from __future__ import annotations

from typing import Any

import yaml

Obj = dict[str, Any]
# The first line of every patch the agent puts in a list it shares with upstream.
MARK = "# alga-bootstrap\n"


class _GoSafeDumper(yaml.SafeDumper):
    """Every string quoted, or a literal block when it spans lines."""


def _quoted(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, "|" if "\n" in value else '"')


_GoSafeDumper.add_representer(str, _quoted)


def go_safe_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_GoSafeDumper, sort_keys=False)


def guarded_add(path: str, value: list[Any]) -> list[Obj]:
    test = {"op": "test", "path": path, "value": None}
    return [test, {"op": "add", "path": path, "value": value}]


def _guarded(text: str) -> tuple[str, list[Any]] | None:
    """(path, entries) when `text` is a guarded add."""
    ops = yaml.safe_load(text)
    if (
        isinstance(ops, list)
        and len(ops) == 2
        and ops[0] == {"op": "test", "path": ops[1].get("path"), "value": None}
        and ops[1].get("op") == "add"
        and isinstance(ops[1].get("value"), list)
    ):
        return ops[1]["path"], ops[1]["value"]
    return None


def guarded_path(patch: Obj) -> str | None:
    found = _guarded(patch["patch"])
    return found[0] if found else None


def has_foreign_entries(live: Obj, patch: Obj) -> bool:
    """Does the list a guarded `patch` adds to already hold, in the live object, entries the
    agent did not write? The agent's: a patch starting with MARK, or an `images` entry for
    an image the patch pins (a Kustomization's images have no field a mark could go in)."""
    found = _guarded(patch["patch"])
    assert found is not None
    path, entries = found
    pinned = {e["name"] for e in entries if isinstance(e, dict) and "newTag" in e}
    node: Any = live
    for key in path.split("/")[1:]:
        node = node.get(key) if isinstance(node, dict) else None

    def agents(entry: Any) -> bool:
        return isinstance(entry, dict) and (
            str(entry.get("patch", "")).startswith(MARK) or entry.get("name") in pinned
        )

    return isinstance(node, list) and not all(agents(e) for e in node)


def as_append(patch: Obj) -> Obj:
    """A guarded add rewritten to append each entry after what is there."""
    found = _guarded(patch["patch"])
    assert found is not None
    path, entries = found
    ops = [{"op": "add", "path": f"{path}/-", "value": e} for e in entries]
    return {**patch, "patch": go_safe_yaml(ops)}
