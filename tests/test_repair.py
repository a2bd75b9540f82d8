"""A converged site changed by hand: `status` finds what is missing, `run` adds only that
(issue 11, point 1). And a forced take-over of a Flux another tool manages (point 6)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubesim import KubeSim
from tests.conftest import BUNDLE, basic_config, fast_run_args, run_agent, writes_beyond_bookkeeping

SITE = {
    "namespaces": [{"name": "apps"}],
    "secrets": [
        {
            "namespace": "apps",
            "name": "shared",
            "keys": {
                "AUTH_KEY": {"generate": {"bytes": 32}},
                "SESSION_KEY": {"generate": {"bytes": 16}},
                "token": {"file": "token.txt"},
            },
        }
    ],
    "configMaps": [{"namespace": "apps", "name": "settings", "data": {"a": "1"}}],
}


@pytest.fixture
def converged(kubesim: KubeSim, tmp_path: Path) -> Path:
    (tmp_path / "token.txt").write_text("from-the-file")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**basic_config(), "site": SITE}))
    first = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert first.code == 0, first.output
    return config


def kubectl(sim: KubeSim, *args: str) -> None:
    subprocess.run(
        ["kubectl", "--kubeconfig", str(sim.kubeconfig_path), *args],
        check=True,
        capture_output=True,
        timeout=30,
    )


def status(sim: KubeSim, config: Path) -> tuple[int, str, dict[str, Any]]:
    args = ["status", "--config", str(config), "--kubeconfig", str(sim.kubeconfig_path)]
    text = run_agent(*args)
    as_json = run_agent(*args, "-o", "json")
    return text.code, text.stdout, json.loads(as_json.stdout)


def secret_data(sim: KubeSim) -> dict[str, str]:
    data: dict[str, str] = sim.get("v1", "Secret", "shared", "apps").get("data") or {}
    return data


@pytest.mark.parametrize("dropped", [["AUTH_KEY"], ["AUTH_KEY", "SESSION_KEY", "token"], ["token"]])
def test_a_missing_key_is_found_and_only_it_is_added(
    kubesim: KubeSim, converged: Path, dropped: list[str]
) -> None:
    before = secret_data(kubesim)
    patch = json.dumps({"data": {key: None for key in dropped}})
    kubectl(kubesim, "-n", "apps", "patch", "secret", "shared", "--type", "merge", "-p", patch)
    assert set(secret_data(kubesim)) == set(before) - set(dropped)

    code, text, report = status(kubesim, converged)
    assert code == 1 and "state: failed" in text
    line = next(line for line in text.splitlines() if "Secret apps/shared" in line)
    assert all(key in line for key in dropped) and "alga-bootstrap run adds" in line
    item = next(i for i in report["site"] if i["name"] == "shared")
    assert item["present"] is True and item["missingKeys"] == sorted(dropped)

    kubesim.clear_log()
    repaired = run_agent(*fast_run_args(converged, kubesim.kubeconfig_path))
    assert repaired.code == 0, repaired.output
    assert repaired.events()[-1]["event"] == "done"
    after = secret_data(kubesim)
    assert set(after) == set(before)
    for key in set(before) - set(dropped):
        assert after[key] == before[key]  # never touched
    for key in set(dropped) & {"AUTH_KEY", "SESSION_KEY"}:
        assert after[key] != before[key]  # a new value, only for what was missing
    if "token" in dropped:
        assert after["token"] == before["token"]  # from the file again
    assert writes_beyond_bookkeeping(kubesim) == ["/api/v1/namespaces/apps/secrets/shared"]
    assert "from-the-file" not in repaired.output
    assert all(before[k] not in repaired.output for k in before)
    assert status(kubesim, converged)[0] == 0


def test_a_missing_create_once_config_map_is_found_and_created(
    kubesim: KubeSim, converged: Path
) -> None:
    kubectl(kubesim, "-n", "apps", "delete", "configmap", "settings")
    code, text, _ = status(kubesim, converged)
    assert code == 1
    assert "ConfigMap apps/settings  missing (alga-bootstrap run creates it)" in text
    kubesim.clear_log()
    repaired = run_agent(*fast_run_args(converged, kubesim.kubeconfig_path))
    assert repaired.code == 0, repaired.output
    assert kubesim.get("v1", "ConfigMap", "settings", "apps")["data"] == {"a": "1"}
    assert writes_beyond_bookkeeping(kubesim) == ["/api/v1/namespaces/apps/configmaps"]
    assert [r for r in kubesim.requests if r["verb"] == "delete"] == []


def test_a_complete_site_is_still_a_cheap_no_op(kubesim: KubeSim, converged: Path) -> None:
    kubesim.clear_log()
    again = run_agent(*fast_run_args(converged, kubesim.kubeconfig_path))
    assert again.code == 0 and again.events()[-1]["event"] == "nothing to do"
    assert kubesim.writes() == [] and len(kubesim.requests) <= 15


FLUX_OBJECTS = [d for d in yaml.safe_load_all(BUNDLE.read_text()) if d]
HELM_LABEL = "app.kubernetes.io/managed-by"
HELM_ANNOTATIONS = {"meta.helm.sh/release-name": "flux2", "meta.helm.sh/release-namespace": "x"}


def test_forced_take_over_of_a_helm_managed_flux_sticks(kubesim: KubeSim, tmp_path: Path) -> None:
    # What `helm install` of a Flux chart leaves on every object (helm/helm
    # pkg/action/validate.go, setMetadataVisitor): the managed-by label and release annotations.
    for doc in FLUX_OBJECTS:
        meta = doc["metadata"]
        marked = {
            **meta,
            "labels": {**meta.get("labels", {}), HELM_LABEL: "Helm"},
            "annotations": {**meta.get("annotations", {}), **HELM_ANNOTATIONS},
        }
        kubesim.put({**doc, "metadata": marked}, "helm")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(basic_config()))
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 3

    dry = run_agent(*fast_run_args(config, kubesim.kubeconfig_path, "--force", "--dry-run"))
    assert dry.code == 0, dry.output
    assert "would take over CustomResourceDefinition/gitrepositories" in dry.stdout
    assert kubesim.get(*_probe_crd())["metadata"]["labels"][HELM_LABEL] == "Helm"

    forced = run_agent(*fast_run_args(config, kubesim.kubeconfig_path, "--force"))
    assert forced.code == 0, forced.output
    for doc in FLUX_OBJECTS:
        meta = doc["metadata"]
        live = kubesim.get(doc["apiVersion"], doc["kind"], meta["name"], meta.get("namespace", ""))
        assert HELM_LABEL not in live["metadata"].get("labels", {}), doc["kind"]
        assert not set(HELM_ANNOTATIONS) & set(live["metadata"].get("annotations", {}))
        assert live["metadata"]["labels"]["app.kubernetes.io/version"] == "v2.9.4"

    kubesim.clear_log()
    unforced = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert unforced.code == 0, unforced.output
    assert unforced.events()[-1]["event"] == "nothing to do"
    assert kubesim.writes() == []


def _probe_crd() -> tuple[str, str, str]:
    return (
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "gitrepositories.source.toolkit.fluxcd.io",
    )
