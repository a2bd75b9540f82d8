"""The Alga appliance as upstream renders it (the reference files in `../shared/alga`), split
by the Flux Kustomization path that applies each object, for the stand-in
kustomize-controller (`Controllers.sources`).

Which path holds what is upstream's layout at Nine-Minds/alga-psa 26bb86fa3a:
`ee/appliance/flux/profiles/talos-single-node/kustomization.yaml` (the profile: the base's
namespaces and child Kustomizations, plus the six values ConfigMaps),
`ee/appliance/flux/base/kustomization.yaml` (the base: the same without the ConfigMaps),
`ee/appliance/flux/base/core/kustomization.yaml` (HelmReleases alga-core, pgbouncer),
`ee/appliance/flux/base/background/kustomization.yaml` (temporal, email-service,
workflow-worker, temporal-worker) and `ee/appliance/flux/base/platform` (the rest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
PROFILE_PATH = "./ee/appliance/flux/profiles/talos-single-node"
BASE_PATH = "./ee/appliance/flux/base"
CORE = {"alga-core", "pgbouncer"}


def load(file: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(file.read_text()) if d]


def sources(profile: list[Obj], children: list[Obj]) -> dict[str, list[Obj]]:
    """Kustomization path -> the objects it applies, from the two rendered files' objects."""
    releases = [o for o in children if o["kind"] == "HelmRelease"]
    return {
        PROFILE_PATH: profile,
        BASE_PATH: [o for o in profile if o["kind"] != "ConfigMap"],
        f"{BASE_PATH}/platform": [o for o in children if o["kind"] != "HelmRelease"],
        f"{BASE_PATH}/core": [o for o in releases if o["metadata"]["name"] in CORE],
        f"{BASE_PATH}/background": [o for o in releases if o["metadata"]["name"] not in CORE],
    }


def reference_sources(directory: Path) -> dict[str, list[Obj]]:
    """`sources` from upstream's rendered files in `directory` (../shared/alga)."""
    return sources(
        load(directory / "profile-talos-single-node.rendered.yaml"),
        load(directory / "children.rendered.yaml"),
    )
