"""Step 3: install (or repair) Flux from the bundle, in stages. Its controllers start
while the next steps seed the site and create the sync; `verify` waits for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent import health, log
from agent.apply import (
    Action,
    Change,
    ChangeSet,
    apply_staged,
    done,
    fetch_live,
    parallel,
)
from agent.bundle import FluxBundle
from agent.errors import NeedsDecision
from agent.health import MANAGED_BY_LABEL, OUR_MANAGERS
from agent.kube import FIELD_MANAGER, Kube
from agent.step import StepResult, step

NAME = "install-flux"
_log = log.get(NAME)
HELM_ANNOTATIONS = ("meta.helm.sh/release-name", "meta.helm.sh/release-namespace")
Obj = dict[str, Any]


@dataclass(frozen=True)
class Inputs:
    kube: Kube
    bundle: FluxBundle
    deadline: float
    trust_previous: bool  # the last run succeeded with these inputs: confirm, do not compare
    installed_flux_version: str | None  # preflight's finding
    taking_over_from: str | None  # preflight's finding (--force)


@dataclass(frozen=True, kw_only=True)
class Result(StepResult):
    running: bool  # its controllers were seen Available (the trusted path checks them)


@step(NAME)
def install(ctx: Inputs) -> Result:
    kube, bundle = ctx.kube, ctx.bundle
    kube.register_crds(bundle.crds)
    if ctx.trust_previous and not ctx.taking_over_from and _running(ctx):
        return Result(note=f"Flux {bundle.version} running", running=True)
    first_stage = bundle.first_stage
    live = fetch_live(kube, first_stage)
    _refuse_dropping_stored_versions(ctx, first_stage, live)
    if ctx.installed_flux_version and ctx.installed_flux_version != bundle.version:
        _log.info("upgrading Flux", installed=ctx.installed_flux_version, bundled=bundle.version)
    # First, so that a forced run stopped midway still leaves the next boot free to finish.
    changes = _take_over(ctx) if ctx.taking_over_from else ChangeSet()
    changes += apply_staged(kube, first_stage, bundle.second_stage, _log, ctx.deadline, live)
    outcome = "applied" if changes.writes else "unchanged"
    if not kube.dry_run:
        _log.info(f"Flux {outcome}", version=bundle.version, changes=len(changes.writes))
    return Result(changes=changes, note=f"Flux {bundle.version} {outcome}", running=False)


def foreign_marks(obj: Obj) -> Obj | None:
    """A merge patch removing what marks `obj` as another tool's, or None. The marks: the
    label flux2 reads to tell which tool installed Flux (MANAGED_BY_LABEL; only "" and "flux"
    mean Flux itself, fluxcd/flux2 installManagedByFlux) and Helm's
    release annotations (helm/helm pkg/action/validate.go, checkOwnership). The bundle carries
    none of them (its labels: instance, part-of, version), so removing them leaves exactly
    what the agent applied."""
    meta = obj["metadata"]
    manager = (meta.get("labels") or {}).get(MANAGED_BY_LABEL)
    patch: Obj = {}
    if manager is not None and manager.lower() not in OUR_MANAGERS:
        patch["labels"] = {MANAGED_BY_LABEL: None}
    annotations = {a: None for a in HELM_ANNOTATIONS if a in (meta.get("annotations") or {})}
    if annotations:
        patch["annotations"] = annotations
    return {"metadata": patch} if patch else None


def _take_over(ctx: Inputs) -> ChangeSet:
    """--force over another tool's Flux: the agent owns what it applies from now on, so the
    next (unforced) run does not refuse again."""
    live = [o for o in fetch_live(ctx.kube, list(ctx.bundle.objects)) if o is not None]
    todo = [(o, patch) for o in live if (patch := foreign_marks(o)) is not None]

    def strip(item: tuple[Obj, Obj]) -> Change:
        obj, patch = item
        ctx.kube.merge_patch(obj, patch)
        fields = [
            f".metadata.{where}.{key}" for where, keys in patch["metadata"].items() for key in keys
        ]
        return Change.of(
            obj, done(ctx.kube, Action.TAKEN_OVER), fields, f"from {ctx.taking_over_from}"
        )

    changes = ChangeSet(tuple(parallel(strip, todo)))
    if not ctx.kube.dry_run:
        _log.info(
            f"took Flux over from {ctx.taking_over_from!r}: removed its ownership marks",
            objects=len(changes),
        )
    return changes


def _refuse_dropping_stored_versions(
    ctx: Inputs, objects: list[dict[str, Any]], live: list[dict[str, Any] | None]
) -> None:
    """An upgrade may not drop a CRD version objects are still stored in: they would
    become unreadable."""
    for desired, current in zip(objects, live, strict=True):
        if desired["kind"] != "CustomResourceDefinition" or current is None:
            continue
        stored = set(current.get("status", {}).get("storedVersions", []))
        kept = {v["name"] for v in desired["spec"]["versions"]}
        dropped = sorted(stored - kept)
        if dropped:
            raise NeedsDecision(
                f"CRD {desired['metadata']['name']} still stores objects as "
                f"{', '.join(dropped)}, which Flux {ctx.bundle.version} no longer serves; "
                f"first migrate them with the installed Flux "
                f"({ctx.installed_flux_version or 'unknown'}): re-apply them at a served "
                "version, then remove the old version from status.storedVersions "
                "(`flux migrate` does both), and re-run"
            )


def _running(ctx: Inputs) -> bool:
    """Every CRD Established at the bundled version, every controller Available, and no
    controller's spec edited by another field manager (kubectl set image leaves it
    Available: only a full compare finds and repairs it)."""
    established = health.established_crds(ctx.kube)
    for crd in ctx.bundle.crds:
        found = established.get(crd["metadata"]["name"])
        labels = found["metadata"].get("labels", {}) if found else {}
        if labels.get("app.kubernetes.io/version") != ctx.bundle.version:
            return False
    live = health.live_controllers(ctx.kube, ctx.bundle.deployments)
    for deployment in live.values():
        editors = health.spec_edited_by_others(deployment, FIELD_MANAGER)
        if editors:
            _log.info(
                "controller edited; comparing every object",
                deployment=deployment["metadata"]["name"],
                managers=editors,
            )
            return False
    return not health.unready_controllers(ctx.kube, ctx.bundle.deployments, live)
