"""The Alga PSA appliance: its `alga` config section, expanded into general settings.

What Git cannot hold becomes `site` objects (namespaces, generated secrets, storage, the
release selection, and in `base` mode the six values ConfigMaps); the root path and, in
`profile` mode, the site values as Kustomization patches become `sync` settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent import safe_yaml
from agent.config.loader import deep_merge, register_section
from agent.config.reader import DNS_SUBDOMAIN, Section
from agent.config.schema import AlgaSettings
from agent.patches import MARK, go_safe_yaml, guarded_add

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

# HelmReleases that must install and upgrade without Helm's wait, as upstream's fix
# (Nine-Minds/alga-psa 5011d117a6, ee/appliance/flux/base/releases/alga-core.yaml) makes
# them. At the pinned commit the server Pod's init container `wait-for-bootstrap`
# (helm/templates/deployment.yaml) waits for the `users` table, which only the
# post-install hook Job creates (helm/templates/jobs.yaml), and Helm runs post-install
# hooks only once its wait is over: the first install would time out and be remediated
# again and again. The other five releases have no hook that what they wait for needs.
INSTALL_WITHOUT_WAIT = ("alga-core",)


@dataclass(frozen=True)
class PinnedImage:
    """One image the appliance runs, pinned by `alga.images.<key>`."""

    key: str
    component: str  # the HelmRelease that starts it (STATUS_IMAGE: the child Kustomization)
    repository: str
    values: tuple[str, str] | None  # values keys of its repository and tag; None: hard-coded


# Every image the appliance's HelmReleases can start with upstream's values at the pinned
# commit, each with the chart template that names it (tests/fixtures/alga-chart-images.yaml
# lists them all). Hocuspocus and the dev, hosted and delete-PVC templates are off under
# upstream's appliance values and so are not here.
IMAGES = (
    # helm/templates/deployment.yaml: server.image.name, server.image.tag
    PinnedImage(
        "algaCore",
        "alga-core",
        "ghcr.io/nine-minds/alga-psa-ee",
        ("server.image.name", "server.image.tag"),
    ),
    # helm/templates/jobs.yaml: setup.image.name, setup.image.tag
    PinnedImage(
        "algaCore",
        "alga-core",
        "ghcr.io/nine-minds/alga-psa-ee",
        ("setup.image.name", "setup.image.tag"),
    ),
    # helm/templates/deployment.yaml: setup.waitForBootstrap.image.name, .tag
    PinnedImage(
        "bootstrapWait",
        "alga-core",
        "ankane/pgvector",
        ("setup.waitForBootstrap.image.name", "setup.waitForBootstrap.image.tag"),
    ),
    # helm/templates/postgres/statefulSet.yaml: db.image.repository, db.image.tag
    PinnedImage(
        "database",
        "alga-core",
        "ankane/pgvector",
        ("db.image.repository", "db.image.tag"),
    ),
    # helm/templates/postgres/statefulSet.yaml: initContainer volume-prep, `image: busybox`
    PinnedImage(
        "volumePrep",
        "alga-core",
        "busybox",
        None,
    ),
    # helm/templates/redis/statefulSet.yaml: redis.image.repository, redis.image.tag
    PinnedImage(
        "redis",
        "alga-core",
        "redis",
        ("redis.image.repository", "redis.image.tag"),
    ),
    # ee/helm/pgbouncer/templates/deployment.yaml: image.repository, image.tag
    PinnedImage(
        "pgbouncer",
        "pgbouncer",
        "edoburu/pgbouncer",
        ("image.repository", "image.tag"),
    ),
    # ee/helm/temporal/templates/deployment.yaml, namespace-job.yaml: server.image.*
    PinnedImage(
        "temporalServer",
        "temporal",
        "temporalio/auto-setup",
        ("server.image.repository", "server.image.tag"),
    ),
    # ee/helm/temporal/templates/ui.yaml: ui.image.repository, ui.image.tag
    PinnedImage(
        "temporalUi",
        "temporal",
        "temporalio/ui",
        ("ui.image.repository", "ui.image.tag"),
    ),
    # ee/helm/workflow-worker/templates/deployment.yaml: image.repository, image.tag
    PinnedImage(
        "workflowWorker",
        "workflow-worker",
        "ghcr.io/nine-minds/workflow-worker",
        ("image.repository", "image.tag"),
    ),
    # ee/helm/email-service/templates/deployment.yaml: image.repository, image.tag
    PinnedImage(
        "emailService",
        "email-service",
        "ghcr.io/nine-minds/email-service",
        ("image.repository", "image.tag"),
    ),
    # ee/helm/temporal-worker/templates/deployment.yaml: image.repository, image.tag
    PinnedImage(
        "temporalWorker",
        "temporal-worker",
        "ghcr.io/nine-minds/temporal-worker",
        ("image.repository", "image.tag"),
    ),
)
# The appliance-status Deployment is a plain manifest, applied by the child Kustomization
# alga-platform (ee/appliance/flux/base/platform/appliance-status.yaml, container `status`,
# `image: node:20-alpine`): pinned by that child's `spec.images`, kustomize's images
# transformer, which sets the tag of every container whose image name is exactly `node`.
STATUS_IMAGE = PinnedImage("applianceStatus", "alga-platform", "node", None)
IMAGE_KEYS = (*dict.fromkeys(i.key for i in IMAGES), STATUS_IMAGE.key)
# The one image nothing outside upstream's code can pin: the update Jobs the status server
# creates when a tech asks it to check for or apply an update name `node:20-alpine` inside
# its script (appliance-status.yaml, createUpdateJob). Listed for the image cache so an
# offline site can still update.
UPDATER_IMAGE = "node:20-alpine"
# The release selection's tag keys (upstream's updater reads and writes these four).
SELECTION_KEYS = {
    "algaCore": "algaCoreTag",
    "workflowWorker": "workflowWorkerTag",
    "emailService": "emailServiceTag",
    "temporalWorker": "temporalWorkerTag",
}
# A tag, optionally pinned further by its digest (the charts write `repository:tag`).
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(@sha256:[0-9a-f]{64})?$")
MODE = re.compile("|".join(ROOT_PATHS))
PRIVILEGED = {
    f"pod-security.kubernetes.io/{mode}": "privileged" for mode in ("enforce", "audit", "warn")
}
STORAGE_MANIFEST = Path(__file__).parent.parent / "manifests" / "local-path-storage.yaml"
VALUES_NAMESPACE = "alga-system"
SELECTION_NAME = "appliance-release-selection"


def expand(alga: Section, data: dict[str, Any]) -> tuple[dict[str, Any], AlgaSettings]:
    """The `alga` section, read and checked, turned into `sync` and `site` settings merged
    with the site's own (`data`, the config without `alga`)."""
    mode = alga.text("mode", "profile", MODE, "use profile or base")
    app_url, host = _app_url(alga)
    tags = _images(alga)
    release = _release(alga.section("release"), alga.has("release"))
    secrets = _secrets(alga.section("secrets"))
    storage = alga.flag("storage", True)
    values_dir = _values_dir(alga) if mode == "base" else None
    alga.raw("valuesDir")
    alga.close()
    site_values = component_site_values(app_url, host, tags)

    sync_section = alga.item(data.get("sync"), "sync")
    site_section = alga.item(data.get("site"), "site")
    sync, site = dict(sync_section.data), dict(site_section.data)
    if "path" in sync and sync["path"] != ROOT_PATHS[mode]:
        sync_section.fail(
            f"set by alga.mode ({mode}: {ROOT_PATHS[mode]}); remove sync.path or change alga.mode",
            "path",
        )
    sync["path"] = ROOT_PATHS[mode]
    site["namespaces"] = [
        {"name": "alga-system"},
        {"name": "appliance-system", "labels": dict(PRIVILEGED)},
        {"name": "msp", "labels": dict(PRIVILEGED)},
        *site_section.items("namespaces"),
    ]
    site["secrets"] = [*secrets, *site_section.items("secrets")]
    # Profile mode: the agent sets the tags, so it owns the release selection too and keeps
    # it equal to them. Base mode: the appliance's updater owns both after the first boot.
    config_maps = [release_selection(release, tags, owned=mode == "profile")]
    if values_dir is not None:
        config_maps += values_config_maps(values_dir, site_values, alga.source)
        site_values = {}  # the values ConfigMaps carry them
    sync["patches"] = [*sync_section.items("patches"), *root_patches(site_values, tags)]
    site["configMaps"] = [*config_maps, *site_section.items("configMaps")]
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
            *site_section.items("manifests"),
        ]
    return {**data, "sync": sync, "site": site}, AlgaSettings(mode, tags)


