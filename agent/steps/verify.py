"""Step 6: did Flux accept the sync? The source must be Ready with an artifact, and the
root Kustomization must have attempted that revision. A rollout still in progress is
success: from here on it is Flux's job."""

from __future__ import annotations

from typing import Any

from agent import desired, log
from agent.context import RunContext
from agent.converge import (
    StepResult,
    condition,
    is_true,
    observed_current,
    parallel,
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


def source_revision(repo: Obj | None) -> str | None:
    """The artifact revision of a GitRepository Ready for its current generation, or None
    while it is still in progress. A failure raises with Flux's own message."""
    if repo is None or not observed_current(repo):
        return None
    name = f"GitRepository {repo['metadata']['namespace']}/{repo['metadata']['name']}"
    if is_true(repo, "Stalled"):
        raise BootstrapError(f"{name} is stalled: {_message(repo, 'Stalled')}")
    ready = condition(repo, "Ready")
    if (
        ready is not None
        and ready.get("status") == "False"
        and ready.get("reason") != "Progressing"
    ):
        raise BootstrapError(f"{name} failed ({ready.get('reason')}): {ready.get('message')}")
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
        raise BootstrapError(
            f"{name} failed to apply {revision} ({ready.get('reason')}): {ready.get('message')}"
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

    def check() -> str | None:
        nonlocal first_look
        repo: Obj | None
        ks: Obj | None
        if len(first_look) == 2:
            repo, ks = first_look
        else:
            repo, ks = parallel(ctx.kube.get_like, [repo_ref, ks_ref])
        first_look = []
        revision = source_revision(repo)
        if revision is None or not attempted(ks, revision):
            return None
        return revision

    revision = wait_until(
        f"Flux to accept {sync.namespace}/{sync.name}", check, ctx.deadline, _log, interval=2.0
    )
    _log.info("Flux accepted the sync", revision=revision)
    return StepResult("verify", note=revision)
