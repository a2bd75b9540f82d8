"""The agent's configuration as typed, frozen objects: what `load` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TALOS_ENDPOINTS = ("https://127.0.0.1:7445", "https://127.0.0.1:6443")
REF_KINDS = ("branch", "tag", "semver", "commit", "name")


@dataclass(frozen=True)
class GitRef:
    kind: str  # one of REF_KINDS
    value: str
    branch: str = ""  # with a commit: the one branch Flux fetches it from

    def as_spec(self) -> dict[str, str]:
        return (
            {"branch": self.branch, self.kind: self.value}
            if self.branch
            else {self.kind: self.value}
        )

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_spec().items())


@dataclass(frozen=True)
class GitCredentials:
    """Files whose contents become the Flux Git Secret; values are read at run time only."""

    secret_name: str
    files: dict[str, Path]  # Secret key -> file


@dataclass(frozen=True)
class SyncConfig:
    name: str
    namespace: str
    url: str
    ref: GitRef
    path: str
    source_interval: str
    source_timeout: str
    interval: str
    retry_interval: str
    timeout: str
    prune: bool
    wait: bool
    patches: tuple[dict[str, Any], ...] = ()
    credentials: GitCredentials | None = None
    sparse_checkout: tuple[str, ...] = ()  # the only folders Flux checks out and stores


@dataclass(frozen=True)
class FluxConfig:
    manifests: Path
    sha256: str
    namespace: str


@dataclass(frozen=True)
class ClusterConfig:
    credentials: str  # "kubeconfig" (a file) or "talos" (machined's admin kubeconfig)
    kubeconfig: Path | None
    endpoints: tuple[str, ...] | None  # None: the kubeconfig's server, or the Talos endpoints


@dataclass(frozen=True)
class TalosConfig:
    socket: str
    # False: never; True: a single-node site (the cluster endpoint is this node); a
    # hostname: only the control-plane node of that name bootstraps (several of them).
    bootstrap_etcd: bool | str
    bootstrap_after_s: float  # how long the API may stay down before etcd bootstrap


@dataclass(frozen=True)
class SecretKey:
    name: str
    generate_bytes: int = 0  # > 0: random bytes, hex-encoded
    file: Path | None = None


@dataclass(frozen=True)
class GeneratedSecret:
    """A Secret created once and never rotated: keys come from files or are generated."""

    namespace: str
    name: str
    keys: tuple[SecretKey, ...]


@dataclass(frozen=True)
class NamespaceSpec:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CreateOnceConfigMap:
    """Created once and never overwritten; or, with `create_once` off, kept equal to `data`
    on every run (the agent owns it)."""

    namespace: str
    name: str
    data: dict[str, str]
    create_once: bool = True


@dataclass(frozen=True)
class PrerequisiteManifest:
    """Objects applied before Flux, skipped entirely when `skip_if_exists` is found."""

    file: Path
    skip_if_exists: tuple[str, str, str, str] | None  # apiVersion, kind, namespace, name
    objects: tuple[dict[str, Any], ...] = ()  # read and checked with the config


@dataclass(frozen=True)
class SiteConfig:
    namespaces: tuple[NamespaceSpec, ...] = ()
    secrets: tuple[GeneratedSecret, ...] = ()
    config_maps: tuple[CreateOnceConfigMap, ...] = ()
    manifests: tuple[PrerequisiteManifest, ...] = ()


@dataclass(frozen=True)
class RecordConfig:
    namespace: str
    name: str


@dataclass(frozen=True)
class LeaseConfig:
    name: str
    duration_s: int


@dataclass(frozen=True)
class AlgaSettings:
    """What the rest of the agent needs to know of the `alga` section once it is expanded."""

    mode: str
    tags: dict[str, str]  # alga.images


@dataclass(frozen=True)
class Config:
    source: str  # where the config came from, for messages
    cluster: ClusterConfig
    flux: FluxConfig
    sync: SyncConfig
    site: SiteConfig
    record: RecordConfig
    lease: LeaseConfig
    talos: TalosConfig
    # Filled by the preset that owns the `alga` section (agent/presets/alga.py).
    alga: AlgaSettings | None = None
