"""kubesim behaves like a kube-apiserver over the wire: checked with httpx and real kubectl."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kubesim import KubeSim
from tests.conftest import BUNDLE

CM_PATH = "/api/v1/namespaces/default/configmaps"
APPLY = "application/apply-patch+yaml"
KUBECTL_DIR = Path("/usr/lib/google-cloud-sdk/bin")
# kubectl 1.29 and newer let the server validate; older ones need the protobuf OpenAPI v2
# document, which kubesim does not serve.
KUBECTLS = sorted(
    (str(p) for p in KUBECTL_DIR.glob("kubectl.1.*") if int(p.name.rsplit(".", 1)[1]) >= 29),
    key=lambda p: int(p.rsplit(".", 1)[1]),
) or ["kubectl"]


def client(sim: KubeSim, token: str | None = None) -> httpx.Client:
    context = ssl.create_default_context(cadata=sim.ca_pem.decode())
    return httpx.Client(
        base_url=sim.url,
        verify=context,
        timeout=10,
        headers={"Authorization": f"Bearer {token or sim.token}"},
    )


def apply(
    c: httpx.Client, path: str, obj: dict[str, Any], manager: str, **query: str
) -> httpx.Response:
    params = {"fieldManager": manager, **query}
    return c.patch(
        path, content=yaml.safe_dump(obj), params=params, headers={"Content-Type": APPLY}
    )


def cm(name: str, data: dict[str, str], **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default", **meta},
        "data": data,
    }


def kubectl(
    sim: KubeSim,
    *args: str,
    binary: str = "kubectl",
    cache: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(sim.kubeconfig_path)}
    if cache:
        env["KUBECACHEDIR"] = str(cache)
    return subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=timeout)


# -- kubectl as an independent client ------------------------------------------------------


@pytest.mark.parametrize("binary", [KUBECTLS[0], KUBECTLS[-1]], ids=lambda b: Path(b).name)
def test_kubectl_installs_and_reads_the_flux_bundle(
    kubesim_factory: Any, tmp_path: Path, binary: str
) -> None:
    sim = kubesim_factory(crd_established_delay=0.3)
    applied = kubectl(
        sim, "apply", "--server-side", "-f", str(BUNDLE), binary=binary, cache=tmp_path
    )
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.count("serverside-applied") == 32
    crds = kubectl(sim, "get", "crd", "-o", "name", binary=binary, cache=tmp_path)
    assert len(crds.stdout.split()) == 11
    waited = kubectl(
        sim,
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=30s",
        binary=binary,
        cache=tmp_path,
    )
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.count("condition met") == 11
    repo = {
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": "GitRepository",
        "metadata": {"name": "demo", "namespace": "flux-system"},
        "spec": {"url": "https://git.example/x.git", "interval": "1m"},
    }
    manifest = tmp_path / "repo.yaml"
    manifest.write_text(yaml.safe_dump(repo))
    created = kubectl(
        sim, "apply", "--server-side", "-f", str(manifest), binary=binary, cache=tmp_path
    )
    assert created.returncode == 0, created.stderr
    listed = kubectl(sim, "get", "gitrepositories", "-A", binary=binary, cache=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "flux-system" in listed.stdout and "demo" in listed.stdout
    # The same bundle again changes nothing: every resourceVersion stays.
    before = sim.store.revision
    again = kubectl(sim, "apply", "--server-side", "-f", str(BUNDLE), binary=binary, cache=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sim.store.revision == before


def test_kubectl_sees_schema_rejection(kubesim: KubeSim, tmp_path: Path) -> None:
    assert (
        kubectl(kubesim, "apply", "--server-side", "-f", str(BUNDLE), cache=tmp_path).returncode
        == 0
    )
    bad = {
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": "GitRepository",
        "metadata": {"name": "bad", "namespace": "flux-system"},
        "spec": {"url": "git@github.com:org/repo", "interval": "1m"},
    }
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(bad))
    result = kubectl(kubesim, "apply", "--server-side", "-f", str(manifest), cache=tmp_path)
    assert result.returncode != 0
    assert "spec.url in body should match '^(http|https|ssh)://.*$'" in result.stderr


# -- basics ----------------------------------------------------------------------------------


def test_requests_without_valid_credentials_get_401(kubesim: KubeSim) -> None:
    with client(kubesim, token="wrong") as c:
        response = c.get("/api/v1/namespaces")
        assert response.status_code == 401
        assert response.json()["reason"] == "Unauthorized"
        # A bad credential is refused on public paths too, as on a real server.
        assert c.get("/readyz").status_code == 401
    with client(kubesim) as c:
        assert c.get("/api/v1/namespaces").status_code == 200
    context = ssl.create_default_context(cadata=kubesim.ca_pem.decode())
    with httpx.Client(base_url=kubesim.url, verify=context, timeout=10) as anonymous:
        assert anonymous.get("/readyz").status_code == 200  # public
        assert anonymous.get("/api/v1/namespaces").status_code == 401


@pytest.mark.parametrize("expired,foreign", [(False, False), (True, False), (False, True)])
def test_client_certificates_are_checked_per_request(
    kubesim: KubeSim, tmp_path: Any, expired: bool, foreign: bool
) -> None:
    user = kubesim.client_cert_kubeconfig(expired, foreign)["users"][0]["user"]
    (tmp_path / "cert.pem").write_bytes(base64.b64decode(user["client-certificate-data"]))
    (tmp_path / "key.pem").write_bytes(base64.b64decode(user["client-key-data"]))
    context = ssl.create_default_context(cadata=kubesim.ca_pem.decode())
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    with httpx.Client(base_url=kubesim.url, verify=context, timeout=10) as c:
        expected = 401 if expired or foreign else 200
        assert c.get("/api/v1/namespaces").status_code == expected
        assert c.get("/readyz").status_code == expected


def test_health_version_and_discovery(kubesim_factory: Any) -> None:
    sim = kubesim_factory(k8s_version="1.34.1")
    with client(sim) as c:
        assert c.get("/livez").text == "ok"
        assert c.get("/version").json()["gitVersion"] == "v1.34.1"
        assert c.get("/api").json()["versions"] == ["v1"]
        groups = {g["name"] for g in c.get("/apis").json()["groups"]}
        assert {"apps", "rbac.authorization.k8s.io", "apiextensions.k8s.io"} <= groups
        core = {r["name"] for r in c.get("/api/v1").json()["resources"]}
        assert {"namespaces", "configmaps", "secrets", "namespaces/status"} <= core
        assert c.get("/apis/source.toolkit.fluxcd.io/v1").status_code == 404


def test_custom_resources_appear_once_the_crd_is_established(kubesim_factory: Any) -> None:
    sim = kubesim_factory(crd_established_delay=2.0)  # the looks below take well under 2 s
    crd = next(
        d
        for d in yaml.safe_load_all(BUNDLE.read_text())
        if d and d["metadata"]["name"] == "gitrepositories.source.toolkit.fluxcd.io"
    )
    with client(sim) as c:
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
        assert apply(c, path, crd, "test").status_code == 201
        status = c.get(path).json()["status"]
        assert not any(x["type"] == "Established" for x in status["conditions"])
        assert c.get("/apis/source.toolkit.fluxcd.io/v1").status_code == 404
        deadline = time.monotonic() + 15
        while not any(
            x["type"] == "Established" and x["status"] == "True"
            for x in c.get(path).json()["status"]["conditions"]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        resources = c.get("/apis/source.toolkit.fluxcd.io/v1").json()["resources"]
        assert "gitrepositories" in {r["name"] for r in resources}
        groups = {g["name"] for g in c.get("/apis").json()["groups"]}
        assert "source.toolkit.fluxcd.io" in groups


def test_create_update_delete_and_missing_namespace(kubesim: KubeSim) -> None:
    with client(kubesim) as c:
        created = c.post(CM_PATH, json=cm("a", {"k": "1"}))
        assert created.status_code == 201
        again = c.post(CM_PATH, json=cm("a", {"k": "1"}))
        assert again.status_code == 409 and again.json()["reason"] == "AlreadyExists"
        live = created.json()
        live["data"] = {"k": "2"}
        updated = c.put(f"{CM_PATH}/a", json=live)
        assert updated.status_code == 200
        stale = c.put(f"{CM_PATH}/a", json=live)  # still carries the old resourceVersion
        assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"
        assert c.delete(f"{CM_PATH}/a").status_code == 200
        assert c.get(f"{CM_PATH}/a").status_code == 404
        missing = c.post("/api/v1/namespaces/nowhere/configmaps", json=cm("b", {}))
        assert missing.status_code == 404
        assert missing.json()["message"] == 'namespaces "nowhere" not found'


def test_list_filters_by_label_selector(kubesim: KubeSim) -> None:
    with client(kubesim) as c:
        for name, tier in (("a", "web"), ("b", "db"), ("c", "web")):
            c.post(CM_PATH, json=cm(name, {}, labels={"tier": tier}))
        names = [
            i["metadata"]["name"]
            for i in c.get(CM_PATH, params={"labelSelector": "tier=web"}).json()["items"]
        ]
        assert names == ["a", "c"]
        others = c.get(CM_PATH, params={"labelSelector": "tier!=web"}).json()["items"]
        assert [i["metadata"]["name"] for i in others] == ["b"]


def test_merge_patch(kubesim: KubeSim) -> None:
    with client(kubesim) as c:
        c.post(CM_PATH, json=cm("a", {"keep": "1", "drop": "2"}))
        patched = c.patch(
            f"{CM_PATH}/a",
            json={"data": {"drop": None, "new": "3"}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert patched.status_code == 200
        assert patched.json()["data"] == {"keep": "1", "new": "3"}


# -- server-side apply -----------------------------------------------------------------------


def test_apply_creates_tracks_managers_and_conflicts(kubesim: KubeSim) -> None:
    with client(kubesim) as c:
        first = apply(c, f"{CM_PATH}/a", cm("a", {"x": "1"}), "alpha")
        assert first.status_code == 201
        managers = [m["manager"] for m in first.json()["metadata"]["managedFields"]]
        assert managers == ["alpha"]
        # Same value from another manager: shared ownership, no conflict.
        shared = apply(c, f"{CM_PATH}/a", cm("a", {"x": "1", "y": "2"}), "beta")
        assert shared.status_code == 200
        assert {m["manager"] for m in shared.json()["metadata"]["managedFields"]} == {
            "alpha",
            "beta",
        }
        conflict = apply(c, f"{CM_PATH}/a", cm("a", {"x": "changed"}), "beta")
        assert conflict.status_code == 409
        assert 'conflict with "alpha": .data.x' in conflict.json()["message"]
        forced = apply(c, f"{CM_PATH}/a", cm("a", {"x": "changed"}), "beta", force="true")
        assert forced.status_code == 200 and forced.json()["data"]["x"] == "changed"
        # alpha owned only data.x; forcing moved it to beta, so alpha owns nothing now.
        managers = {m["manager"]: m for m in forced.json()["metadata"]["managedFields"]}
        assert set(managers) == {"beta"}
        assert managers["beta"]["fieldsV1"]["f:data"] == {"f:x": {}}
        # beta no longer applies y: a field only beta owned is removed.
        assert "y" not in forced.json()["data"]


def test_apply_needs_a_field_manager(kubesim: KubeSim) -> None:
    with client(kubesim) as c:
        response = c.patch(
            f"{CM_PATH}/a", content=yaml.safe_dump(cm("a", {})), headers={"Content-Type": APPLY}
        )
        assert response.status_code == 422
        assert "fieldManager: Required value" in response.json()["message"]


def test_noop_apply_keeps_resource_version_and_generation(kubesim: KubeSim) -> None:
    deploy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}}},
    }
    path = "/apis/apps/v1/namespaces/default/deployments/d"
    with client(kubesim) as c:
        created = apply(c, path, deploy, "m").json()["metadata"]
        same = apply(c, path, deploy, "m").json()["metadata"]
        assert same["resourceVersion"] == created["resourceVersion"]
        assert same["generation"] == created["generation"] == 1
        labelled = {**deploy, "metadata": {**deploy["metadata"], "labels": {"x": "y"}}}
        meta_change = apply(c, path, labelled, "m").json()["metadata"]
        assert meta_change["resourceVersion"] != created["resourceVersion"]
        assert meta_change["generation"] == 1  # metadata is not spec
        scaled = {**labelled, "spec": {**deploy["spec"], "replicas": 2}}
        assert apply(c, path, scaled, "m").json()["metadata"]["generation"] == 2


def test_dry_run_changes_nothing(kubesim: KubeSim) -> None:
    with client(kubesim) as c:
        dry = apply(c, f"{CM_PATH}/a", cm("a", {"x": "1"}), "m", dryRun="All")
        assert dry.status_code == 201 and dry.json()["data"] == {"x": "1"}
        assert c.get(f"{CM_PATH}/a").status_code == 404
        apply(c, f"{CM_PATH}/a", cm("a", {"x": "1"}), "m")
        revision = kubesim.store.revision
        dry = apply(c, f"{CM_PATH}/a", cm("a", {"x": "2"}), "m", dryRun="All")
        assert dry.json()["data"] == {"x": "2"}
        assert c.get(f"{CM_PATH}/a").json()["data"] == {"x": "1"}
        assert kubesim.store.revision == revision
    assert [r["dry_run"] for r in kubesim.requests if r["verb"] == "apply"] == [True, False, True]


def test_status_subresource_is_kept_apart(kubesim: KubeSim) -> None:
    path = "/apis/apps/v1/namespaces/default/deployments/d"
    deploy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "default"},
        "spec": {"replicas": 1},
        "status": {"replicas": 99},
    }
    with client(kubesim_no_controllers := kubesim) as c:
        kubesim_no_controllers.controllers.stop()
        created = apply(c, path, deploy, "m").json()
        assert "replicas" not in created.get("status", {})  # status ignored on the main path
        status = c.put(
            f"{path}/status", json={**created, "spec": {"replicas": 5}, "status": {"replicas": 3}}
        ).json()
        assert status["status"]["replicas"] == 3
        assert status["spec"]["replicas"] == 1  # spec ignored on /status
        assert status["metadata"]["generation"] == 1


def test_custom_objects_are_validated_against_the_crd_schema(kubesim: KubeSim) -> None:
    for doc in yaml.safe_load_all(BUNDLE.read_text()):
        if doc:
            kubesim.put(doc)
    path = "/apis/source.toolkit.fluxcd.io/v1/namespaces/flux-system/gitrepositories/r"
    base = {
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": "GitRepository",
        "metadata": {"name": "r", "namespace": "flux-system"},
    }
    with client(kubesim) as c:
        missing = apply(c, path, {**base, "spec": {"url": "https://x/y"}}, "m")
        assert missing.status_code == 422
        assert missing.json()["message"] == (
            'GitRepository.source.toolkit.fluxcd.io "r" is invalid: spec.interval: Required value'
        )
        pattern = apply(c, path, {**base, "spec": {"url": "git@x:y", "interval": "1m"}}, "m")
        assert "spec.url in body should match" in pattern.json()["message"]
        typed = apply(c, path, {**base, "spec": {"url": "https://x/y", "interval": 5}}, "m")
        assert "spec.interval in body must be of type string" in typed.json()["message"]
        enum = apply(
            c,
            path,
            {**base, "spec": {"url": "https://x/y", "interval": "1m", "provider": "gitlab"}},
            "m",
        )
        assert enum.status_code == 422
        assert 'spec.provider: Unsupported value: "gitlab"' in enum.json()["message"]
        ok = apply(c, path, {**base, "spec": {"url": "https://x/y", "interval": "1m"}}, "m")
        assert ok.status_code == 201


def test_watch_streams_events_with_resource_versions(kubesim: KubeSim) -> None:
    with client(kubesim) as c:
        start = c.get(CM_PATH).json()["metadata"]["resourceVersion"]
        events: list[dict[str, Any]] = []

        def changes() -> None:
            time.sleep(0.2)
            c2 = client(kubesim)
            c2.post(CM_PATH, json=cm("w", {"a": "1"}))
            c2.patch(
                f"{CM_PATH}/w",
                json={"data": {"a": "2"}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            c2.delete(f"{CM_PATH}/w")
            c2.close()

        import threading

        threading.Thread(target=changes).start()
        params = {"watch": "1", "resourceVersion": start, "timeoutSeconds": "3"}
        with c.stream("GET", CM_PATH, params=params) as response:
            for line in response.iter_lines():
                if line:
                    events.append(json.loads(line))
                if len(events) == 3:
                    break
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(start)


# -- controllers -----------------------------------------------------------------------------


def test_controllers_make_deployments_and_flux_objects_ready(kubesim: KubeSim) -> None:
    for doc in yaml.safe_load_all(BUNDLE.read_text()):
        if doc:
            kubesim.put(doc)
    kubesim.put(
        {
            "apiVersion": "source.toolkit.fluxcd.io/v1",
            "kind": "GitRepository",
            "metadata": {"name": "app", "namespace": "flux-system"},
            "spec": {
                "url": "https://git.example/app.git",
                "interval": "1m",
                "ref": {"branch": "main"},
            },
        }
    )
    kubesim.put(
        {
            "apiVersion": "kustomize.toolkit.fluxcd.io/v1",
            "kind": "Kustomization",
            "metadata": {"name": "app", "namespace": "flux-system"},
            "spec": {
                "interval": "5m",
                "prune": True,
                "path": "./",
                "sourceRef": {"kind": "GitRepository", "name": "app"},
            },
        }
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ks = kubesim.get("kustomize.toolkit.fluxcd.io/v1", "Kustomization", "app", "flux-system")
        if ks.get("status", {}).get("lastAppliedRevision"):
            break
        time.sleep(0.05)
    repo = kubesim.get("source.toolkit.fluxcd.io/v1", "GitRepository", "app", "flux-system")
    revision = repo["status"]["artifact"]["revision"]
    assert revision.startswith("main@sha1:")
    assert ks["status"]["lastAttemptedRevision"] == revision
    assert ks["status"]["observedGeneration"] == ks["metadata"]["generation"]
    deploy = kubesim.get("apps/v1", "Deployment", "source-controller", "flux-system")
    assert {c["type"]: c["status"] for c in deploy["status"]["conditions"]}["Available"] == "True"
    assert kubesim.controllers.errors == []


# -- faults ----------------------------------------------------------------------------------


def test_refuses_connections_then_comes_up(kubesim_factory: Any) -> None:
    sim = kubesim_factory(refuse_seconds=2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sim.port), timeout=1).close()
    deadline = time.monotonic() + 15
    while True:  # then it listens
        try:
            socket.create_connection(("127.0.0.1", sim.port), timeout=1).close()
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    with client(sim) as c:
        assert c.get("/readyz").status_code == 200


def test_readyz_unavailable_for_a_while(kubesim_factory: Any) -> None:
    sim = kubesim_factory(readyz_unavailable_seconds=1.0)
    with client(sim) as c:
        assert c.get("/readyz").status_code == 503
        time.sleep(1.2)
        assert c.get("/readyz").status_code == 200


@pytest.mark.parametrize("status", [500, 503, 429])
def test_fail_next_requests(kubesim: KubeSim, status: int) -> None:
    kubesim.faults.fail_next(2, status, verb="create", retry_after=3 if status == 429 else None)
    with client(kubesim) as c:
        assert c.get(CM_PATH).status_code == 200  # other verbs pass
        first = c.post(CM_PATH, json=cm("a", {}))
        assert first.status_code == status
        if status == 429:
            assert first.headers["Retry-After"] == "3"
        assert c.post(CM_PATH, json=cm("a", {})).status_code == status
        assert c.post(CM_PATH, json=cm("a", {})).status_code == 201


def test_fail_by_path_and_reset_connections(kubesim: KubeSim) -> None:
    kubesim.faults.fail_next(1, 500, path="/secrets")
    kubesim.faults.reset_next(1, verb="list")
    with client(kubesim) as c:
        assert c.get(CM_PATH + "/x").status_code == 404
        assert c.get("/api/v1/namespaces/default/secrets/x").status_code == 500
        with pytest.raises(httpx.TransportError):
            c.get(CM_PATH)
        assert c.get(CM_PATH).status_code == 200


def test_latency_and_request_log_file(kubesim_factory: Any, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    sim = kubesim_factory(latency_ms=50, request_log=log)
    with client(sim) as c:
        started = time.monotonic()
        c.get(CM_PATH)
        c.post(CM_PATH, json=cm("a", {}))
        assert time.monotonic() - started >= 0.1
    # Each request is logged before its answer goes out.
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["verb"], e["status"]) for e in entries] == [("list", 200), ("create", 201)]
    assert all(e["ms"] >= 50 for e in entries)
    assert [e["verb"] for e in sim.writes()] == ["create"]


# -- command line ----------------------------------------------------------------------------


def test_serve_starts_fast_prints_ready_and_stops_on_sigterm(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kc"
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubesim",
            "serve",
            "--kubeconfig-out",
            str(kubeconfig),
            "--controllers",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    elapsed = time.monotonic() - started
    try:
        assert line.startswith("ready https://127.0.0.1:")
        assert elapsed < 10  # includes interpreter start, seconds on a busy machine
        config = yaml.safe_load(kubeconfig.read_text())
        assert config["clusters"][0]["cluster"]["server"] == line.split()[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
