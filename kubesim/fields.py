"""Field paths of JSON-like objects, as server-side apply tracks ownership and merges.

A path is a tuple of map keys and list items. As in sigs.k8s.io/structured-merge-diff (which
kube-apiserver's field manager uses), a list's schema decides how it is owned and merged
(typed/merge.go, mergingWalker.visitListItems; fieldpath/pathelement.go):
`x-kubernetes-list-type: map` lists are keyed by their `x-kubernetes-list-map-keys` (an item
is the element `k:{"name":"x"}`; a key field missing from an item takes its schema default,
as for a container port's protocol), `set` lists by value (`v:"a"`), and any other list
(`atomic`, or no schema) is one leaf, owned and replaced whole. A map marked
`x-kubernetes-map-type: atomic` is one leaf too. `schema` None means an object the simulator
has no schema for: its maps are granular, its lists atomic.

Besides leaves and list items, a manager may own a map or list itself, written `".": {}`
beside its fields in fieldsV1 (fieldpath/serialize.go). An applier owns the value of a key
that is not a field of a struct (a key of a map, or of an object under a CRD's
x-kubernetes-preserve-unknown-fields: typed/tofieldset.go, visitMapItems); an updater owns
each map or list its write added, the fields of a new list item too (typed/compare.go: the
Added set holds every node the write created, compared with the live object or, for a
create, with the Go type's zero value).
"""

from __future__ import annotations

import copy
import json
from typing import Any

Schema = dict[str, Any] | None


class Item(str):
    """A path element naming a list item, `k:{...}` or `v:...`, as fieldsV1 spells it."""


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


# What lies under a CRD schema's x-kubernetes-preserve-unknown-fields, past its properties: in
# structured-merge-diff a deduced type, whose maps are maps (their keys are no fields) and whose
# lists are atomic. kubesim's own schemas of built-in structs mark themselves
# `x-kubesim-struct`: what they leave out are still fields.
UNTYPED: dict[str, Any] = {"x-kubesim-untyped": True}


def child(schema: Schema, key: str) -> Schema:
    if not schema:
        return None
    if schema.get("x-kubesim-untyped"):
        return schema
    props = schema.get("properties", {})
    if key in props:
        known: Schema = props[key]
        return known or None
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        return extra
    if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("x-kubesim-struct"):
        return UNTYPED
    return None


def _declared(schema: Schema, key: str) -> bool:
    """Whether `key` is a field of a struct (else a key of a map)."""
    if not schema:
        return True
    if schema.get("x-kubesim-untyped"):
        return False
    if key in schema.get("properties", {}):
        return True
    if isinstance(schema.get("additionalProperties"), dict):
        return False
    return not schema.get("x-kubernetes-preserve-unknown-fields") or bool(
        schema.get("x-kubesim-struct")
    )


def _list_type(schema: Schema) -> str:
    return (schema or {}).get("x-kubernetes-list-type", "atomic")


def _atomic_map(schema: Schema) -> bool:
    return (schema or {}).get("x-kubernetes-map-type") == "atomic"


def _items(schema: Schema) -> Schema:
    items = (schema or {}).get("items")
    return items if isinstance(items, dict) else None


def item_element(schema: Schema, item: Any) -> Item:
    """The path element of `item` in a list with `schema` (a map or set list)."""
    if _list_type(schema) == "set" or not isinstance(item, dict):
        return Item("v:" + json.dumps(item, sort_keys=True, separators=(",", ":")))
    item_schema = _items(schema)
    key = {}
    for name in (schema or {}).get("x-kubernetes-list-map-keys", []):
        value = item.get(name, (child(item_schema, name) or {}).get("default"))
        if value is not None:
            key[name] = value
    return Item("k:" + json.dumps(key, sort_keys=True, separators=(",", ":")))


