"""Step 2: is this cluster one the bundled Flux may be installed on, by us?"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent import health, log
from agent.bundle import FluxBundle
from agent.errors import NeedsDecision
from agent.health import OUR_MANAGERS, PROBE_CRD
from agent.kube import Kube
from agent.step import StepResult, step

NAME = "preflight"
_log = log.get(NAME)


@dataclass(frozen=True)
class Inputs:
    kube: Kube
    bundle: FluxBundle
    force: bool


@dataclass(frozen=True, kw_only=True)
class Result(StepResult):
    installed_flux_version: str | None  # before this run; None when not installed
    taking_over_from: str | None  # --force over a Flux another tool manages (its name)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


@step(NAME)
def check(ctx: Inputs) -> Result:
    server = ctx.kube.version()
    major = int(re.sub(r"\D", "", str(server.get("major", "0"))) or 0)
    minor = int(re.sub(r"\D", "", str(server.get("minor", "0"))) or 0)
    needed = ctx.bundle.min_kubernetes
    if (major, minor) < needed:
        raise NeedsDecision(
            f"Kubernetes {server.get('gitVersion', f'{major}.{minor}')} is older than Flux "
            f"{ctx.bundle.version} supports (>= {needed[0]}.{needed[1]}); upgrade Kubernetes "
            "or bundle an older Flux"
        )
    flux = health.installed_flux(ctx.kube)
    note = f"Kubernetes {server.get('gitVersion')}; Flux not installed"
    installed = taking_over_from = None
    if flux is not None:
        manager = flux.managed_by
        if manager and manager.lower() not in OUR_MANAGERS:
            if not ctx.force:
                raise NeedsDecision(
                    f"Flux on this cluster is managed by {manager!r} (label app.kubernetes.io/"
                    f"managed-by on CRD {PROBE_CRD}); alga-bootstrap would take it over. Remove "
                    "that installation, or re-run with --force to take ownership"
                )
            _log.warning(f"taking over Flux from {manager!r} (--force)")
            taking_over_from = manager
        installed = flux.version
        if (
            installed
            and version_tuple(installed) > version_tuple(ctx.bundle.version)
            and not ctx.force
        ):
            raise NeedsDecision(
                f"Flux {installed} is installed, newer than the bundled {ctx.bundle.version}; "
                "a downgrade can break the cluster. Bundle Flux >= the installed one, or "
                "re-run with --force to downgrade"
            )
        note = f"Kubernetes {server.get('gitVersion')}; Flux {installed or 'unknown'} installed"
    _log.info(
        "preflight passed",
        kubernetes=server.get("gitVersion"),
        flux_installed=installed,
        flux_bundled=ctx.bundle.version,
    )
    return Result(note=note, installed_flux_version=installed, taking_over_from=taking_over_from)
