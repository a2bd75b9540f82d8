"""Step 4: what the site needs from its first boot and Git cannot hold: namespaces,
prerequisite manifests (storage), generated secrets, create-once ConfigMaps.

Generated secrets and create-once ConfigMaps are created when absent and never
overwritten: a re-run must not rotate a credential or revert a value changed in place.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from agent import desired, log
from agent.apply import Action, Change, ChangeSet, apply_all, parallel
from agent.config import (
    Config,
    CreateOnceConfigMap,
    GeneratedSecret,
    PrerequisiteManifest,
)
from agent.errors import ConfigError
from agent.kube import Kube
from agent.step import StepResult, step

NAME = "seed-site"
_log = log.get(NAME)
Obj = dict[str, Any]
NEVER_OVERWRITTEN = "created once, never overwritten"


@dataclass(frozen=True)
class Inputs:
    kube: Kube
    config: Config
    trust_previous: bool  # the last run succeeded with these inputs: confirm, do not compare


@step(NAME)
def seed(ctx: Inputs) -> StepResult:
    site = ctx.config.site
    if ctx.trust_previous and _present(ctx):
        return StepResult(note="site objects present")
    changes = apply_all(ctx.kube, desired.site_namespaces(ctx.config), _log)
    # With the namespaces there, the rest is independent: do it concurrently.
    tasks: list[Callable[[], ChangeSet]] = [
        *(partial(_prerequisite, ctx, m) for m in site.manifests),
        *(partial(_generated_secret, ctx, s) for s in site.secrets),
        *(partial(_create_once, ctx, c) for c in site.config_maps),
    ]
    for finished in parallel(lambda task: task(), tasks):
        changes += finished
    return StepResult(changes=changes)


def _create_once(ctx: Inputs, spec: CreateOnceConfigMap) -> ChangeSet:
    obj = desired.config_map(spec)
    if not spec.create_once:  # the agent owns it: keep it as configured
        return apply_all(ctx.kube, [obj], _log)
    if ctx.kube.get_like(obj) is not None:
        return ChangeSet((Change.of(obj, Action.UNCHANGED, note=NEVER_OVERWRITTEN),))
    if ctx.kube.dry_run:
        return ChangeSet((Change.of(obj, Action.WOULD_CREATE),))
    if ctx.kube.create(obj) is None:  # someone created it meanwhile: theirs stays
        return ChangeSet((Change.of(obj, Action.UNCHANGED, note=NEVER_OVERWRITTEN),))
    created = Change.of(obj, Action.CREATED)
    _log.info(f"created {created.subject}")
    return ChangeSet((created,))


def _prerequisite(ctx: Inputs, manifest: PrerequisiteManifest) -> ChangeSet:
    if manifest.skip_if_exists is not None:
        api_version, kind, namespace, name = manifest.skip_if_exists
        if ctx.kube.get(api_version, kind, name, namespace) is not None:
            _log.info(f"{kind} {name} exists; leaving {manifest.file.name} alone")
            marker = Change(
                kind,
                namespace,
                name,
                Action.SKIPPED,
                note=f"exists: {manifest.file.name} not applied",
            )
            return ChangeSet((marker,))
    objects = manifest.objects
    # Namespaces first: the rest of the file may live in them.
    first = [o for o in objects if o["kind"] == "Namespace"]
    return apply_all(ctx.kube, first, _log) + apply_all(
        ctx.kube, [o for o in objects if o["kind"] != "Namespace"], _log
    )


def _values(spec: GeneratedSecret, only: set[str] | None = None) -> dict[str, bytes]:
    values = {}
    for key in spec.keys:
        if only is not None and key.name not in only:
            continue
        if key.file is not None:
            try:
                value = key.file.read_bytes()
            except OSError as err:
                raise ConfigError(
                    f"{key.file}: cannot read secret file for "
                    f"{spec.namespace}/{spec.name} key {key.name}: "
                    f"{err.strerror}"
                ) from None
        else:
            value = secrets.token_hex(key.generate_bytes).encode()
        log.register_secret(value)
        values[key.name] = value
    return values


def _generated_secret(ctx: Inputs, spec: GeneratedSecret) -> ChangeSet:
    live = ctx.kube.get("v1", "Secret", spec.name, spec.namespace)
    missing = desired.missing_keys(spec, live)
    key_paths = tuple(f".data.{key}" for key in missing)  # key names, never their values
    where = f"Secret/{spec.namespace}/{spec.name}"

    def entry(action: Action, fields: tuple[str, ...] = ()) -> ChangeSet:
        note = "never rotated" if action == Action.UNCHANGED else ""
        return ChangeSet((Change("Secret", spec.namespace, spec.name, action, fields, note),))

    if ctx.kube.dry_run:
        if live is None:
            return entry(Action.WOULD_CREATE, key_paths)
        return entry(Action.WOULD_CONFIGURE, key_paths) if missing else entry(Action.UNCHANGED)
    if live is None:
        obj = desired.generated_secret(spec, _values(spec))
        if ctx.kube.create(obj) is None:
            _log.info(f"{where} was created meanwhile; keeping it")
            return entry(Action.UNCHANGED)
        _log.info(f"created {where}", keys=sorted(k.name for k in spec.keys))
        return entry(Action.CREATED, key_paths)
    for value in (live.get("data") or {}).values():
        log.register_secret(base64.b64decode(value))
    if not missing:
        return entry(Action.UNCHANGED)
    # Add only what is missing; existing values are never rotated.
    values = _values(spec, set(missing))
    patch = {"data": {k: base64.b64encode(v).decode() for k, v in values.items()}}
    ctx.kube.merge_patch(live, patch)
    _log.info(f"added missing keys to {where}", keys=missing)
    return entry(Action.CONFIGURED, key_paths)


def _present(ctx: Inputs) -> bool:
    """A few list reads (one per kind and namespace) confirming every site object is there
    and every generated secret and owned ConfigMap holds all its keys (desired.site_object_gaps)."""
    wanted: dict[tuple[str, str, str], set[str]] = {}
    for api_version, kind, namespace, name in desired.site_objects(ctx.config):
        wanted.setdefault((api_version, kind, namespace), set()).add(name)

    def complete(group: tuple[tuple[str, str, str], set[str]]) -> bool:
        (api_version, kind, namespace), names = group
        found = {o["metadata"]["name"]: o for o in ctx.kube.list(api_version, kind, namespace)}
        for name in names:
            live = found.get(name)
            if live is None or desired.site_object_gaps(ctx.config, kind, namespace, name, live):
                where = f"{namespace}/{name}" if namespace else name
                _log.info(f"{kind} {where} is missing or incomplete; checking every site object")
                return False
        return True

    return all(parallel(complete, wanted.items()))
