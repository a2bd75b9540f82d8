"""The Alga preset against kubesim, checked against upstream's rendered profile and children
(../shared/alga): every reference Git does not satisfy must be satisfied after a run."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import config as config_module
from agent import desired
from agent.config import deep_merge
from agent.presets import alga
from kubesim import KubeSim, upstream
from kubesim import kustomize as kubesim_kustomize
from kubesim.store import ApiError
from tests.conftest import (
    BUNDLE,
    SHARED,
    Result,
    agent_env,
    fast_run_args,
    run_agent,
    writes_beyond_bookkeeping,
)

ALGA_DIR = SHARED / "alga"
PROFILE = [
    d
    for d in yaml.safe_load_all((ALGA_DIR / "profile-talos-single-node.rendered.yaml").read_text())
    if d
]
CHILDREN = [d for d in yaml.safe_load_all((ALGA_DIR / "children.rendered.yaml").read_text()) if d]
HELM_RELEASES = [d for d in CHILDREN if d["kind"] == "HelmRelease"]
SITE_URL = "https://psa.example.test"
GENERATED = [
    ("appliance-system", "appliance-status-auth", "token"),
    ("msp", "alga-psa-shared", "ALGA_AUTH_KEY"),
]
Obj = dict[str, Any]


def site_config(mode: str = "profile", **alga_fields: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"mode": mode, "appUrl": SITE_URL, **alga_fields}
    if mode == "base":
        section.setdefault("valuesDir", str(ALGA_DIR / "values"))
    return {"preset": "alga-talos-single-node", "flux": {"manifests": str(BUNDLE)}, "alga": section}


def site_status(sim: KubeSim, write_config: Any) -> Result:
    """`status -o json` with the site config, against `sim`."""
    return run_agent(
        "status",
        "--config",
        str(write_config(site_config())),
        "--kubeconfig",
        str(sim.kubeconfig_path),
        "-o",
        "json",
    )


def secret_values(sim: KubeSim) -> dict[str, str]:
    out = {}
    for namespace, name, key in GENERATED:
        data = sim.get("v1", "Secret", name, namespace)["data"]
        out[name] = base64.b64decode(data[key]).decode()
    return out


def secret_key_refs(node: Any) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        ref = node.get("secretKeyRef")
        if isinstance(ref, dict):
            yield ref["name"], ref["key"]
        for value in node.values():
            yield from secret_key_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from secret_key_refs(item)


def check_common_references(sim: KubeSim) -> None:
    """What every render needs from the first boot, whatever the mode."""
    # The GitRepository every child Kustomization and HelmRelease takes its source from.
    refs = [
        (d["spec"]["sourceRef"], d["metadata"]["namespace"])
        for d in PROFILE
        if d["kind"] == "Kustomization"
    ]
    refs += [
        (r["spec"]["chart"]["spec"]["sourceRef"], r["metadata"]["namespace"]) for r in HELM_RELEASES
    ]
    assert len(refs) == 9
    for ref, namespace in refs:
        assert ref["kind"] == "GitRepository"
        assert sim.exists(
            "source.toolkit.fluxcd.io/v1",
            "GitRepository",
            ref["name"],
            ref.get("namespace", namespace),
        ), ref
    # Secrets the rendered workloads read, each with its key.
    found = 0
    for obj in CHILDREN:
        for name, key in secret_key_refs(obj):
            secret = sim.get("v1", "Secret", name, obj["metadata"]["namespace"])
            assert key in secret["data"]
            found += 1
    assert found >= 1
    for namespace, name, key in GENERATED:
        value = base64.b64decode(sim.get("v1", "Secret", name, namespace)["data"][key])
        assert re.fullmatch(rb"[0-9a-f]{64}", value)  # 32 random bytes, hex
    # The storage class the values files ask for, with the provisioner behind it.
    classes = {
        c
        for f in (ALGA_DIR / "values").glob("*.yaml")
        for c in re.findall(r"storageClass: (\S+)", f.read_text())
    }
    assert classes == {"local-path"}
    assert sim.exists("storage.k8s.io/v1", "StorageClass", "local-path")
    assert sim.exists("apps/v1", "Deployment", "local-path-provisioner", "local-path-storage")
    selection = sim.get("v1", "ConfigMap", "appliance-release-selection", "alga-system")["data"]
    assert set(selection) == {
        "releaseVersion",
        "selectedChannel",
        "appVersion",
        "releaseBranch",
        "algaCoreTag",
        "workflowWorkerTag",
        "emailServiceTag",
        "temporalWorkerTag",
    }
    assert "latest" not in selection.values()
    for name in ("alga-system", "appliance-system", "msp"):
        expected = next(
            d for d in PROFILE if d["kind"] == "Namespace" and d["metadata"]["name"] == name
        )["metadata"].get("labels", {})
        live = sim.get("v1", "Namespace", name)["metadata"].get("labels", {})
        assert expected.items() <= live.items()


# -- upstream's appliance, applied by the stand-in Flux ----------------------------------------

FIXTURE = yaml.safe_load(
    (Path(__file__).parent / "fixtures" / "alga-chart-images.yaml").read_text()
)
HR_API = "helm.toolkit.fluxcd.io/v2"
KS_API = "kustomize.toolkit.fluxcd.io/v1"


def with_upstream(sim: KubeSim, profile: list[Obj] | None = None) -> KubeSim:
    """The stand-in kustomize-controller applies upstream's rendered objects (or edited
    copies of the profile) at their paths, with each Kustomization's patches."""
    sim.controllers.sources.update(upstream.sources(profile or PROFILE, CHILDREN))
    return sim


