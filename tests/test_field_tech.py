"""Field techs (issue 7): status, dry run, concurrent runs, Flux upgrades in place."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kubesim import KubeSim
from tests.conftest import (
    BUNDLE,
    REPO,
    agent_env,
    basic_config,
    fast_run_args,
    run_agent,
    writes_beyond_bookkeeping,
)

KS_API, HR_API = "kustomize.toolkit.fluxcd.io/v1", "helm.toolkit.fluxcd.io/v2"
GITREPO_CRD = "gitrepositories.source.toolkit.fluxcd.io"


def status(sim: KubeSim, config: Path, *extra: str) -> Any:
    return run_agent(
        "status", "--config", str(config), "--kubeconfig", str(sim.kubeconfig_path), *extra
    )


def older_bundle(tmp_path: Path, *, extra_version: bool = False) -> tuple[Path, str]:
    """A copy of the bundle made to look like Flux v2.9.3 (labels and one image); with
    `extra_version`, its GitRepository CRD also serves v1beta2."""
    docs = [d for d in yaml.safe_load_all(BUNDLE.read_text()) if d]
    text = (
        yaml.safe_dump_all(docs)
        .replace("v2.9.4", "v2.9.3")
        .replace("source-controller:v1.9.4", "source-controller:v1.9.3")
    )
    docs = list(yaml.safe_load_all(text))
    if extra_version:
        crd = next(d for d in docs if d["metadata"]["name"] == GITREPO_CRD)
        # A copy, not a shared schema: YAML would write that as an alias, which is refused.
        beta = {**copy.deepcopy(crd["spec"]["versions"][0]), "name": "v1beta2", "storage": False}
        crd["spec"]["versions"].append(beta)
    path = tmp_path / "old-bundle.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def config_for(write_config: Any, bundle: Path, sha: str, name: str) -> Path:
    data = basic_config()
    data["flux"] = {"manifests": str(bundle), "sha256": sha}
    path: Path = write_config(data, name)
    return path


# -- status ------------------------------------------------------------------------------------


def test_status_before_and_after_a_run(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(basic_config())
    before = status(kubesim, config)
    assert before.code == 5
    assert "Source       missing" in before.stdout and "state: not-bootstrapped" in before.stdout
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    after = status(kubesim, config)
    assert after.code == 0, after.output
    assert "state: ready" in after.stdout
    assert "installed v2.9.4, bundled v2.9.4" in after.stdout
    report = json.loads(status(kubesim, config, "--output", "json").stdout)
    assert set(report) == {
        "api",
        "flux",
        "source",
        "kustomizations",
        "site",
        "patches",
        "release",
        "lastRun",
        "state",
    }
    assert report["patches"] == report["release"] == []  # no patches, not the Alga preset
    assert report["state"] == "ready"
    assert report["source"]["url"] == "https://git.example/org/appliance.git"
    assert report["lastRun"]["result"] == "succeeded"
    assert all(c["state"] == "ready" for c in report["flux"]["controllers"])
    assert len(report["flux"]["controllers"]) == 4


def test_status_shows_the_dependency_tree_and_progress(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(basic_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    owner = {
        "kustomize.toolkit.fluxcd.io/name": "appliance",
        "kustomize.toolkit.fluxcd.io/namespace": "flux-system",
    }
    for name, after in (("apps", "platform"), ("platform", None)):
        spec: dict[str, Any] = {
            "interval": "5m",
            "prune": True,
            "path": f"./{name}",
            "sourceRef": {"kind": "GitRepository", "name": "appliance"},
        }
        if after:
            spec["dependsOn"] = [{"name": after}]
        kubesim.put(
            {
                "apiVersion": KS_API,
                "kind": "Kustomization",
                "metadata": {"name": name, "namespace": "flux-system", "labels": owner},
                "spec": spec,
            }
        )
    kubesim.put(
        {
            "apiVersion": HR_API,
            "kind": "HelmRelease",
            "metadata": {
                "name": "web",
                "namespace": "flux-system",
                "labels": {
                    "kustomize.toolkit.fluxcd.io/name": "apps",
                    "kustomize.toolkit.fluxcd.io/namespace": "flux-system",
                },
            },
            "spec": {
                "interval": "10m",
                "chart": {
                    "spec": {
                        "chart": "./web",
                        "sourceRef": {"kind": "GitRepository", "name": "appliance"},
                    }
                },
            },
        }
    )
    time.sleep(0.5)  # the stand-in controllers mark the Kustomizations Ready; not the release
    report = json.loads(status(kubesim, config, "-o", "json").stdout)
    root = report["kustomizations"][0]
    assert [c["name"] for c in root["children"]] == ["platform", "apps"]  # dependencies first
    apps = root["children"][1]
    assert apps["dependsOn"] == ["platform"]
    assert [h["name"] for h in apps["helmReleases"]] == ["web"]
    assert apps["helmReleases"][0]["state"] == "progressing"
    assert report["state"] == "progressing"
    text = status(kubesim, config)
    assert text.code == 4
    assert "HelmRelease flux-system/web" in text.stdout and "after platform" in text.stdout
    # A failed release turns the whole state to failed.
    kubesim.set_status(
        HR_API,
        "HelmRelease",
        "web",
        {
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "InstallFailed",
                    "message": "Helm install failed: timed out",
                    "lastTransitionTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            ],
        },
        "flux-system",
    )
    failed = status(kubesim, config)
    assert failed.code == 1
    assert "Helm install failed: timed out" in failed.stdout


def test_status_when_the_api_is_unreachable(write_config: Any, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "x",
                "clusters": [{"name": "x", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "x", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
            }
        )
    )
    result = run_agent(
        "status",
        "--config",
        str(write_config(basic_config())),
        "--kubeconfig",
        str(kubeconfig),
        "-o",
        "json",
    )
    assert result.code == 1
    report = json.loads(result.stdout)
    assert report["api"]["reachable"] is False and report["state"] == "failed"


# -- dry run -----------------------------------------------------------------------------------


def test_dry_run_on_a_fresh_cluster_writes_nothing(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(basic_config())
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path, "--dry-run"))
    assert result.code == 0, result.output
    assert kubesim.writes() == []
    assert any(r["dry_run"] for r in kubesim.requests)  # the server was asked, dry-run
    assert "would create CustomResourceDefinition/gitrepositories" in result.stdout
    assert "would create GitRepository/flux-system/appliance" in result.stdout
    assert result.stdout.startswith("dry run: ")


def test_dry_run_shows_changed_fields(kubesim: KubeSim, write_config: Any) -> None:
    assert (
        run_agent(*fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path)).code == 0
    )
    kubesim.clear_log()
    changed = write_config(basic_config(ref={"tag": "v2.0.0"}, interval="15m"), "c.yaml")
    result = run_agent(*fast_run_args(changed, kubesim.kubeconfig_path, "--dry-run"))
    assert result.code == 0, result.output
    assert kubesim.writes() == []
    # The server's answer: the branch the agent owned goes, the tag comes.
    repo = "would configure GitRepository/flux-system/appliance: .spec.ref.branch, .spec.ref.tag"
    assert repo in result.stdout
    assert "would configure Kustomization/flux-system/appliance: .spec.interval" in result.stdout
    assert "unchanged Deployment/flux-system/source-controller" in result.stdout
    assert "dry run: 2 to create or change" in result.stdout


# -- concurrency -------------------------------------------------------------------------------


def test_two_runs_at_once_do_the_work_once(kubesim_factory: Any, write_config: Any) -> None:
    """A field tech's run while the boot-time run is active: it never writes what the other
    wrote, and finds nothing to do."""
    sim = kubesim_factory(controllers=True, controller_delay=0.5, latency_ms=20)
    config = write_config(basic_config())
    argv = [sys.executable, "-m", "agent", *fast_run_args(config, sim.kubeconfig_path)]
    boot = subprocess.Popen(
        argv, cwd=REPO, env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while not sim.exists("coordination.k8s.io/v1", "Lease", "alga-bootstrap", "alga-system"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    tech = run_agent(*fast_run_args(config, sim.kubeconfig_path))
    out, err = boot.communicate(timeout=120)
    assert boot.returncode == 0, out + err
    assert tech.code == 0, tech.output
    assert tech.events()[-1]["event"] == "nothing to do"
    writes: dict[str, int] = {}
    for request in sim.writes():
        if request["verb"] in ("apply", "create") and "/leases" not in request["path"]:
            writes[request["path"]] = writes.get(request["path"], 0) + 1
    assert len(writes) > 30 and set(writes.values()) == {1}  # each object written once


def test_a_run_waits_while_another_holds_the_lease(kubesim: KubeSim, write_config: Any) -> None:
    """Another live run (here the test, renewing the lease) holds it: the agent waits, then
    proceeds once it is released."""

    def lease(holder: str | None) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec: dict[str, Any] = {"leaseDurationSeconds": 15, "acquireTime": now, "renewTime": now}
        if holder:
            spec["holderIdentity"] = holder
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "alga-bootstrap", "namespace": "alga-system"},
            "spec": spec,
        }

    kubesim.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "alga-system"}})
    kubesim.put(lease("boot-time-run"), "other-run")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            *fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path),
        ],
        cwd=REPO,
        env=agent_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    # Hold it for 4 s, renewing well within its 15 s duration (room for a busy CI machine).
    for _ in range(8):
        time.sleep(0.5)
        kubesim.put(lease("boot-time-run"), "other-run")
    assert proc.poll() is None  # still waiting
    assert not kubesim.exists(
        "source.toolkit.fluxcd.io/v1", "GitRepository", "appliance", "flux-system"
    )
    kubesim.put(lease(None), "other-run")  # released
    _, log = proc.communicate(timeout=60)
    assert proc.returncode == 0, log
    events = [json.loads(line) for line in log.splitlines()]
    assert any(
        e["event"] == "another run holds the lease; waiting" and e["holder"] == "boot-time-run"
        for e in events
    )
    assert not any(e["event"].startswith("taking over") for e in events)
    assert kubesim.exists(
        "source.toolkit.fluxcd.io/v1", "GitRepository", "appliance", "flux-system"
    )


def test_a_dead_holders_lease_is_taken_over_after_its_duration(
    kubesim: KubeSim, write_config: Any
) -> None:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    kubesim.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "alga-system"}})
    kubesim.put(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "alga-bootstrap", "namespace": "alga-system"},
            "spec": {
                "holderIdentity": "node-that-died",
                "leaseDurationSeconds": 3,
                "acquireTime": now,
                "renewTime": now,
            },
        }
    )
    started = time.monotonic()
    result = run_agent(*fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    assert time.monotonic() - started >= 2.5
    takeover = [e for e in result.events() if e["event"].startswith("taking over the lease")]
    assert takeover and takeover[0]["holder"] == "node-that-died"
    lease = kubesim.get("coordination.k8s.io/v1", "Lease", "alga-bootstrap", "alga-system")
    assert "holderIdentity" not in lease["spec"]  # released at the end, never deleted


# -- Flux upgrades in place --------------------------------------------------------------------


def test_upgrade_from_an_older_bundle(kubesim: KubeSim, write_config: Any, tmp_path: Path) -> None:
    old, old_sha = older_bundle(tmp_path)
    assert (
        run_agent(
            *fast_run_args(
                config_for(write_config, old, old_sha, "old.yaml"), kubesim.kubeconfig_path
            )
        ).code
        == 0
    )
    deploy = kubesim.get("apps/v1", "Deployment", "source-controller", "flux-system")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"].endswith("v1.9.3")
    new = write_config(basic_config(), "new.yaml")
    result = run_agent(*fast_run_args(new, kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    upgrade = [e for e in result.events() if e["event"] == "upgrading Flux"]
    assert upgrade and upgrade[0]["installed"] == "v2.9.3"
    deploy = kubesim.get("apps/v1", "Deployment", "source-controller", "flux-system")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"].endswith("v1.9.4")
    assert deploy["metadata"]["generation"] == 2
    crd = kubesim.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", GITREPO_CRD)
    assert crd["metadata"]["labels"]["app.kubernetes.io/version"] == "v2.9.4"
    assert (
        json.loads(
            kubesim.get("v1", "ConfigMap", "alga-bootstrap-run", "alga-system")["data"]["run.json"]
        )["fluxVersion"]
        == "v2.9.4"
    )


def test_upgrade_refuses_to_drop_a_stored_version(
    kubesim: KubeSim, write_config: Any, tmp_path: Path
) -> None:
    old, old_sha = older_bundle(tmp_path, extra_version=True)
    assert (
        run_agent(
            *fast_run_args(
                config_for(write_config, old, old_sha, "old.yaml"), kubesim.kubeconfig_path
            )
        ).code
        == 0
    )
    crd = kubesim.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", GITREPO_CRD)
    kubesim.set_status(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        GITREPO_CRD,
        {**crd["status"], "storedVersions": ["v1beta2", "v1"]},
    )
    kubesim.clear_log()
    result = run_agent(
        *fast_run_args(write_config(basic_config(), "new.yaml"), kubesim.kubeconfig_path)
    )
    assert result.code == 3
    assert f"CRD {GITREPO_CRD} still stores objects as v1beta2" in result.stderr
    assert "flux migrate" in result.stderr
    assert writes_beyond_bookkeeping(kubesim) == []
    crd = kubesim.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", GITREPO_CRD)
    assert [v["name"] for v in crd["spec"]["versions"]] == ["v1", "v1beta2"]


def test_downgrade_needs_force(kubesim: KubeSim, write_config: Any, tmp_path: Path) -> None:
    assert (
        run_agent(*fast_run_args(write_config(basic_config()), kubesim.kubeconfig_path)).code == 0
    )
    old, old_sha = older_bundle(tmp_path)
    old_config = config_for(write_config, old, old_sha, "old.yaml")
    refused = run_agent(*fast_run_args(old_config, kubesim.kubeconfig_path))
    assert refused.code == 3
    assert "Flux v2.9.4 is installed, newer than the bundled v2.9.3" in refused.stderr
    forced = run_agent(*fast_run_args(old_config, kubesim.kubeconfig_path, "--force"))
    assert forced.code == 0, forced.output
    crd = kubesim.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", GITREPO_CRD)
    assert crd["metadata"]["labels"]["app.kubernetes.io/version"] == "v2.9.3"
