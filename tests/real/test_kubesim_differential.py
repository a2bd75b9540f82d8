"""kubesim against the real thing: one real kube-apiserver (testbed/cluster.py, start_api) and
one KubeSim (controllers off) get the same HTTP requests, and what each answers (status code,
Warning headers, body) and what each then stores (a GET after) must be the same once what is
volatile by nature is dropped (uid, resourceVersion, timestamps, managedFields times).

Every difference either is fixed in kubesim or is listed in ACCEPTED_DIFFERENCES with the
reason it does not matter to the agent; anything else fails the test, and an accepted
difference that no longer occurs fails it too (the table stays true)."""

from __future__ import annotations

import base64
import copy
import json
import re
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kubesim.server import KubeSim
from testbed.cluster import Cluster
from tests.conftest import BUNDLE

REQUEST_TIMEOUT = 30.0
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
AGENT = "alga-bootstrap"  # the agent's field manager (agent/kube.py, FIELD_MANAGER)
NS = "kubesim-diff"
BUNDLE_DOCS = [d for d in yaml.safe_load_all(BUNDLE.read_text()) if d]
FIRST_STAGE_KINDS = ("CustomResourceDefinition", "Namespace", "ClusterRole")  # agent/bundle.py
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<absent>"})()


# Every form a quantity may take (apimachinery pkg/api/resource/quantity.go, ParseQuantity),
# as a client may send it.
QUANTITIES = [
    "1000m",
    "0.5",
    "1.5",
    "2000",
    "1000000k",
    "1500",
    "100m",
    "1024Mi",
    "0.5Gi",
    "1.5Gi",
    "1024Ki",
    "512Ki",
    "0.5Ki",
    "1.5Ki",
    "8Ei",
    "1000e0",
    "12e-1",
    "1e3",
    "1E3",
    "0.5e3",
    "1e19",
    "1000P",
    "1000E",
    "0.1n",
    "1500u",
    "0.5m",
    "0",
    "000",
    "0Mi",
    "1.500",
    "1.0",
    "+5",
    ".5",
    "5.",
    1,
    0.25,
]


@dataclass(frozen=True)
class Accepted:
    """A difference kubesim keeps: `case` and `path` are regular expressions matched in full
    against a difference's case id and path; `test` the test that shows it (the module checks
    that each still occurs)."""

    test: str
    case: str
    path: str
    reason: str


ACCEPTED_DIFFERENCES: list[Accepted] = [
    Accepted(
        "test_quantities",
        r"quantities/[a-z-]+/ResourceQuota(/stored|/again)?",
        rf"\.body\.spec\.hard\.q{QUANTITIES.index('1000E')}\.kubernetes\.io/x",
        'The real server writes 1000E (10^21, past the largest decimal suffix) as "1": '
        "CanonicalizeBytes finds no suffix for 10^21 and drops it (apimachinery "
        "pkg/api/resource/quantity.go), a bug. kubesim writes 1e21, which its own unit test "
        "pins (tests/test_kubesim_apiserver.py, QUANTITIES). No manifest the agent applies "
        "holds a quantity that large.",
    ),
    Accepted(
        "test_status_codes_and_error_bodies",
        r"errors/(invalid-custom-resource|custom-resource-missing-required)",
        r"\.body\.(message|details\.causes)",
        "The same 422 Invalid with the same field errors; the real server adds one more, "
        '"<nil>: Invalid value: null: some validation rules were not checked because the '
        "object was invalid\", when a blocking error kept it from running the CRD's CEL rules "
        "(apiextensions-apiserver pkg/registry/customresource/strategy.go, hasBlockingErr). "
        "kubesim runs no CEL, and its unit test pins the message without the addition "
        "(tests/test_kubesim.py, test_custom_objects_are_validated_against_the_crd_schema). "
        "The agent passes such messages on, it does not parse them.",
    ),
    Accepted(
        "test_status_codes_and_error_bodies",
        r"errors/body-not-json",
        r"\.body\.message",
        "The same 400 BadRequest, worded by Go's encoding/json on the real server. The agent "
        "only sends bodies it serialised itself.",
    ),
]


# -- clients -----------------------------------------------------------------------------------


