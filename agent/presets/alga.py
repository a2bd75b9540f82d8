"""The Alga PSA appliance: its `alga` config section, expanded into general settings.

What Git cannot hold becomes `site` objects (namespaces, generated secrets, storage, the
release selection, and in `base` mode the six values ConfigMaps); the root path and, in
`profile` mode, the site values as Kustomization patches become `sync` settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from agent.config import deep_merge
from agent.errors import ConfigError

PROFILE = "talos-single-node"
ROOT_PATHS = {
    "profile": "./ee/appliance/flux/profiles/talos-single-node",
    "base": "./ee/appliance/flux/base",
}
COMPONENTS = (
    "alga-core",
    "pgbouncer",
    "temporal",
    "workflow-worker",
    "email-service",
    "temporal-worker",
)
# The child Kustomization (profile mode) that renders each component's HelmRelease.
CHILD_OF = {
    "alga-core": "alga-core",
    "pgbouncer": "alga-core",
    "temporal": "alga-background",
    "workflow-worker": "alga-background",
    "email-service": "alga-background",
    "temporal-worker": "alga-background",
}
IMAGE_KEYS = ("algaCore", "workflowWorker", "emailService", "temporalWorker", "bootstrapWait")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
HOST = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PRIVILEGED = {
    f"pod-security.kubernetes.io/{mode}": "privileged" for mode in ("enforce", "audit", "warn")
}
STORAGE_MANIFEST = Path(__file__).parent.parent / "manifests" / "local-path-storage.yaml"
VALUES_NAMESPACE = "alga-system"


def _fail(source: str, field: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: alga.{field}: {message}")


def _string(section: dict[str, Any], key: str, source: str, prefix: str = "") -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, prefix + key, "is required and must be a non-empty string")
    return value


def expand(data: dict[str, Any], source: str, base_dir: Path) -> dict[str, Any]:
    alga = data.get("alga")
    if not isinstance(alga, dict):
        raise ConfigError(f"{source}: alga: must be a mapping")
    known = {"mode", "appUrl", "host", "release", "images", "valuesDir", "storage", "secrets"}
    unknown = sorted(set(alga) - known)
    if unknown:
        raise _fail(
            source, unknown[0], f"unknown field (known fields here: {', '.join(sorted(known))})"
        )
    mode = alga.get("mode", "profile")
    if mode not in ROOT_PATHS:
        raise _fail(source, "mode", f"{mode!r} is not a mode; use profile or base")
    app_url, host = _app_url(alga, source)
    tags = _images(alga, source)
    release = _release(alga, source)
    site_values = component_site_values(app_url, host, tags)

    out = {k: v for k, v in data.items() if k != "alga"}
    sync = dict(out.get("sync") or {})
    if "path" in sync and sync["path"] != ROOT_PATHS[mode]:
        raise ConfigError(
            f"{source}: sync.path: set by alga.mode ({mode}: {ROOT_PATHS[mode]});"
            " remove sync.path or change alga.mode"
        )
    sync["path"] = ROOT_PATHS[mode]
    site = dict(out.get("site") or {})
    site["namespaces"] = [
        {"name": "alga-system"},
        {"name": "appliance-system", "labels": dict(PRIVILEGED)},
        {"name": "msp", "labels": dict(PRIVILEGED)},
        *site.get("namespaces", []),
    ]
    site["secrets"] = [*_secrets(alga, source, base_dir), *site.get("secrets", [])]
    config_maps = [release_selection(release, tags)]
    if mode == "base":
        config_maps += values_config_maps(_values_dir(alga, source, base_dir), site_values, source)
    else:
        sync["patches"] = [*sync.get("patches", []), *profile_patches(site_values)]
    site["configMaps"] = [*config_maps, *site.get("configMaps", [])]
    storage = alga.get("storage", True)
    if not isinstance(storage, bool):
        raise _fail(source, "storage", "must be true or false")
    if storage:
        site["manifests"] = [
            {
                "file": str(STORAGE_MANIFEST),
                "skipIfExists": {
                    "apiVersion": "storage.k8s.io/v1",
                    "kind": "StorageClass",
                    "name": "local-path",
                },
            },
            *site.get("manifests", []),
        ]
    out["sync"], out["site"] = sync, site
    return out


def _app_url(alga: dict[str, Any], source: str) -> tuple[str, str]:
    url = _string(alga, "appUrl", source)
    parts = urlsplit(url)
    if (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or not HOST.match(parts.hostname)
        or parts.path not in ("", "/")
        or parts.query
    ):
        raise _fail(
            source,
            "appUrl",
            f"{url!r} is not a site URL; use https://host[:port], "
            "for example https://psa.example.com",
        )
    host = alga.get("host", parts.hostname)
    if not isinstance(host, str) or not HOST.match(host):
        raise _fail(source, "host", f"{host!r} is not a lowercase DNS name")
    return url.rstrip("/"), host


def _images(alga: dict[str, Any], source: str) -> dict[str, str]:
    images = alga.get("images")
    if not isinstance(images, dict):
        raise _fail(source, "images", f"must map each of {', '.join(IMAGE_KEYS)} to a tag")
    unknown = sorted(set(images) - set(IMAGE_KEYS))
    if unknown:
        raise _fail(
            source, f"images.{unknown[0]}", f"unknown image (known: {', '.join(IMAGE_KEYS)})"
        )
    tags = {}
    for key in IMAGE_KEYS:
        tag = images.get(key)
        if tag is None or tag == "":
            raise _fail(source, f"images.{key}", "needs a pinned image tag")
        tag = str(tag)
        if tag == "latest":
            raise _fail(
                source,
                f"images.{key}",
                "'latest' is refused: pin the release's tag so a restart never changes what runs",
            )
        if not TAG.match(tag):
            raise _fail(source, f"images.{key}", f"{tag!r} is not a valid image tag")
        tags[key] = tag
    return tags


def _release(alga: dict[str, Any], source: str) -> dict[str, str]:
    release = alga.get("release")
    if not isinstance(release, dict):
        raise _fail(source, "release", "must set version, channel, appVersion and branch")
    unknown = sorted(set(release) - {"version", "channel", "appVersion", "branch"})
    if unknown:
        raise _fail(
            source,
            f"release.{unknown[0]}",
            "unknown field (known fields here: appVersion, branch, channel, version)",
        )
    return {
        k: str(_string(release, k, source, "release."))
        for k in ("version", "channel", "appVersion", "branch")
    }


def _secrets(alga: dict[str, Any], source: str, base_dir: Path) -> list[dict[str, Any]]:
    """The two generated Secrets; a site may supply either value from a file instead."""
    given = alga.get("secrets") or {}
    if not isinstance(given, dict) or set(given) - {"statusTokenFile", "authKeyFile"}:
        raise _fail(source, "secrets", "may set only statusTokenFile and authKeyFile")

    def key(field: str) -> dict[str, Any]:
        if given.get(field):
            return {"file": str(base_dir / given[field])}
        return {"generate": {"bytes": 32}}

    return [
        {
            "namespace": "appliance-system",
            "name": "appliance-status-auth",
            "keys": {"token": key("statusTokenFile")},
        },
        {
            "namespace": "msp",
            "name": "alga-psa-shared",
            "keys": {"ALGA_AUTH_KEY": key("authKeyFile")},
        },
    ]


def component_site_values(
    app_url: str, host: str, tags: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """The Helm values a site sets, per component, over upstream's values files."""
    return {
        "alga-core": {
            "host": host,
            "appUrl": app_url,
            "domainSuffix": host,
            "setup": {
                "image": {"tag": tags["algaCore"]},
                "waitForBootstrap": {"image": {"tag": tags["bootstrapWait"]}},
            },
            "server": {"image": {"tag": tags["algaCore"]}},
        },
        "workflow-worker": {"image": {"tag": tags["workflowWorker"]}},
        "email-service": {"image": {"tag": tags["emailService"]}},
        "temporal-worker": {"image": {"tag": tags["temporalWorker"]}},
    }


