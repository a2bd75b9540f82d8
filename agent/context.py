"""What every step of a run sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.bundle import FluxBundle
from agent.config import Config
from agent.kube import Kube

Obj = dict[str, Any]


@dataclass
class RunContext:
    config: Config
    bundle: FluxBundle
    kube: Kube
    deadline: float  # time.monotonic() by which the run gives up
    force: bool = False
    dry_run: bool = False
    # The last recorded run succeeded with these very inputs: steps may confirm health with
    # a few reads instead of comparing every object.
    trust_previous: bool = False
    previous_revision: str | None = None  # the revision the trusted run verified
    installed_flux_version: str | None = None
    taking_over_from: str | None = None  # --force over a Flux another tool manages (its name)
    sync_objects: list[Obj] = field(default_factory=list)  # live GitRepository, Kustomization
