"""kubesim stores what kube-apiserver would store: canonical quantities, Secret data, pruned
unknown fields, server-side apply's list merging and built-in defaults, on real writes and on
dry runs alike. Checked over HTTPS with httpx and with real kubectl."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubesim import KubeSim
from kubesim.quantity import canonical
from tests.conftest import BUNDLE
from tests.test_kubesim import apply, client, kubectl

DEPLOY_PATH = "/apis/apps/v1/namespaces/default/deployments"
VOLATILE_META = ("managedFields", "resourceVersion", "generation", "creationTimestamp", "uid")


def path_of(sim: KubeSim, obj: dict[str, Any]) -> str:
    t = sim.store.type_for_kind(obj["apiVersion"], obj["kind"])
    prefix = f"/apis/{t.group_version}" if t.group else "/api/v1"
    meta = obj["metadata"]
    scope = f"/namespaces/{meta['namespace']}" if t.namespaced else ""
    return f"{prefix}{scope}/{t.plural}/{meta['name']}"


def deployment(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": containers},
            },
            **spec,
        },
    }


def comparable(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as an ssa-style compare sees it: no managedFields, versions or timestamps."""
    out = copy.deepcopy(obj)
    for key in VOLATILE_META:
        out["metadata"].pop(key, None)
    return out


# -- resource quantities ---------------------------------------------------------------------

# Cases worked out from apimachinery pkg/api/resource/quantity.go (ParseQuantity,
# CanonicalizeBytes) and suffix.go.
QUANTITIES = [
    ("1000m", "1"),  # decimal: the largest exponent, a multiple of 3, that loses nothing
    ("0.5", "500m"),
    ("1.5", "1500m"),
    ("2000", "2k"),
    ("1000000k", "1G"),
    ("1500", "1500"),
    ("100m", "100m"),
    ("1024Mi", "1Gi"),  # binary: the largest power of 1024
    ("1.5Gi", "1536Mi"),
    ("1024Ki", "1Mi"),
    ("512Ki", "512Ki"),
    ("0.5Ki", "512"),  # binary below 1024 is written as decimal
    ("1.5Ki", "1536"),
    ("8Ei", "9223372036854775807"),  # binary is capped at 2^63-1
    ("1000e0", "1e3"),  # an exponent stays an exponent
    ("12e-1", "1200e-3"),
    ("1e3", "1e3"),
    ("1000E", "1e21"),  # past E (10^18) decimal SI falls back to an exponent
    ("0.1n", "1n"),  # rounded away from zero to a whole nano
    ("0", "0"),
    ("000", "0"),
    ("0Mi", "0"),
    ("-1000m", "-1"),
    ("1.500", "1.500"),  # the fast path keeps a string it finds canonical as it came
    (1, "1"),  # a bare JSON number is read from its text
    (0.25, "250m"),
    ("banana", "banana"),  # not a quantity: left for validation to refuse
]


@pytest.mark.parametrize(("given", "stored"), QUANTITIES, ids=[str(q[0]) for q in QUANTITIES])
def test_quantity_canonical_form(given: Any, stored: str) -> None:
    assert canonical(given) == stored