@pytest.fixture
def kubesim(kubesim_factory: Any) -> KubeSim:
    return with_upstream(kubesim_factory(controllers=True, controller_delay=0.05))


def wait_for(check: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def live_releases(sim: KubeSim) -> dict[str, Obj]:
    """The six HelmReleases, once the child Kustomizations applied them."""

    def all_six() -> dict[str, Obj] | None:
        names = [r["metadata"]["name"] for r in HELM_RELEASES]
        if all(sim.exists(HR_API, "HelmRelease", n, "alga-system") for n in names):
            return {n: sim.get(HR_API, "HelmRelease", n, "alga-system") for n in names}
        return None

    found: dict[str, Obj] = wait_for(all_six)
    return found


def helm_values(sim: KubeSim, release: Obj) -> Obj:
    """What helm-controller gives the chart: the valuesFrom keys merged in order."""
    merged: Obj = {}
    for ref in release["spec"]["valuesFrom"]:
        cm = sim.get("v1", "ConfigMap", ref["name"], "alga-system")
        merged = deep_merge(merged, yaml.safe_load(cm["data"][ref["valuesKey"]]))
    return merged


def lookup(values: Obj, key: str) -> Any:
    node: Any = values
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def pinned(tag: Any) -> bool:
    return isinstance(tag, str) and tag not in ("", "latest")


def edited(name: str, change: Any) -> list[Obj]:
    """A copy of upstream's profile with the object `name` changed."""
    profile = copy.deepcopy(PROFILE)
    for obj in profile:
        if obj["metadata"]["name"] == name:
            change(obj)
    return profile


# -- the tests ---------------------------------------------------------------------------------


def run_mode(kubesim: KubeSim, write_config: Any, mode: str, **alga_fields: Any) -> Obj:
    """Run the preset in `mode`, check what every mode needs; the root Kustomization."""
    config = write_config(site_config(mode, **alga_fields))
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    check_common_references(kubesim)
    root: Obj = kubesim.get(KS_API, "Kustomization", "alga-appliance", "flux-system")
    return root


def test_profile_mode_satisfies_every_reference(kubesim: KubeSim, write_config: Any) -> None:
    root = run_mode(kubesim, write_config, "profile")
    assert root["spec"]["path"] == "./ee/appliance/flux/profiles/talos-single-node"
    # The API (the bundle's CRD schema) takes the fetch limits as the preset sets them.
    repo = kubesim.get(
        "source.toolkit.fluxcd.io/v1", "GitRepository", root["metadata"]["name"], "flux-system"
    )
    assert repo["spec"]["timeout"] == "30m" and len(repo["spec"]["sparseCheckout"]) == 3
    assert {
        k: root["spec"][k] for k in ("interval", "retryInterval", "timeout", "prune", "wait")
    } == {"interval": "5m", "retryInterval": "1m", "timeout": "2m", "prune": True, "wait": True}
    # Flux owns the values ConfigMaps from Git: the agent did not create them, Flux did.
    cm = kubesim.get("v1", "ConfigMap", "appliance-values-alga-core", "alga-system")
    assert cm["metadata"]["labels"]["kustomize.toolkit.fluxcd.io/name"] == "alga-appliance"
    for component, release in live_releases(kubesim).items():
        refs = release["spec"]["valuesFrom"]
        # Upstream's values first, the site's last (later entries win in Helm).
        assert refs[0]["valuesKey"] == f"{component}.talos-single-node.yaml"
        assert refs[-1]["valuesKey"] == f"{component}.site.yaml"
        for ref in refs:
            data = kubesim.get("v1", "ConfigMap", ref["name"], "alga-system")["data"]
            assert ref["valuesKey"] in data, (component, ref)
    core = yaml.safe_load(
        kubesim.get("v1", "ConfigMap", "appliance-values-alga-core", "alga-system")["data"][
            "alga-core.site.yaml"
        ]
    )
    assert core["appUrl"] == SITE_URL and core["host"] == "psa.example.test"
    assert core["server"]["image"] == {"name": "ghcr.io/nine-minds/alga-psa-ee", "tag": "a2cbb430"}
    assert core["setup"]["waitForBootstrap"]["image"]["tag"] == "v0.5.1"
    # Upstream's own values keys are untouched by the patches.
    original = next(d for d in PROFILE if d["metadata"]["name"] == "appliance-values-alga-core")
    assert (
        cm["data"]["alga-core.talos-single-node.yaml"]
        == (original["data"]["alga-core.talos-single-node.yaml"])
    )
    # status agrees: every patch in effect, the release selection equal to what runs.
    status = site_status(kubesim, write_config)
    report = json.loads(status.stdout)
    assert report["patches"] and {p["state"] for p in report["patches"]} == {"ready"}
    assert {r["state"] for r in report["release"]} == {"ready"}


def test_the_simulated_images_field_sets_images_as_kustomize_does(tmp_path: Path) -> None:
    """`images` entries of each form (newTag over a digest, digest alone, newName alone,
    a registry with a port), containers at any depth, one without an image: kubesim's
    stand-in against `kubectl kustomize`."""
    digest = "sha256:" + "1" * 64
    objects: list[Obj] = [
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "cj"},
            "spec": {
                "jobTemplate": {
                    "spec": {
                        "template": {
                            "spec": {
                                "containers": [
                                    {"name": "a", "image": f"a:1@{digest}"},
                                    {"name": "no-image"},
                                ],
                                "initContainers": [{"name": "b", "image": "b:2"}],
                            }
                        }
                    }
                }
            },
        },
        {
            "apiVersion": "example.com/v1",
            "kind": "Thing",
            "metadata": {"name": "t"},
            "spec": {
                "deep": {
                    "containers": [
                        {"name": "c", "image": "c"},
                        {"name": "d", "image": "reg:5000/d:3"},
                    ]
                }
            },
        },
    ]
    images = [
        {"name": "a", "newTag": "9"},
        {"name": "b", "digest": "sha256:" + "2" * 64},
        {"name": "c", "newName": "cc"},
        {"name": "reg:5000/d", "newName": "e", "newTag": "4"},
    ]
    real = kubectl_kustomize(tmp_path / "images", objects, [], images)
    assert isinstance(real, list)
    assert by_name(kubesim_kustomize.build(objects, [], images)) == by_name(real)
    thing = by_name(real)[("Thing", "t")]["spec"]["deep"]["containers"]
    assert [c["image"] for c in thing] == ["cc", "e:4"]


