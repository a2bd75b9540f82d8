"""The apply engine's ChangeSet, the full-compare path and the run record's actions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from agent import log
from agent.apply import Action, Change, apply_all
from agent.kube import Kube, load_kubeconfig
from kubesim import KubeSim
from tests.conftest import basic_config, fast_run_args, run_agent, writes_beyond_bookkeeping

_log = log.get("test")
DATA_NS = "/api/v1/namespaces/default"


def config_map(**data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": "default"},
        "data": data,
    }


def secret(value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "token", "namespace": "default"},
        "stringData": {"token": value},
    }


@pytest.fixture
def kube(kubesim: KubeSim) -> Iterator[Kube]:
    client = Kube(load_kubeconfig([kubesim.kubeconfig_path]))
    yield client
    client.close()


def dry_run_flags(sim: KubeSim) -> list[bool]:
    """The dryRun flag of each apply logged (kubesim logs a request before answering it)."""
    return [bool(r["dry_run"]) for r in sim.requests if r["verb"] == "apply"]


def only(changes: Any) -> Change:
    (change,) = changes.entries
    assert isinstance(change, Change)
    return change


def test_changeset_actions_created_configured_unchanged(kubesim: KubeSim, kube: Kube) -> None:
    created = only(apply_all(kube, [config_map(a="1")], _log))
    assert (created.action, created.subject) == (Action.CREATED, "ConfigMap/default/settings")
    assert dry_run_flags(kubesim) == [False]

    kubesim.clear_log()
    unchanged = only(apply_all(kube, [config_map(a="1")], _log))
    assert unchanged.action == Action.UNCHANGED and unchanged.fields == ()
    # Decided by the server: a dry-run apply, and nothing written.
    assert dry_run_flags(kubesim) == [True]
    assert kubesim.writes() == []

    configured = only(apply_all(kube, [config_map(a="1", b="2")], _log))
    assert configured.action == Action.CONFIGURED
    assert configured.fields == (".data.b",)
    assert str(configured) == "configured ConfigMap/default/settings: .data.b"
    assert kubesim.get("v1", "ConfigMap", "settings", "default")["data"] == {"a": "1", "b": "2"}
    # A field the agent no longer applies is removed by server-side apply: a change too.
    dropped = only(apply_all(kube, [config_map(b="2")], _log))
    assert (dropped.action, dropped.fields) == (Action.CONFIGURED, (".data.a",))


def test_changeset_dry_run_forms_write_nothing(kubesim: KubeSim, kube: Kube) -> None:
    apply_all(kube, [config_map(a="1")], _log)
    kube.dry_run = True
    kubesim.clear_log()
    other = {**config_map(), "metadata": {"name": "other", "namespace": "default"}}
    changes = apply_all(kube, [config_map(a="2"), config_map(a="1"), other], _log).entries
    assert [c.action for c in changes] == [
        Action.WOULD_CONFIGURE,
        Action.UNCHANGED,
        Action.WOULD_CREATE,
    ]
    assert changes[0].fields == (".data.a",)
    assert [c.action.writes for c in changes] == [True, False, True]
    assert kubesim.writes() == []
    assert kubesim.get("v1", "ConfigMap", "settings", "default")["data"] == {"a": "1"}


def test_a_changed_secret_lists_its_field_paths_never_values(kube: Kube) -> None:
    apply_all(kube, [secret("first-value-1234")], _log)
    change = only(apply_all(kube, [secret("second-value-5678")], _log))
    assert change.action == Action.CONFIGURED
    assert change.fields == (".data.token",)
    shown = str(change) + json.dumps(change.as_record())
    assert "value-" not in shown and "c2Vjb25k" not in shown  # neither text nor base64


# -- the full-compare path on a converged cluster --------------------------------------------


def test_full_compare_on_a_converged_cluster_writes_nothing(
    kubesim: KubeSim, write_config: Any
) -> None:
    assert (
        run_agent(*fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path)).code == 0
    )
    # New inputs (the Lease's duration) that change no object: the fast path is off.
    changed = write_config({**basic_config(), "lease": {"durationSeconds": 45}}, "changed.yaml")
    kubesim.clear_log()
    again = run_agent(*fast_run_args(changed, kubesim.kubeconfig_path))
    assert again.code == 0, again.output
    assert writes_beyond_bookkeeping(kubesim) == []
    compared = {r["path"] for r in kubesim.requests if r["verb"] == "apply" and r["dry_run"]}
    assert any("/deployments/" in p for p in compared)  # every object was compared
    assert any(p.endswith("/gitrepositories/appliance") for p in compared)

    kubesim.clear_log()
    dry = run_agent(*fast_run_args(changed, kubesim.kubeconfig_path, "--dry-run"))
    assert dry.code == 0, dry.output
    assert kubesim.writes() == []
    assert dry.stdout.startswith("dry run: 0 to create or change, ")
    plan = dry.stdout.splitlines()[1:]
    assert len(plan) > 30
    assert all(line.split("] ", 1)[1].startswith(("unchanged ", "skipped ")) for line in plan)


def test_the_fresh_path_applies_without_dry_runs(kubesim: KubeSim, write_config: Any) -> None:
    """Missing objects are created at once: the only comparison is of the namespace the
    run's Lease created first."""
    assert (
        run_agent(*fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path)).code == 0
    )
    dry = [r["path"] for r in kubesim.requests if r["dry_run"]]
    assert dry == ["/api/v1/namespaces/alga-system"]