def test_quantities_are_canonicalised_on_write_and_dry_run(kubesim: KubeSim) -> None:
    container = {
        "name": "app",
        "image": "ghcr.io/example/app:1.0",
        "resources": {
            "limits": {"cpu": "1000m", "memory": "1024Mi"},
            "requests": {"cpu": 0.5, "memory": "1.5Gi", "ephemeral-storage": "2000"},
        },
    }
    deploy = deployment("q", [container])
    deploy["spec"]["template"]["spec"]["volumes"] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "1024Ki"}}
    ]
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": "default"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "10240Mi"}},
        },
    }
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "q", "namespace": "default"},
        "spec": {"hard": {"pods": "1000", "requests.cpu": "4000m"}},
    }
    with client(kubesim) as c:
        dry = apply(c, f"{DEPLOY_PATH}/q", deploy, "m", dryRun="All").json()
        live = apply(c, f"{DEPLOY_PATH}/q", deploy, "m").json()
        assert comparable(dry) == comparable(live)
        resources = live["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert resources == {
            "limits": {"cpu": "1", "memory": "1Gi"},
            "requests": {"cpu": "500m", "memory": "1536Mi", "ephemeral-storage": "2k"},
        }
        volume = live["spec"]["template"]["spec"]["volumes"][0]
        assert volume["emptyDir"] == {"sizeLimit": "1Mi"}
        created = c.post("/api/v1/namespaces/default/persistentvolumeclaims", json=pvc)
        assert created.json()["spec"]["resources"] == {"requests": {"storage": "10Gi"}}
        applied = apply(c, path_of(kubesim, quota), quota, "m").json()
        assert applied["spec"]["hard"] == {"pods": "1k", "requests.cpu": "4"}
        # The same configuration again is no change at all.
        before = kubesim.store.revision
        assert apply(c, f"{DEPLOY_PATH}/q", deploy, "m").status_code == 200
        assert kubesim.store.revision == before
    got = kubectl(kubesim, "get", "deployment", "q", "-n", "default", "-o", "json")
    limits = json.loads(got.stdout)["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert limits["limits"]["cpu"] == "1"


# -- Secret stringData -----------------------------------------------------------------------


def test_secret_string_data_is_merged_into_data_and_not_stored(
    kubesim: KubeSim, tmp_path: Path
) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s", "namespace": "default"},
        "data": {"kept": base64.b64encode(b"old").decode(), "both": "b2xk"},
        "stringData": {"both": "new", "plain": "text"},
    }
    manifest = tmp_path / "secret.yaml"
    manifest.write_text(yaml.safe_dump(secret))
    with client(kubesim) as c:
        dry = c.post("/api/v1/namespaces/default/secrets", json=secret, params={"dryRun": "All"})
        assert dry.status_code == 201
    applied = kubectl(kubesim, "apply", "--server-side", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(
        kubectl(kubesim, "get", "secret", "s", "-n", "default", "-o", "json").stdout
    )
    assert "stringData" not in stored and "stringData" not in dry.json()
    decoded = {k: base64.b64decode(v).decode() for k, v in stored["data"].items()}
    assert decoded == {"kept": "old", "both": "new", "plain": "text"}
    assert stored["type"] == "Opaque"  # SetDefaults_Secret
    assert dry.json()["data"] == stored["data"]


# -- unknown fields --------------------------------------------------------------------------

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "size": {"type": "integer"},
                                    "free": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                    },
                                    "template": {
                                        "type": "object",
                                        "x-kubernetes-embedded-resource": True,
                                        "properties": {
                                            "data": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            }
                                        },
                                    },
                                    "parts": {
                                        "type": "array",
                                        "x-kubernetes-list-type": "map",
                                        "x-kubernetes-list-map-keys": ["name"],
                                        "items": {
                                            "type": "object",
                                            "required": ["name"],
                                            "properties": {
                                                "name": {"type": "string"},
                                                "count": {"type": "integer"},
                                            },
                                        },
                                    },
                                    "tags": {
                                        "type": "array",
                                        "x-kubernetes-list-type": "set",
                                        "items": {"type": "string"},
                                    },
                                    "steps": {"type": "array", "items": {"type": "string"}},
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}
WIDGET_PATH = "/apis/example.com/v1/namespaces/default/widgets"


def widget(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


@pytest.fixture
def widgets(kubesim: KubeSim) -> KubeSim:
    kubesim.put(WIDGET_CRD)
    return kubesim


def test_unknown_fields_of_a_structural_schema_are_pruned(widgets: KubeSim) -> None:
    body = widget(
        "w",
        size=1,
        color="red",
        free={"anything": {"goes": True}},
        template={
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "t", "bogus": 1},
            "data": {"a": "b"},
            "extra": 1,
        },
    )
    body["topLevel"] = "x"
    with client(widgets) as c:
        dry = c.post(WIDGET_PATH, json=body, params={"dryRun": "All"})
        created = c.post(WIDGET_PATH, json=body)
    assert created.status_code == 201, created.text
    assert comparable(dry.json()) == comparable(created.json())
    stored = created.json()
    assert "topLevel" not in stored
    assert stored["spec"] == {
        "size": 1,
        "free": {"anything": {"goes": True}},  # x-kubernetes-preserve-unknown-fields
        "template": {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "t"},  # an embedded resource's metadata is an ObjectMeta
            "data": {"a": "b"},
        },
    }
    # The default directive is Warn: one Warning header per dropped field.
    warnings = created.headers.get_list("warning")
    assert 'unknown field \\"spec.color\\"' in ",".join(warnings)
    assert len(warnings) == 4, warnings