def values_key(component: str) -> str:
    return f"{component}.{PROFILE}.yaml"


def site_values_key(component: str) -> str:
    return f"{component}.site.yaml"


def release_selection(release: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
    return {
        "namespace": VALUES_NAMESPACE,
        "name": "appliance-release-selection",
        "data": {
            "releaseVersion": release["version"],
            "selectedChannel": release["channel"],
            "appVersion": release["appVersion"],
            "releaseBranch": release["branch"],
            "algaCoreTag": tags["algaCore"],
            "workflowWorkerTag": tags["workflowWorker"],
            "emailServiceTag": tags["emailService"],
            "temporalWorkerTag": tags["temporalWorker"],
        },
    }


def _values_dir(alga: dict[str, Any], source: str, base_dir: Path) -> Path:
    raw = alga.get("valuesDir")
    if not isinstance(raw, str) or not raw:
        raise _fail(
            source,
            "valuesDir",
            "base mode needs the directory holding the six "
            f"<component>.{PROFILE}.yaml values files",
        )
    path = Path(raw) if Path(raw).is_absolute() else base_dir / raw
    if not path.is_dir():
        raise _fail(source, "valuesDir", f"directory {str(path)!r} does not exist")
    return path


def values_config_maps(
    values_dir: Path, site_values: dict[str, dict[str, Any]], source: str
) -> list[dict[str, Any]]:
    """Base mode: the six values ConfigMaps, upstream's files with the site values merged."""
    out = []
    for component in COMPONENTS:
        file = values_dir / values_key(component)
        try:
            values = yaml.safe_load(file.read_text()) or {}
        except FileNotFoundError:
            raise _fail(source, "valuesDir", f"values file {str(file)!r} is missing") from None
        except (OSError, yaml.YAMLError) as err:
            raise _fail(source, "valuesDir", f"cannot read {str(file)!r}: {err}") from None
        if not isinstance(values, dict):
            raise _fail(source, "valuesDir", f"{str(file)!r} must hold a YAML mapping")
        merged = deep_merge(values, site_values.get(component, {}))
        out.append(
            {
                "namespace": VALUES_NAMESPACE,
                "name": f"appliance-values-{component}",
                "data": {values_key(component): yaml.safe_dump(merged, sort_keys=False)},
            }
        )
    return out


def profile_patches(site_values: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Profile mode: Flux owns the values ConfigMaps from Git. The site values ride in the
    root Kustomization as patches: each values ConfigMap gains a `<component>.site.yaml` key,
    and each child Kustomization gains a patch making its HelmReleases read that key after
    upstream's. Upstream's own keys are never rewritten."""
    patches: list[dict[str, Any]] = []
    child_patches: dict[str, list[dict[str, Any]]] = {}
    for component, values in site_values.items():
        config_map = f"appliance-values-{component}"
        patches.append(
            {
                "target": {"kind": "ConfigMap", "name": config_map, "namespace": VALUES_NAMESPACE},
                "patch": yaml.safe_dump(
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": config_map, "namespace": VALUES_NAMESPACE},
                        "data": {
                            site_values_key(component): yaml.safe_dump(values, sort_keys=False)
                        },
                    },
                    sort_keys=False,
                ),
            }
        )
        child_patches.setdefault(CHILD_OF[component], []).append(
            {
                "target": {
                    "group": "helm.toolkit.fluxcd.io",
                    "kind": "HelmRelease",
                    "name": component,
                    "namespace": VALUES_NAMESPACE,
                },
                "patch": yaml.safe_dump(
                    [
                        {
                            "op": "add",
                            "path": "/spec/valuesFrom/-",
                            "value": {
                                "kind": "ConfigMap",
                                "name": config_map,
                                "valuesKey": site_values_key(component),
                            },
                        }
                    ],
                    sort_keys=False,
                ),
            }
        )
    for child, inner in child_patches.items():
        patches.append(
            {
                "target": {
                    "group": "kustomize.toolkit.fluxcd.io",
                    "kind": "Kustomization",
                    "name": child,
                    "namespace": "flux-system",
                },
                "patch": yaml.safe_dump(
                    [{"op": "add", "path": "/spec/patches", "value": inner}], sort_keys=False
                ),
            }
        )
    return patches
