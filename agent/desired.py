"""Desired objects, built by pure functions from the config. No I/O here."""

from __future__ import annotations

import base64
from typing import Any

from agent import patches
from agent.config import (
    Config,
    CreateOnceConfigMap,
    GeneratedSecret,
    NamespaceSpec,
    SyncConfig,
)
from agent.errors import ConfigError
from agent.kube import Kind, placement_problem

Obj = dict[str, Any]
MANAGED_BY = {"app.kubernetes.io/managed-by": "alga-bootstrap"}


def _meta(name: str, namespace: str = "", labels: dict[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name, "labels": {**MANAGED_BY, **(labels or {})}}
    if namespace:
        meta["namespace"] = namespace
    return meta


def namespace(spec: NamespaceSpec) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(spec.name, "", spec.labels)}


def site_namespaces(config: Config) -> list[Obj]:
    """The site's namespaces, plus the one the run record (and Lease) live in."""
    specs = list(config.site.namespaces)
    if config.record.namespace not in {n.name for n in specs}:
        specs.append(NamespaceSpec(config.record.namespace))
    return [namespace(spec) for spec in specs]


def site_objects(config: Config) -> list[tuple[str, str, str, str]]:
    """(apiVersion, kind, namespace, name) of every first-boot object that must exist:
    namespaces, generated secrets, create-once ConfigMaps, prerequisite markers."""
    out = [("v1", "Namespace", "", ns["metadata"]["name"]) for ns in site_namespaces(config)]
    out += [("v1", "Secret", s.namespace, s.name) for s in config.site.secrets]
    out += [("v1", "ConfigMap", c.namespace, c.name) for c in config.site.config_maps]
    out += [m.skip_if_exists for m in config.site.manifests if m.skip_if_exists]
    return out


def missing_keys(spec: GeneratedSecret, live: Obj | None) -> list[str]:
    """The keys of a generated secret its live copy lacks (all of them when it is absent)."""
    return sorted({k.name for k in spec.keys} - set(((live or {}).get("data") or {}).keys()))


def site_object_gaps(config: Config, kind: str, namespace: str, name: str, live: Obj) -> list[str]:
    """Keys a present site object lacks: a generated secret must hold every key the config
    names (`run` adds the missing ones), and a ConfigMap the agent owns (not create-once)
    every key with the configured value (`run` sets them again). Other site objects only
    have to exist. Key names only, never values."""
    if kind == "Secret":
        for spec in config.site.secrets:
            if (spec.namespace, spec.name) == (namespace, name):
                return missing_keys(spec, live)
    if kind == "ConfigMap":
        for owned in config.site.config_maps:
            if (owned.namespace, owned.name) == (namespace, name) and not owned.create_once:
                data = live.get("data") or {}
                return sorted(k for k, v in owned.data.items() if data.get(k) != v)
    return []


def secret(namespace_name: str, name: str, values: dict[str, bytes]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(name, namespace_name),
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(values.items())},
    }


def generated_secret(spec: GeneratedSecret, values: dict[str, bytes]) -> Obj:
    return secret(spec.namespace, spec.name, values)


def config_map(spec: CreateOnceConfigMap) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(spec.name, spec.namespace),
        "data": dict(spec.data),
    }


def git_repository(sync: SyncConfig) -> Obj:
    spec: Obj = {
        "url": sync.url,
        "ref": sync.ref.as_spec(),
        "interval": sync.source_interval,
        "timeout": sync.source_timeout,
    }
    if sync.sparse_checkout:
        spec["sparseCheckout"] = list(sync.sparse_checkout)
    if sync.credentials is not None:
        spec["secretRef"] = {"name": sync.credentials.secret_name}
    return {
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": "GitRepository",
        "metadata": _meta(sync.name, sync.namespace),
        "spec": spec,
    }


def kustomization(sync: SyncConfig, append_to: frozenset[int] = frozenset()) -> Obj:
    """The root Kustomization; the guarded patches at the indices in `append_to` become
    appends (see agent.patches)."""
    spec: Obj = {
        "interval": sync.interval,
        "retryInterval": sync.retry_interval,
        "timeout": sync.timeout,
        "path": sync.path,
        "prune": sync.prune,
        "wait": sync.wait,
        "sourceRef": {"kind": "GitRepository", "name": sync.name, "namespace": sync.namespace},
    }
    if sync.patches:
        spec["patches"] = [
            patches.as_append(p) if i in append_to else dict(p) for i, p in enumerate(sync.patches)
        ]
    return {
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1",
        "kind": "Kustomization",
        "metadata": _meta(sync.name, sync.namespace),
        "spec": spec,
    }


def run_record(namespace_name: str, name: str, record_json: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name, namespace_name),
        "data": {"run.json": record_json},
    }


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
