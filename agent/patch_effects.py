"""Did the root Kustomization's patches take effect? Kustomize, and so Flux, silently ignores
a targeted patch that selects nothing: if upstream renames what a patch targets, the site's
values are dropped without an error. So after Flux applied the root, the agent looks at the
objects themselves: each target exists and carries its patch; a patch the root adds to a
child Kustomization is checked the same way on the objects that child applies, once the
child has applied the current revision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from agent.apply import parallel, unmet_fields
from agent.health import condition, observed_current
from agent.kube import Kube

Obj = dict[str, Any]
OK, PENDING, FAILED = "ok", "pending", "failed"
# The API version the agent reads each patchable kind with.
API_VERSIONS = {
    ("", "ConfigMap"): "v1",
    ("kustomize.toolkit.fluxcd.io", "Kustomization"): "kustomize.toolkit.fluxcd.io/v1",
    ("helm.toolkit.fluxcd.io", "HelmRelease"): "helm.toolkit.fluxcd.io/v2",
}


@dataclass(frozen=True)
class Effect:
    kind: str
    namespace: str
    name: str
    state: str  # OK, PENDING or FAILED
    message: str


class _Objects:
    """Objects read a list per kind and namespace (a few requests, not one per target)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.lists: dict[tuple[str, str, str], dict[str, Obj]] = {}

    def fetch(self, groups: set[tuple[str, str, str]]) -> None:
        todo = sorted(groups - self.lists.keys())
        for group, items in zip(todo, parallel(lambda g: self.kube.list(*g), todo), strict=True):
            self.lists[group] = {o["metadata"]["name"]: o for o in items}

    def get(self, api_version: str, kind: str, name: str, namespace: str) -> Obj | None:
        self.fetch({(api_version, kind, namespace)})
        return self.lists[(api_version, kind, namespace)].get(name)


def target_of(patch: Obj) -> tuple[str, str, str, str] | None:
    """(apiVersion, kind, namespace, name) of a patch's single, named target."""
    target = patch.get("target") or {}
    api_version = API_VERSIONS.get((target.get("group", ""), target.get("kind", "")))
    if api_version is None or not target.get("name"):
        return None
    return api_version, target["kind"], target.get("namespace", ""), target["name"]


def _group(patch: Obj) -> tuple[str, str, str] | None:
    found = target_of(patch)
    return found[:3] if found else None


def check(kube: Kube, patches: list[Obj], ref: str, revision: str) -> list[Effect]:
    """The effect of each of the root's `patches`, once Flux applied the root at the source
    `revision`; `ref` names it in messages."""
    objects = _Objects(kube)
    objects.fetch({g for g in map(_group, patches) if g is not None})
    return [e for patch in patches for e in _check(objects, patch, ref, revision, applied=True)]


def _check(objects: _Objects, patch: Obj, ref: str, revision: str, applied: bool) -> list[Effect]:
    """`applied`: the Kustomization carrying this patch has built and applied the current
    revision with it, so a missing target was renamed or removed upstream."""
    group = _group(patch)
    if group is None:
        return []  # not a target the agent can look up; nothing to check
    api_version, kind, namespace = group
    name = patch["target"]["name"]
    obj = objects.get(api_version, kind, name, namespace)
    if obj is None:
        if not applied:
            return [Effect(kind, namespace, name, PENDING, "not applied yet")]
        return [
            Effect(
                kind,
                namespace,
                name,
                FAILED,
                f"missing at {ref}: upstream renamed or removed it, and Flux ignores a patch "
                "that selects nothing, so the site's patch is dropped; pin sync.ref back to a "
                "revision that has it, or use an agent that knows the new name",
            )
        ]
    body = yaml.safe_load(patch["patch"])
    missing = _missing(obj, body)
    if missing:
        state = FAILED if applied else PENDING
        return [Effect(kind, namespace, name, state, f"does not carry its patch ({missing})")]
    effects = [Effect(kind, namespace, name, OK, "carries its patch")]
    if kind == "Kustomization" and isinstance(body, list):
        child_applied = applied_at(obj, revision)
        if isinstance(child_applied, str):
            return [*effects, Effect(kind, namespace, name, FAILED, child_applied)]
        for op in body:
            if op.get("op") == "add" and op["path"].startswith("/spec/patches"):
                inner = op["value"] if isinstance(op["value"], list) else [op["value"]]
                for child_patch in inner:
                    effects += _check(objects, child_patch, ref, revision, child_applied)
    return effects


def applied_at(ks: Obj, revision: str) -> bool | str:
    """True once the Kustomization applied its current spec at `revision`; the message when
    Flux could not build it."""
    ready = condition(ks, "Ready") or {}
    if not observed_current(ks):
        return False
    if ready.get("reason") == "BuildFailed":
        return f"Flux cannot build it: {ready.get('message', '')}"
    return bool(ks.get("status", {}).get("lastAttemptedRevision") == revision)


def _missing(obj: Obj, body: Any) -> str:
    """What of the patch `obj` lacks: a field path, or '' when it carries all of it."""
    if isinstance(body, dict):  # strategic merge: the fields it sets
        fields = {k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")}
        drifted = unmet_fields(fields, obj)
        return ", ".join(drifted)
    appended: dict[str, list[Any]] = {}
    for op in body:
        if op.get("op") != "add":
            continue
        path = op["path"]
        if path.endswith("/-"):
            appended.setdefault(path[:-2], []).append(op["value"])
        elif unmet_fields(op["value"], _at(obj, path)):
            return f"{path} differs"
    # Compared as `unmet_fields` does: fields the server defaults are not differences.
    for path, values in appended.items():  # appended: last, in order (later entries win)
        node = _at(obj, path)
        tail = node[-len(values) :] if isinstance(node, list) else []
        if len(tail) != len(values) or any(
            unmet_fields(v, t) for v, t in zip(values, tail, strict=True)
        ):
            return f"{path} does not end with the agent's entries"
    return ""


def _at(obj: Obj, path: str) -> Any:
    node: Any = obj
    for key in path.split("/")[1:]:
        node = node.get(key) if isinstance(node, dict) else None
    return node