def http_client(kubeconfig: Path, workdir: Path) -> httpx.Client:
    """An httpx client authenticating as the kubeconfig says: client certificate (the test
    bed) or bearer token (kubesim), trusting the kubeconfig's CA."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    if "certificate-authority-data" in cluster:
        ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
        context = ssl.create_default_context(cadata=ca)
    else:
        context = ssl.create_default_context(cafile=cluster["certificate-authority"])
    headers = {}
    if "client-certificate" in user:
        context.load_cert_chain(user["client-certificate"], user["client-key"])
    elif "client-certificate-data" in user:
        cert, key = workdir / "client.crt", workdir / "client.key"
        cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
        key.write_bytes(base64.b64decode(user["client-key-data"]))
        context.load_cert_chain(str(cert), str(key))
    if "token" in user:
        headers["Authorization"] = f"Bearer {user['token']}"
    headers["User-Agent"] = "kubesim-differential/1.0"
    return httpx.Client(
        base_url=cluster["server"], verify=context, headers=headers, timeout=REQUEST_TIMEOUT
    )


# -- normalising and comparing -----------------------------------------------------------------

VOLATILE_META = ("uid", "resourceVersion", "creationTimestamp", "selfLink")
TYPED_PATCH_FAILED = "failed to create typed patch object"
PATCHED_OBJECT = re.compile(r'Invalid value: "(?:[^"\\]|\\.)*": strict')
IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")


def normalise(body: Any) -> Any:
    """An answer as compared: volatile metadata dropped, managedFields keyed by
    manager|operation|subresource without their time, conditions without their times."""
    body = copy.deepcopy(body)
    if isinstance(body, dict) and body.get("kind", "").endswith("List") and "items" in body:
        body["metadata"] = {}
        body["items"] = [normalise(item) for item in body["items"]]
        return body
    if isinstance(body, dict) and body.get("kind") == "Status":
        (body.get("details") or {}).pop("uid", None)
        message = str(body.get("message", ""))
        if message.startswith(TYPED_PATCH_FAILED):
            # Which undeclared fields the real server lists follows Go's map order.
            body["message"] = message.split("): ", 1)[0] + "): <fields not declared in schema>"
        # An invalid merge patch quotes the whole patched object, volatile fields and all.
        for holder in [body, *((body.get("details") or {}).get("causes") or [])]:
            if isinstance(holder.get("message"), str):
                holder["message"] = PATCHED_OBJECT.sub(
                    'Invalid value: "<the patched object>": strict', holder["message"]
                )
    if isinstance(body, dict) and isinstance(body.get("metadata"), dict):
        meta = body["metadata"]
        for key in VOLATILE_META:
            meta.pop(key, None)
        if "managedFields" in meta:
            meta["managedFields"] = {
                f"{e.get('manager')}|{e.get('operation')}|{e.get('subresource', '')}": {
                    k: v for k, v in e.items() if k not in ("manager", "operation", "time")
                }
                for e in meta["managedFields"]
            }
        status = body.get("status")
        for cond in (status.get("conditions") or []) if isinstance(status, dict) else []:
            if isinstance(cond, dict):
                cond.pop("lastTransitionTime", None)
                cond.pop("lastUpdateTime", None)
        spec = body.get("spec")
        if body.get("kind") == "Service" and isinstance(spec, dict):
            # Each server gives out addresses of its own range, in its own order.
            if IPV4.fullmatch(str(spec.get("clusterIP", ""))):
                spec["clusterIP"] = "<allocated>"
            if isinstance(spec.get("clusterIPs"), list):
                spec["clusterIPs"] = [
                    "<allocated>" if IPV4.fullmatch(str(ip)) else ip for ip in spec["clusterIPs"]
                ]
    return body


def differences(real: Any, sim: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, real value, kubesim value) for every place the two differ; lists item by item
    when they are as long, else whole."""
    if isinstance(real, dict) and isinstance(sim, dict):
        for key in sorted(set(real) | set(sim)):
            yield from differences(real.get(key, MISSING), sim.get(key, MISSING), f"{path}.{key}")
    elif isinstance(real, list) and isinstance(sim, list) and len(real) == len(sim):
        for index, (left, right) in enumerate(zip(real, sim, strict=True)):
            yield from differences(left, right, f"{path}[{index}]")
    elif real != sim:
        yield path or ".", real, sim


@dataclass
class Difference:
    case: str
    path: str
    real: Any
    sim: Any

    def __str__(self) -> str:
        def short(value: Any) -> str:
            text = value if value is MISSING else json.dumps(value, sort_keys=True)
            text = str(text)
            return text if len(text) <= 300 else text[:300] + "..."

        return f"{self.case}: {self.path}: real={short(self.real)} kubesim={short(self.sim)}"


@dataclass
class Answer:
    status: int
    body: Any
    warnings: list[str]
    resource_version: str = ""

    def comparable(self) -> dict[str, Any]:
        return {"status": self.status, "warnings": self.warnings, "body": normalise(self.body)}


@dataclass
class PerSide:
    """A request parameter that differs by side (a resourceVersion each server gave)."""

    real: Any
    sim: Any