def _walk(obj: dict[str, Any], schema: Schema, status: bool) -> list[tuple[str, Path]]:
    """Every path of `obj` that ownership can name, each as ("leaf", path), ("item", path),
    ("node", path) for a map or list with children under a struct field, or ("key", path) for
    one under a map key."""
    out: list[tuple[str, Path]] = []

    def walk(node: Any, node_schema: Schema, prefix: Path, declared: bool) -> None:
        if isinstance(node, dict) and node and not _atomic_map(node_schema):
            out.append(("node" if declared else "key", prefix))
            for key, value in node.items():
                walk(value, child(node_schema, key), (*prefix, key), _declared(node_schema, key))
        elif isinstance(node, list) and node and _list_type(node_schema) in ("map", "set"):
            out.append(("node" if declared else "key", prefix))
            item_schema = _items(node_schema)
            for item in node:
                element = item_element(node_schema, item)
                out.append(("item", (*prefix, element)))
                if isinstance(item, dict) and _list_type(node_schema) == "map":
                    for key, value in item.items():
                        walk(
                            value,
                            child(item_schema, key),
                            (*prefix, element, key),
                            _declared(item_schema, key),
                        )
        else:
            out.append(("leaf", prefix))

    for key, value in obj.items():
        if key in ("apiVersion", "kind") or (key == "status") != status:
            continue
        if key == "metadata" and isinstance(value, dict):
            meta_schema = child(schema, "metadata")
            for mkey, mvalue in value.items():
                if mkey not in _UNOWNED_METADATA:
                    walk(
                        mvalue,
                        child(meta_schema, mkey),
                        ("metadata", mkey),
                        _declared(meta_schema, mkey),
                    )
            continue
        walk(value, child(schema, key), (key,), _declared(schema, key))
    return out


def leaf_paths(obj: dict[str, Any], schema: Schema = None, status: bool = False) -> set[Path]:
    """Every path a manager would own by applying `obj` (an applied configuration): its
    leaves, list items and the values of map keys that have children; with `status`, those of
    its status only."""
    return {path for what, path in _walk(obj, schema, status) if what != "node"}


def node_paths(obj: dict[str, Any], schema: Schema = None, status: bool = False) -> set[Path]:
    """The maps and lists of `obj` that have children."""
    return {path for what, path in _walk(obj, schema, status) if what in ("node", "key")}


MISSING = object()


def _step(node: Any, node_schema: Schema, key: str) -> tuple[Any, Schema]:
    if isinstance(key, Item):
        if isinstance(node, list):
            for item in node:
                if item_element(node_schema, item) == key:
                    return item, _items(node_schema)
        return MISSING, None
    if isinstance(node, dict) and key in node:
        return node[key], child(node_schema, key)
    return MISSING, None


def get_path(obj: Any, path: Path, schema: Schema = None) -> Any:
    node, node_schema = obj, schema
    for key in path:
        node, node_schema = _step(node, node_schema, key)
        if node is MISSING:
            break
    return node


def has_path(obj: Any, path: Path, schema: Schema = None) -> bool:
    return get_path(obj, path, schema) is not MISSING


def delete_path(obj: dict[str, Any], path: Path, schema: Schema = None) -> None:
    """Remove a leaf (or a list item) and any maps or lists left empty above it."""
    parents: list[tuple[Any, str, Schema]] = []
    node: Any = obj
    node_schema = schema
    for key in path[:-1]:
        parents.append((node, key, node_schema))
        node, node_schema = _step(node, node_schema, key)
        if node is MISSING:
            return
    last = path[-1]
    if isinstance(last, Item) and isinstance(node, list):
        node[:] = [item for item in node if item_element(node_schema, item) != last]
    elif isinstance(node, dict):
        node.pop(last, None)
    for parent, key, _ in reversed(parents):
        if isinstance(key, Item) or not isinstance(parent, dict):
            break
        if parent.get(key) in ({}, []):
            del parent[key]
        else:
            break


