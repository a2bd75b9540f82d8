"""The Alga preset's first boot and the boots after it, on the real test bed: kube-apiserver,
kube-controller-manager, kube-scheduler and kwok; Flux's source-, kustomize- and
helm-controller as host processes; upstream's tree in a Git server over HTTPS with basic
auth. The tests of this module run in order on one cluster: each starts from what the one
before left."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from testbed.cluster import AGENT_USER, Cluster
from tests.real.conftest import Testbed

CHILDREN = ("alga-platform", "alga-core", "alga-background")
HELM_RELEASES = (
    "alga-core",
    "pgbouncer",
    "temporal",
    "email-service",
    "workflow-worker",
    "temporal-worker",
)
GENERATED = (("appliance-system", "appliance-status-auth"), ("msp", "alga-psa-shared"))


def condition(obj: dict[str, Any], kind: str = "Ready") -> dict[str, Any]:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return dict(c)
    return {}


def wait_for(what: str, check: Any, timeout: float, every: float = 2) -> Any:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what} within {timeout:.0f} s; last look: {last}")


def flux_ready(cluster: Cluster, kind: str, name: str, namespace: str) -> bool:
    obj = cluster.get(kind, name, "-n", namespace)
    return (
        condition(obj).get("status") == "True"
        and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
    )


def secrets(cluster: Cluster) -> dict[str, dict[str, str]]:
    return {name: cluster.get("secret", name, "-n", ns)["data"] for ns, name in GENERATED}


@pytest.fixture(scope="module")
def first_boot(testbed: Testbed) -> Any:
    mark = testbed.cluster.audit_mark()
    result = testbed.run("run", "--log-format", "json", "--timeout", "5m")
    return result, mark


def test_the_first_boot_exits_0_with_a_real_clone(testbed: Testbed, first_boot: Any) -> None:
    result, _ = first_boot
    assert result.code == 0, result.output[-3000:]
    assert result.events()[-1]["event"] == "done"
    source = testbed.cluster.get("gitrepository", "alga-appliance", "-n", "flux-system")
    assert condition(source)["status"] == "True", source["status"]
    # The real source-controller cloned our Git server, at the commit the config pins.
    assert source["status"]["artifact"]["revision"] == f"main@sha1:{testbed.commit}"
    served = [r for r in testbed.git.requests() if r.path.endswith("git-upload-pack")]
    assert served and all(r.status == 200 and r.user == "site" for r in served), served


def test_the_root_and_its_children_are_applied_by_kustomize_controller(
    testbed: Testbed, first_boot: Any
) -> None:
    cluster = testbed.cluster
    revision = f"main@sha1:{testbed.commit}"
    for name in ("alga-appliance", *CHILDREN):
        wait_for(
            f"Kustomization {name} Ready at {revision}",
            lambda n=name: (
                flux_ready(cluster, "kustomization", n, "flux-system")
                and cluster.get("kustomization", n, "-n", "flux-system")["status"].get(
                    "lastAppliedRevision"
                )
                == revision
            ),
            600,
        )
    # The agent's patches are in effect: the values ConfigMaps carry the site's URL.
    values = cluster.get("configmap", "appliance-values-alga-core", "-n", "alga-system")
    assert "psa.example.test" in json.dumps(values["data"])


def test_every_helm_release_is_installed_by_helm_controller(
    testbed: Testbed, first_boot: Any
) -> None:
    cluster = testbed.cluster
    for name in HELM_RELEASES:
        wait_for(
            f"HelmRelease {name} Ready",
            lambda n=name: flux_ready(cluster, "helmrelease", n, "alga-system"),
            900,
        )
    # Helm's own release record: the charts came from the Git source.
    releases = cluster.kubectl("get", "secret", "-A", "-l", "owner=helm", "-o", "name").split()
    assert len(releases) >= len(HELM_RELEASES), releases


def test_status_tells_the_truth(testbed: Testbed, first_boot: Any) -> None:
    report = testbed.status()
    assert report["state"] == "ready", json.dumps(report, indent=1)[:3000]
    assert report["source"]["revision"] == f"main@sha1:{testbed.commit}"


def test_the_next_boot_writes_nothing(testbed: Testbed, first_boot: Any) -> None:
    cluster = testbed.cluster
    mark = cluster.audit_mark()
    result = testbed.run("run", "--log-format", "json")
    assert result.code == 0, result.output[-3000:]
    assert result.events()[-1]["event"] == "nothing to do"
    events = cluster.audit(mark)
    writes = [(e.verb, e.resource, e.name) for e in events if e.write]
    # Its Lease aside (taken and released around any write the run might make).
    assert [w for w in writes if w[1] != "leases"] == [], writes
    assert len(events) <= 20, [e.uri for e in events]


def test_without_its_record_the_run_compares_everything_and_writes_only_the_record(
    testbed: Testbed, first_boot: Any
) -> None:
    cluster = testbed.cluster
    before = secrets(cluster)
    cluster.kubectl("delete", "configmap", "alga-bootstrap-run", "-n", "alga-system")
    mark = cluster.audit_mark()
    result = testbed.run("run", "--log-format", "json")
    assert result.code == 0, result.output[-3000:]
    events = cluster.audit(mark)
    written = {(e.resource, e.name) for e in events if e.write and not e.uri.count("dryRun")}
    assert written - {("leases", "alga-bootstrap")} == {("configmaps", "alga-bootstrap-run")}, (
        written
    )
    # The dry-run applies asked the real server; it found nothing to change.
    assert any("dryRun=All" in e.uri for e in events)
    assert secrets(cluster) == before


def test_a_dry_run_on_the_converged_cluster_has_nothing_to_change(testbed: Testbed) -> None:
    cluster = testbed.cluster
    mark = cluster.audit_mark()
    result = testbed.run("run", "--dry-run", "--log-format", "json")
    assert result.code == 0, result.output[-3000:]
    assert "nothing to change" in result.stdout.lower() or "0 to" in result.stdout, result.stdout
    assert [e for e in cluster.audit(mark) if e.write and "dryRun=All" not in e.uri] == []


def test_an_edited_controller_and_secret_are_repaired(testbed: Testbed) -> None:
    cluster = testbed.cluster
    before = secrets(cluster)
    image = cluster.get("deployment", "source-controller", "-n", "flux-system")["spec"]["template"][
        "spec"
    ]["containers"][0]["image"]
    # A field the agent applies, changed by another manager (kubectl's own).
    cluster.kubectl(
        "-n", "flux-system", "set", "image", "deployment/source-controller", "manager=busybox:1"
    )
    cluster.kubectl(
        "-n",
        "msp",
        "patch",
        "secret",
        "alga-psa-shared",
        "--type=json",
        "-p",
        '[{"op": "remove", "path": "/data/ALGA_AUTH_KEY"}]',
    )
    result = testbed.run("run", "--log-format", "json")
    assert result.code == 0, result.output[-3000:]
    deployment = cluster.get("deployment", "source-controller", "-n", "flux-system")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == image
    # The missing key is generated once more; the others are untouched.
    after = secrets(cluster)
    assert after["appliance-status-auth"] == before["appliance-status-auth"]
    assert base64.b64decode(after["alga-psa-shared"]["ALGA_AUTH_KEY"])


def test_a_field_only_another_manager_set_is_left_to_it(testbed: Testbed) -> None:
    """Server-side apply: an env var a tech added with kubectl is theirs; the agent's forced
    apply of its own fields neither removes it nor conflicts with it."""
    cluster = testbed.cluster
    cluster.kubectl(
        "-n", "flux-system", "set", "env", "deployment/helm-controller", "SITE_TUNING=1"
    )
    result = testbed.run("run", "--log-format", "json")
    assert result.code == 0, result.output[-3000:]
    deployment = cluster.get("deployment", "helm-controller", "-n", "flux-system")
    env = deployment["spec"]["template"]["spec"]["containers"][0].get("env", [])
    assert "SITE_TUNING" in {e["name"] for e in env}


def test_a_field_another_manager_owns_is_not_fought_over(testbed: Testbed) -> None:
    cluster = testbed.cluster
    # A tech scales a controller with their own field manager; the bundle sets no replicas
    # conflict-free: the agent's forced apply of its own fields leaves theirs.
    cluster.kubectl(
        "-n",
        "flux-system",
        "annotate",
        "deployment/kustomize-controller",
        "site.example/owner=tech",
        "--field-manager=tech",
    )
    mark = cluster.audit_mark()
    result = testbed.run("run", "--log-format", "json")
    assert result.code == 0, result.output[-3000:]
    deployment = cluster.get("deployment", "kustomize-controller", "-n", "flux-system")
    assert deployment["metadata"]["annotations"]["site.example/owner"] == "tech"
    writes = [e for e in cluster.audit(mark) if e.write and "dryRun=All" not in e.uri]
    assert [e for e in writes if e.resource == "deployments"] == [], writes
    assert all(e.user == AGENT_USER for e in writes)
