"""Stand-ins for what a real cluster's controllers would do, each after a short delay."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kubesim import kustomize
from kubesim.store import ApiError, Store, condition, now

SOURCE = ("source.toolkit.fluxcd.io", "gitrepositories")
KUSTOMIZE = ("kustomize.toolkit.fluxcd.io", "kustomizations")
REQUESTED_AT = "reconcile.fluxcd.io/requestedAt"


@dataclass
class Outcome:
    """A failure a test wants a Flux object to report."""

    reason: str
    message: str
    stalled: bool = False


@dataclass
class Controllers:
    store: Store
    delay: float = 0.2
    source_failures: dict[str, Outcome] = field(default_factory=dict)  # by GitRepository URL
    # How long a fetch takes, by GitRepository URL (a slow link); a failure comes after it.
    source_fetch_seconds: dict[str, float] = field(default_factory=dict)
    kustomization_failures: dict[str, Outcome] = field(default_factory=dict)  # by name
    # GitRepositories (by URL) the stand-in never reconciles, as when source-controller is
    # not running: the object keeps no status, so it never becomes Ready.
    unreconciled_sources: set[str] = field(default_factory=set)
    # What the source holds at each Kustomization path (rendered objects): given one, the
    # Kustomization builds it with its patches and applies it, as kustomize-controller does.
    sources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _first_seen: dict[tuple[Any, ...], float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._loop, name="kubesim-controllers", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.reconcile_once()
            except ApiError as err:
                # Usually an object changed under us and the next tick sees the new state;
                # kept for tests, which assert the stand-ins never write invalid status.
                self.errors.append(err.message)

    def _due(self, key: tuple[Any, ...], extra: float = 0.0) -> bool:
        seen = self._first_seen.setdefault(key, time.monotonic())
        return time.monotonic() - seen >= self.delay + extra

    def _objects(self, group: str, plural: str) -> list[dict[str, Any]]:
        for (g, _v, p), t in list(self.store.types.items()):
            if (g, p) == (group, plural):
                return self.store.list(t, "")[0]
        return []

    def _set_status(self, obj: dict[str, Any], status: dict[str, Any], manager: str) -> None:
        api_version = obj["apiVersion"]
        t = self.store.type_for_kind(api_version, obj["kind"])
        meta = obj["metadata"]
        self.store.update(
            t,
            meta.get("namespace", ""),
            meta["name"],
            {"status": status},
            manager,
            subresource="status",
        )

    def reconcile_once(self) -> None:
        for deploy in self._objects("apps", "deployments"):
            self._deployment(deploy)
        for repo in self._objects(*SOURCE):
            self._git_repository(repo)
        for ks in self._objects(*KUSTOMIZE):
            self._kustomization(ks)

    def _deployment(self, d: dict[str, Any]) -> None:
        meta, status = d["metadata"], d.get("status", {})
        if status.get("observedGeneration") == meta["generation"]:
            return
        if not self._due(("deploy", meta["namespace"], meta["name"], meta["generation"])):
            return
        replicas = d.get("spec", {}).get("replicas", 1)
        self._set_status(
            d,
            {
                "observedGeneration": meta["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
                "conditions": [
                    condition(
                        "Available",
                        "True",
                        "MinimumReplicasAvailable",
                        "Deployment has minimum availability.",
                    ),
                    condition(
                        "Progressing",
                        "True",
                        "NewReplicaSetAvailable",
                        f'ReplicaSet "{meta["name"]}" has successfully progressed.',
                    ),
                ],
            },
            "kube-controller-manager",
        )

    def _git_repository(self, repo: dict[str, Any]) -> None:
        """source-controller's conditions, as internal/controller/gitrepository_controller.go
        (release/v1.9.x) sets them: `reconcile` marks Reconciling and Ready=Unknown before
        the fetch ("processing object: new generation", or reconcileStorage's "building
        artifact" while there is no artifact); a fetch error (gitCheckout: FetchFailed,
        GitOperationFailed) leaves status.observedGeneration behind and Reconciling with
        reason ProgressingWithRetry (internal/reconcile ComputeReconcileResult); a stalling
        error sets Stalled, removes Reconciling and records the generation."""
        meta, spec, status = repo["metadata"], repo.get("spec", {}), repo.get("status", {})
        if spec.get("url") in self.unreconciled_sources or spec.get("suspend"):
            # A suspended one is not reconciled: GitRepositoryReconciler.reconcile
            # (internal/controller/gitrepository_controller.go) returns ResultEmpty before
            # any work, so the deferred SummarizeAndPatch records no new generation; only a
            # requestedAt annotation would be noted (not modelled). Status stays as it was.
            return
        generation = meta["generation"]
        requested = meta.get("annotations", {}).get(REQUESTED_AT, "")
        failure = self.source_failures.get(spec.get("url", ""))
        if (
            status.get("observedGeneration") == generation
            and status.get("lastHandledReconcileAt", "") == requested
        ) or (failure and not failure.stalled and _shows(repo, "FetchFailed", failure.reason)):
            return
        key = ("git", meta["namespace"], meta["name"], generation, requested)
        fetch_seconds = self.source_fetch_seconds.get(spec.get("url", ""), 0.0)
        if not self._due(key, fetch_seconds):
            if fetch_seconds and self._due(key) and not _shows(repo, "Reconciling", "Progressing"):
                self._set_status(repo, _fetching(repo), "source-controller")
            return
        new: dict[str, Any] = {"observedGeneration": generation}
        if requested:
            new["lastHandledReconcileAt"] = requested
        if failure:
            fetch_failed = [
                _flux_condition(generation, "Ready", "False", failure.reason, failure.message),
                _flux_condition(generation, "FetchFailed", "True", failure.reason, failure.message),
            ]
            if failure.stalled:
                new["conditions"] = [
                    *fetch_failed,
                    _flux_condition(generation, "Stalled", "True", failure.reason, failure.message),
                ]
            else:
                new = {
                    **{k: v for k, v in status.items() if k != "conditions"},
                    **{k: v for k, v in new.items() if k != "observedGeneration"},
                    "conditions": [
                        *fetch_failed,
                        _flux_condition(
                            generation,
                            "Reconciling",
                            "True",
                            "ProgressingWithRetry",
                            _progress_message(repo),
                        ),
                    ],
                }
        else:
            revision = git_revision(spec)
            path = (
                f"gitrepository/{meta['namespace']}/{meta['name']}/"
                f"{revision.rsplit(':', 1)[-1]}.tar.gz"
            )
            new["artifact"] = {
                "revision": revision,
                "path": path,
                "url": f"http://source-controller.flux-system.svc.cluster.local./{path}",
                "digest": "sha256:" + hashlib.sha256(revision.encode()).hexdigest(),
                "lastUpdateTime": now(),
            }
            message = f"stored artifact for revision '{revision}'"
            new["conditions"] = [
                _flux_condition(generation, "Ready", "True", "Succeeded", message),
                _flux_condition(generation, "ArtifactInStorage", "True", "Succeeded", message),
            ]
        self._set_status(repo, new, "source-controller")

    def _kustomization(self, ks: dict[str, Any]) -> None:
        meta, spec, status = ks["metadata"], ks.get("spec", {}), ks.get("status", {})
        if spec.get("suspend"):
            self._suspended_kustomization(ks)
            return
        ref = spec.get("sourceRef", {})
        source = self._source(ref.get("namespace", meta["namespace"]), ref.get("name", ""))
        revision = (source or {}).get("status", {}).get("artifact", {}).get("revision", "")
        requested = meta.get("annotations", {}).get(REQUESTED_AT, "")
        if (
            status.get("observedGeneration") == meta["generation"]
            and status.get("lastAttemptedRevision", "") == revision
            and status.get("lastHandledReconcileAt", "") == requested
        ):
            return
        key = ("ks", meta["namespace"], meta["name"], meta["generation"], revision, requested)
        if not self._due(key):
            return
        new: dict[str, Any] = {"observedGeneration": meta["generation"]}
        if requested:
            new["lastHandledReconcileAt"] = requested
        failure = self.kustomization_failures.get(meta["name"])
        if not revision:
            message = f"Source artifact not found, retrying in {spec.get('retryInterval', '30s')}"
            new["conditions"] = [condition("Ready", "False", "ArtifactFailed", message)]
        elif failure:
            new["lastAttemptedRevision"] = revision
            new["conditions"] = [condition("Ready", "False", failure.reason, failure.message)]
            if failure.stalled:
                new["conditions"].append(
                    condition("Stalled", "True", failure.reason, failure.message)
                )
        else:
            new["lastAttemptedRevision"] = revision
            try:
                self._build_and_apply(ks)
            except kustomize.BuildError as err:
                new["lastAppliedRevision"] = status.get("lastAppliedRevision", "")
                new["conditions"] = [
                    condition("Ready", "False", "BuildFailed", f"kustomize build failed: {err}")
                ]
            else:
                new["lastAppliedRevision"] = revision
                new["conditions"] = [
                    condition(
                        "Ready", "True", "ReconciliationSucceeded", f"Applied revision: {revision}"
                    )
                ]
        self._set_status(ks, new, "kustomize-controller")

    def _suspended_kustomization(self, ks: dict[str, Any]) -> None:
        """kustomize-controller internal/controller/kustomization_controller.go, Reconcile:
        a suspended Kustomization is not reconciled ("Reconciliation is suspended for this
        object"), but the deferred finalizeStatus still runs, and records the generation
        when Ready is True (so `flux suspend` leaves a Ready one current)."""
        meta, status = ks["metadata"], ks.get("status", {})
        ready = [c for c in status.get("conditions", []) if c.get("type") == "Ready"]
        if status.get("observedGeneration") == meta["generation"]:
            return
        if ready and ready[0].get("status") == "True":
            self._set_status(
                ks, {**status, "observedGeneration": meta["generation"]}, "kustomize-controller"
            )

    def _build_and_apply(self, ks: dict[str, Any]) -> None:
        """fluxcd/kustomize-controller `internal/controller/kustomization_controller.go`
        (`reconcile`: build, then server-side apply, Namespaces first, each object labelled
        `kustomize.toolkit.fluxcd.io/name` and `/namespace`; a build error applies nothing
        and reports BuildFailed). No pruning, no health checks here."""
        meta, spec = ks["metadata"], ks.get("spec", {})
        objects = self.sources.get(spec.get("path", ""))
        if objects is None:
            return
        built = kustomize.build(objects, spec.get("patches", []), spec.get("images", []))
        built.sort(key=lambda o: o["kind"] != "Namespace")
        for obj in built:
            labels = obj.setdefault("metadata", {}).setdefault("labels", {})
            labels["kustomize.toolkit.fluxcd.io/name"] = meta["name"]
            labels["kustomize.toolkit.fluxcd.io/namespace"] = meta["namespace"]
            t = self.store.type_for_kind(obj["apiVersion"], obj["kind"])
            m = obj["metadata"]
            self.store.apply(
                t, m.get("namespace", ""), m["name"], obj, "kustomize-controller", True
            )

    def _source(self, namespace: str, name: str) -> dict[str, Any] | None:
        for repo in self._objects(*SOURCE):
            if (repo["metadata"]["namespace"], repo["metadata"]["name"]) == (namespace, name):
                return repo
        return None


def _flux_condition(
    generation: int, kind: str, status: str, reason: str, message: str
) -> dict[str, Any]:
    """Flux sets every condition's observedGeneration (fluxcd/pkg runtime/conditions, Set)."""
    return {**condition(kind, status, reason, message), "observedGeneration": generation}


def _shows(obj: dict[str, Any], kind: str, reason: str) -> bool:
    """Whether `obj` has condition `kind` with `reason` for its current generation."""
    for cond in obj.get("status", {}).get("conditions", []):
        if cond.get("type") == kind:
            return bool(
                cond.get("reason") == reason
                and cond.get("observedGeneration") == obj["metadata"]["generation"]
            )
    return False


def _progress_message(repo: dict[str, Any]) -> str:
    status = repo.get("status", {})
    if not status.get("artifact"):
        return "building artifact"  # reconcileStorage, while there is no artifact
    return (
        f"processing object: new generation {status.get('observedGeneration', 0)}"
        f" -> {repo['metadata']['generation']}"
    )


def _fetching(repo: dict[str, Any]) -> dict[str, Any]:
    """The status while a fetch runs: Reconciling=True and Ready=Unknown with the same
    message (fluxcd/pkg runtime/reconcile, ProgressiveStatus); the rest is left as it was."""
    status, generation = repo.get("status", {}), repo["metadata"]["generation"]
    message = _progress_message(repo)
    kept = [
        c
        for c in status.get("conditions", [])
        if c.get("type") not in ("Ready", "Reconciling", "Stalled")
    ]
    return {
        **{k: v for k, v in status.items() if k != "conditions"},
        "conditions": [
            _flux_condition(generation, "Reconciling", "True", "Progressing", message),
            _flux_condition(generation, "Ready", "Unknown", "Progressing", message),
            *kept,
        ],
    }


def git_revision(spec: dict[str, Any]) -> str:
    """A stable fake revision in Flux's `<ref>@sha1:<hash>` form."""
    ref = spec.get("ref", {})
    digest = hashlib.sha1(f"{spec.get('url')}{sorted(ref.items())}".encode()).hexdigest()
    if "commit" in ref:  # with a branch: `<branch>@sha1:<commit>` (fluxcd/pkg git, Commit.String)
        return (
            f"{ref['branch']}@sha1:{ref['commit']}" if "branch" in ref else f"sha1:{ref['commit']}"
        )
    name = ref.get("branch") or ref.get("tag") or ref.get("semver") or ref.get("name") or "HEAD"
    return f"{name}@sha1:{digest}"