def _app_url(alga: Section) -> tuple[str, str]:
    url = alga.text("appUrl", hint="the site's URL, for example https://psa.example.com")
    parts = urlsplit(url)
    if (
        " " in url
        or parts.scheme not in ("https", "http")
        or not parts.hostname
        or not DNS_SUBDOMAIN.fullmatch(parts.hostname)
        or parts.path not in ("", "/")
        or parts.query
    ):
        alga.fail(
            f"{url!r} is not a site URL; use https://host[:port], "
            "for example https://psa.example.com",
            "appUrl",
        )
    host = alga.text("host", parts.hostname, DNS_SUBDOMAIN, "a lowercase DNS name")
    return url.rstrip("/"), host


def _images(alga: Section) -> dict[str, str]:
    if not alga.has("images"):
        alga.fail(f"must map each of {', '.join(IMAGE_KEYS)} to a tag", "images")
    images = alga.section("images")
    tags = {}
    for key in IMAGE_KEYS:
        tag = images.raw(key)
        if tag is None or tag == "":
            images.fail("needs a pinned image tag", key)
        if not isinstance(tag, str):
            # YAML already turned it into a number or boolean (`010` is 8): ask for quotes.
            images.fail(f"{tag!r} must be a string; quote the tag", key)
        if tag == "latest":
            images.fail(
                "'latest' is refused: pin the release's tag so a restart never changes what runs",
                key,
            )
        if not TAG.fullmatch(tag):
            images.fail(f"{safe_yaml.shown(tag)} is not a valid image tag", key)
        tags[key] = tag
    images.close()
    return tags


