"""One readiness model (issue 13): verify and status read Flux objects through agent/health.py
and agree; a suspended source or Kustomization is shown as such, and `run` says so at once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent import health, status
from agent.errors import BootstrapError
from agent.steps import verify
from kubesim import KubeSim
from kubesim.controllers import Outcome
from tests.conftest import basic_config, fast_run_args, run_agent

SOURCE_API, KS_API = "source.toolkit.fluxcd.io/v1", "kustomize.toolkit.fluxcd.io/v1"
REV, OLD = "main@sha1:2222", "main@sha1:1111"
Obj = dict[str, Any]


def cond(kind: str, state: str, reason: str, message: str = "", generation: int = 2) -> Obj:
    return {
        "type": kind,
        "status": state,
        "reason": reason,
        "message": message or reason,
        "observedGeneration": generation,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


def flux_obj(kind: str, *conditions: Obj, suspend: bool = False, **status_fields: Any) -> Obj:
    """A Flux object at generation 2; status.observedGeneration 2 unless given."""
    api = SOURCE_API if kind == "GitRepository" else KS_API
    spec: Obj = {"interval": "5m", "suspend": True} if suspend else {"interval": "5m"}
    if kind == "Kustomization":
        spec["sourceRef"] = {"kind": "GitRepository", "name": "appliance"}
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": "appliance", "namespace": "flux-system", "generation": 2},
        "spec": spec,
        "status": {"observedGeneration": 2, "conditions": list(conditions), **status_fields},
    }


ARTIFACT = {"artifact": {"revision": REV}}
READY_REPO = cond("Ready", "True", "Succeeded", f"stored artifact for revision '{REV}'")
FETCH_ERROR = "failed to checkout and determine revision: unable to clone: repository not found"

# (what, object, health state, status state, verify: a revision / True = accepted,
# None / False = waits, a string = fails with it)
TABLE: list[tuple[str, Obj | None, str, str, Any]] = [
    ("source ready", flux_obj("GitRepository", READY_REPO, **ARTIFACT), "ready", "ready", REV),
    (
        "source fetching",
        flux_obj(
            "GitRepository",
            cond("Reconciling", "True", "Progressing", "building artifact"),
            cond("Ready", "Unknown", "Progressing", "building artifact"),
        ),
        "progressing",
        "progressing",
        None,
    ),
    (
        # source-controller: the conditions carry the generation, status.observedGeneration
        # stays behind, Reconciling says it retries.
        "source fetch failed, retried",
        flux_obj(
            "GitRepository",
            cond("Ready", "False", "GitOperationFailed", FETCH_ERROR),
            cond("FetchFailed", "True", "GitOperationFailed", FETCH_ERROR),
            cond("Reconciling", "True", "ProgressingWithRetry", "retrying"),
            observedGeneration=1,
        ),
        "failed",
        "failed",
        "repository not found",
    ),
    (
        "source stalled",
        flux_obj(
            "GitRepository",
            cond("Ready", "False", "InvalidURL", "bad URL"),
            cond("Stalled", "True", "InvalidURL", "bad URL"),
        ),
        "stalled",
        "failed",
        "is stalled: bad URL",
    ),
    (
        "source ready for an older generation",
        flux_obj("GitRepository", {**READY_REPO, "observedGeneration": 1}, observedGeneration=1),
        "progressing",
        "progressing",
        None,
    ),
    (
        "source suspended, its artifact current",
        flux_obj("GitRepository", READY_REPO, suspend=True, **ARTIFACT),
        "suspended",
        "suspended",
        REV,
    ),
    (
        "source suspended before its spec was fetched",
        flux_obj(
            "GitRepository",
            {**READY_REPO, "observedGeneration": 1},
            suspend=True,
            observedGeneration=1,
            **ARTIFACT,
        ),
        "suspended",
        "suspended",
        "flux resume source git appliance -n flux-system",
    ),
    (
        "kustomization applied the revision",
        flux_obj(
            "Kustomization",
            cond("Ready", "True", "ReconciliationSucceeded", f"Applied revision: {REV}"),
            lastAttemptedRevision=REV,
        ),
        "ready",
        "ready",
        True,
    ),
    (
        "kustomization ready at the old revision",
        flux_obj(
            "Kustomization",
            cond("Ready", "True", "ReconciliationSucceeded", f"Applied revision: {OLD}"),
            lastAttemptedRevision=OLD,
        ),
        "ready",
        "ready",
        False,
    ),
    (
        # Set before lastAttemptedRevision (kustomization_controller.go): waiting for the source.
        "ArtifactFailed before the revision was attempted",
        flux_obj(
            "Kustomization",
            cond("Ready", "False", "ArtifactFailed", "Source artifact not found, retrying in 30s"),
            lastAttemptedRevision=OLD,
        ),
        "progressing",
        "progressing",
        False,
    ),
    (
        "ArtifactFailed for the revision attempted",
        flux_obj(
            "Kustomization",
            cond("Ready", "False", "ArtifactFailed", "kustomization path not found: ./nope"),
            lastAttemptedRevision=REV,
        ),
        "failed",
        "failed",
        "(ArtifactFailed): kustomization path not found",
    ),
    (
        # A failure is stamped on the condition; status.observedGeneration stays behind
        # (finalizeStatus records it only when Ready), Reconciling turns ProgressingWithRetry.
        "BuildFailed, retried",
        flux_obj(
            "Kustomization",
            cond("Ready", "False", "BuildFailed", "kustomize build failed: bad patch"),
            cond("Reconciling", "True", "ProgressingWithRetry", "retrying"),
            observedGeneration=1,
            lastAttemptedRevision=REV,
        ),
        "failed",
        "failed",
        "(BuildFailed): kustomize build failed: bad patch",
    ),
    (
        "HealthCheckFailed: applied, not healthy",
        flux_obj(
            "Kustomization",
            cond("Ready", "False", "HealthCheckFailed", "Deployment/msp/alga-core not ready"),
            lastAttemptedRevision=REV,
        ),
        "failed",
        "failed",
        True,
    ),
    (
        "waiting for a dependency",
        flux_obj(
            "Kustomization",
            cond("Ready", "False", "DependencyNotReady", "dependency 'platform' is not ready"),
            lastAttemptedRevision=OLD,
        ),
        "progressing",
        "progressing",
        False,
    ),
    (
        "kustomization stalled",
        flux_obj(
            "Kustomization",
            cond("Ready", "False", "InvalidCELExpression", "bad expression"),
            cond("Stalled", "True", "InvalidCELExpression", "bad expression"),
        ),
        "stalled",
        "failed",
        "is stalled: bad expression",
    ),
    (
        "kustomization suspended after applying the revision",
        flux_obj(
            "Kustomization",
            cond("Ready", "True", "ReconciliationSucceeded", f"Applied revision: {REV}"),
            suspend=True,
            lastAttemptedRevision=REV,
        ),
        "suspended",
        "suspended",
        True,
    ),
    (
        "kustomization suspended before the revision",
        flux_obj(
            "Kustomization",
            cond("Ready", "True", "ReconciliationSucceeded", f"Applied revision: {OLD}"),
            suspend=True,
            lastAttemptedRevision=OLD,
        ),
        "suspended",
        "suspended",
        "flux resume kustomization appliance -n flux-system",
    ),
    ("kustomization missing", None, "missing", "failed", False),
]


def through_verify(obj: Obj | None, kind: str) -> Any:
    """What verify makes of `obj`: its answer, or its error message."""
    try:
        if kind == "GitRepository":
            return verify.source_revision(obj)
        return verify.attempted(obj, REV)
    except BootstrapError as err:
        return str(err)


@pytest.mark.parametrize(
    ("obj", "model", "shown", "verified"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_verify_and_status_read_the_same_model(
    obj: Obj | None, model: str, shown: str, verified: Any
) -> None:
    kind = obj["kind"] if obj else "Kustomization"
    source_revision = REV if kind == "Kustomization" else None
    found = health.flux(obj, source_revision)
    assert found.state == model
    assert status.shown(health.flux(obj, source_revision)) == shown
    answer = through_verify(obj, kind)
    if isinstance(verified, str) and verified != REV:
        assert isinstance(answer, str) and verified in answer, answer
    else:
        assert answer == verified
    # Where verify fails, status never says ready or progressing, and the other way round.
    if isinstance(answer, str) and answer != REV:
        assert shown in ("failed", "suspended")
    if found.failed and answer is not True:
        assert isinstance(answer, str)
    if found.state == health.SUSPENDED and obj is not None:
        assert health.resume_command(obj) in found.message


# -- against kubesim ---------------------------------------------------------------------------


def _status(sim: KubeSim, config: Path, *extra: str) -> Any:
    return run_agent(
        "status", "--config", str(config), "--kubeconfig", str(sim.kubeconfig_path), *extra
    )


def _suspend(sim: KubeSim, kind: str, name: str) -> None:
    """As `flux suspend` does: spec.suspend true, under its own field manager."""
    api = SOURCE_API if kind == "GitRepository" else KS_API
    sim.put(
        {
            "apiVersion": api,
            "kind": kind,
            "metadata": {"name": name, "namespace": "flux-system"},
            "spec": {"suspend": True},
        },
        "flux",
    )


def test_suspended_root_fails_fast_and_status_shows_it(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(basic_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    _suspend(kubesim, "Kustomization", "appliance")
    # Nothing new to apply: the suspended root already applied the source's revision.
    again = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert again.code == 0, again.output
    assert "is suspended" in again.output
    assert "flux resume kustomization appliance" in again.output
    # A new revision the suspended root can never attempt: said at once, not at the deadline.
    moved = write_config(basic_config(ref={"branch": "release"}), "moved.yaml")
    started = time.monotonic()
    result = run_agent(*fast_run_args(moved, kubesim.kubeconfig_path, "--timeout", "60s"))
    assert result.code == 1, result.output
    assert time.monotonic() - started < 20
    assert len(result.messages()) == 1  # besides the run's log
    assert "Kustomization flux-system/appliance is suspended" in result.stderr
    assert "flux resume kustomization appliance -n flux-system" in result.stderr
    report = json.loads(_status(kubesim, moved, "-o", "json").stdout)
    assert report["kustomizations"][0]["state"] == "suspended"
    assert report["state"] == "suspended"
    text = _status(kubesim, moved)
    assert text.code == 1
    assert "‖ Kustomization flux-system/appliance" in text.stdout
    assert "flux resume kustomization appliance -n flux-system" in text.stdout
    assert "state: suspended" in text.stdout


def test_suspended_source_fails_fast(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(basic_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    _suspend(kubesim, "GitRepository", "appliance")
    moved = write_config(basic_config(ref={"branch": "release"}), "moved.yaml")
    started = time.monotonic()
    result = run_agent(*fast_run_args(moved, kubesim.kubeconfig_path, "--timeout", "60s"))
    assert result.code == 1, result.output
    assert time.monotonic() - started < 20
    assert "GitRepository flux-system/appliance is suspended" in result.stderr
    assert "flux resume source git appliance -n flux-system" in result.stderr
    report = json.loads(_status(kubesim, moved, "-o", "json").stdout)
    assert report["source"]["state"] == "suspended"


def test_status_shows_a_suspended_child(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(basic_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    kubesim.put(
        {
            "apiVersion": KS_API,
            "kind": "Kustomization",
            "metadata": {
                "name": "apps",
                "namespace": "flux-system",
                "labels": {
                    "kustomize.toolkit.fluxcd.io/name": "appliance",
                    "kustomize.toolkit.fluxcd.io/namespace": "flux-system",
                },
            },
            "spec": {
                "interval": "5m",
                "prune": True,
                "path": "./apps",
                "suspend": True,
                "sourceRef": {"kind": "GitRepository", "name": "appliance"},
            },
        }
    )
    time.sleep(0.5)  # the stand-in would have reconciled it by now, were it not suspended
    # Only the CRD's default status, as the API server writes it: no controller touched it.
    apps = kubesim.get(KS_API, "Kustomization", "apps", "flux-system")
    assert apps.get("status") == {"observedGeneration": -1}
    report = json.loads(_status(kubesim, config, "-o", "json").stdout)
    root = report["kustomizations"][0]
    assert root["state"] == "ready"
    assert [(c["name"], c["state"]) for c in root["children"]] == [("apps", "suspended")]
    assert report["state"] == "suspended"
    text = _status(kubesim, config)
    assert "flux resume kustomization apps -n flux-system" in text.stdout


def test_artifact_failed_is_a_failure_to_run_and_status_alike(
    kubesim: KubeSim, write_config: Any
) -> None:
    """kustomize-controller's ArtifactFailed for the revision it attempted (its path check:
    "kustomization path not found"): run fails with Flux's message, status shows failed."""
    kubesim.controllers.kustomization_failures["appliance"] = Outcome(
        "ArtifactFailed", "kustomization path not found: stat ./clusters/appliance: no such file"
    )
    config = write_config(basic_config())
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path, "--timeout", "60s"))
    assert result.code == 1, result.output
    assert "(ArtifactFailed): kustomization path not found" in result.stderr
    report = json.loads(_status(kubesim, config, "-o", "json").stdout)
    root = report["kustomizations"][0]
    assert (root["state"], root["reason"]) == ("failed", "ArtifactFailed")
    assert report["state"] == "failed"