@dataclass
class Pair:
    real: httpx.Client
    sim: httpx.Client
    found: list[Difference] = field(default_factory=list)
    seen_accepted: set[Accepted] = field(default_factory=set)
    ran: set[str] = field(default_factory=set)  # the tests that compared all they meant to
    flux_installed: bool = False

    def request(
        self,
        side: str,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, Any] | None = None,
    ) -> Answer:
        client = self.real if side == "real" else self.sim
        query = {
            k: (getattr(v, side) if isinstance(v, PerSide) else v)
            for k, v in (params or {}).items()
        }
        if isinstance(body, PerSide):
            body = getattr(body, side)
        content = None if body is None else json.dumps(body)
        headers = {"Accept": "application/json"}
        if content is not None:
            headers["Content-Type"] = content_type
        response = client.request(method, path, params=query, content=content, headers=headers)
        try:
            data = response.json()
        except ValueError:
            data = response.text
        rv = data.get("metadata", {}).get("resourceVersion", "") if isinstance(data, dict) else ""
        return Answer(response.status_code, data, response.headers.get_list("warning"), rv)

    def send(
        self,
        case: str,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, Any] | None = None,
    ) -> tuple[Answer, Answer]:
        """The same request to both; their answers compared under `case`."""
        real = self.request("real", method, path, body, content_type, params)
        sim = self.request("sim", method, path, body, content_type, params)
        self.compare(case, real.comparable(), sim.comparable())
        return real, sim

    def apply(
        self, case: str, obj: dict[str, Any], manager: str = AGENT, **params: Any
    ) -> tuple[Answer, Answer]:
        return self.send(
            case, "PATCH", path_of(obj), obj, APPLY, {"fieldManager": manager, **params}
        )

    def stored(self, case: str, path: str) -> tuple[Answer, Answer]:
        return self.send(case, "GET", path)

    def compare(self, case: str, real: Any, sim: Any) -> None:
        for where, left, right in differences(real, sim):
            self.found.append(Difference(case, where, left, right))

    def assert_same(self) -> None:
        """Fail on every difference found since the last call that is not accepted."""
        found, self.found = self.found, []
        unexpected = []
        for diff in found:
            accepted = next(
                (
                    a
                    for a in ACCEPTED_DIFFERENCES
                    if re.fullmatch(a.case, diff.case) and re.fullmatch(a.path, diff.path)
                ),
                None,
            )
            if accepted is None:
                unexpected.append(diff)
            else:
                self.seen_accepted.add(accepted)
        assert not unexpected, f"{len(unexpected)} differences:\n" + "\n".join(
            str(d) for d in unexpected
        )


# -- paths -------------------------------------------------------------------------------------

