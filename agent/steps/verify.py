"""Step 6: does Flux run, and did it accept the sync? Its controllers must be Available
(they started while the site was seeded), the source Ready with an artifact, and the
root Kustomization must have attempted that revision. Then the root's patches must have
taken effect (a patch whose target upstream renamed selects nothing, silently). A rollout
still in progress is success: from here on it is Flux's job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent import desired, health, log, patch_effects
from agent.apply import parallel, wait_until
from agent.bundle import FluxBundle
from agent.config import SyncConfig
from agent.errors import BootstrapError
from agent.kube import Kube, Watch, Watched
from agent.step import StepResult, step

NAME = "verify"
_log = log.get(NAME)
Obj = dict[str, Any]


@dataclass(frozen=True)
class Inputs:
    kube: Kube
    sync: SyncConfig
    deadline: float
    live: tuple[Obj | None, Obj | None]  # GitRepository, Kustomization as create-sync left them
    trusted_revision: str | None  # the revision the trusted last run verified, if any
    flux: FluxBundle  # its controllers, to wait for
    flux_running: bool  # install-flux saw them Available


@dataclass(frozen=True, kw_only=True)
class Result(StepResult):
    revision: str | None  # the source revision Flux accepted; None in a dry run


# What the agent's guarded JSON patches fail with when upstream sets the field itself.
GUARD_FAILURE = "testing value /spec/"
GUARD_HINT = (
    "; at this revision upstream sets a field the agent's patch would replace (a child "
    "Kustomization's patches or a HelmRelease's post-renderers), and the agent never drops "
    "upstream's: pin sync.ref back to the last revision that worked, or use an agent "
    "that knows the new layout"
)


def source_failure(repo: Obj) -> str | None:
    """Flux's own message when the source failed for its current generation: Stalled, or
    an attempt that failed. source-controller retries a failed fetch with backoff; the run
    does not wait for it, it reports it (and Talos runs the agent again)."""
    found = health.flux(repo)
    name = health.name_of(repo)
    if found.state == health.STALLED:
        return f"{name} is stalled: {found.message}"
    if not found.failed:
        return None
    message = f"{name} failed ({found.reason}): {found.message}"
    if "context deadline exceeded" in found.message:
        timeout = repo.get("spec", {}).get("timeout", "60s")
        message += f"; the fetch took longer than its timeout ({timeout}): raise sync.sourceTimeout"
    return message


def source_progress(repo: Obj | None) -> tuple[str, float] | None:
    """While source-controller works on the source: its own message and how long it has
    been at it (since its Reconciling condition last changed)."""
    reconciling = health.condition(repo, "Reconciling")
    if repo is None or reconciling is None or reconciling.get("status") != "True":
        return None
    since = reconciling.get("lastTransitionTime")
    return str(reconciling.get("message", "")), health.seconds_since(since) if since else 0.0


def _suspended(obj: Obj, what: str) -> BootstrapError:
    return BootstrapError(
        f"{health.name_of(obj)} is suspended (spec.suspend: true), so Flux will not "
        f"{what}; resume it ({health.resume_command(obj)}) and re-run alga-bootstrap"
    )


def source_revision(repo: Obj | None) -> str | None:
    """The artifact revision of a GitRepository Ready for its current generation, or None
    while it is still in progress. A failure raises with Flux's own message. A suspended
    one is fine while its artifact is that of its current spec (someone paused fetching:
    the agent has what it needs); otherwise it can never become so, and the run says so at
    once instead of waiting out its deadline (as flux2 bootstrap's objectReconciled)."""
    if repo is None:
        return None
    failure = source_failure(repo)
    if failure:
        raise BootstrapError(failure)
    revision = health.artifact_revision(repo)
    if health.suspended(repo):
        if revision is None:
            raise _suspended(repo, "fetch its current spec")
        _log.warning(f"{health.name_of(repo)} is suspended", fix=health.resume_command(repo))
    return revision


def attempted(ks: Obj | None, revision: str) -> bool:
    """True once the Kustomization attempted `revision` without a failure. A suspended one
    that already applied `revision` for its current spec is fine (a tech paused it on
    purpose, and nothing the run waits for is missing); one that has not can never attempt
    it, and the run fails at once naming the fix."""
    if ks is None:
        return False
    name = health.name_of(ks)
    found = health.flux(ks, revision)
    if found.state == health.STALLED:
        raise BootstrapError(f"{name} is stalled: {found.message}")
    at_revision = ks.get("status", {}).get("lastAttemptedRevision") == revision
    if found.state == health.SUSPENDED:
        if not (at_revision and health.last_reported(ks, revision).state == health.READY):
            raise _suspended(ks, f"apply {revision}")
        _log.warning(f"{name} is suspended", fix=health.resume_command(ks))
        return True
    if not at_revision:
        return False
    if found.state == health.FAILED and found.reason not in health.ROLLOUT_REASONS:
        hint = GUARD_HINT if GUARD_FAILURE in found.message else ""
        raise BootstrapError(
            f"{name} failed to apply {revision} ({found.reason}): {found.message}{hint}"
        )
    return True


def _wait_for_flux(ctx: Inputs) -> None:
    """Until every Flux controller is Available; one past its progress deadline (an image
    that cannot be pulled, a crash loop) fails the run at once, as kstatus judges it
    (health.deployment)."""
    controllers = ctx.flux.deployments
    waiting_for = ""

    def check() -> bool | None:
        nonlocal waiting_for
        unready = health.unready_controllers(ctx.kube, controllers)
        if not unready:
            return True
        deploy, found = unready[0]
        namespace, name = deploy["metadata"]["namespace"], deploy["metadata"]["name"]
        waiting_for = f"Deployment {namespace}/{name}: {found.message or found.state}"
        if found.failed:
            raise BootstrapError(
                f"Flux did not start: Deployment {namespace}/{name} {found.reason}: "
                f"{found.message.rstrip('.')}; see `kubectl -n {namespace} describe "
                f"deployment {name}`, then re-run"
            )
        return None

    wait_until(
        "the Flux controllers to be Available",
        check,
        ctx.deadline,
        _log,
        progress=lambda: {"waiting_for": waiting_for},
        wake=Watch(
            ctx.kube,
            [
                Watched("apps/v1", "Deployment", ns)
                for ns in health.controller_namespaces(controllers)
            ],
        ),
    )
    _log.info("Flux running", version=ctx.flux.version)


@step(NAME)
def verify(ctx: Inputs) -> Result:
    sync = ctx.sync
    if ctx.kube.dry_run:
        return Result(note="skipped in a dry run", revision=None)
    if not ctx.flux_running:
        _wait_for_flux(ctx)
    repo_ref, ks_ref = desired.git_repository(sync), desired.kustomization(sync)
    # What create-sync read saves the first requests.
    first_look = list(ctx.live) if all(o is not None for o in ctx.live) else []
    applied: list[Obj] = []  # the root's patches, as Flux has them

    def check() -> str | None:
        nonlocal first_look, applied
        repo: Obj | None
        ks: Obj | None
        if len(first_look) == 2:
            repo, ks = first_look
        else:
            repo, ks = parallel(ctx.kube.get_like, [repo_ref, ks_ref])
        first_look = []
        latest["repo"] = repo
        revision = source_revision(repo)
        if revision is None or not attempted(ks, revision):
            return None
        if sync.patches and ks is not None and not health.observed_current(ks):  # an older spec
            return None
        applied = (ks or {}).get("spec", {}).get("patches", [])
        return revision

    def progress() -> dict[str, object]:
        fetching = source_progress(latest["repo"])
        if fetching is None:
            return {}
        return {"source": fetching[0], "source_fetching_s": round(fetching[1])}

    latest: dict[str, Obj | None] = {"repo": None}
    revision = wait_until(
        f"Flux to accept {sync.namespace}/{sync.name}",
        check,
        ctx.deadline,
        _log,
        interval=2.0,
        progress=progress,
        wake=Watch(ctx.kube, [Watched.one(repo_ref), Watched.one(ks_ref)]),
    )
    _log.info("Flux accepted the sync", revision=revision)
    accepted = "Flux accepted the sync"
    if revision == ctx.trusted_revision:
        # The last run checked these very patches at this very revision.
        return Result(note=accepted, revision=revision)
    ref = f"{sync.ref.kind} {sync.ref.value}"
    effects = patch_effects.check(ctx.kube, applied, ref, revision)
    failed = [e for e in effects if e.state == patch_effects.FAILED]
    if failed:
        raise BootstrapError(
            "the sync's patches did not take effect: "
            + "; ".join(f"{e.kind} {e.namespace}/{e.name} {e.message}" for e in failed)
        )
    pending = [f"{e.kind} {e.namespace}/{e.name}" for e in effects if e.state != patch_effects.OK]
    _log.info("patches in effect", checked=len(effects), pending=pending)
    return Result(note=accepted, revision=revision)
