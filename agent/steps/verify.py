"""Step 6: did Flux accept the sync? The source must be Ready with an artifact, and the
root Kustomization must have attempted that revision. Then the root's patches must have
taken effect (a patch whose target upstream renamed selects nothing, silently). A rollout
still in progress is success: from here on it is Flux's job."""

from __future__ import annotations

from typing import Any

from agent import desired, log, patch_effects
from agent.context import RunContext
from agent.converge import (
    StepResult,
    condition,
    is_true,
    observed_current,
    parallel,
    seconds_since,
    wait_until,
)
from agent.errors import BootstrapError

_log = log.get("verify")
Obj = dict[str, Any]
# Kustomization Ready=False reasons that mean the attempt failed (not merely in progress).
FAILED_REASONS = {
    "BuildFailed",
    "ReconciliationFailed",
    "PruneFailed",
    "ArtifactFailed",
    "InvalidPath",
}
# What the agent's guarded JSON patches fail with when upstream sets the field itself.
GUARD_FAILURE = "testing value /spec/"
GUARD_HINT = (
    "; at this revision upstream sets a field the agent's patch would replace (a child "
    "Kustomization's patches or a HelmRelease's post-renderers), and the agent never drops "
    "upstream's: pin sync.ref back to the last revision that worked, or use an agent "
    "that knows the new layout"
)


# Conditions source-controller counts as a failed attempt (gitRepositoryFailConditions in
# internal/controller/gitrepository_controller.go): FetchFailed (auth, DNS, timeout:
# reasons AuthenticationFailed, GitOperationFailed), IncludeUnavailable, StorageOperationFailed.
FAIL_CONDITIONS = ("FetchFailed", "IncludeUnavailable", "StorageOperationFailed")


def _current(obj: Obj, cond: Obj) -> bool:
    """Whether a condition speaks of the object's current generation. Flux stamps each
    condition with it (fluxcd/pkg runtime/conditions, Set), also when a failed fetch leaves
    status.observedGeneration behind."""
    seen = cond.get("observedGeneration", obj.get("status", {}).get("observedGeneration", -1))
    return bool(seen >= obj["metadata"].get("generation", 0))


def source_failure(repo: Obj) -> str | None:
    """Flux's own message when the source failed for its current generation: Stalled, or
    an attempt that failed. source-controller retries a failed fetch with backoff; the run
    does not wait for it, it reports it (and Talos runs the agent again)."""
    name = f"GitRepository {repo['metadata']['namespace']}/{repo['metadata']['name']}"
    if is_true(repo, "Stalled") and observed_current(repo):
        return f"{name} is stalled: {_message(repo, 'Stalled')}"
    ready = condition(repo, "Ready")
    if ready is None or ready.get("status") != "False" or not _current(repo, ready):
        return None
    verified = condition(repo, "SourceVerified") or {}
    if not any(is_true(repo, c) for c in FAIL_CONDITIONS) and verified.get("status") != "False":
        return None  # still progressing (Progressing, NewRevision)
    message = f"{name} failed ({ready.get('reason')}): {ready.get('message')}"
    if "context deadline exceeded" in str(ready.get("message")):
        timeout = repo.get("spec", {}).get("timeout", "60s")
        message += f"; the fetch took longer than its timeout ({timeout}): raise sync.sourceTimeout"
    return message


def source_progress(repo: Obj | None) -> tuple[str, float] | None:
    """While source-controller works on the source: its own message and how long it has
    been at it (since its Reconciling condition last changed)."""
    reconciling = condition(repo, "Reconciling")
    if repo is None or reconciling is None or reconciling.get("status") != "True":
        return None
    since = reconciling.get("lastTransitionTime")
    return str(reconciling.get("message", "")), seconds_since(since) if since else 0.0


def source_revision(repo: Obj | None) -> str | None:
    """The artifact revision of a GitRepository Ready for its current generation, or None
    while it is still in progress. A failure raises with Flux's own message."""
    if repo is None:
        return None
    failure = source_failure(repo)
    if failure:
        raise BootstrapError(failure)
    if not observed_current(repo):
        return None
    revision = repo.get("status", {}).get("artifact", {}).get("revision")
    return revision if is_true(repo, "Ready") and revision else None


def attempted(ks: Obj | None, revision: str) -> bool:
    """True once the Kustomization attempted `revision` without a failure."""
    if ks is None:
        return False
    name = f"Kustomization {ks['metadata']['namespace']}/{ks['metadata']['name']}"
    if is_true(ks, "Stalled"):
        raise BootstrapError(f"{name} is stalled: {_message(ks, 'Stalled')}")
    if ks.get("status", {}).get("lastAttemptedRevision") != revision:
        return False
    ready = condition(ks, "Ready")
    if (
        observed_current(ks)
        and ready is not None
        and ready.get("status") == "False"
        and ready.get("reason") in FAILED_REASONS
    ):
        message = str(ready.get("message"))
        hint = GUARD_HINT if GUARD_FAILURE in message else ""
        raise BootstrapError(
            f"{name} failed to apply {revision} ({ready.get('reason')}): {message}{hint}"
        )
    return True


def _message(obj: Obj, kind: str) -> str:
    return str((condition(obj, kind) or {}).get("message", ""))


def verify(ctx: RunContext) -> StepResult:
    sync = ctx.config.sync
    if ctx.dry_run:
        return StepResult("verify", note="skipped in a dry run")
    repo_ref, ks_ref = desired.git_repository(sync), desired.kustomization(sync)
    first_look = list(ctx.sync_objects)  # what create-sync read saves the first requests
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
        if sync.patches and ks is not None and not observed_current(ks):  # an older spec
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
    )
    _log.info("Flux accepted the sync", revision=revision)
    if ctx.trust_previous and revision == ctx.previous_revision:
        # The last run checked these very patches at this very revision.
        return StepResult("verify", note=revision)
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
    return StepResult("verify", note=revision)