PLURALS = {
    "Namespace": "namespaces",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "ServiceAccount": "serviceaccounts",
    "Service": "services",
    "ResourceQuota": "resourcequotas",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Deployment": "deployments",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "NetworkPolicy": "networkpolicies",
    "CustomResourceDefinition": "customresourcedefinitions",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def plural_of(obj: dict[str, Any]) -> str:
    if obj["kind"] in PLURALS:
        return PLURALS[obj["kind"]]
    crd = next(
        d
        for d in BUNDLE_DOCS
        if d["kind"] == "CustomResourceDefinition" and d["spec"]["names"]["kind"] == obj["kind"]
    )
    return str(crd["spec"]["names"]["plural"])


def collection_of(obj: dict[str, Any], namespace: str | None = None) -> str:
    api = obj["apiVersion"]
    prefix = f"/apis/{api}" if "/" in api else f"/api/{api}"
    namespace = obj["metadata"].get("namespace", "") if namespace is None else namespace
    scope = f"/namespaces/{namespace}" if obj["kind"] not in CLUSTER_SCOPED else ""
    return f"{prefix}{scope}/{plural_of(obj)}"


def path_of(obj: dict[str, Any]) -> str:
    return f"{collection_of(obj)}/{obj['metadata']['name']}"


def subject(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return (
        f"{obj['kind']}/{meta.get('namespace', '') + '/' if meta.get('namespace') else ''}"
        + (meta["name"])
    )


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _compared(request: pytest.FixtureRequest, pair: Pair) -> Iterator[None]:
    yield
    pair.ran.add(request.node.originalname)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("differential")
    cluster = Cluster(workdir / "cluster")
    cluster.workdir.mkdir()
    sim = KubeSim(kubeconfig_out=workdir / "kubesim.kubeconfig", controllers=False)
    clients: list[httpx.Client] = []
    try:
        cluster.start_api()
        sim.start()
        real = http_client(cluster.agent_kubeconfig, workdir)
        kubesim = http_client(sim.kubeconfig_path, workdir)
        clients += [real, kubesim]
        both = Pair(real, kubesim)
        wait_for_default_namespace(both)
        yield both
    finally:
        for client in clients:
            client.close()
        sim.stop()
        cluster.stop()


def wait_for_default_namespace(pair: Pair) -> None:
    """The real server creates `default` and the kube-* namespaces just after it is ready
    (its bootstrap controller); a test that runs first must not race it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(
            pair.request("real", "GET", f"/api/v1/namespaces/{ns}").status == 200
            for ns in ("default", "kube-system", "kube-public", "kube-node-lease")
        ):
            return
        time.sleep(0.2)
    raise AssertionError("the real server never created its namespaces")


def wait_established(pair: Pair, names: list[str]) -> None:
    deadline = time.monotonic() + 60
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            crd = pair.request(
                "real", "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            ).body
            conditions = crd.get("status", {}).get("conditions", [])
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                pending.discard(name)
        time.sleep(0.2)
    assert not pending, f"CRDs not Established on the real server: {sorted(pending)}"


# -- 1. the agent's own apply sequence -----------------------------------------------------------


def install_flux(pair: Pair) -> None:
    """The bundle as the agent applies it (agent/apply.py, apply_staged): CRDs, Namespaces and
    ClusterRoles first, then, once the CRDs are Established, the rest; each a forced
    server-side apply as alga-bootstrap. Then the same again as a dry run, which must be a
    no-op on both: its answer is the stored object, resourceVersion and all."""
    first = [d for d in BUNDLE_DOCS if d["kind"] in FIRST_STAGE_KINDS]
    rest = [d for d in BUNDLE_DOCS if d["kind"] not in FIRST_STAGE_KINDS]
    for obj in first:
        real, _ = pair.apply(f"bundle/apply/{subject(obj)}", obj, force="true")
        assert real.status == 201, real.body
    crds = [o["metadata"]["name"] for o in first if o["kind"] == "CustomResourceDefinition"]
    wait_established(pair, crds)
    for obj in rest:
        real, _ = pair.apply(f"bundle/apply/{subject(obj)}", obj, force="true")
        assert real.status == 201, real.body
    stored = {}
    for obj in BUNDLE_DOCS:
        stored[path_of(obj)] = pair.stored(f"bundle/stored/{subject(obj)}", path_of(obj))
    for obj in BUNDLE_DOCS:
        case = f"bundle/dry-run/{subject(obj)}"
        answers = pair.apply(case, obj, force="true", dryRun="All")
        for side, dry, live in zip(("real", "sim"), answers, stored[path_of(obj)], strict=True):
            assert dry.status == 200, dry.body
            # A no-op: the answer is what is stored, resourceVersion and managedFields' times
            # included.
            for where, before, after in differences(live.body, dry.body):
                pair.found.append(Difference(f"{case}/no-op/{side}", where, before, after))
    pair.flux_installed = True


@pytest.fixture
def flux(pair: Pair) -> None:
    """Flux installed as the agent installs it: its CRDs serve on both."""
    if not pair.flux_installed:
        install_flux(pair)


def test_the_agents_flux_install(pair: Pair, flux: None) -> None:
    pair.assert_same()


# -- 2. what the server does to what it is sent --------------------------------------------------


def cm(name: str, namespace: str = NS, **top: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        **top,
    }


def deployment(name: str, containers: list[dict[str, Any]], **pod: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": containers, **pod},
            },
        },
    }


def git_repository(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": "GitRepository",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"url": "https://git.example/site.git", "interval": "1m", **spec},
    }


def write(
    pair: Pair, case: str, verb: str, obj: dict[str, Any], manager: str = AGENT, **params: Any
) -> tuple[Answer, Answer]:
    """One write of `obj` by `verb`: create (POST), apply (server-side, forced), update (PUT
    over what is stored) or patch (a JSON merge patch of all of `obj`)."""
    if verb == "create":
        return pair.send(case, "POST", collection_of(obj), obj, params=params)
    if verb == "apply":
        return pair.apply(case, obj, manager, force="true", **params)
    if verb == "update":
        # As a client updates: over what it read, with each server's resourceVersion.
        bodies = []
        for side in ("real", "sim"):
            sided = copy.deepcopy(obj)
            current = pair.request(side, "GET", path_of(obj))
            if current.status == 200:
                sided["metadata"]["resourceVersion"] = current.resource_version
            bodies.append(sided)
        return pair.send(case, "PUT", path_of(obj), PerSide(*bodies), params=params)
    if verb == "patch":
        return pair.send(case, "PATCH", path_of(obj), obj, MERGE, params=params)
    raise ValueError(verb)


def dry_run_write_read(pair: Pair, case: str, verb: str, obj: dict[str, Any]) -> None:
    """The same write as a dry run, then for real, then read back: three answers compared."""
    write(pair, f"{case}/dry-run", verb, obj, dryRun="All")
    write(pair, case, verb, obj)
    pair.stored(f"{case}/stored", path_of(obj))


def delete(pair: Pair, obj: dict[str, Any]) -> None:
    for side in ("real", "sim"):
        pair.request(side, "DELETE", path_of(obj))


@pytest.fixture(scope="module")
def namespace(pair: Pair) -> str:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    real, _ = pair.send("namespace/create", "POST", "/api/v1/namespaces", ns)
    assert real.status == 201, real.body
    pair.assert_same()
    return NS


@pytest.mark.parametrize("verb", ["create", "apply", "dry-run"])
def test_quantities(pair: Pair, namespace: str, verb: str) -> None:
    """Every quantity form, as a quota's hard limits (a ResourceList, as container resources
    are) and a Deployment's resources, emptyDir size and env divisor."""
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": f"quantities-{verb}", "namespace": namespace},
        "spec": {"hard": {f"q{i}.kubernetes.io/x": q for i, q in enumerate(QUANTITIES)}},
    }
    container = {
        "name": "app",
        "image": "registry.example/app:1.0",
        "resources": {
            "limits": {"cpu": "1000m", "memory": "1.5Gi", "ephemeral-storage": "1e4"},
            "requests": {"cpu": "0.1n", "memory": "0.5Gi", "ephemeral-storage": "2000"},
        },
        "env": [
            {
                "name": "MEMORY",
                "valueFrom": {
                    "resourceFieldRef": {"resource": "limits.memory", "divisor": "1024Ki"}
                },
            }
        ],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    deploy = deployment(
        f"quantities-{verb}",
        [container],
        volumes=[{"name": "tmp", "emptyDir": {"sizeLimit": "1.5Gi"}}],
    )
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"quantities-{verb}", "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "0.5Gi"}}},
    }
    for obj in (quota, deploy, pvc):
        case = f"quantities/{verb}/{obj['kind']}"
        if verb == "dry-run":
            write(pair, case, "apply", obj, dryRun="All")
            pair.stored(f"{case}/stored", path_of(obj))
        else:
            write(pair, case, verb, obj)
            pair.stored(f"{case}/stored", path_of(obj))
            # The same again, as a dry run: the server's canonical forms are stable, and a
            # form sent over its canonical one moves the field to the applier.
            write(pair, f"{case}/again", "apply", obj, dryRun="All")
    pair.assert_same()


