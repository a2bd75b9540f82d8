"""The Alga preset against kubesim, checked against upstream's rendered profile and children
(../shared/alga): every reference Git does not satisfy must be satisfied after a run."""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubesim import KubeSim
from tests.conftest import BUNDLE, SHARED, agent_env, fast_run_args, run_agent

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


# -- a small stand-in for the kustomize patching Flux does -------------------------------------


def _matches(target: dict[str, str], obj: Obj) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and re.fullmatch(target.get("name", ".*"), obj["metadata"]["name"]) is not None
        and target.get("namespace", obj["metadata"].get("namespace"))
        == obj["metadata"].get("namespace")
        and target.get("group", group) == group
    )


def _merge(base: Obj, overlay: Obj) -> Obj:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else copy.deepcopy(value)
        )
    return out


def apply_patches(objects: list[Obj], patches: list[Obj]) -> list[Obj]:
    """Strategic merge (maps) and JSON6902 `add` (`/x/-` appends to list x): the two patch
    forms the preset uses."""
    fixed = []
    for patch in patches:
        body = yaml.safe_load(patch["patch"])
        if isinstance(body, list):
            for op in body:
                if op["path"].endswith("/-"):
                    op["path"] = op["path"][:-2]
                    op["value"] = [op["value"]]
                    op["append"] = True
            patch = {**patch, "patch": yaml.safe_dump(body)}
        fixed.append(patch)
    out = copy.deepcopy(objects)
    for patch in fixed:
        body = yaml.safe_load(patch["patch"])
        for obj in out:
            if not _matches(patch["target"], obj):
                continue
            if isinstance(body, dict):
                obj.update(_merge(obj, body))
                continue
            for op in body:
                *parents, last = op["path"].strip("/").split("/")
                node = obj
                for key in parents:
                    node = node[key]
                if op.get("append"):
                    node[last] = node[last] + op["value"]
                else:
                    node[last] = copy.deepcopy(op["value"])
    return out


# -- the tests ---------------------------------------------------------------------------------


def run_mode(kubesim: KubeSim, write_config: Any, mode: str) -> Obj:
    """Run the preset in `mode`, check what every mode needs; the root Kustomization."""
    result = run_agent(*fast_run_args(write_config(site_config(mode)), kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    check_common_references(kubesim)
    root: Obj = kubesim.get(
        "kustomize.toolkit.fluxcd.io/v1", "Kustomization", "alga-appliance", "flux-system"
    )
    return root


def test_profile_mode_satisfies_every_reference(kubesim: KubeSim, write_config: Any) -> None:
    root = run_mode(kubesim, write_config, "profile")
    assert root["spec"]["path"] == "./ee/appliance/flux/profiles/talos-single-node"
    assert {
        k: root["spec"][k] for k in ("interval", "retryInterval", "timeout", "prune", "wait")
    } == {"interval": "5m", "retryInterval": "1m", "timeout": "2m", "prune": True, "wait": True}
    # Flux owns the values ConfigMaps from Git: the agent must not have created them.
    assert not kubesim.exists("v1", "ConfigMap", "appliance-values-alga-core", "alga-system")
    # Render as Flux would: the profile with the root's patches, then each child
    # Kustomization's (patched) patches on the HelmReleases it renders.
    profile = apply_patches(PROFILE, root["spec"]["patches"])
    config_maps = {d["metadata"]["name"]: d for d in profile if d["kind"] == "ConfigMap"}
    children = {d["metadata"]["name"]: d for d in profile if d["kind"] == "Kustomization"}
    releases = HELM_RELEASES
    for child in children.values():
        releases = apply_patches(releases, child["spec"].get("patches", []))
    for release in releases:
        component = release["metadata"]["name"]
        for ref in release["spec"]["valuesFrom"]:
            assert ref["kind"] == "ConfigMap"
            assert ref["valuesKey"] in config_maps[ref["name"]]["data"], (component, ref)
        site_keys = [
            r["valuesKey"]
            for r in release["spec"]["valuesFrom"]
            if r["valuesKey"].endswith(".site.yaml")
        ]
        # Upstream's values first, the site's after them (later entries win in Helm).
        assert (
            release["spec"]["valuesFrom"][0]["valuesKey"] == f"{component}.talos-single-node.yaml"
        )
        if component in ("alga-core", "workflow-worker", "email-service", "temporal-worker"):
            assert len(site_keys) == 1
            site = yaml.safe_load(
                config_maps[f"appliance-values-{component}"]["data"][site_keys[0]]
            )
            tags = re.findall(r"'tag': '([^']+)'", str(site))
            assert tags and "latest" not in tags
    core = yaml.safe_load(config_maps["appliance-values-alga-core"]["data"]["alga-core.site.yaml"])
    assert core["appUrl"] == SITE_URL and core["host"] == "psa.example.test"
    assert core["server"]["image"]["tag"] == "a2cbb430"
    assert core["setup"]["waitForBootstrap"]["image"]["tag"] == "v0.5.1"
    # Upstream's own values keys are untouched by the patches.
    original = next(d for d in PROFILE if d["metadata"]["name"] == "appliance-values-alga-core")
    assert (
        config_maps["appliance-values-alga-core"]["data"]["alga-core.talos-single-node.yaml"]
        == original["data"]["alga-core.talos-single-node.yaml"]
    )


def test_base_mode_creates_the_values_config_maps(kubesim: KubeSim, write_config: Any) -> None:
    root = run_mode(kubesim, write_config, "base")
    assert root["spec"]["path"] == "./ee/appliance/flux/base"
    assert "patches" not in root["spec"]
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
    assert "commit=26bb86fa3aade6d4e4289db3a71f8803ed4ff144" in result.stdout
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
        ({"appUrl": "ftp://psa.example.test"}, "alga.appUrl: 'ftp://psa.example.test' is not"),
        ({"appUrl": "https://psa.example.test/app"}, "is not a site URL"),
        (
            {"mode": "base", "valuesDir": "MISSING_ONE"},
            "pgbouncer.talos-single-node.yaml' is missing",
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