def test_strict_field_validation_rejects_unknown_fields(widgets: KubeSim, tmp_path: Path) -> None:
    with client(widgets) as c:
        strict = c.post(
            WIDGET_PATH,
            json=widget("w", size=1, foo=1, bar=2),
            params={"fieldValidation": "Strict"},
        )
        assert strict.status_code == 400
        assert strict.json()["message"] == (
            'Widget in version "v1" cannot be handled as a Widget: strict decoding error: '
            'unknown field "spec.foo", unknown field "spec.bar"'
        )
        deploy = deployment("d", [{"name": "a", "image": "x:1", "colour": "red"}])
        rejected = c.post(DEPLOY_PATH, json=deploy, params={"fieldValidation": "Strict"})
        assert rejected.status_code == 400
        assert (
            'unknown field "spec.template.spec.containers[0].colour"'
            in (rejected.json()["message"])
        )
        ignored = c.post(DEPLOY_PATH, json=deploy, params={"fieldValidation": "Ignore"})
        assert ignored.status_code == 201 and not ignored.headers.get_list("warning")
        assert "colour" not in ignored.json()["spec"]["template"]["spec"]["containers"][0]
        assert c.get(f"{WIDGET_PATH}/w").status_code == 404
    # kubectl validates strictly by default, server-side.
    manifest = tmp_path / "w.yaml"
    manifest.write_text(yaml.safe_dump(widget("w", size=1, foo=1)))
    refused = kubectl(widgets, "apply", "--server-side", "-f", str(manifest))
    assert refused.returncode != 0
    assert ".spec.foo: field not declared in schema" in refused.stderr
    warned = kubectl(widgets, "create", "--validate=warn", "-f", str(manifest))
    assert warned.returncode == 0, warned.stderr
    assert 'unknown field "spec.foo"' in warned.stderr


# -- server-side apply and lists -------------------------------------------------------------


def test_apply_merges_map_lists_by_key_between_managers(widgets: KubeSim) -> None:
    path = f"{WIDGET_PATH}/w"
    with client(widgets) as c:
        apply(c, path, widget("w", parts=[{"name": "a", "count": 1}], tags=["x"]), "alpha")
        both = apply(
            c, path, widget("w", parts=[{"name": "b", "count": 2}], tags=["y"]), "beta"
        ).json()
        assert both["spec"]["parts"] == [{"name": "a", "count": 1}, {"name": "b", "count": 2}]
        assert both["spec"]["tags"] == ["x", "y"]  # a set: the union
        owned = {m["manager"]: m["fieldsV1"] for m in both["metadata"]["managedFields"]}
        assert owned["beta"]["f:spec"]["f:parts"] == {
            'k:{"name":"b"}': {".": {}, "f:name": {}, "f:count": {}}
        }
        assert owned["beta"]["f:spec"]["f:tags"] == {'v:"y"': {}}
        # Another manager changing a field of an item alpha owns conflicts, by item key.
        conflict = apply(c, path, widget("w", parts=[{"name": "a", "count": 5}]), "beta")
        assert conflict.status_code == 409
        assert 'conflict with "alpha": .spec.parts[name="a"].count' in conflict.json()["message"]
        # beta stops applying its item: it goes; alpha's stays.
        dropped = apply(c, path, widget("w", tags=["y"]), "beta").json()
        assert dropped["spec"]["parts"] == [{"name": "a", "count": 1}]
        # An atomic list belongs whole to its last applier.
        apply(c, path, widget("w", steps=["one", "two"]), "gamma")
        replaced = apply(c, path, widget("w", steps=["three"]), "delta", force="true")
        assert replaced.json()["spec"]["steps"] == ["three"]


