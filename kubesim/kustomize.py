"""The part of a kustomize build Flux's kustomize-controller does with a Kustomization's
`spec.patches` and `spec.images`, for the stand-in controller: select targets, apply
strategic-merge and JSON (RFC 6902) patches, set image tags. Only what the appliance's
patches use.

Followed: kubernetes-sigs/kustomize `api/internal/builtins/PatchTransformer.go`
(`Transform`: a patch with a target applies to every resource the selector matches, and to
none, silently, when nothing matches), `api/types/selector.go` (`Selector`: group, version,
kind, name and namespace, names as anchored regular expressions),
`api/filters/patchjson6902/patchjson6902.go` (the JSON patch is applied by
evanphx/json-patch: `add` into a missing parent fails with "doc is missing path", `test`
with a null value passes on a missing key and otherwise fails with "testing value <path>
failed"), kyaml's merge2 for strategic merge on custom resources (maps merge key by
key, lists are replaced, null removes), and the images transformer
(`api/filters/imagetag`, LegacyFilter and updater.go SetImageValue: the `image` of every
container and init container, at any depth of any kind but a CRD, whose image name without
tag or digest equals `name` exactly; `node` does not match `docker.io/library/node`, and
image strings elsewhere, such as in a command, are left alone). The wording and the image
matching were checked against `kubectl kustomize` (kustomize v5.5.0).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

Obj = dict[str, Any]


class BuildError(Exception):
    pass


def selects(target: dict[str, str], obj: Obj) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    meta = obj["metadata"]

    def matches(key: str, value: str) -> bool:
        return key not in target or re.fullmatch(target[key], value) is not None

    return (
        matches("group", group)
        and matches("kind", obj["kind"])
        and matches("name", meta["name"])
        and matches("namespace", meta.get("namespace", ""))
    )


def build(objects: list[Obj], patches: list[Obj], images: list[Obj] | None = None) -> list[Obj]:
    """`objects` with `patches` applied in order, then `images`; BuildError as kustomize
    would fail."""
    out = copy.deepcopy(objects)
    for patch in patches:
        body = yaml.safe_load(patch["patch"])
        target = patch.get("target") or {}
        for i, obj in enumerate(out):
            if not selects(target, obj):
                continue
            if isinstance(body, list):
                out[i] = _json_patch(obj, body)
            else:
                out[i] = _merge(obj, {k: v for k, v in body.items() if k != "metadata"})
    for obj in out:
        if images and obj["kind"] != "CustomResourceDefinition":
            _set_images(obj, images)
    return out


def _set_images(node: Any, images: list[Obj]) -> None:
    """Every `containers` and `initContainers` list at any depth (imagetag's LegacyFilter),
    each container that has an `image`."""
    if isinstance(node, list):
        for item in node:
            _set_images(item, images)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = _set_image(container["image"], images)
            _set_images(value, images)


def _set_image(image: str, images: list[Obj]) -> str:
    """imagetag's SetImageValue: newName replaces the name; newTag with a digest sets both,
    newTag alone drops the digest, a digest alone drops the tag."""
    rest, _, digest = image.partition("@")
    name, tag = rest, ""
    if ":" in rest.rpartition("/")[2]:  # a tag, not a registry's port
        name, _, tag = rest.rpartition(":")
    for pin in images:
        if pin["name"] != name:
            continue
        name = pin.get("newName") or name
        if pin.get("newTag"):
            tag, digest = pin["newTag"], pin.get("digest") or ""
        elif pin.get("digest"):
            tag, digest = "", pin["digest"]
        return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    return image


def _merge(base: Any, patch: Any) -> Any:
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _json_patch(obj: Obj, ops: list[Obj]) -> Obj:
    doc = copy.deepcopy(obj)
    for op in ops:
        path = op["path"]
        *parents, last = _pointer(path)
        node: Any = doc
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if op["op"] == "test":
            have = node.get(last) if isinstance(node, dict) else None
            if have != op.get("value"):
                raise BuildError(f"testing value {path} failed: test failed")
        elif op["op"] == "add":
            if isinstance(node, list) and last == "-":
                node.append(copy.deepcopy(op["value"]))
            elif isinstance(node, dict):
                node[last] = copy.deepcopy(op["value"])
            else:
                raise BuildError(
                    f'add operation does not apply: doc is missing path: "{path}": missing value'
                )
        else:
            raise BuildError(f"unsupported JSON patch operation {op['op']!r} in the simulator")
    return doc
