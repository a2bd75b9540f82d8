"""Step 2: is this cluster one the bundled Flux may be installed on, by us?"""

from __future__ import annotations

import re

from agent import health, log
from agent.context import RunContext
from agent.converge import StepResult
from agent.errors import NeedsDecision
from agent.health import PROBE_CRD

_log = log.get("preflight")
OUR_MANAGERS = {"flux", "alga-bootstrap"}


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def check(ctx: RunContext) -> StepResult:
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
            ctx.taking_over_from = manager
        installed = flux.version
        ctx.installed_flux_version = installed
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
        flux_installed=ctx.installed_flux_version,
        flux_bundled=ctx.bundle.version,
    )
    return StepResult("preflight", note=note)