@pytest.mark.parametrize("verb", ["create", "apply", "update"])
def test_quantity_that_does_not_parse(pair: Pair, namespace: str, verb: str) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": f"banana-{verb}", "namespace": namespace},
        "spec": {"hard": {"pods": "10"}},
    }
    if verb == "update":
        write(pair, f"quantity-bad/{verb}/before", "create", quota)
    bad = copy.deepcopy(quota)
    bad["spec"]["hard"]["pods"] = "banana"
    write(pair, f"quantity-bad/{verb}", verb, bad)
    pair.stored(f"quantity-bad/{verb}/stored", path_of(quota))
    pair.assert_same()


SECRET_WRITES = [
    ("create", {"data": {"kept": "b2xk", "both": "b2xk"}, "stringData": {"both": "new", "s": "t"}}),
    ("apply", {"data": {"kept": "b2xk"}, "stringData": {"both": "new", "s": "t"}}),
    ("update", {"data": {"kept": "b2xk"}, "stringData": {"s": "u"}}),
    ("patch", {"stringData": {"p": "q"}}),
    ("apply", {"stringData": {"s": "applied again"}}),
]


def test_secret_string_data(pair: Pair, namespace: str) -> None:
    """stringData is merged into data, wins over it, and is never stored; on each write verb,
    dry run and real."""
    for step, (verb, fields) in enumerate(SECRET_WRITES):
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "string-data", "namespace": namespace},
            **fields,
        }
        case = f"secret/{step}-{verb}"
        dry_run_write_read(pair, case, verb, secret)
    pair.assert_same()


UNKNOWN_FIELD_OBJECTS = {
    "ConfigMap": cm("unknown", data={"a": "b"}, dta={"typo": "x"}),
    "Deployment": deployment(
        "unknown", [{"name": "app", "image": "registry.example/app:1", "colour": "red"}]
    ),
    "GitRepository": git_repository("unknown", colour="red", ref={"branch": "main", "tag2": 1}),
}
UNKNOWN_FIELD_OBJECTS["ConfigMap"]["metadata"]["bogus"] = 1


@pytest.mark.parametrize("directive", ["Ignore", "Warn", "Strict", None])
@pytest.mark.parametrize("verb", ["create", "apply", "update", "patch"])
@pytest.mark.parametrize("kind", sorted(UNKNOWN_FIELD_OBJECTS))
def test_unknown_fields(
    pair: Pair, namespace: str, flux: None, kind: str, verb: str, directive: str | None
) -> None:
    """Unknown fields are dropped silently (Ignore), with one Warning header each (Warn, the
    default), or refused with a 400 naming them (Strict)."""
    obj = copy.deepcopy(UNKNOWN_FIELD_OBJECTS[kind])
    obj["metadata"]["name"] = f"unknown-{verb}-{(directive or 'default').lower()}"
    params = {"fieldValidation": directive} if directive else {}
    case = f"unknown/{kind}/{verb}/{directive}"
    if verb in ("update", "patch"):
        real, _ = write(pair, f"{case}/before", "create", _without_unknown(kind, obj))
        assert real.status == 201, real.body
    write(pair, case, verb, obj, **params)
    pair.stored(f"{case}/stored", path_of(obj))
    delete(pair, obj)
    pair.assert_same()


def _without_unknown(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    clean = copy.deepcopy(obj)
    if kind == "ConfigMap":
        clean.pop("dta")
        clean["metadata"].pop("bogus")
    elif kind == "Deployment":
        clean["spec"]["template"]["spec"]["containers"][0].pop("colour")
    else:
        clean["spec"].pop("colour")
        clean["spec"]["ref"].pop("tag2")
    return clean


@pytest.mark.parametrize("verb", ["create", "apply"])
def test_namespace_defaults(pair: Pair, verb: str) -> None:
    """A Namespace gets its name label (whatever the client set it to), the kubernetes
    finalizer and phase Active."""
    plain = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"plain-{verb}"}}
    labelled = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": f"labelled-{verb}",
            "labels": {"kubernetes.io/metadata.name": "something-else", "team": "a"},
        },
    }
    for ns in (plain, labelled):
        case = f"namespace/{verb}/{ns['metadata']['name']}"
        dry_run_write_read(pair, case, verb, ns)
    pair.assert_same()


