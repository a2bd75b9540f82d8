"""Field paths of JSON-like objects, as server-side apply tracks ownership.

A path is a tuple of map keys. Lists are atomic: a list is one leaf, owned whole.
"""

from __future__ import annotations

import copy
from typing import Any

Path = tuple[str, ...]

# Identity and server-maintained fields are never owned by a manager.
_UNOWNED_METADATA = {
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
}


def leaf_paths(obj: dict[str, Any]) -> set[Path]:
    """Every leaf path a manager would own by sending `obj` (an applied configuration)."""
    out: set[Path] = set()

    def walk(node: Any, prefix: Path) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, (*prefix, key))
        else:
            out.add(prefix)

    for key, value in obj.items():
        if key in ("apiVersion", "kind", "status"):
            continue
        if key == "metadata" and isinstance(value, dict):
            for mkey, mvalue in value.items():
                if mkey not in _UNOWNED_METADATA:
                    walk(mvalue, ("metadata", mkey))
            continue
        walk(value, (key,))
    return out


_MISSING = object()


def get_path(obj: Any, path: Path) -> Any:
    node = obj
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def has_path(obj: Any, path: Path) -> bool:
    return get_path(obj, path) is not _MISSING


def delete_path(obj: dict[str, Any], path: Path) -> None:
    """Remove a leaf and any maps left empty above it."""
    parents: list[tuple[dict[str, Any], str]] = []
    node: Any = obj
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        parents.append((node, key))
        node = node[key]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    for parent, key in reversed(parents):
        if parent[key] == {}:
            del parent[key]
        else:
            break


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge maps; lists and scalars in `overlay` replace those in `base`."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def changed_paths(old: dict[str, Any], new: dict[str, Any]) -> set[Path]:
    """Leaf paths of `new` whose value differs from `old` (added or changed)."""
    return {p for p in leaf_paths(new) if get_path(old, p) != get_path(new, p)}


def to_fields_v1(paths: set[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in sorted(paths):
        node = root
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return root


def from_fields_v1(tree: dict[str, Any]) -> set[Path]:
    out: set[Path] = set()

    def walk(node: dict[str, Any], prefix: Path) -> None:
        children = {k: v for k, v in node.items() if k.startswith("f:")}
        if not children:
            if prefix:
                out.add(prefix)
            return
        for key, child in children.items():
            walk(child if isinstance(child, dict) else {}, (*prefix, key[2:]))

    walk(tree, ())
    return out


def dotted(path: Path) -> str:
    return "." + ".".join(path)
