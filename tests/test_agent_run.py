"""`alga-bootstrap run` end to end against kubesim over HTTPS (issue: the agent)."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubesim import KubeSim
from kubesim.controllers import Outcome
from tests.conftest import (
    BUNDLE,
    BUNDLE_SHA,
    REPO,
    Result,
    agent_env,
    basic_config,
    fast_run_args,
    run_agent,
    writes_beyond_bookkeeping,
)

SOURCE_API, KS_API = "source.toolkit.fluxcd.io/v1", "kustomize.toolkit.fluxcd.io/v1"
FLUX_OBJECTS = [d for d in yaml.safe_load_all(BUNDLE.read_text()) if d]


def flux_installed(sim: KubeSim) -> bool:
    return all(
        sim.exists(
            o["apiVersion"], o["kind"], o["metadata"]["name"], o["metadata"].get("namespace", "")
        )
        for o in FLUX_OBJECTS
    )


def record(sim: KubeSim) -> dict[str, Any]:
    cm = sim.get("v1", "ConfigMap", "alga-bootstrap-run", "alga-system")
    loaded: dict[str, Any] = json.loads(cm["data"]["run.json"])
    return loaded


@pytest.fixture
def config(write_config: Any) -> Path:
    path: Path = write_config(basic_config())
    return path


def test_fresh_run_installs_flux_and_the_sync(kubesim: KubeSim, config: Path) -> None:
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    assert flux_installed(kubesim)
    repo = kubesim.get(SOURCE_API, "GitRepository", "appliance", "flux-system")
    assert repo["spec"] == {
        "url": "https://git.example/org/appliance.git",
        "ref": {"branch": "main"},
        "interval": "1m",
        "timeout": "60s",  # Flux's default, written out
    }
    ks = kubesim.get(KS_API, "Kustomization", "appliance", "flux-system")
    assert ks["spec"]["path"] == "./clusters/appliance"
    assert ks["spec"]["sourceRef"] == {
        "kind": "GitRepository",
        "name": "appliance",
        "namespace": "flux-system",
    }
    assert ks["spec"]["prune"] is True
    # Every object was applied server-side by the agent's field manager.
    managers = {m["manager"] for m in repo["metadata"]["managedFields"]}
    assert "alga-bootstrap" in managers
    entry = record(kubesim)
    assert entry["result"] == "succeeded"
    assert entry["fluxVersion"] == "v2.9.4"
    assert entry["revision"] == repo["status"]["artifact"]["revision"]
    assert [s["name"] for s in entry["steps"]] == [
        "preflight",
        "install-flux",
        "seed-site",
        "create-sync",
        "verify",
    ]
    assert entry["steps"][1]["outcome"] == "changed"
    # CRDs and namespaces went before everything else (staged apply).
    applies = [r["path"] for r in kubesim.requests if r["verb"] == "apply"]
    first_deploy = next(i for i, p in enumerate(applies) if "/deployments/" in p)
    last_crd = max(i for i, p in enumerate(applies) if "customresourcedefinitions" in p)
    assert last_crd < first_deploy
    events = result.events()  # JSON lines when stderr is not a terminal
    assert events[-1]["event"] == "done"


def test_rerun_on_a_converged_cluster_only_reads(kubesim: KubeSim, config: Path) -> None:
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    kubesim.clear_log()
    revision = kubesim.store.revision
    again = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert again.code == 0, again.output
    assert kubesim.writes() == []
    assert len(kubesim.requests) <= 15, [r["path"] for r in kubesim.requests]
    assert kubesim.store.revision == revision
    assert again.events()[-1]["event"] == "nothing to do"


def test_rerun_with_a_changed_config_compares_everything(
    kubesim: KubeSim, write_config: Any
) -> None:
    assert (
        run_agent(*fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path)).code == 0
    )
    kubesim.clear_log()
    changed = write_config(basic_config(ref={"tag": "v1.2.0"}), "changed.yaml")
    result = run_agent(*fast_run_args(changed, kubesim.kubeconfig_path))
    assert result.code == 0, result.output  # changing the ref is allowed
    # Only the GitRepository changed; besides it, the run wrote its record and its Lease.
    assert writes_beyond_bookkeeping(kubesim) == [
        "/apis/source.toolkit.fluxcd.io/v1/namespaces/flux-system/gitrepositories/appliance"
    ]
    assert any(r["path"].endswith("/alga-bootstrap-run") for r in kubesim.writes())
    repo = kubesim.get(SOURCE_API, "GitRepository", "appliance", "flux-system")
    assert repo["spec"]["ref"] == {"tag": "v1.2.0"}


def test_deleted_object_is_repaired_when_the_inputs_change(
    kubesim: KubeSim, write_config: Any
) -> None:
    assert (
        run_agent(*fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path)).code == 0
    )
    t = kubesim.store.type_for_kind("apps/v1", "Deployment")
    kubesim.store.delete(t, "flux-system", "helm-controller")
    result = run_agent(*fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    assert kubesim.exists("apps/v1", "Deployment", "helm-controller", "flux-system")


def test_api_refusing_connections_then_coming_up(kubesim_factory: Any, config: Path) -> None:
    sim = kubesim_factory(controllers=True, controller_delay=0.05, refuse_seconds=math.inf)
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", *fast_run_args(config, sim.kubeconfig_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=agent_env(),
        cwd=REPO,
    )
    assert agent.stderr is not None
    first = agent.stderr.readline()  # started: the API comes up 2.5 s later
    threading.Timer(2.5, sim.accept_connections).start()
    out, err = agent.communicate(timeout=120)
    result = Result(agent.returncode, out, first + err)
    assert result.code == 0, result.output
    waits = [e for e in result.events() if e["event"] == "API not ready yet"]
    assert waits and "ConnectError" in waits[0]["detail"]
    assert all("deadline_in_s" in e for e in waits)


def test_readyz_unavailable_for_a_while(kubesim_factory: Any, config: Path) -> None:
    sim = kubesim_factory(controllers=True, controller_delay=0.05, readyz_unavailable_seconds=1.5)
    result = run_agent(*fast_run_args(config, sim.kubeconfig_path))
    assert result.code == 0, result.output
    assert any("HTTP 503" in e.get("detail", "") for e in result.events())


def test_api_never_ready_fails_with_exit_1(kubesim_factory: Any, config: Path) -> None:
    sim = kubesim_factory(readyz_unavailable_seconds=60)
    result = run_agent(*fast_run_args(config, sim.kubeconfig_path, "--timeout", "2s"))
    assert result.code == 1
    assert "did not become ready" in result.stderr
    assert sim.writes() == []


@pytest.mark.parametrize("status", [500, 429])
def test_injected_failures_on_writes_are_retried(
    kubesim: KubeSim, config: Path, status: int
) -> None:
    kubesim.faults.fail_next(4, status, verb="apply", retry_after=1 if status == 429 else None)
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    failed = [r for r in kubesim.requests if r["status"] == status]
    assert len(failed) == 4
    assert flux_installed(kubesim)
    retries = [e for e in result.events() if e["event"] == "request failed, retrying"]
    assert len(retries) == 4


def test_slow_crd_establishment_is_waited_for(kubesim_factory: Any, config: Path) -> None:
    sim = kubesim_factory(controllers=True, controller_delay=0.05, crd_established_delay=1.5)
    result = run_agent(*fast_run_args(config, sim.kubeconfig_path))
    assert result.code == 0, result.output
    applies = [r for r in sim.requests if r["verb"] == "apply"]
    crd_done = max(r["ts"] for r in applies if "customresourcedefinitions" in r["path"])
    first_deploy = min(r["ts"] for r in applies if "/deployments/" in r["path"])
    assert first_deploy - crd_done >= 1.0  # nothing of stage two before the CRDs were ready


def test_run_killed_mid_install_then_rerun_completes(kubesim_factory: Any, config: Path) -> None:
    sim = kubesim_factory(controllers=True, controller_delay=0.05, latency_ms=40)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *fast_run_args(config, sim.kubeconfig_path)],
        cwd=REPO,
        env=agent_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while len(sim.writes()) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert 0 < len(sim.writes()) < 40 and not flux_installed(sim)
    result = run_agent(*fast_run_args(config, sim.kubeconfig_path))
    assert result.code == 0, result.output
    assert flux_installed(sim)
    sim.clear_log()
    assert run_agent(*fast_run_args(config, sim.kubeconfig_path)).code == 0
    assert sim.writes() == []


def test_git_credentials_from_files(kubesim: KubeSim, tmp_path: Path, write_config: Any) -> None:
    (tmp_path / "id").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecretkeymaterial42\n")
    (tmp_path / "known").write_text("git.example ssh-ed25519 AAAAC3Nza\n")
    config = write_config(
        basic_config(
            url="ssh://git@git.example/org/appliance.git",
            credentials={"identityFile": "id", "knownHostsFile": "known"},
        )
    )
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    secret = kubesim.get("v1", "Secret", "appliance-git", "flux-system")
    assert set(secret["data"]) == {"identity", "known_hosts"}
    assert base64.b64decode(secret["data"]["identity"]) == (tmp_path / "id").read_bytes()
    repo = kubesim.get(SOURCE_API, "GitRepository", "appliance", "flux-system")
    assert repo["spec"]["secretRef"] == {"name": "appliance-git"}
    assert "secretkeymaterial42" not in result.output
    # Rotating the key file is an operator's decision: the Secret follows the file.
    (tmp_path / "id").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nrotated-key-99\n")
    again = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert again.code == 0, again.output
    secret = kubesim.get("v1", "Secret", "appliance-git", "flux-system")
    assert b"rotated-key-99" in base64.b64decode(secret["data"]["identity"])
    assert "rotated-key-99" not in again.output


def test_source_failure_stops_early_with_fluxs_message(kubesim: KubeSim, config: Path) -> None:
    kubesim.controllers.source_failures["https://git.example/org/appliance.git"] = Outcome(
        "GitOperationFailed",
        "failed to checkout and determine revision: unable to clone: repository not found",
        stalled=True,
    )
    started = time.monotonic()
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path, "--timeout", "60s"))
    assert result.code == 1
    assert time.monotonic() - started < 20  # stopped early, not at the deadline
    assert "repository not found" in result.stderr
    assert len(result.messages()) == 1
    assert record(kubesim)["result"] == "failed"


def test_kustomization_build_failure_is_reported(kubesim: KubeSim, config: Path) -> None:
    kubesim.controllers.kustomization_failures["appliance"] = Outcome(
        "BuildFailed", "kustomization path not found: stat ./clusters/appliance: no such file"
    )
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path, "--timeout", "60s"))
    assert result.code == 1
    assert "BuildFailed" in result.stderr and "kustomization path not found" in result.stderr


def test_progressing_kustomization_is_success(kubesim: KubeSim, config: Path) -> None:
    kubesim.controllers.kustomization_failures["appliance"] = Outcome(
        "HealthCheckFailed", "health check failed: Deployment/msp/alga-core not ready"
    )
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert result.code == 0, result.output


def _helm_managed_flux(sim: KubeSim) -> None:
    for doc in FLUX_OBJECTS:
        if doc["kind"] == "CustomResourceDefinition":
            labels = {**doc["metadata"]["labels"], "app.kubernetes.io/managed-by": "Helm"}
            sim.put({**doc, "metadata": {**doc["metadata"], "labels": labels}}, "helm")


def test_helm_managed_flux_needs_force(kubesim: KubeSim, config: Path) -> None:
    _helm_managed_flux(kubesim)
    kubesim.clear_log()
    refused = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert refused.code == 3
    assert "managed by 'Helm'" in refused.stderr and "--force" in refused.stderr
    assert writes_beyond_bookkeeping(kubesim) == []
    forced = run_agent(*fast_run_args(config, kubesim.kubeconfig_path, "--force"))
    assert forced.code == 0, forced.output
    assert flux_installed(kubesim)


def test_newer_flux_installed_is_not_downgraded(kubesim: KubeSim, config: Path) -> None:
    crd = next(
        d
        for d in FLUX_OBJECTS
        if d["metadata"]["name"] == "gitrepositories.source.toolkit.fluxcd.io"
    )
    labels = {**crd["metadata"]["labels"], "app.kubernetes.io/version": "v2.10.0"}
    kubesim.put({**crd, "metadata": {**crd["metadata"], "labels": labels}}, "flux")
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert result.code == 3
    assert "newer than the bundled v2.9.4" in result.stderr


def test_kubernetes_older_than_flux_supports(kubesim_factory: Any, config: Path) -> None:
    sim = kubesim_factory(k8s_version="1.31.4")
    result = run_agent(*fast_run_args(config, sim.kubeconfig_path))
    assert result.code == 3
    assert "older than Flux v2.9.4 supports (>= 1.33)" in result.stderr
    assert writes_beyond_bookkeeping(sim) == []


def test_changing_the_path_needs_force(kubesim: KubeSim, write_config: Any) -> None:
    assert (
        run_agent(*fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path)).code == 0
    )
    moved = write_config(basic_config(path="./clusters/other"), "moved.yaml")
    refused = run_agent(*fast_run_args(moved, kubesim.kubeconfig_path))
    assert refused.code == 3
    assert "applies path ./clusters/appliance" in refused.stderr
    ks = kubesim.get(KS_API, "Kustomization", "appliance", "flux-system")
    assert ks["spec"]["path"] == "./clusters/appliance"
    forced = run_agent(*fast_run_args(moved, kubesim.kubeconfig_path, "--force"))
    assert forced.code == 0, forced.output
    ks = kubesim.get(KS_API, "Kustomization", "appliance", "flux-system")
    assert ks["spec"]["path"] == "./clusters/other"


def test_changing_the_url_needs_force(kubesim: KubeSim, write_config: Any) -> None:
    assert (
        run_agent(*fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path)).code == 0
    )
    other = write_config(basic_config(url="https://git.example/org/other.git"), "other.yaml")
    refused = run_agent(*fast_run_args(other, kubesim.kubeconfig_path))
    assert refused.code == 3 and "sync.url" in refused.stderr


def test_bundle_digest_mismatch_is_bad_input(
    kubesim: KubeSim, write_config: Any, tmp_path: Path
) -> None:
    tampered = tmp_path / "bundle.yaml"
    tampered.write_text(BUNDLE.read_text().replace("v1.9.4", "v1.9.5"))
    config = write_config(basic_config())
    result = run_agent(
        *fast_run_args(config, kubesim.kubeconfig_path, "--flux-manifests", str(tampered))
    )
    assert result.code == 2
    assert f"but flux.sha256 pins {BUNDLE_SHA}" in result.stderr
    assert kubesim.requests == []


def test_missing_kubeconfig_is_bad_input(config: Path, tmp_path: Path) -> None:
    result = run_agent("run", "--config", str(config), "--kubeconfig", str(tmp_path / "nope"))
    assert result.code == 2
    assert "cannot read kubeconfig" in result.stderr
    no_source = run_agent("run", "--config", str(config))
    assert no_source.code == 2 and "cluster.kubeconfig" in no_source.stderr


def test_version_validate_and_help() -> None:
    version = run_agent("version")
    assert version.code == 0 and version.stdout.startswith("alga-bootstrap 0.1.0")
    help_text = run_agent("run", "--help")
    assert help_text.code == 0
    for line in ("0  done", "2  bad config", "3  needs an operator decision"):
        assert line in help_text.stdout
    usage = run_agent("run", "--timeout", "soon")
    assert usage.code == 2 and "is not valid; use a Go duration" in usage.stderr
    assert "Traceback" not in usage.output


def test_validate_a_config_without_a_cluster(config: Path) -> None:
    result = run_agent("validate", "--config", str(config))
    assert result.code == 0, result.output
    assert "valid (Flux v2.9.4" in result.stdout


def test_logs_are_json_lines_off_a_terminal(kubesim: KubeSim, config: Path) -> None:
    result = run_agent("run", "--config", str(config), "--kubeconfig", str(kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    for event in result.events():  # every line parses
        assert {"event", "level", "timestamp", "step"} <= set(event)