FULL_POD = {
    "containers": [
        {
            "name": "app",
            "image": "registry.example:5000/app",
            "ports": [
                {"containerPort": 8080, "name": "http"},
                {"containerPort": 53, "protocol": "UDP"},
            ],
            "env": [
                {"name": "PLAIN", "value": "x"},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {
                    "name": "CPU",
                    "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}},
                },
                {
                    "name": "FROM_SECRET",
                    "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                },
            ],
            "livenessProbe": {"httpGet": {"port": "http"}},
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 5},
            "startupProbe": {"exec": {"command": ["true"]}},
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/app"},
                {"name": "secret", "mountPath": "/etc/secret", "readOnly": True},
            ],
            "securityContext": {"runAsNonRoot": True},
        },
        {"name": "latest", "image": "app:latest"},
        {"name": "digest", "image": "app@sha256:" + "0" * 64},
    ],
    "initContainers": [{"name": "init", "image": "busybox:1.36", "command": ["true"]}],
    "volumes": [
        {"name": "config", "configMap": {"name": "c"}},
        {"name": "secret", "secret": {"secretName": "s"}},
        {"name": "empty"},
        {"name": "tmp", "emptyDir": {}},
    ],
    "serviceAccountName": "app",
    "nodeSelector": {"kubernetes.io/os": "linux"},
}


@pytest.mark.parametrize("verb", ["create", "apply", "update"])
def test_workload_defaults(pair: Pair, namespace: str, verb: str) -> None:
    """Deployment, pod template and container defaults; Service defaults."""
    minimal = deployment(f"minimal-{verb}", [{"name": "app", "image": "registry.example/a:1"}])
    full = deployment(f"full-{verb}", **copy.deepcopy(FULL_POD))
    full["spec"]["strategy"] = {"type": "Recreate"}
    full["spec"]["replicas"] = 2
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{verb}", "namespace": namespace},
        "spec": {
            "selector": {"app": "x"},
            "ports": [
                {"port": 80, "targetPort": "http", "name": "http"},
                {"port": 9090, "name": "m"},
            ],
        },
    }
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"headless-{verb}", "namespace": namespace},
        "spec": {"clusterIP": "None", "selector": {"app": "x"}, "ports": [{"port": 80}]},
    }
    for obj in (minimal, full, service, headless):
        case = f"defaults/{verb}/{subject(obj)}"
        if verb == "update":
            write(pair, f"{case}/before", "create", obj)
            obj = copy.deepcopy(obj)
            obj["metadata"].setdefault("labels", {})["updated"] = "yes"
        dry_run_write_read(pair, case, verb, obj)
    pair.assert_same()


def minimal(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": "minimal", "namespace": NS},
        "spec": spec,
    }


FLUX_MINIMAL = [
    git_repository("minimal"),
    minimal(
        "source.toolkit.fluxcd.io/v1",
        "OCIRepository",
        {"url": "oci://registry.example/manifests", "interval": "5m"},
    ),
    minimal(
        "source.toolkit.fluxcd.io/v1",
        "HelmRepository",
        {"url": "https://charts.example", "interval": "1h"},
    ),
    minimal(
        "kustomize.toolkit.fluxcd.io/v1",
        "Kustomization",
        {
            "interval": "10m",
            "prune": True,
            "sourceRef": {"kind": "GitRepository", "name": "minimal"},
        },
    ),
    minimal(
        "helm.toolkit.fluxcd.io/v2",
        "HelmRelease",
        {
            "interval": "10m",
            "chart": {
                "spec": {"chart": "app", "sourceRef": {"kind": "HelmRepository", "name": "minimal"}}
            },
            "values": {"nested": {"deeper": [1, 2]}, "empty": {}},
        },
    ),
]


@pytest.mark.parametrize("verb", ["create", "apply"])
def test_custom_resource_defaults(pair: Pair, namespace: str, flux: None, verb: str) -> None:
    """Flux's objects with minimal specs get their CRD schema's defaults."""
    for template in FLUX_MINIMAL:
        obj = copy.deepcopy(template)
        obj["metadata"]["name"] = f"minimal-{verb}"
        case = f"crd-defaults/{verb}/{obj['kind']}"
        dry_run_write_read(pair, case, verb, obj)
    pair.assert_same()


