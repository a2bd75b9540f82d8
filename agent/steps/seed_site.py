"""Step 4: what the site needs from its first boot and Git cannot hold: namespaces,
prerequisite manifests (storage), generated secrets, create-once ConfigMaps.

Generated secrets and create-once ConfigMaps are created when absent and never
overwritten: a re-run must not rotate a credential or revert a value changed in place.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from functools import partial
from typing import Any

from agent import desired, log
from agent.config import (
    Config,
    CreateOnceConfigMap,
    GeneratedSecret,
    PrerequisiteManifest,
)
from agent.context import RunContext
from agent.converge import StepResult, describe, ensure, parallel
from agent.errors import ConfigError
from agent.kube import Kind, placement_problem

_log = log.get("seed-site")
Obj = dict[str, Any]


def seed(ctx: RunContext) -> StepResult:
    site = ctx.config.site
    if ctx.trust_previous and _present(ctx):
        return StepResult("seed-site", note="site objects present")
    changes = ensure(ctx.kube, desired.site_namespaces(ctx.config), _log)
    # With the namespaces there, the rest is independent: do it concurrently.
    tasks: list[Callable[[], list[str]]] = [
        *(partial(_prerequisite, ctx, m) for m in site.manifests),
        *(partial(_generated_secret, ctx, s) for s in site.secrets),
        *(partial(_create_once, ctx, c) for c in site.config_maps),
    ]
    for done in parallel(lambda task: task(), tasks):
        changes += done
    return StepResult("seed-site", changes)


def _create_once(ctx: RunContext, spec: CreateOnceConfigMap) -> list[str]:
    obj = desired.config_map(spec)
    if not spec.create_once:  # the agent owns it: keep it as configured
        return ensure(ctx.kube, [obj], _log)
    if ctx.kube.get_like(obj) is not None:
        return (
            [f"unchanged {describe(obj)} (created once, never overwritten)"] if ctx.dry_run else []
        )
    if ctx.dry_run:
        return [f"would create {describe(obj)}"]
    if ctx.kube.create(obj) is not None:
        _log.info(f"created {describe(obj)}")
        return [f"created {describe(obj)}"]
    return []


def check_manifests(config: Config, kinds: dict[tuple[str, str], Kind]) -> None:
    """Before the first request: every prerequisite object, and every marker, is of a kind
    the agent can write (built in, or a CRD of the Flux bundle)."""
    for i, manifest in enumerate(config.site.manifests):
        for number, obj in enumerate(manifest.objects, 1):
            problem = placement_problem(obj, kinds)
            if problem:
                raise ConfigError(
                    f"{config.source}: site.manifests[{i}].file: {manifest.file}: "
                    f"document {number}: {problem}"
                )
        if manifest.skip_if_exists:
            api_version, kind, namespace, name = manifest.skip_if_exists
            meta = {"name": name, "namespace": namespace}
            problem = placement_problem(
                {"apiVersion": api_version, "kind": kind, "metadata": meta}, kinds
            )
            if problem:
                raise ConfigError(f"{config.source}: site.manifests[{i}].skipIfExists: {problem}")


def _prerequisite(ctx: RunContext, manifest: PrerequisiteManifest) -> list[str]:
    if manifest.skip_if_exists is not None:
        api_version, kind, namespace, name = manifest.skip_if_exists
        if ctx.kube.get(api_version, kind, name, namespace) is not None:
            _log.info(f"{kind} {name} exists; leaving {manifest.file.name} alone")
            return [f"unchanged {manifest.file.name} ({kind} {name} exists)"] if ctx.dry_run else []
    objects = manifest.objects
    # Namespaces first: the rest of the file may live in them.
    first = [o for o in objects if o["kind"] == "Namespace"]
    return ensure(ctx.kube, first, _log) + ensure(
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


def _generated_secret(ctx: RunContext, spec: GeneratedSecret) -> list[str]:
    live = ctx.kube.get("v1", "Secret", spec.name, spec.namespace)
    missing = desired.missing_keys(spec, live)
    if ctx.dry_run:
        where = f"Secret/{spec.namespace}/{spec.name}"
        if live is None:
            return [f"would create {where} (keys {', '.join(missing)})"]
        if missing:
            return [f"would add keys {', '.join(missing)} to {where}"]
        return [f"unchanged {where} (never rotated)"]
    if live is None:
        obj = desired.generated_secret(spec, _values(spec))
        if ctx.kube.create(obj) is None:
            _log.info(f"{describe(obj)} was created meanwhile; keeping it")
            return []
        _log.info(f"created {describe(obj)}", keys=sorted(k.name for k in spec.keys))
        return [f"created {describe(obj)}"]
    for value in (live.get("data") or {}).values():
        log.register_secret(base64.b64decode(value))
    if not missing:
        return []
    # Add only what is missing; existing values are never rotated.
    values = _values(spec, set(missing))
    patch = {"data": {k: base64.b64encode(v).decode() for k, v in values.items()}}
    ctx.kube.merge_patch(live, patch)
    _log.info(f"added missing keys to Secret/{spec.namespace}/{spec.name}", keys=missing)
    return [f"added keys {', '.join(missing)} to Secret/{spec.namespace}/{spec.name}"]


def _present(ctx: RunContext) -> bool:
    """A few list reads (one per kind and namespace) confirming every site object is there
    and every generated secret holds all its keys."""
    wanted: dict[tuple[str, str, str], set[str]] = {}
    for api_version, kind, namespace, name in desired.site_objects(ctx.config):
        wanted.setdefault((api_version, kind, namespace), set()).add(name)

    owned = {
        (c.namespace, c.name): c.data for c in ctx.config.site.config_maps if not c.create_once
    }

    def complete(group: tuple[tuple[str, str, str], set[str]]) -> bool:
        (api_version, kind, namespace), names = group
        found = {o["metadata"]["name"]: o for o in ctx.kube.list(api_version, kind, namespace)}
        for name in names:
            live = found.get(name)
            drifted = (
                live is not None
                and kind == "ConfigMap"
                and (namespace, name) in owned
                and not owned[(namespace, name)].items() <= (live.get("data") or {}).items()
            )
            if (
                live is None
                or drifted
                or desired.site_object_gaps(ctx.config, kind, namespace, name, live)
            ):
                where = f"{namespace}/{name}" if namespace else name
                _log.info(f"{kind} {where} is missing or incomplete; checking every site object")
                return False
        return True

    return all(parallel(complete, wanted.items()))