def test_apply_merges_built_in_lists_by_their_merge_keys(kubesim: KubeSim) -> None:
    path = f"{DEPLOY_PATH}/d"
    first = deployment(
        "d",
        [
            {
                "name": "app",
                "image": "app:1",
                "env": [{"name": "A", "value": "1"}],
                "ports": [{"containerPort": 8080}],
            }
        ],
    )
    second = deployment(
        "d",
        [
            {
                "name": "app",
                "env": [{"name": "B", "value": "2"}],
                "ports": [{"containerPort": 9090, "name": "metrics"}],
            },
            {"name": "sidecar", "image": "side:1"},
        ],
    )
    with client(kubesim) as c:
        assert apply(c, path, first, "alpha").status_code == 201
        merged = apply(c, path, second, "beta").json()
        containers = merged["spec"]["template"]["spec"]["containers"]
        assert [x["name"] for x in containers] == ["app", "sidecar"]
        app = containers[0]
        assert app["image"] == "app:1"
        assert app["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
        # ports are keyed by containerPort and protocol; protocol defaults to TCP.
        assert app["ports"] == [
            {"containerPort": 8080, "protocol": "TCP"},
            {"containerPort": 9090, "name": "metrics", "protocol": "TCP"},
        ]
        # Re-applying a port without its protocol finds the defaulted item: no change.
        before = kubesim.store.revision
        assert apply(c, path, first, "alpha").status_code == 200
        assert kubesim.store.revision == before
        # beta drops its sidecar and env var: they go; alpha's stay.
        only_app = deployment(
            "d",
            [
                {
                    "name": "app",
                    "ports": second["spec"]["template"]["spec"]["containers"][0]["ports"],
                }
            ],
        )
        after = apply(c, path, only_app, "beta").json()["spec"]["template"]["spec"]
        assert [x["name"] for x in after["containers"]] == ["app"]
        assert after["containers"][0]["env"] == [{"name": "A", "value": "1"}]


# -- defaults --------------------------------------------------------------------------------

DEPLOYMENT_DEFAULTS = {
    "replicas": 1,
    "strategy": {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
    },
    "revisionHistoryLimit": 10,
    "progressDeadlineSeconds": 600,
}
POD_DEFAULTS = {
    "restartPolicy": "Always",
    "terminationGracePeriodSeconds": 30,
    "dnsPolicy": "ClusterFirst",
    "securityContext": {},
    "schedulerName": "default-scheduler",
}


@pytest.mark.parametrize("verb", ["create", "apply", "update"])
def test_deployment_defaults(kubesim: KubeSim, verb: str) -> None:
    containers = [
        {"name": "a", "image": "registry.local:5000/app", "ports": [{"containerPort": 80}]},
        {"name": "b", "image": "app:latest"},
        {"name": "c", "image": "app:1.2"},
        {"name": "d", "image": "app@sha256:" + "0" * 64},
    ]
    deploy = deployment("d", containers)
    with client(kubesim) as c:
        send: dict[str, Any] = {
            "create": lambda **q: c.post(DEPLOY_PATH, json=deploy, params=q),
            "apply": lambda **q: apply(c, f"{DEPLOY_PATH}/d", deploy, "m", **q),
            "update": lambda **q: c.put(f"{DEPLOY_PATH}/d", json=deploy, params=q),
        }
        if verb == "update":
            c.post(DEPLOY_PATH, json=deployment("d", [{"name": "z", "image": "z:1"}]))
        dry = send[verb](dryRun="All")
        live = send[verb]()
    assert live.status_code in (200, 201), live.text
    assert comparable(dry.json()) == comparable(live.json())
    spec = live.json()["spec"]
    assert {k: spec[k] for k in DEPLOYMENT_DEFAULTS} == DEPLOYMENT_DEFAULTS
    pod = spec["template"]["spec"]
    assert {k: pod[k] for k in POD_DEFAULTS} == POD_DEFAULTS
    policies = [x["imagePullPolicy"] for x in pod["containers"]]
    assert policies == ["Always", "Always", "IfNotPresent", "IfNotPresent"]
    first = pod["containers"][0]
    assert first["terminationMessagePath"] == "/dev/termination-log"
    assert first["terminationMessagePolicy"] == "File"
    assert first["ports"] == [{"containerPort": 80, "protocol": "TCP"}]


def test_defaults_set_by_the_server_are_not_owned_by_an_applier(kubesim: KubeSim) -> None:
    deploy = deployment("d", [{"name": "a", "image": "a:1"}])
    with client(kubesim) as c:
        applied = apply(c, f"{DEPLOY_PATH}/d", deploy, "m").json()
        owned = applied["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]
        assert "f:replicas" not in owned and "f:strategy" not in owned
        created = c.post(DEPLOY_PATH, json=deployment("e", [{"name": "a", "image": "a:1"}]))
        # A create's manager owns what it stored, defaults too, as on a real server.
        owned = created.json()["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]
        assert "f:replicas" in owned


# -- the Flux bundle -------------------------------------------------------------------------


def test_flux_bundle_dry_run_apply_equals_the_live_objects(kubesim_factory: Any) -> None:
    kubesim = kubesim_factory()  # no controllers: nothing but these requests writes
    docs = [d for d in yaml.safe_load_all(BUNDLE.read_text()) if d]
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    rest = [d for d in docs if d not in crds and d not in namespaces]
    with client(kubesim) as c:
        live: dict[str, dict[str, Any]] = {}
        for stage in (crds, namespaces, rest):
            for obj in stage:
                response = apply(
                    c, path_of(kubesim, obj), obj, "kustomize-controller", force="true"
                )
                assert response.status_code in (200, 201), response.text
                live[path_of(kubesim, obj)] = response.json()
        revision = kubesim.store.revision
        for path, obj in zip(live, crds + namespaces + rest, strict=True):
            dry = apply(c, path, obj, "kustomize-controller", force="true", dryRun="All")
            assert dry.status_code == 200, dry.text
            current = c.get(path).json()
            assert comparable(dry.json()) == comparable(current), path
            assert (
                dry.json()["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"]
            )
        assert kubesim.store.revision == revision
    # The bundle's own values were canonicalised on the way in.
    source = live["/apis/apps/v1/namespaces/flux-system/deployments/source-controller"]
    container = source["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    assert container["terminationMessagePolicy"] == "File"


def test_warning_headers_reach_kubectl(kubesim: KubeSim, tmp_path: Path) -> None:
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "c", "namespace": "default"},
                "data": {"a": "b"},
                "dta": {"typo": "x"},
            }
        )
    )
    warned = kubectl(kubesim, "create", "--validate=warn", "-f", str(manifest))
    assert warned.returncode == 0, warned.stderr
    assert 'unknown field "dta"' in warned.stderr
    # Server-side apply refuses the field whatever the directive, as the real server does
    # (tests/real/test_kubesim_differential.py, test_unknown_fields).
    manifest.write_text(manifest.read_text().replace("name: c\n", "name: d\n"))
    applied = kubectl(kubesim, "apply", "--server-side", "--validate=warn", "-f", str(manifest))
    assert applied.returncode == 1
    assert ".dta: field not declared in schema" in applied.stderr