def test_apply_merges_lists_between_managers(pair: Pair, namespace: str) -> None:
    """Server-side apply by two managers: containers and env merged by name, ports by port and
    protocol; a change to another manager's field conflicts (409, its body) unless forced; a
    manager that stops applying its own items removes them and only them."""
    name = "merging"
    alpha = deployment(
        name,
        [
            {
                "name": "app",
                "image": "registry.example/app:1",
                "env": [{"name": "A", "value": "1"}],
                "ports": [{"containerPort": 8080, "name": "http"}],
            }
        ],
    )
    beta = deployment(
        name,
        [
            {
                "name": "app",
                "env": [{"name": "B", "value": "2"}],
                "ports": [{"containerPort": 9090, "name": "metrics"}],
            },
            {"name": "sidecar", "image": "registry.example/side:1"},
        ],
    )
    del beta["spec"]["selector"]
    path = path_of(alpha)
    pair.apply("merge/alpha", alpha, "alpha")
    pair.apply("merge/beta", beta, "beta")
    pair.stored("merge/stored", path)
    # beta changes alpha's image and env value: a conflict each, refused without force.
    takeover = copy.deepcopy(beta)
    container = takeover["spec"]["template"]["spec"]["containers"][0]
    container["image"] = "registry.example/app:2"
    container["env"].append({"name": "A", "value": "changed"})
    real, _ = pair.send("merge/conflict", "PATCH", path, takeover, APPLY, {"fieldManager": "beta"})
    assert real.status == 409, real.body
    pair.stored("merge/conflict/stored", path)
    # An Update manager's fields conflict too, named with its API version.
    patch = {"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 5}}}}
    pair.send("merge/update", "PATCH", path, patch, MERGE, {"fieldManager": "patcher"})
    grace = copy.deepcopy(beta)
    grace["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 7
    real, _ = pair.send(
        "merge/conflict-update", "PATCH", path, grace, APPLY, {"fieldManager": "beta"}
    )
    assert real.status == 409 and "using apps/v1" in real.body["message"], real.body
    pair.send(
        "merge/forced", "PATCH", path, takeover, APPLY, {"fieldManager": "beta", "force": "true"}
    )
    pair.stored("merge/forced/stored", path)
    # beta drops its sidecar and env var B: they go, alpha's stay.
    only_app = deployment(
        name,
        [
            {
                "name": "app",
                "image": "registry.example/app:2",
                "env": [{"name": "A", "value": "changed"}],
            }
        ],
    )
    del only_app["spec"]["selector"]
    pair.apply("merge/beta-drops", only_app, "beta")
    pair.stored("merge/beta-drops/stored", path)
    # A ConfigMap's data keys by two managers; one gives up a key it shares.
    first = cm("merging", data={"a": "1", "shared": "x"})
    second = cm("merging", data={"b": "2", "shared": "x"})
    pair.apply("merge/cm/first", first, "first")
    pair.apply("merge/cm/second", second, "second")
    pair.apply("merge/cm/first-drops", cm("merging", data={"a": "1"}), "first")
    pair.stored("merge/cm/stored", path_of(first))
    pair.assert_same()


@pytest.mark.parametrize("verb", ["create", "apply", "update", "patch", "delete", "apply-existing"])
def test_dry_run_leaves_nothing_stored(pair: Pair, namespace: str, verb: str) -> None:
    obj = cm(f"dry-{verb}", data={"a": "1"})
    case = f"dry-run/{verb}"
    if verb in ("update", "patch", "delete", "apply-existing"):
        write(pair, f"{case}/before", "create", obj)
        obj["data"] = {"a": "changed"}
    if verb == "delete":
        pair.send(case, "DELETE", path_of(obj), params={"dryRun": "All"})
    else:
        write(pair, case, "apply" if verb == "apply-existing" else verb, obj, dryRun="All")
    pair.stored(f"{case}/stored", path_of(obj))
    listed = pair.send(f"{case}/list", "GET", collection_of(obj))
    for answer in listed:
        assert answer.status == 200
    pair.assert_same()


def watch_events(pair: Pair, side: str, path: str, params: dict[str, Any]) -> list[Any]:
    """The events of a watch that the server ends after two seconds (timeoutSeconds), at most
    50 lines, each read within the request timeout."""
    client = pair.real if side == "real" else pair.sim
    query = {"watch": "1", "timeoutSeconds": "2", **params}
    events: list[Any] = []
    with client.stream("GET", path, params=query, headers={"Accept": "application/json"}) as r:
        if r.status_code != 200:
            return [{"status": r.status_code, "body": normalise(json.loads(r.read() or b"{}"))}]
        for line in r.iter_lines():
            if line.strip():
                event = json.loads(line)
                events.append({"type": event["type"], "object": normalise(event["object"])})
            if len(events) >= 50:
                break
    return events


def test_watch_from_a_list(pair: Pair, namespace: str) -> None:
    """A watch from a list's resourceVersion sees what changed after it, and nothing else; one
    from resourceVersion "0" or none starts with every object, as ADDED events."""
    collection = f"/api/v1/namespaces/{namespace}/configmaps"
    selector = {"labelSelector": "watched=yes"}
    first = cm("watched-1", data={"n": "1"})
    first["metadata"]["labels"] = {"watched": "yes"}
    write(pair, "watch/first", "create", first)
    lists = [pair.request(side, "GET", collection, params=selector) for side in ("real", "sim")]
    rvs = PerSide(lists[0].resource_version, lists[1].resource_version)
    pair.compare("watch/list", lists[0].comparable(), lists[1].comparable())
    second = cm("watched-2", data={"n": "2"})
    second["metadata"]["labels"] = {"watched": "yes"}
    write(pair, "watch/second", "create", second)
    write(pair, "watch/first-changed", "patch", {**first, "data": {"n": "1b"}})
    expected = {
        # What changed after the list, in order.
        "from-list": [("ADDED", "watched-2"), ("MODIFIED", "watched-1")],
        # Every object as it is now, then nothing more (the order is the store's).
        "from-0": [("ADDED", "watched-1"), ("ADDED", "watched-2")],
        "from-none": [("ADDED", "watched-1"), ("ADDED", "watched-2")],
    }
    for label, since in (("from-list", rvs), ("from-0", PerSide("0", "0")), ("from-none", None)):
        real, sim = both_watch(pair, collection, selector, since)
        seen = [(e["type"], e["object"]["metadata"]["name"]) for e in real]
        assert sorted(seen) == sorted(expected[label]), (label, seen)
        if label == "from-list":
            assert seen == expected[label]
        pair.compare(f"watch/{label}", real, sim)
    # From the latest list: nothing happens, nothing comes.
    latest = [pair.request(side, "GET", collection, params=selector) for side in ("real", "sim")]
    since = PerSide(latest[0].resource_version, latest[1].resource_version)
    real, sim = both_watch(pair, collection, selector, since)
    assert real == [], real
    pair.compare("watch/quiet", real, sim)
    pair.assert_same()


def both_watch(
    pair: Pair, path: str, params: dict[str, Any], since: PerSide | None
) -> tuple[list[Any], list[Any]]:
    """The same watch on both at once (each lasts its timeoutSeconds)."""
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(
                watch_events,
                pair,
                side,
                path,
                {**params, **({"resourceVersion": getattr(since, side)} if since else {})},
            )
            for side in ("real", "sim")
        ]
        real, sim = (f.result(timeout=REQUEST_TIMEOUT) for f in futures)
    return real, sim


def cm_path(name: str, namespace: str = NS) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps/{name}"


def test_status_codes_and_error_bodies(pair: Pair, namespace: str, flux: None) -> None:
    """The answers the agent reads when something is wrong: code, reason, message, details."""
    existing = cm("existing", data={"a": "1"})
    write(pair, "errors/setup", "create", existing)
    cases: list[tuple[str, str, str, Any, str, dict[str, Any]]] = [
        ("get-missing", "GET", cm_path("missing"), None, "", {}),
        ("get-in-missing-namespace", "GET", cm_path("x", "nowhere"), None, "", {}),
        (
            "create-in-missing-namespace",
            "POST",
            "/api/v1/namespaces/nowhere/configmaps",
            cm("x", "nowhere"),
            "application/json",
            {},
        ),
        (
            "apply-in-missing-namespace",
            "PATCH",
            cm_path("x", "nowhere"),
            cm("x", "nowhere"),
            APPLY,
            {"fieldManager": AGENT},
        ),
        ("create-existing", "POST", collection_of(existing), existing, "application/json", {}),
        ("create-without-name", "POST", collection_of(existing), cm(""), "application/json", {}),
        (
            "apply-without-manager",
            "PATCH",
            cm_path("no-manager"),
            cm("no-manager"),
            APPLY,
            {},
        ),
        (
            "apply-name-mismatch",
            "PATCH",
            cm_path("one"),
            cm("other"),
            APPLY,
            {"fieldManager": AGENT},
        ),
        (
            "apply-kind-mismatch",
            "PATCH",
            cm_path("kind"),
            {**cm("kind"), "kind": "Secret"},
            APPLY,
            {"fieldManager": AGENT},
        ),
        (
            "bad-field-validation",
            "POST",
            collection_of(existing),
            cm("bad-validation"),
            "application/json",
            {"fieldValidation": "Sometimes"},
        ),
        ("update-missing", "PUT", cm_path("missing"), cm("missing"), "application/json", {}),
        ("patch-missing", "PATCH", cm_path("missing"), {"data": {"a": "b"}}, MERGE, {}),
        ("delete-missing", "DELETE", cm_path("missing"), None, "", {}),
        (
            "update-stale",
            "PUT",
            cm_path("existing"),
            {**existing, "metadata": {**existing["metadata"], "resourceVersion": "1"}},
            "application/json",
            {},
        ),
        ("body-not-json", "POST", collection_of(existing), "{nope", "application/json", {}),
        ("unknown-resource", "GET", f"/api/v1/namespaces/{namespace}/widgets", None, "", {}),
        ("unknown-group", "GET", "/apis/example.com/v1/widgets", None, "", {}),
        (
            "invalid-custom-resource",
            "POST",
            collection_of(git_repository("x")),
            git_repository("invalid", interval="soon", ref={"branch": 7}),
            "application/json",
            {},
        ),
        (
            "custom-resource-missing-required",
            "PATCH",
            path_of(git_repository("required")),
            {**git_repository("required"), "spec": {"interval": "1m"}},
            APPLY,
            {"fieldManager": AGENT},
        ),
        (
            "update-custom-resource-unconditionally",
            "PUT",
            path_of(git_repository("minimal-apply")),
            git_repository("minimal-apply"),
            "application/json",
            {},
        ),
    ]
    for name, method, path, body, ctype, params in cases:
        if isinstance(body, str):
            answers = []
            for client in (pair.real, pair.sim):
                r = client.request(
                    method, path, content=body, headers={"Content-Type": ctype}, params=params
                )
                answers.append(Answer(r.status_code, r.json(), r.headers.get_list("warning")))
            pair.compare(f"errors/{name}", answers[0].comparable(), answers[1].comparable())
            continue
        pair.send(f"errors/{name}", method, path, body, ctype or "application/json", params)
    pair.assert_same()


def test_every_accepted_difference_still_occurs(pair: Pair) -> None:
    """An accepted difference that no longer shows (kubesim or the server changed) is taken
    out of the table, which stays a true list."""
    stale = [a for a in ACCEPTED_DIFFERENCES if a.test in pair.ran and a not in pair.seen_accepted]
    assert not stale, "accepted differences that no longer occur:\n" + "\n".join(
        f"{a.test}: {a.case}: {a.path}" for a in stale
    )
