"""The Flux install bundle: verified against its pinned sha256, split into apply stages."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import safe_yaml
from agent.errors import ConfigError
from agent.kube import BUILTIN_KINDS, Kind, custom_kinds, placement_problem

# Applied first and waited for (CRDs Established) before anything that depends on them.
FIRST_STAGE_KINDS = ("CustomResourceDefinition", "Namespace", "ClusterRole")

# The oldest Kubernetes minor each Flux minor supports (Flux release notes).
MIN_KUBERNETES = {"2.9": (1, 33), "2.8": (1, 33), "2.7": (1, 32), "2.6": (1, 31)}

Obj = dict[str, Any]


@dataclass(frozen=True)
class FluxBundle:
    path: Path
    sha256: str
    version: str  # e.g. v2.9.4, from the objects' app.kubernetes.io/version label
    objects: tuple[Obj, ...]

    @property
    def first_stage(self) -> list[Obj]:
        return [o for o in self.objects if o["kind"] in FIRST_STAGE_KINDS]

    @property
    def second_stage(self) -> list[Obj]:
        return [o for o in self.objects if o["kind"] not in FIRST_STAGE_KINDS]

    @property
    def crds(self) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == "CustomResourceDefinition"]

    @property
    def deployments(self) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == "Deployment"]

    @property
    def min_kubernetes(self) -> tuple[int, int]:
        minor = ".".join(self.version.lstrip("v").split(".")[:2])
        return MIN_KUBERNETES.get(minor, max(MIN_KUBERNETES.values()))

    @property
    def kinds(self) -> dict[tuple[str, str], Kind]:
        """What the agent can write with this bundle: built-in kinds and the bundle's CRDs."""
        try:
            return {**BUILTIN_KINDS, **custom_kinds(self.crds)}
        except ConfigError as err:
            raise ConfigError(f"{self.path}: {err}") from None

    def images(self) -> list[str]:
        found: list[str] = []
        for deploy in self.deployments:
            pod = deploy["spec"]["template"]["spec"]
            for container in pod.get("initContainers", []) + pod.get("containers", []):
                if container["image"] not in found:
                    found.append(container["image"])
        return found


def load(path: Path, expected_sha256: str) -> FluxBundle:
    try:
        data = safe_yaml.read_bytes(path, safe_yaml.MANIFEST_LIMIT)
    except ConfigError as err:
        raise ConfigError(
            f"cannot read the Flux bundle: {err}; set flux.manifests or --flux-manifests to "
            "the `flux install --export` file"
        ) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ConfigError(
            f"{path}: sha256 is {actual}, but flux.sha256 pins "
            f"{expected_sha256}; use the bundle the config pins, or pin this one "
            "after checking where it came from"
        )
    objects = safe_yaml.objects_in(safe_yaml.text_of(data, str(path)), str(path))
    versions = {
        o["metadata"].get("labels", {}).get("app.kubernetes.io/version") for o in objects
    } - {None}
    if len(versions) != 1:
        raise ConfigError(
            f"{path}: cannot tell the Flux version (app.kubernetes.io/version "
            f"labels: {sorted(versions) or 'none'}); is this `flux install "
            "--export` output?"
        )
    if not any(o["kind"] == "CustomResourceDefinition" for o in objects):
        raise ConfigError(
            f"{path}: holds no CustomResourceDefinitions; is this `flux install --export` output?"
        )
    bundle = FluxBundle(path, actual, str(versions.pop()), objects)
    kinds = bundle.kinds
    for number, obj in enumerate(objects, 1):
        problem = placement_problem(obj, kinds)
        if problem:
            raise ConfigError(f"{path}: document {number}: {problem}")
    return bundle