def test_custom_resources_get_their_schema_defaults(kubesim: KubeSim) -> None:
    docs = [d for d in yaml.safe_load_all(BUNDLE.read_text()) if d]
    crd = next(
        d for d in docs if d["metadata"]["name"] == "gitrepositories.source.toolkit.fluxcd.io"
    )
    kubesim.put(crd)
    repo = {
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": "GitRepository",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": {"url": "https://git.example/r.git", "interval": "1m"},
    }
    with client(kubesim) as c:
        dry = apply(c, path_of(kubesim, repo), repo, "m", dryRun="All").json()
        live = apply(c, path_of(kubesim, repo), repo, "m").json()
    assert comparable(dry) == comparable(live)
    assert live["spec"]["timeout"] == "60s"
    # A status the create dropped comes back with its default, as the real server reads it.
    assert live["status"] == {"observedGeneration": -1}
    owned = live["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]
    assert "f:timeout" not in owned


def test_namespaces_get_their_name_label_and_finalizer(kubesim: KubeSim) -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}
    with client(kubesim) as c:
        created = c.post("/api/v1/namespaces", json=ns).json()
    assert created["metadata"]["labels"] == {"kubernetes.io/metadata.name": "team"}
    assert created["spec"] == {"finalizers": ["kubernetes"]}
