"""Step 5: the Git credentials Secret, the GitRepository and the root Kustomization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent import desired, log, patch_effects
from agent.apply import Action, Change, ChangeSet, apply_all, parallel, unmet_fields
from agent.config import GitCredentials, SyncConfig, url_without_secrets
from agent.errors import ConfigError, NeedsDecision
from agent.kube import Kube
from agent.patches import guarded_path, has_foreign_entries
from agent.step import StepResult, step

NAME = "create-sync"
_log = log.get(NAME)
Obj = dict[str, Any]


@dataclass(frozen=True)
class Inputs:
    kube: Kube
    sync: SyncConfig
    force: bool
    trust_previous: bool  # the last run succeeded with these inputs: confirm, do not compare


@dataclass(frozen=True, kw_only=True)
class Result(StepResult):
    # The live GitRepository and Kustomization as this step left them (either may be
    # missing in a dry run): verify's first look, saving its first requests.
    live: tuple[Obj | None, Obj | None]


def credentials_secret(credentials: GitCredentials, namespace: str) -> Obj:
    values = {}
    for key, path in credentials.files.items():
        try:
            values[key] = path.read_bytes()
        except OSError as err:
            raise ConfigError(
                f"{path}: cannot read Git credentials file ({err.strerror})"
            ) from None
        log.register_secret(values[key])
    return desired.secret(namespace, credentials.secret_name, values)


@step(NAME)
def create(ctx: Inputs) -> Result:
    sync = ctx.sync
    wanted = [desired.git_repository(sync), desired.kustomization(sync)]
    if sync.credentials is not None:
        wanted.insert(0, credentials_secret(sync.credentials, sync.namespace))
    live = parallel(ctx.kube.get_like, wanted)
    if live[-1] is None or unmet_fields(wanted[-1], live[-1]):
        wanted[-1] = desired.kustomization(sync, _shared_lists(ctx))
    _refuse_retargeting(ctx, wanted[-2], live[-2], wanted[-1], live[-1])
    if ctx.trust_previous and all(
        o is not None and not unmet_fields(w, o) for w, o in zip(wanted, live, strict=True)
    ):  # the trusted re-run: what the last run applied is still there, as written
        unchanged = ChangeSet(tuple(Change.of(w, Action.UNCHANGED) for w in wanted))
        return Result(changes=unchanged, note=f"{sync.url} {sync.path}", live=(live[-2], live[-1]))
    changes = apply_all(ctx.kube, wanted, _log, live)
    if changes.writes and not ctx.kube.dry_run:
        live = parallel(ctx.kube.get_like, wanted[-2:])
    return Result(changes=changes, note=f"{sync.url} {sync.path}", live=(live[-2], live[-1]))


def _refuse_retargeting(
    ctx: Inputs, repo: Obj, live_repo: Obj | None, ks: Obj, live_ks: Obj | None
) -> None:
    """With prune on, pointing an existing sync elsewhere deletes the application."""
    if ctx.force:
        return
    old_url = (live_repo or {}).get("spec", {}).get("url")
    if old_url and old_url != repo["spec"]["url"]:
        raise NeedsDecision(
            f"GitRepository {ctx.sync.namespace}/{ctx.sync.name} syncs "
            f"{url_without_secrets(old_url)}, the config says {repo['spec']['url']}; with "
            "prune on, a wrong source deletes the application. Fix sync.url, or re-run with "
            "--force"
        )
    old_path = (live_ks or {}).get("spec", {}).get("path")
    if old_path and old_path != ks["spec"]["path"]:
        raise NeedsDecision(
            f"Kustomization {ctx.sync.namespace}/{ctx.sync.name} applies path "
            f"{old_path}, the config says {ks['spec']['path']}; with prune on, a wrong path "
            "deletes the application. Fix sync.path, or re-run with --force"
        )


def _shared_lists(ctx: Inputs) -> frozenset[int]:
    """The guarded patches whose target already shows entries that are not the agent's
    (upstream's own patches on a child Kustomization, say): those append instead. The
    targets are read concurrently."""
    guarded = [
        (i, patch, path, group)
        for i, patch in enumerate(ctx.sync.patches)
        if (path := guarded_path(patch)) is not None
        and (group := patch_effects.target_of(patch)) is not None
    ]

    def shared(item: tuple[int, Obj, str, tuple[str, str, str, str]]) -> bool:
        _, patch, path, (api_version, kind, namespace, name) = item
        live = ctx.kube.get(api_version, kind, name, namespace)
        if live is not None and has_foreign_entries(live, patch):
            _log.info(f"{kind} {namespace}/{name} carries its own {path}; appending to them")
            return True
        return False

    appends = parallel(shared, guarded)
    return frozenset(item[0] for item, append in zip(guarded, appends, strict=True) if append)