def _release(release: Section, given: bool) -> dict[str, str]:
    if not given:
        release.fail("must set version, channel, appVersion and branch")
    out = {k: release.text(k) for k in ("version", "channel", "appVersion", "branch")}
    release.close()
    return out


def _secrets(given: Section) -> list[dict[str, Any]]:
    """The two generated Secrets; a site may supply either value from a file instead."""

    def key(field: str) -> dict[str, Any]:
        file = given.file(field, required=False)
        return {"generate": {"bytes": 32}} if file is None else {"file": str(file)}

    secrets = [
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
    given.close()
    return secrets


def component_site_values(
    app_url: str, host: str, tags: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """The Helm values a site sets, per component, over upstream's values files: the URL,
    and the repository and tag of every image the chart takes from its values."""
    out: dict[str, dict[str, Any]] = {
        "alga-core": {"host": host, "appUrl": app_url, "domainSuffix": host}
    }
    for image in IMAGES:
        if image.values is None:
            continue
        values = out.setdefault(image.component, {})
        for key, value in zip(image.values, (image.repository, tags[image.key]), strict=True):
            *parents, last = key.split(".")
            node = values
            for parent in parents:
                node = node.setdefault(parent, {})
            node[last] = value
    return out


def post_renderer_images(tags: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """Per component, the images its chart hard-codes, pinned by a kustomize post-renderer
    (helm-controller's `spec.postRenderers[].kustomize.images`)."""
    out: dict[str, list[dict[str, str]]] = {}
    for image in IMAGES:
        if image.values is None:
            out.setdefault(image.component, []).append(
                _image_pin(image.repository, tags[image.key])
            )
    return out


def configured_tags(values: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """The tag each release-selection image has in the HelmReleases' merged `values` (by
    component; None where that HelmRelease is not there yet)."""
    out: dict[str, str | None] = {}
    for image in IMAGES:
        if image.key not in SELECTION_KEYS or image.key in out or image.values is None:
            continue
        node: Any = values.get(image.component)
        for part in image.values[1].split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[image.key] = None if node is None else str(node)
    return out


def image_refs(tags: dict[str, str]) -> list[str]:
    """Every image the appliance runs, as the nodes pull it."""
    pinned = (*IMAGES, STATUS_IMAGE)
    return list(dict.fromkeys([*(f"{i.repository}:{tags[i.key]}" for i in pinned), UPDATER_IMAGE]))


def _image_pin(name: str, pinned: str) -> dict[str, str]:
    """A kustomize `images` entry: `tag` or `tag@sha256:...` as newTag and digest."""
    tag, _, digest = pinned.partition("@")
    return {"name": name, "newTag": tag, **({"digest": digest} if digest else {})}


def values_key(component: str) -> str:
    return f"{component}.{PROFILE}.yaml"


def site_values_key(component: str) -> str:
    return f"{component}.site.yaml"


def release_selection(release: dict[str, str], tags: dict[str, str], owned: bool) -> dict[str, Any]:
    return {
        "namespace": VALUES_NAMESPACE,
        "name": SELECTION_NAME,
        "createOnce": not owned,
        "data": {
            "releaseVersion": release["version"],
            "selectedChannel": release["channel"],
            "appVersion": release["appVersion"],
            "releaseBranch": release["branch"],
            **{selection: tags[key] for key, selection in SELECTION_KEYS.items()},
        },
    }


def _values_dir(alga: Section) -> Path:
    raw = alga.text(
        "valuesDir",
        hint=f"base mode needs the directory holding the six <component>.{PROFILE}.yaml "
        "values files",
    )
    path = Path(raw) if Path(raw).is_absolute() else alga.base_dir / raw
    if not path.is_dir():
        alga.fail(f"directory {str(path)!r} does not exist", "valuesDir")
    return path


def values_config_maps(
    values_dir: Path, site_values: dict[str, dict[str, Any]], source: str
) -> list[dict[str, Any]]:
    """Base mode: the six values ConfigMaps, upstream's files with the site values merged."""
    out = []
    for component in COMPONENTS:
        file = values_dir / values_key(component)
        values = safe_yaml.load_mapping(file, where=f"{source}: alga.valuesDir")
        merged = deep_merge(values, site_values.get(component, {}))
        out.append(
            {
                "namespace": VALUES_NAMESPACE,
                "name": f"appliance-values-{component}",
                "data": {values_key(component): go_safe_yaml(merged)},
            }
        )
    return out


def root_patches(
    site_values: dict[str, dict[str, Any]], tags: dict[str, str]
) -> list[dict[str, Any]]:
    """The root Kustomization's patches. Profile mode: Flux owns the values ConfigMaps from
    Git, so each gains a `<component>.site.yaml` key, and each HelmRelease reads that key
    after upstream's (a patch the child Kustomization carries). Both modes: images the
    charts hard-code are pinned by a post-renderer on their HelmRelease, and the status
    Deployment's by `images` on the child Kustomization that applies it. Upstream's own
    keys, patches and post-renderers are never rewritten."""
    patches: list[dict[str, Any]] = []
    release_ops: dict[str, list[dict[str, Any]]] = {}
    for component, values in site_values.items():
        config_map = f"appliance-values-{component}"
        patches.append(
            {
                "target": {"kind": "ConfigMap", "name": config_map, "namespace": VALUES_NAMESPACE},
                "patch": go_safe_yaml(
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": config_map, "namespace": VALUES_NAMESPACE},
                        # No final newline: kustomize drops it (seen with kubectl kustomize).
                        "data": {site_values_key(component): go_safe_yaml(values).rstrip()},
                    }
                ),
            }
        )
        release_ops.setdefault(component, []).append(
            {
                "op": "add",
                "path": "/spec/valuesFrom/-",
                "value": {
                    "kind": "ConfigMap",
                    "name": config_map,
                    "valuesKey": site_values_key(component),
                },
            }
        )
    for component, images in post_renderer_images(tags).items():
        release_ops.setdefault(component, []).extend(
            guarded_add("/spec/postRenderers", [{"kustomize": {"images": images}}])
        )
    for component in INSTALL_WITHOUT_WAIT:
        release_ops.setdefault(component, []).extend(
            {"op": "add", "path": f"/spec/{action}/disableWait", "value": True}
            for action in ("install", "upgrade")
        )
    child_patches: dict[str, list[dict[str, Any]]] = {}
    for component, ops in release_ops.items():
        child_patches.setdefault(CHILD_OF[component], []).append(
            {
                "target": {
                    "group": "helm.toolkit.fluxcd.io",
                    "kind": "HelmRelease",
                    "name": component,
                    "namespace": VALUES_NAMESPACE,
                },
                "patch": MARK + go_safe_yaml(ops).rstrip(),  # see the site values
            }
        )
    # The status Deployment's image, by the child Kustomization that applies it.
    patches.append(
        {
            "target": {
                "group": "kustomize.toolkit.fluxcd.io",
                "kind": "Kustomization",
                "name": STATUS_IMAGE.component,
                "namespace": "flux-system",
            },
            "patch": go_safe_yaml(
                guarded_add(
                    "/spec/images",
                    [_image_pin(STATUS_IMAGE.repository, tags[STATUS_IMAGE.key])],
                )
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
                "patch": go_safe_yaml(guarded_add("/spec/patches", inner)),
            }
        )
    return patches


register_section("alga", expand)