def merge(base: Any, overlay: Any, schema: Schema = None) -> Any:
    """`overlay` merged into `base`: maps deep-merged, map and set lists merged by item, other
    lists and scalars replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict) and overlay:
        if _atomic_map(schema):
            return copy.deepcopy(overlay)
        out = copy.deepcopy(base)
        for key, value in overlay.items():
            out[key] = merge(out.get(key), value, child(schema, key))
        return out
    if isinstance(base, list) and isinstance(overlay, list) and _list_type(schema) != "atomic":
        return _merge_items(base, overlay, schema)
    return copy.deepcopy(overlay)


def _merge_items(base: list[Any], overlay: list[Any], schema: Schema) -> list[Any]:
    """Items of both, the shared ones merged, in an order that keeps the overlay's order of
    shared items and each base-only item where it was (structured-merge-diff
    typed/merge.go, mergingWalker.visitListItems)."""
    item_schema = _items(schema)
    left = [(item_element(schema, item), item) for item in base]
    right = [(item_element(schema, item), item) for item in overlay]
    left_items, right_items = dict(left), dict(right)
    shared = [key for key, _ in right if key in left_items]
    out: list[Any] = []
    merged: set[str] = set()

    def merge_item(key: Item) -> Any:
        merged.add(key)
        if key in left_items and _list_type(schema) == "map":
            return merge(left_items[key], right_items[key], item_schema)
        return copy.deepcopy(right_items[key])

    li = ri = 0
    while li < len(left) or ri < len(right):
        if li < len(left) and ri < len(right):
            lkey = left[li][0]
            if lkey == right[ri][0]:
                out.append(merge_item(lkey))
                li, ri = li + 1, ri + 1
                if shared and shared[0] == lkey:
                    shared.pop(0)
                continue
            if lkey in right_items and shared and shared[0] != lkey:
                li += 1
                continue
        if li < len(left):
            lkey, litem = left[li]
            if lkey not in right_items:
                out.append(copy.deepcopy(litem))
                li += 1
                continue
            if lkey in merged:
                li += 1
                continue
        if ri < len(right):
            rkey = right[ri][0]
            out.append(merge_item(rkey))
            ri += 1
            if shared and shared[0] == rkey:
                shared.pop(0)
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


def changed_paths(
    old: dict[str, Any], new: dict[str, Any], schema: Schema = None, status: bool = False
) -> set[Path]:
    """Paths of `new` whose value differs from `old` (added or changed); a list item counts
    as changed only when it is new, its fields count for themselves. With `status`, those of
    the status only (a write to the status subresource)."""
    out = set()
    for what, path in _walk(new, schema, status):
        if what in ("item", "node", "key"):
            # Only a new one: a map or item that was there already is not changed itself.
            if not has_path(old, path, schema):
                out.add(path)
        elif get_path(old, path, schema) != get_path(new, path, schema):
            out.add(path)
    return out


def to_fields_v1(paths: set[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    members = []
    for path in sorted(paths):
        node = root
        for key in path:
            node = node.setdefault(key if isinstance(key, Item) else f"f:{key}", {})
        members.append(node)
    for node in members:
        if node:
            # A member that has children of its own is marked with "." (structured-merge-diff
            # fieldpath/serialize.go, serializePathElements: the set's members).
            node["."] = {}
    return root


def from_fields_v1(tree: dict[str, Any]) -> set[Path]:
    out: set[Path] = set()

    def walk(node: dict[str, Any], prefix: Path) -> None:
        if "." in node:
            out.add(prefix)
        children = {k: v for k, v in node.items() if k[:2] in ("f:", "k:", "v:")}
        if not children:
            if prefix and "." not in node:
                out.add(prefix)
            return
        for key, value in children.items():
            element = key[2:] if key.startswith("f:") else Item(key)
            walk(value if isinstance(value, dict) else {}, (*prefix, element))

    walk(tree, ())
    return out


def dotted(path: Path) -> str:
    """A path as kube-apiserver's conflict messages write it: `.spec.containers[name="a"].image`
    (structured-merge-diff fieldpath/element.go, PathElement.String)."""
    out = ""
    for key in path:
        if isinstance(key, Item) and key.startswith("k:"):
            fields = json.loads(key[2:])
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in fields.items()) + "]"
        elif isinstance(key, Item):
            out += f"[={key[2:]}]"
        else:
            out += "." + key
    return out
