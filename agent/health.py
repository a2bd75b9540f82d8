"""One readiness model for what the agent waits for and `status` shows: Deployments, CRDs
and Flux objects, each read as its controller reports it. `verify`, `install-flux` and
`status` all ask here, so they cannot disagree.

Flux objects follow flux2 pkg/bootstrap/bootstrap.go (objectReconciled: suspended is an
error at once; a status for an older generation is not an answer; Ready decides) and
kstatus (sigs.k8s.io/cli-utils pkg/kstatus/status, Compute: Stalled means failed,
Reconciling means in progress), with the per-condition observedGeneration Flux stamps
(fluxcd/pkg runtime/conditions, Set)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from agent.kube import Kube

Obj = dict[str, Any]
READY, PROGRESSING, FAILED = "ready", "progressing", "failed"
STALLED, SUSPENDED, MISSING = "stalled", "suspended", "missing"
CRD_API = "apiextensions.k8s.io/v1"
PROBE_CRD = "gitrepositories.source.toolkit.fluxcd.io"  # Flux is installed if this is
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
OUR_MANAGERS = {"flux", "alga-bootstrap"}  # its values meaning Flux itself, or us
SOURCE_KINDS = {"GitRepository", "OCIRepository", "HelmRepository", "Bucket", "HelmChart"}
# Ready=False reasons that mean an attempt failed, not that it is under way (fluxcd/pkg
# apis/meta/conditions.go; kustomize-controller internal/controller/
# kustomization_controller.go sets them in `reconcile`, helm-controller its own
# *Failed reasons). ArtifactFailed is special: see `flux`.
FAILED_REASONS = {
    "BuildFailed",
    "ReconciliationFailed",
    "PruneFailed",
    "HealthCheckFailed",
    "InvalidPath",
    "InvalidURL",
    "InvalidCELExpression",
    "InstallFailed",
    "UpgradeFailed",
    "RollbackFailed",
    "UninstallFailed",
    "TestFailed",
}
ARTIFACT_FAILED = "ArtifactFailed"
# Of those, the ones that come after the revision was applied: what it rolled out is not
# healthy within the timeout (kustomize-controller checkHealth; Flux keeps reconciling).
# A failure to show, but the revision was accepted.
ROLLOUT_REASONS = {"HealthCheckFailed"}
# Conditions source-controller counts as a failed attempt (gitRepositoryFailConditions in
# internal/controller/gitrepository_controller.go): FetchFailed (auth, DNS, timeout:
# reasons AuthenticationFailed, GitOperationFailed), IncludeUnavailable, StorageOperationFailed.
SOURCE_FAIL_CONDITIONS = ("FetchFailed", "IncludeUnavailable", "StorageOperationFailed")
# `flux resume` subcommands by kind (fluxcd/flux2 cmd/flux/resume_*.go).
_RESUME = {
    "GitRepository": "source git",
    "OCIRepository": "source oci",
    "HelmRepository": "source helm",
    "Bucket": "source bucket",
    "Kustomization": "kustomization",
    "HelmRelease": "helmrelease",
}


@dataclass(frozen=True)
class Health:
    state: str
    reason: str = ""
    message: str = ""  # the controller's own words, or the fix

    @property
    def failed(self) -> bool:
        return self.state in (FAILED, STALLED)


def condition(obj: Obj | None, kind: str) -> Obj | None:
    # `conditions: null` is what kube-apiserver stores for a new CRD until its controllers
    # set them (apiextensions/v1 CustomResourceDefinitionStatus.Conditions has no omitempty).
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            found: Obj = cond
            return found
    return None


def is_true(obj: Obj | None, kind: str) -> bool:
    cond = condition(obj, kind)
    return cond is not None and cond.get("status") == "True"


def observed_current(obj: Obj) -> bool:
    return bool(
        obj.get("status", {}).get("observedGeneration", -1) >= obj["metadata"].get("generation", 0)
    )


def current(obj: Obj, cond: Obj) -> bool:
    """Whether a condition speaks of the object's current generation. Flux stamps each
    condition with it (fluxcd/pkg runtime/conditions, Set), also when a failed attempt
    leaves status.observedGeneration behind (kustomize-controller finalizeStatus records
    the generation only once Ready)."""
    seen = cond.get("observedGeneration", obj.get("status", {}).get("observedGeneration", -1))
    return bool(seen >= obj["metadata"].get("generation", 0))


def name_of(obj: Obj) -> str:
    meta = obj["metadata"]
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj['kind']} {where}{meta['name']}"


def resume_command(obj: Obj) -> str:
    meta = obj["metadata"]
    what = _RESUME.get(obj["kind"], obj["kind"].lower())
    return f"flux resume {what} {meta['name']} -n {meta.get('namespace', '')}"


def suspended(obj: Obj | None) -> bool:
    """spec.suspend: the controller returns before reconciling (kustomize-controller and
    source-controller, Reconcile: "reconciliation is suspended for this object")."""
    return bool((obj or {}).get("spec", {}).get("suspend"))


def flux(obj: Obj | None, source_revision: str | None = None) -> Health:
    """A Flux object's health. For a Kustomization, `source_revision` is its source's
    artifact revision if known: Ready=False ArtifactFailed is set before the controller
    records lastAttemptedRevision (kustomization_controller.go: "Source artifact not
    found", or the download or the path check failing), so it is a failure only once that
    very revision was attempted, and otherwise the wait for the source."""
    if obj is None:
        return Health(MISSING)
    if suspended(obj):
        return Health(
            SUSPENDED,
            "Suspended",  # meta.SuspendedReason
            f"reconciliation is suspended (spec.suspend: true); resume it: {resume_command(obj)}",
        )
    return last_reported(obj, source_revision)


def last_reported(obj: Obj, source_revision: str | None = None) -> Health:
    """What the controller last reported, spec.suspend aside (a suspended object keeps
    the status of its last reconciliation)."""
    ready = condition(obj, "Ready") or {}
    stalled = condition(obj, "Stalled")
    if stalled is not None and stalled.get("status") == "True" and current(obj, stalled):
        return Health(STALLED, str(stalled.get("reason", "")), str(stalled.get("message", "")))
    reason, message = str(ready.get("reason", "")), str(ready.get("message", ""))
    if not ready or not current(obj, ready):
        return Health(PROGRESSING, reason, message or "waiting for the controller")
    if ready.get("status") == "False" and _attempt_failed(obj, reason, source_revision):
        return Health(FAILED, reason, message)
    reconciling = condition(obj, "Reconciling")
    if reconciling is not None and reconciling.get("status") == "True":
        return Health(PROGRESSING, reason, str(reconciling.get("message", "")) or message)
    if ready.get("status") == "True" and observed_current(obj):
        return Health(READY, reason, message)
    return Health(PROGRESSING, reason, message)


def _attempt_failed(obj: Obj, reason: str, source_revision: str | None) -> bool:
    if obj["kind"] in SOURCE_KINDS:
        # source-controller mirrors its failure conditions into Ready; Ready=False without
        # one of them is a fetch still under way.
        verified = condition(obj, "SourceVerified") or {}
        return any(is_true(obj, c) for c in SOURCE_FAIL_CONDITIONS) or (
            verified.get("status") == "False"
        )
    if reason == ARTIFACT_FAILED:
        attempted = obj.get("status", {}).get("lastAttemptedRevision")
        return source_revision is not None and attempted == source_revision
    return reason in FAILED_REASONS


def artifact_revision(repo: Obj | None) -> str | None:
    """The artifact revision of a source Ready for its current generation, else None;
    spec.suspend aside."""
    if repo is None or last_reported(repo).state != READY:
        return None
    revision = repo.get("status", {}).get("artifact", {}).get("revision")
    return str(revision) if revision else None


def deployment(deploy: Obj | None) -> Health:
    """As kstatus reads a Deployment (cli-utils pkg/kstatus/status/core.go,
    deploymentConditions): the current generation observed, every replica updated and
    available; ProgressDeadlineExceeded is a failure."""
    if deploy is None:
        return Health(MISSING)
    status = deploy.get("status", {})
    replicas = deploy.get("spec", {}).get("replicas", 1)
    available = condition(deploy, "Available") or {}
    progressing = condition(deploy, "Progressing") or {}
    message = str(available.get("message", ""))
    if not observed_current(deploy):
        return Health(PROGRESSING, "", "waiting for the controller to observe the new spec")
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        return Health(FAILED, "ProgressDeadlineExceeded", str(progressing.get("message", "")))
    if (
        available.get("status") == "True"
        and status.get("updatedReplicas", 0) >= replicas
        and status.get("availableReplicas", 0) >= replicas
    ):
        return Health(READY, str(available.get("reason", "")), message)
    return Health(PROGRESSING, str(available.get("reason", "")), message)


def crd(definition: Obj | None) -> Health:
    """A CustomResourceDefinition serves once Established; NamesAccepted=False never will
    (kubernetes apiextensions-apiserver pkg/controller/status, NamingConditionController)."""
    if definition is None:
        return Health(MISSING)
    names = condition(definition, "NamesAccepted") or {}
    if names.get("status") == "False":
        return Health(FAILED, str(names.get("reason", "")), str(names.get("message", "")))
    if is_true(definition, "Established"):
        return Health(READY, "Established")
    return Health(PROGRESSING, "", "not Established yet")


def established_crds(kube: Kube) -> dict[str, Obj]:
    """The cluster's CustomResourceDefinitions that serve (see crd), by name."""
    return {
        c["metadata"]["name"]: c
        for c in kube.list(CRD_API, "CustomResourceDefinition")
        if crd(c).state == READY
    }


def controller_namespaces(deployments: list[Obj]) -> list[str]:
    return sorted({d["metadata"]["namespace"] for d in deployments})


def live_controllers(kube: Kube, deployments: list[Obj]) -> dict[tuple[str, str], Obj]:
    """Flux's controller Deployments as the cluster has them, by namespace and name."""
    return {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d
        for ns in controller_namespaces(deployments)
        for d in kube.list("apps/v1", "Deployment", ns)
    }


def spec_edited_by_others(obj: Obj, manager: str) -> list[str]:
    """The field managers other than `manager` that own part of the object's spec: someone
    edited it (`kubectl set image`, `kubectl edit`). Status writes and metadata (the
    deployment controller's revision annotation) do not count."""
    return sorted(
        {
            str(entry.get("manager"))
            for entry in obj.get("metadata", {}).get("managedFields") or []
            if entry.get("manager") != manager
            and not entry.get("subresource")
            and "f:spec" in (entry.get("fieldsV1") or {})
        }
    )


def unready_controllers(
    kube: Kube, deployments: list[Obj], live: dict[tuple[str, str], Obj] | None = None
) -> list[tuple[Obj, Health]]:
    """Those of Flux's controller Deployments that are not Ready, each with its health:
    failed ones first. Empty once Flux runs."""
    live = live_controllers(kube, deployments) if live is None else live
    unready = []
    for desired in deployments:
        meta = desired["metadata"]
        found = deployment(live.get((meta["namespace"], meta["name"])))
        if found.state != READY:
            unready.append((desired, found))
    return sorted(unready, key=lambda pair: not pair[1].failed)


@dataclass(frozen=True)
class FluxInstallation:
    version: str | None  # the CRDs' app.kubernetes.io/version label
    managed_by: str | None  # which tool installed it (app.kubernetes.io/managed-by)


def installed_flux(kube: Kube) -> FluxInstallation | None:
    """Is Flux installed, which version, installed by whom: read from the GitRepository
    CRD's labels, as flux2 does (cmd/flux/cluster_info.go, getFluxClusterInfo)."""
    found = kube.get(CRD_API, "CustomResourceDefinition", PROBE_CRD)
    if found is None:
        return None
    labels = found["metadata"].get("labels", {})
    return FluxInstallation(labels.get("app.kubernetes.io/version"), labels.get(MANAGED_BY_LABEL))


def seconds_since(timestamp: str) -> float:
    """Seconds from a Kubernetes timestamp (RFC 3339, UTC) to now; never negative."""
    then = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return max((dt.datetime.now(dt.UTC) - then).total_seconds(), 0.0)