# -- the run record --------------------------------------------------------------------------


def record(sim: KubeSim) -> dict[str, Any]:
    cm = sim.get("v1", "ConfigMap", "alga-bootstrap-run", "alga-system")
    loaded: dict[str, Any] = json.loads(cm["data"]["run.json"])
    return loaded


def test_the_record_holds_structured_actions(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(basic_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    steps = {s["name"]: s for s in record(kubesim)["steps"]}
    assert {
        "action": "created",
        "kind": "GitRepository",
        "namespace": "flux-system",
        "name": "appliance",
    } in steps["create-sync"]["changes"]
    assert all(c["action"] == "created" for c in steps["install-flux"]["changes"])

    # Someone edits the sync: the trusted re-run sees it and configures it back.
    edit = {
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": "GitRepository",
        "metadata": {"name": "appliance", "namespace": "flux-system"},
        "spec": {"interval": "7m"},
    }
    kubesim.put(edit, "kubectl-edit")
    again = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert again.code == 0, again.output
    steps = {s["name"]: s for s in record(kubesim)["steps"]}
    assert steps["create-sync"]["changes"] == [
        {
            "action": "configured",
            "kind": "GitRepository",
            "namespace": "flux-system",
            "name": "appliance",
            "fields": [".spec.interval"],
        }
    ]
    assert steps["create-sync"]["outcome"] == "changed"
    assert steps["install-flux"] == {
        "name": "install-flux",
        "outcome": "unchanged",
        "changes": [],
        "note": "Flux v2.9.4 running",
    }
    logged = [e for e in again.events() if e["event"].startswith("configured ")]
    assert logged[0]["event"] == "configured GitRepository/flux-system/appliance"
    assert logged[0]["fields"] == str([".spec.interval"])  # the log renders lists as text


def test_a_failed_step_is_recorded_from_its_result(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(basic_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    moved = write_config(basic_config(url="https://git.example/other/repo.git"), "moved.yaml")
    refused = run_agent(*fast_run_args(moved, kubesim.kubeconfig_path))
    assert refused.code == 3
    entry = record(kubesim)
    assert entry["result"] == "failed"
    assert [(s["name"], s["outcome"]) for s in entry["steps"]] == [
        ("preflight", "unchanged"),
        ("install-flux", "unchanged"),
        ("seed-site", "unchanged"),
        ("create-sync", "failed"),
    ]
    assert entry["steps"][-1]["note"] == entry["error"]


OLD_RECORD = {  # as the previous release wrote it: changes as lines of text
    "agentVersion": "0.1.0",
    "fluxVersion": "v2.9.4",
    "result": "succeeded",
    "error": None,
    "revision": "main@sha1:0123456789abcdef0123456789abcdef01234567",
    "startedAt": "2026-11-28T10:00:00Z",
    "finishedAt": "2026-11-28T10:00:40Z",
    "durationSeconds": 40.0,
    "inputsDigest": "0" * 64,
    "steps": [
        {"name": "preflight", "outcome": "unchanged", "changes": [], "note": "Kubernetes v1.33.2"},
        {
            "name": "create-sync",
            "outcome": "changed",
            "changes": [
                "created GitRepository/flux-system/appliance",
                "created Kustomization/flux-system/appliance",
                "added keys token to Secret/apps/shared",
            ],
            "note": "https://git.example/org/appliance.git ./clusters/appliance",
        },
        {"name": "verify", "outcome": "unchanged", "changes": [], "note": "main@sha1:0123"},
    ],
}


def test_status_reads_a_record_of_the_previous_release(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(basic_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    args = ["status", "--config", str(config), "--kubeconfig", str(kubesim.kubeconfig_path)]
    fresh = run_agent(*args)
    assert "changes (" in fresh.stdout and " created" in fresh.stdout  # counted by action

    cm = kubesim.get("v1", "ConfigMap", "alga-bootstrap-run", "alga-system")
    kubesim.put({**cm, "data": {"run.json": json.dumps(OLD_RECORD)}}, "alga-bootstrap")
    shown = run_agent(*args)
    assert shown.code == 0, shown.output
    assert (
        "Last run     succeeded at 2026-11-28T10:00:40Z, 3 changes, revision "
        "main@sha1:0123456789abcdef0123456789abcdef01234567"
    ) in shown.stdout
    as_json = json.loads(run_agent(*args, "-o", "json").stdout)
    assert (
        as_json["lastRun"]["steps"][1]["changes"][0]
        == "created GitRepository/flux-system/appliance"
    )
    # The next run reads it too: its inputs digest differs, so it compares everything.
    kubesim.clear_log()
    again = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert again.code == 0, again.output
    assert writes_beyond_bookkeeping(kubesim) == []