def test_every_image_the_charts_can_start_is_pinned(kubesim: KubeSim, write_config: Any) -> None:
    """From upstream's files: each image reference in the charts (the fixture, read from the
    templates at the pinned commit) that upstream's values leave enabled is set by the
    preset to a pinned tag, or pinned by the post-renderer when the chart hard-codes it."""
    run_mode(kubesim, write_config, "profile")
    releases = live_releases(kubesim)
    charts = {r["spec"]["chart"]["spec"]["chart"]: n for n, r in releases.items()}
    assert set(charts) == set(FIXTURE["images"])  # a chart upstream adds fails here
    checked = []
    for chart, entries in FIXTURE["images"].items():
        release = releases[charts[chart]]
        site_key = release["spec"]["valuesFrom"][-1]
        site = yaml.safe_load(
            kubesim.get("v1", "ConfigMap", site_key["name"], "alga-system")["data"][
                site_key["valuesKey"]
            ]
        )
        values = deep_merge(FIXTURE["defaults"][chart], helm_values(kubesim, release))
        pins = [
            i
            for r in release["spec"].get("postRenderers", [])
            for i in r.get("kustomize", {}).get("images", [])
        ]
        for entry in entries:
            (key, off), *_ = (entry.get("disabledWhen") or {"": object()}).items()
            if key and bool(lookup(values, key)) == bool(off):
                continue  # upstream's values leave this template off
            if "hardcoded" in entry:
                name = entry["hardcoded"].split(":")[0]
                pin = next(p for p in pins if p["name"] == name)
                assert pinned(pin.get("newTag")) or pin.get("digest", "").startswith("sha256:")
            else:
                assert lookup(site, entry["tag"]) == lookup(values, entry["tag"])
                assert pinned(lookup(values, entry["tag"])), (chart, entry)
                assert lookup(values, entry["repository"]), (chart, entry)
            checked.append(entry["file"])
    assert len(checked) == 13  # the rest are off under upstream's appliance values
    # Upstream's plain manifests (no chart): one workload, the status page, pinned by the
    # child Kustomization that applies it. A workload upstream adds there fails here.
    workloads = [o for o in CHILDREN if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert [(o["kind"], o["metadata"]["name"]) for o in workloads] == [
        ("Deployment", "appliance-status")
    ]
    status_page = kubesim.get("apps/v1", "Deployment", "appliance-status", "appliance-system")
    containers = status_page["spec"]["template"]["spec"]["containers"]
    assert [c["image"] for c in containers] == ["node:20.19-alpine"]
    # The image list names exactly what these values start.
    listed = run_agent("images", "--config", str(write_config(site_config()))).stdout.split()
    for chart, entries in FIXTURE["images"].items():
        values = helm_values(kubesim, releases[charts[chart]])
        for entry in entries:
            if "tag" in entry and entry["file"] in checked and lookup(values, entry["repository"]):
                ref = f"{lookup(values, entry['repository'])}:{lookup(values, entry['tag'])}"
                assert ref in listed


def test_base_mode_creates_the_values_config_maps(kubesim: KubeSim, write_config: Any) -> None:
    root = run_mode(kubesim, write_config, "base")
    assert root["spec"]["path"] == "./ee/appliance/flux/base"
    # Only the images upstream hard-codes are pinned by patches (the status page's on the
    # child that applies it, the chart's busybox on alga-core); the values are in ConfigMaps.
    assert [p["target"]["name"] for p in root["spec"]["patches"]] == [
        "alga-platform",
        "alga-core",
    ]
    core_release = live_releases(kubesim)["alga-core"]
    assert core_release["spec"]["postRenderers"] == [
        {"kustomize": {"images": [{"name": "busybox", "newTag": "1.37.0"}]}}
    ]
    assert len(core_release["spec"]["valuesFrom"]) == 1  # upstream's only
    for release in HELM_RELEASES:
        for ref in release["spec"]["valuesFrom"]:
            cm = kubesim.get("v1", "ConfigMap", ref["name"], "alga-system")
            assert ref["valuesKey"] in cm["data"], ref
            values = yaml.safe_load(cm["data"][ref["valuesKey"]])
            assert "latest" not in re.findall(r"'tag': '([^']+)'", str(values))
    core = yaml.safe_load(
        kubesim.get("v1", "ConfigMap", "appliance-values-alga-core", "alga-system")["data"][
            "alga-core.talos-single-node.yaml"
        ]
    )
    assert core["appUrl"] == SITE_URL
    assert core["setup"]["image"]["tag"] == core["server"]["image"]["tag"] == "a2cbb430"
    assert core["db"]["persistence"]["storageClass"] == "local-path"  # upstream's values kept


def test_base_mode_never_overwrites_values_changed_in_place(
    kubesim: KubeSim, write_config: Any
) -> None:
    assert (
        run_agent(*fast_run_args(write_config(site_config("base")), kubesim.kubeconfig_path)).code
        == 0
    )
    cm = kubesim.get("v1", "ConfigMap", "appliance-values-email-service", "alga-system")
    upgraded = {"email-service.talos-single-node.yaml": "image:\n  tag: upgraded-in-place\n"}
    kubesim.put(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": cm["metadata"]["name"], "namespace": "alga-system"},
            "data": upgraded,
        },
        "appliance-updater",
    )
    changed = write_config(site_config("base", appUrl="https://other.example.test"), "b.yaml")
    result = run_agent(*fast_run_args(changed, kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    after = kubesim.get("v1", "ConfigMap", "appliance-values-email-service", "alga-system")
    assert after["data"] == upgraded


def test_rerun_changes_nothing_and_keeps_the_secrets(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(site_config())
    first = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert first.code == 0, first.output
    values = secret_values(kubesim)
    kubesim.clear_log()
    second = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert second.code == 0, second.output
    assert kubesim.writes() == []
    assert len(kubesim.requests) <= 15
    # A changed site value runs every step in full: still no secret is rotated.
    changed = write_config(site_config(appUrl="https://renamed.example.test"), "c.yaml")
    third = run_agent(*fast_run_args(changed, kubesim.kubeconfig_path))
    assert third.code == 0, third.output
    assert secret_values(kubesim) == values
    for output in (first.output, second.output, third.output):
        for value in values.values():
            assert value not in output


def test_a_deleted_secret_key_is_restored_without_touching_the_others(
    kubesim: KubeSim, write_config: Any
) -> None:
    config = write_config(site_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    shared = kubesim.get("v1", "Secret", "alga-psa-shared", "msp")
    t = kubesim.store.type_for_kind("v1", "Secret")
    live = kubesim.store.get(t, "msp", "alga-psa-shared")
    live["data"] = {"OTHER": base64.b64encode(b"kept").decode()}  # ALGA_AUTH_KEY gone
    kubesim.store.update(t, "msp", "alga-psa-shared", live, "someone")
    changed = write_config(site_config(appUrl="https://x.example.test"), "d.yaml")
    result = run_agent(*fast_run_args(changed, kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    data = kubesim.get("v1", "Secret", "alga-psa-shared", "msp")["data"]
    assert base64.b64decode(data["OTHER"]) == b"kept"
    assert "ALGA_AUTH_KEY" in data and data["ALGA_AUTH_KEY"] != shared["data"]["ALGA_AUTH_KEY"]


def test_secrets_from_files(kubesim: KubeSim, write_config: Any, tmp_path: Path) -> None:
    (tmp_path / "auth").write_text("site-provided-auth-key-0123456789")
    config = write_config(site_config(secrets={"authKeyFile": str(tmp_path / "auth")}))
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    assert secret_values(kubesim)["alga-psa-shared"] == "site-provided-auth-key-0123456789"
    assert "site-provided-auth-key" not in result.output


def test_existing_storage_class_is_left_alone(kubesim: KubeSim, write_config: Any) -> None:
    kubesim.put(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": "local-path"},
            "provisioner": "example.com/other",
        },
        "someone",
    )
    result = run_agent(*fast_run_args(write_config(site_config()), kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    sc = kubesim.get("storage.k8s.io/v1", "StorageClass", "local-path")
    assert sc["provisioner"] == "example.com/other"
    assert not kubesim.exists("v1", "Namespace", "local-path-storage")


def test_validate_accepts_the_preset_and_the_default(tmp_path: Path, write_config: Any) -> None:
    result = run_agent("validate", "--config", str(write_config(site_config())))
    assert result.code == 0, result.output
    assert "branch=main commit=26bb86fa3aade6d4e4289db3a71f8803ed4ff144" in result.stdout
    # No config file at all: the image's default is the Alga preset.
    env = {**agent_env(), "HOME": str(tmp_path)}
    default = run_agent("validate", "--flux-manifests", str(BUNDLE), env=env)
    assert default.code == 0, default.output
    assert default.stdout.startswith("preset alga-talos-single-node: valid")


@pytest.mark.parametrize(
    ("alga_fields", "message"),
    [
        (
            {
                "images": {
                    "algaCore": "latest",
                    "workflowWorker": "1",
                    "emailService": "1",
                    "temporalWorker": "1",
                    "bootstrapWait": "1",
                }
            },
            "alga.images.algaCore: 'latest' is refused",
        ),
        (
            {
                "images": {
                    "algaCore": "",
                    "workflowWorker": "1",
                    "emailService": "1",
                    "temporalWorker": "1",
                    "bootstrapWait": "1",
                }
            },
            "alga.images.algaCore: needs a pinned image tag",
        ),
        ({"images": {"redis": 8}}, "alga.images.redis: 8 must be a string; quote the tag"),
        ({"appUrl": "ftp://psa.example.test"}, "alga.appUrl: 'ftp://psa.example.test' is not"),
        ({"appUrl": "https://psa.example.test/app"}, "is not a site URL"),
        (
            {"mode": "base", "valuesDir": "MISSING_ONE"},
            "pgbouncer.talos-single-node.yaml: file not found",
        ),
    ],
)
def test_validate_rejects_bad_site_values(
    tmp_path: Path, write_config: Any, alga_fields: dict[str, Any], message: str
) -> None:
    if alga_fields.get("valuesDir") == "MISSING_ONE":
        values = tmp_path / "values"
        values.mkdir()
        for f in (ALGA_DIR / "values").glob("*.yaml"):
            if "pgbouncer" not in f.name:
                (values / f.name).write_text(f.read_text())
        alga_fields = {**alga_fields, "valuesDir": str(values)}
    result = run_agent("validate", "--config", str(write_config(site_config(**alga_fields))))
    assert result.code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- upstream drift, numeric-looking tags, the release --------------------------------------


def run_against(kubesim: KubeSim, write_config: Any, profile: list[Obj], **alga: Any) -> Any:
    with_upstream(kubesim, profile)
    return run_agent(*fast_run_args(write_config(site_config(**alga)), kubesim.kubeconfig_path))


def test_a_renamed_child_kustomization_fails_the_run(kubesim: KubeSim, write_config: Any) -> None:
    def rename(obj: Obj) -> None:
        obj["metadata"]["name"] = "alga-core-v2"

    result = run_against(kubesim, write_config, edited("alga-core", rename))
    assert result.code == 1, result.output
    assert len(result.messages()) == 1
    assert (
        "Kustomization flux-system/alga-core missing at commit "
        "26bb86fa3aade6d4e4289db3a71f8803ed4ff144: upstream renamed or removed it"
    ) in result.stderr
    assert "alga-background" not in result.stderr  # the others took effect


def test_a_renamed_values_config_map_fails_the_run(kubesim: KubeSim, write_config: Any) -> None:
    def rename(obj: Obj) -> None:
        obj["metadata"]["name"] = "appliance-values-mail"

    result = run_against(kubesim, write_config, edited("appliance-values-email-service", rename))
    assert result.code == 1, result.output
    assert "ConfigMap alga-system/appliance-values-email-service missing at commit" in (
        result.stderr
    )
    status = site_status(kubesim, write_config)
    assert status.code == 1
    failed = [p for p in json.loads(status.stdout)["patches"] if p["state"] == "failed"]
    assert [p["name"] for p in failed] == ["appliance-values-email-service"]


UPSTREAM_PATCH = {
    "target": {"kind": "HelmRelease", "name": "temporal"},
    "patch": "- op: add\n  path: /spec/timeout\n  value: 45m\n",
}


def test_upstream_patches_on_a_child_are_never_dropped(kubesim: KubeSim, write_config: Any) -> None:
    def add_patches(obj: Obj) -> None:
        obj["spec"]["patches"] = [UPSTREAM_PATCH]

    result = run_against(kubesim, write_config, edited("alga-background", add_patches))
    assert result.code == 1, result.output
    assert "testing value /spec/patches failed" in result.stderr
    assert "the agent never drops upstream's" in result.stderr
    # Flux's build failed as a whole: nothing was applied without upstream's patch.
    assert not kubesim.exists(KS_API, "Kustomization", "alga-background", "flux-system")


def test_upstream_patches_already_on_a_child_are_appended_to(
    kubesim: KubeSim, write_config: Any
) -> None:
    """A cluster where Flux applied upstream's child with its own patches before (upstream's
    workstation bootstrap, say): the agent appends its patch after upstream's."""
    profile = edited("alga-background", lambda o: o["spec"].update(patches=[UPSTREAM_PATCH]))
    flux_applied_before(kubesim, profile, "alga-background")
    config = write_config(site_config())
    result = run_against(kubesim, write_config, profile)
    assert result.code == 0, result.output
    patches = kubesim.get(KS_API, "Kustomization", "alga-background", "flux-system")["spec"][
        "patches"
    ]
    assert patches[0] == UPSTREAM_PATCH and len(patches) == 5
    temporal = live_releases(kubesim)["temporal"]
    assert temporal["spec"]["timeout"] == "45m"  # upstream's patch took effect too
    assert temporal["spec"]["valuesFrom"][-1]["valuesKey"] == "temporal.site.yaml"
    kubesim.clear_log()
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    assert writes_beyond_bookkeeping(kubesim) == []


def test_upstream_images_already_on_the_platform_child_are_appended_to(
    kubesim: KubeSim, write_config: Any
) -> None:
    """The same for the status page's pin: upstream's own `images` on alga-platform stay,
    the agent's entry goes after them, and a re-run sees its entry as its own."""
    upstream_pin = {"name": "busybox", "newTag": "1.36.1"}
    profile = edited("alga-platform", lambda o: o["spec"].update(images=[upstream_pin]))
    flux_applied_before(kubesim, profile, "alga-platform")
    result = run_against(kubesim, write_config, profile)
    assert result.code == 0, result.output
    live = kubesim.get(KS_API, "Kustomization", "alga-platform", "flux-system")
    assert live["spec"]["images"] == [upstream_pin, {"name": "node", "newTag": "20.19-alpine"}]
    kubesim.clear_log()
    config = write_config(site_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    assert writes_beyond_bookkeeping(kubesim) == []


def flux_applied_before(sim: KubeSim, profile: list[Obj], child_name: str) -> None:
    """The cluster as Flux left it when it applied upstream's `child_name` (from the edited
    `profile`) before the agent ran: its CRD, its namespace, the child itself."""
    child = next(o for o in profile if o["metadata"]["name"] == child_name)
    crd = next(
        d
        for d in yaml.safe_load_all(BUNDLE.read_text())
        if d and d["metadata"]["name"] == "kustomizations.kustomize.toolkit.fluxcd.io"
    )
    sim.put(crd, "flux")
    sim.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "flux-system"}})
    wait_for(lambda: sim.put(child, "kustomize-controller") if _served(sim) else None)


def _served(sim: KubeSim) -> bool:
    try:
        sim.store.type_for_kind(KS_API, "Kustomization")
    except ApiError:
        return False
    return True


NUMERIC_LOOKING = {
    "algaCore": "12345e67",
    "workflowWorker": "1e5",
    "emailService": "0x1F",
    "temporalWorker": "true",
    "redis": "010",
    "pgbouncer": "1_000",
}


def go_yaml(texts: list[str]) -> list[Any]:
    """Each YAML text as Go reads it (kubectl's sigs.k8s.io/yaml, as Helm and Flux do)."""
    docs = [
        f"apiVersion: example.com/v1\nkind: Probe\nmetadata:\n  name: p{i}\nvalue:\n"
        + "".join(f"  {line}\n" for line in text.splitlines())
        for i, text in enumerate(texts)
    ]
    out = subprocess.run(
        ["kubectl", "annotate", "--local", "-f", "-", "checked=yes", "-o", "json"],
        input="---\n".join(docs),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECONFIG": "/dev/null"},
    )
    items, at, decoder = [], 0, json.JSONDecoder()
    while out.stdout[at:].strip():  # one JSON object per document, back to back
        at += len(out.stdout[at:]) - len(out.stdout[at:].lstrip())
        item, at = decoder.raw_decode(out.stdout, at)
        items.append(item)
    return [item["value"] for item in sorted(items, key=lambda o: int(o["metadata"]["name"][1:]))]


def generated_texts(root: Obj) -> list[str]:
    """Every YAML text in the root's patches: the patches, the patches they carry, and the
    values texts they put in ConfigMaps."""
    texts, todo = [], [p["patch"] for p in root["spec"].get("patches", [])]
    while todo:
        text = todo.pop()
        texts.append(text)
        body = yaml.safe_load(text)
        if isinstance(body, dict):
            todo += [v for v in body.get("data", {}).values()]
        else:
            for op in body:
                value = op.get("value")
                for item in value if isinstance(value, list) else []:
                    if isinstance(item, dict) and "patch" in item:
                        todo.append(item["patch"])
    return texts


def tags_in(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k in ("tag", "newTag")] + [
            t for v in node.values() for t in tags_in(v)
        ]
    if isinstance(node, list):
        return [t for v in node for t in tags_in(v)]
    return []


@pytest.mark.parametrize("mode", ["profile", "base"])
def test_numeric_looking_tags_reach_helm_as_strings(
    kubesim: KubeSim, write_config: Any, mode: str
) -> None:
    root = run_mode(kubesim, write_config, mode, images=dict(NUMERIC_LOOKING))
    texts = generated_texts(root)
    if mode == "base":
        for component in alga.COMPONENTS:
            cm = kubesim.get("v1", "ConfigMap", f"appliance-values-{component}", "alga-system")
            texts += list(cm["data"].values())
    assert len(texts) >= 8
    as_go = go_yaml(texts)
    for text, go in zip(texts, as_go, strict=True):
        assert go == yaml.safe_load(text), text  # Go and Python read the same values
    tags = [t for go in as_go for t in tags_in(go)]
    for tag in NUMERIC_LOOKING.values():
        assert tag in tags
    assert all(isinstance(t, str) for t in tags)
    selection = kubesim.get("v1", "ConfigMap", "appliance-release-selection", "alga-system")
    assert selection["data"]["algaCoreTag"] == "12345e67"


def selection_of(sim: KubeSim) -> dict[str, str]:
    data: dict[str, str] = sim.get("v1", "ConfigMap", "appliance-release-selection", "alga-system")[
        "data"
    ]
    return data


def test_profile_mode_keeps_the_release_selection_equal_to_the_tags(
    kubesim: KubeSim, write_config: Any
) -> None:
    run_mode(kubesim, write_config, "profile")
    kubesim.put(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "appliance-release-selection", "namespace": "alga-system"},
            "data": {**selection_of(kubesim), "algaCoreTag": "moved-by-updater"},
        },
        "appliance-updater",
    )
    # status and run judge the owned selection alike: it differs, and run restores it.
    report = json.loads(site_status(kubesim, write_config).stdout)
    site = {(i["kind"], i["name"]): i for i in report["site"]}
    assert site[("ConfigMap", "appliance-release-selection")]["missingKeys"] == ["algaCoreTag"]
    config = write_config(site_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    assert selection_of(kubesim)["algaCoreTag"] == "a2cbb430"
    # A new release in the config moves the pods' values and the selection together.
    images = {"algaCore": "b0b0b0b0"}
    newer = write_config(site_config(images=images, release={"version": "1.1"}), "n.yaml")
    result = run_agent(*fast_run_args(newer, kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    assert selection_of(kubesim)["algaCoreTag"] == "b0b0b0b0"
    assert selection_of(kubesim)["releaseVersion"] == "1.1"
    site = yaml.safe_load(
        kubesim.get("v1", "ConfigMap", "appliance-values-alga-core", "alga-system")["data"][
            "alga-core.site.yaml"
        ]
    )
    assert site["server"]["image"]["tag"] == site["setup"]["image"]["tag"] == "b0b0b0b0"


def test_status_shows_a_release_selection_the_helm_releases_do_not_run(
    kubesim: KubeSim, write_config: Any
) -> None:
    run_mode(kubesim, write_config, "base")
    live_releases(kubesim)
    kubesim.put(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "appliance-release-selection", "namespace": "alga-system"},
            "data": {**selection_of(kubesim), "algaCoreTag": "half-updated"},
        },
        "appliance-updater",
    )
    config = write_config(site_config("base"))
    # Base mode: the selection is the updater's; a run leaves it alone.
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    assert selection_of(kubesim)["algaCoreTag"] == "half-updated"
    args = ["status", "--config", str(config), "--kubeconfig", str(kubesim.kubeconfig_path)]
    report = run_agent(*args, "-o", "json")
    assert report.code == 1
    release = {r["image"]: r for r in json.loads(report.stdout)["release"]}
    assert release["algaCore"]["state"] == "failed"
    assert "selection half-updated, HelmRelease a2cbb430" in release["algaCore"]["message"]
    assert release["emailService"]["state"] == "ready"
    text = run_agent(*args).stdout
    assert "✗ algaCore  selection half-updated, HelmRelease a2cbb430: finish the update" in text


def test_images_lists_what_an_offline_first_boot_pulls(write_config: Any) -> None:
    result = run_agent("images", "--config", str(write_config(site_config())))
    assert result.code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(set(lines))
    assert sum("ghcr.io/fluxcd/" in line for line in lines) == 4
    assert "docker.io/rancher/local-path-provisioner:v0.0.31" in lines
    for ref in (
        "ghcr.io/nine-minds/alga-psa-ee:a2cbb430",
        "ghcr.io/nine-minds/workflow-worker:a2cbb43",
        "ghcr.io/nine-minds/email-service:61e4a00e",
        "ghcr.io/nine-minds/temporal-worker:a2cbb43",
        "ankane/pgvector:v0.5.1",
        "busybox:1.37.0",
        "redis:7.4.2",
        "edoburu/pgbouncer:v1.25.1-p0",
        "temporalio/auto-setup:1.27.2",
        "temporalio/ui:2.30.0",
        "node:20.19-alpine",  # the status page, pinned
        "node:20-alpine",  # the update Jobs, named in upstream's script
    ):
        assert ref in lines
    assert not any(line.endswith(":latest") or ":" not in line for line in lines)


def kubectl_kustomize(
    where: Path, objects: list[Obj], patches: list[Obj], images: list[Obj] | None = None
) -> list[Obj] | str:
    """Real kustomize (kubectl's) on `objects` with `patches` and `images`: the objects, or
    its error."""
    where.mkdir()
    (where / "objects.yaml").write_text(yaml.safe_dump_all(objects))
    (where / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["objects.yaml"], "patches": patches, "images": images or []})
    )
    out = subprocess.run(["kubectl", "kustomize", str(where)], capture_output=True, text=True)
    if out.returncode != 0:
        return out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_name(objects: list[Obj]) -> dict[tuple[str, str], Obj]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_the_simulated_flux_builds_as_kustomize_does(tmp_path: Path, write_config: Any) -> None:
    """kubesim's stand-in against `kubectl kustomize` on upstream's objects and the agent's
    real patches: the profile, both children, upstream patches on a child (guarded: both
    fail the build; appended: both keep upstream's)."""
    config = config_module.load(write_config(site_config(images=dict(NUMERIC_LOOKING))))
    root = desired.kustomization(config.sync)["spec"]["patches"]
    built = kubesim_kustomize.build(PROFILE, root)
    assert by_name(built) == by_name(kubectl_kustomize(tmp_path / "root", PROFILE, root))
    paths = upstream.sources(PROFILE, CHILDREN)
    for child in (o for o in built if o["kind"] == "Kustomization"):
        objects, patches = paths[child["spec"]["path"]], child["spec"].get("patches", [])
        images = child["spec"].get("images", [])
        real = kubectl_kustomize(tmp_path / child["metadata"]["name"], objects, patches, images)
        assert by_name(kubesim_kustomize.build(objects, patches, images)) == by_name(real)
    # The status page's pin, and the same pin as a digest, as real kustomize sets them.
    platform = paths["./ee/appliance/flux/base/platform"]
    digest = {"name": "node", "newTag": "20.19-alpine", "digest": "sha256:" + "ab" * 32}
    real = kubectl_kustomize(tmp_path / "digest", platform, [], [digest])
    assert by_name(kubesim_kustomize.build(platform, [], [digest])) == by_name(real)
    status_page = by_name(real)[("Deployment", "appliance-status")]["spec"]["template"]["spec"]
    assert status_page["containers"][0]["image"] == "node:20.19-alpine@sha256:" + "ab" * 32
    profile = edited("alga-background", lambda o: o["spec"].update(patches=[UPSTREAM_PATCH]))
    real = kubectl_kustomize(tmp_path / "guarded", profile, root)
    assert isinstance(real, str) and "testing value /spec/patches failed" in real
    with pytest.raises(kubesim_kustomize.BuildError, match="testing value /spec/patches failed"):
        kubesim_kustomize.build(profile, root)
    index = next(i for i, p in enumerate(root) if p["target"]["name"] == "alga-background")
    appended = desired.kustomization(config.sync, frozenset({index}))["spec"]["patches"]
    real = kubectl_kustomize(tmp_path / "appended", profile, appended)
    assert by_name(kubesim_kustomize.build(profile, appended)) == by_name(real)
    assert by_name(real)[("Kustomization", "alga-background")]["spec"]["patches"][0] == (
        UPSTREAM_PATCH
    )


@pytest.mark.parametrize("mode", ["profile", "base"])
def test_alga_core_installs_and_upgrades_without_helms_wait(
    kubesim: KubeSim, write_config: Any, mode: str
) -> None:
    """Upstream's fix of the first-install deadlock (5011d117a6): the bootstrap hook Job that
    alga-core's server waits for runs only after Helm's wait, so alga-core must not wait.
    Upstream's releases set no disableWait at the pinned commit; the others keep waiting."""
    assert not any("disableWait" in json.dumps(r["spec"]) for r in HELM_RELEASES)
    run_mode(kubesim, write_config, mode)
    releases = live_releases(kubesim)
    core = releases["alga-core"]["spec"]
    assert core["install"]["disableWait"] is True
    assert core["upgrade"]["disableWait"] is True
    assert core["install"]["remediation"] == {"retries": 5}  # upstream's own, kept
    for name, release in releases.items():
        if name != "alga-core":
            assert "disableWait" not in json.dumps(release["spec"]), name
