"""A real control plane on loopback for tests: etcd, kube-apiserver (with an audit log),
kube-controller-manager, kube-scheduler and kwok for one fake node, then Flux's
source-, kustomize- and helm-controller as host processes. Every process runs from the
binaries `testbed/build` made, on free ports, with its own data and TMPDIR under one work
directory, and is stopped by its own process id. Flags and their sources:
../shared/docs/real-cluster.md (sections 4 to 8)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.pki import CA, CertFiles, service_account_keys

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ALGA_TESTBED_CACHE", Path.home() / ".cache/alga-bootstrap-testbed"))
BIN = CACHE / "bin"
AGENT_USER = "alga-bootstrap"  # the agent's client certificate CN: its name in the audit log
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "source-controller",
    "kustomize-controller",
    "helm-controller",
)


class TestbedError(RuntimeError):
    pass


def binary(name: str) -> Path:
    """A real-backend test fails, never skips, when its binary is missing."""
    path = BIN / name
    if not path.is_file():
        raise TestbedError(
            f"{path} is missing: build the test bed with `bash testbed/build` "
            "(scripts/test does, in the background)"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    what: str, check: Callable[[], bool], timeout: float, proc: Process | None = None
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.exited():
            raise TestbedError(f"{proc.name} exited ({proc.returncode()}): {proc.tail()}")
        try:
            if check():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise TestbedError(
        f"{what} not ready within {timeout:.0f} s" + (f": {proc.tail()}" if proc else "")
    )


class Process:
    """One host process with its log file; started in its own session so that stopping it
    stops whatever it started, and nothing else."""

    def __init__(
        self, name: str, args: list[str], workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.args = args
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.env = env or {}
        self._popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Process:
        tmp = self.workdir / f"tmp-{self.name}"
        tmp.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp),
            "TMPDIR": str(tmp),
        }
        env.update(self.env)
        with self.log.open("ab") as log:
            self._popen = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=tmp,
            )
        (self.workdir / f"{self.name}.pid").write_text(str(self._popen.pid))
        self.starts += 1
        return self

    def exited(self) -> bool:
        return self._popen is None or self._popen.poll() is not None

    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, timeout: float = 10) -> None:
        if self._popen is None or self._popen.poll() is not None:
            return
        try:
            os.killpg(self._popen.pid, signal.SIGTERM)
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._popen.pid, signal.SIGKILL)
            self._popen.wait(timeout)
        except ProcessLookupError:
            pass


@dataclass
class AuditEvent:
    user: str
    verb: str
    uri: str
    code: int
    resource: str
    namespace: str
    name: str
    subresource: str
    user_agent: str

    @property
    def write(self) -> bool:
        return self.verb in WRITE_VERBS


@dataclass
class Cluster:
    workdir: Path
    ca: CA = field(init=False)
    processes: dict[str, Process] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    admin_kubeconfig: Path = field(init=False)
    agent_kubeconfig: Path = field(init=False)
    audit_log: Path = field(init=False)
    _audit_offset: int = 0
    _supervisor: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _sa: CertFiles = field(init=False)

    # ---- start -------------------------------------------------------------------------

    def start(self) -> Cluster:
        """The whole test bed but Flux (see flux_controllers_when_served)."""
        for name in COMPONENTS:
            binary(name)
        self.start_api()
        self._start_kcm_and_scheduler()
        self._start_kwok()
        return self

    def start_api(self) -> Cluster:
        """etcd and kube-apiserver alone: what a test of the server's own behaviour needs."""
        pki = self.workdir / "pki"
        self.ca = CA(pki)
        serving = self.ca.issue(
            "apiserver",
            "kube-apiserver",
            hosts=("127.0.0.1", "localhost", "kubernetes", "kubernetes.default.svc"),
            server=True,
        )
        admin = self.ca.issue("admin", "admin", ("system:masters",))
        agent = self.ca.issue("agent", AGENT_USER, ("system:masters",))
        self._sa = service_account_keys(pki)
        for name in (
            "etcd-client",
            "etcd-peer",
            "apiserver",
            "kcm",
            "scheduler",
            "source",
            "kustomize",
            "helm",
            "artifacts",
        ):
            self.ports[name] = free_port()
        self.admin_kubeconfig = self._kubeconfig("admin.kubeconfig", admin)
        self.agent_kubeconfig = self._kubeconfig("agent.kubeconfig", agent)
        self._start_etcd()
        self._start_apiserver(serving, self._sa)
        return self

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def _kubeconfig(self, name: str, user: CertFiles) -> Path:
        path = self.workdir / name
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "testbed",
                            "cluster": {
                                "server": f"https://127.0.0.1:{self.ports['apiserver']}",
                                "certificate-authority": str(self.ca.cert),
                            },
                        }
                    ],
                    "users": [
                        {
                            "name": "user",
                            "user": {
                                "client-certificate": str(user.cert),
                                "client-key": str(user.key),
                            },
                        }
                    ],
                    "contexts": [
                        {"name": "testbed", "context": {"cluster": "testbed", "user": "user"}}
                    ],
                    "current-context": "testbed",
                }
            )
        )
        path.chmod(0o600)
        return path

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        proc = Process(name, [str(binary(name)), *args], self.workdir, env).start()
        self.processes[name] = proc
        return proc

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd-client']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        proc = self._spawn(
            "etcd",
            [
                "--name=node0",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=node0={peer}",
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=8589934592",
                "--auto-compaction-retention=1",
                "--log-level=warn",
            ],
        )
        wait_until(
            "etcd",
            lambda: b'"true"' in urllib.request.urlopen(f"{client}/health", timeout=2).read(),
            60,
            proc,
        )

    def _https_ok(self, port: int, path: str, verify: bool = True) -> bool:
        context = (
            ssl.create_default_context(cafile=str(self.ca.cert))
            if verify
            else ssl._create_unverified_context()
        )
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}{path}", timeout=3, context=context
        ) as answer:
            return bool(answer.status == 200)

    def _start_apiserver(self, serving: CertFiles, sa: CertFiles) -> None:
        policy = self.workdir / "audit-policy.yaml"
        # Every finished request at Metadata level: how tests count the agent's requests.
        policy.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [{"level": "Metadata"}],
                }
            )
        )
        self.audit_log = self.workdir / "audit.log"
        proc = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd-client']}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={self.ca.cert}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--authorization-mode=Node,RBAC",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-maxsize=0",
            ],
        )
        wait_until(
            "kube-apiserver", lambda: self._https_ok(self.ports["apiserver"], "/readyz"), 120, proc
        )

    def _start_kcm_and_scheduler(self) -> None:
        sa = self._sa
        kc = str(self.admin_kubeconfig)
        common = [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            "--leader-elect=false",
        ]
        kcm = self._spawn(
            "kube-controller-manager",
            [
                *common,
                f"--secure-port={self.ports['kcm']}",
                "--controllers=*",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={self.ca.cert}",
                "--node-monitor-period=25s",
                "--node-monitor-grace-period=3m20s",
                "--kube-api-qps=5000",
                "--kube-api-burst=10000",
                "--concurrent-deployment-syncs=10",
            ],
        )
        scheduler = self._spawn(
            "kube-scheduler", [*common, f"--secure-port={self.ports['scheduler']}"]
        )
        wait_until(
            "kube-controller-manager",
            lambda: self._https_ok(self.ports["kcm"], "/healthz", False),
            90,
            kcm,
        )
        wait_until(
            "kube-scheduler",
            lambda: self._https_ok(self.ports["scheduler"], "/healthz", False),
            90,
            scheduler,
        )

    def _start_kwok(self) -> None:
        stages = CACHE / "kwok-stages"
        # The default stages kwokctl writes (pkg/kwokctl/runtime/cluster.go): kwok v0.8.0 has
        # none built in and exits without them.
        files = [
            stages / "node/fast/node-initialize.yaml",
            stages / "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
            stages / "pod/fast/pod-ready.yaml",
            stages / "pod/fast/pod-complete.yaml",
            stages / "pod/fast/pod-delete.yaml",
        ]
        texts = [f.read_text() for f in files]
        texts += local_path_stages(stages)
        config = self.workdir / "kwok-stages.yaml"
        config.write_text("\n---\n".join(texts))
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": "kwok-node-0",
                        "annotations": {
                            "node.alpha.kubernetes.io/ttl": "0",
                            "kwok.x-k8s.io/node": "fake",
                        },
                        "labels": {
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "kubernetes.io/hostname": "kwok-node-0",
                            "type": "kwok",
                        },
                    },
                    "status": {
                        "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                        "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                    },
                }
            ),
        )
        proc = self._spawn(
            "kwok",
            [
                f"--kubeconfig={self.admin_kubeconfig}",
                "--manage-all-nodes=true",
                f"--config={config}",
                "--node-lease-duration-seconds=200",
                "--cidr=10.244.0.0/16",
            ],
        )

        def node_ready() -> bool:
            node = json.loads(self.kubectl("get", "node", "kwok-node-0", "-o", "json"))
            return any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in node["status"].get("conditions", [])
            )

        wait_until("the kwok node", node_ready, 60, proc)

    # ---- Flux's controllers --------------------------------------------------------------

    def flux_controllers_when_served(self) -> None:
        """Start source-, kustomize- and helm-controller once the agent has applied Flux's
        CRDs (a controller whose CRD is missing for 2 min exits: controller-runtime
        pkg/internal/source/kind.go), and restart any that exits, as a Deployment would."""
        self._supervisor = threading.Thread(
            target=self._supervise, name="flux-supervisor", daemon=True
        )
        self._supervisor.start()

    def _crds_served(self) -> bool:
        names = self.kubectl("get", "crd", "-o", "name", check=False)
        return all(
            f"customresourcedefinition.apiextensions.k8s.io/{n}" in names
            for n in (
                "gitrepositories.source.toolkit.fluxcd.io",
                "kustomizations.kustomize.toolkit.fluxcd.io",
                "helmreleases.helm.toolkit.fluxcd.io",
            )
        )

    def _flux_processes(self) -> list[Process]:
        env = {"KUBECONFIG": str(self.admin_kubeconfig), "RUNTIME_NAMESPACE": "flux-system"}
        artifacts = f"127.0.0.1:{self.ports['artifacts']}"
        common = [
            "--metrics-addr=0",
            "--watch-all-namespaces=true",
            "--events-addr=",
            "--log-encoding=console",
            "--log-level=debug",
        ]
        src_tmp = self.workdir / "tmp-source-controller"
        (self.workdir / "source-data").mkdir(exist_ok=True)  # it refuses a missing one
        return [
            Process(
                "source-controller",
                [
                    str(binary("source-controller")),
                    *common,
                    f"--health-addr=127.0.0.1:{self.ports['source']}",
                    f"--storage-path={self.workdir / 'source-data'}",
                    f"--storage-addr={artifacts}",
                    f"--storage-adv-addr={artifacts}",
                ],
                self.workdir,
                {**env, "TUF_ROOT": str(src_tmp / ".sigstore")},
            ),
            Process(
                "kustomize-controller",
                [
                    str(binary("kustomize-controller")),
                    *common,
                    f"--health-addr=127.0.0.1:{self.ports['kustomize']}",
                ],
                self.workdir,
                env,
            ),
            Process(
                "helm-controller",
                [
                    str(binary("helm-controller")),
                    *common,
                    f"--health-addr=127.0.0.1:{self.ports['helm']}",
                ],
                self.workdir,
                env,
            ),
        ]

    def _supervise(self) -> None:
        while not self._stopping.is_set() and not self._crds_served():
            self._stopping.wait(0.5)
        for proc in self._flux_processes():
            self.processes[proc.name] = proc.start()
        while not self._stopping.wait(1):
            for name in ("source-controller", "kustomize-controller", "helm-controller"):
                proc = self.processes.get(name)
                if proc is not None and proc.exited() and not self._stopping.is_set():
                    proc.start()

    def flux_ready(self, timeout: float = 120) -> None:
        for name, port in (
            ("source-controller", "source"),
            ("kustomize-controller", "kustomize"),
            ("helm-controller", "helm"),
        ):
            wait_until(
                name,
                lambda n=name, p=port: n in self.processes and _http_ok(self.ports[p]),
                timeout,
            )

    def restart_flux_controllers(self) -> None:
        for name in ("source-controller", "kustomize-controller", "helm-controller"):
            proc = self.processes[name]
            proc.stop()
            proc.start()
        self.flux_ready()

    # ---- clients -------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, user: str = "admin"
    ) -> str:
        kubeconfig = self.admin_kubeconfig if user == "admin" else self.agent_kubeconfig
        proc = subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise TestbedError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def get(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", *args, "-o", "json")))

    # ---- the audit log -------------------------------------------------------------------

    def audit_mark(self) -> int:
        """Where the audit log ends now: events after it are what follows."""
        time.sleep(1.5)  # an event may land just after its client saw the answer
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def audit(self, since: int = 0, user: str = AGENT_USER) -> list[AuditEvent]:
        time.sleep(1.5)
        events = []
        with self.audit_log.open("rb") as log:
            log.seek(since)
            for line in log:
                event = json.loads(line)
                if event.get("stage") != "ResponseComplete":
                    continue
                if event.get("user", {}).get("username") != user:
                    continue
                ref = event.get("objectRef") or {}
                events.append(
                    AuditEvent(
                        user=user,
                        verb=event.get("verb", ""),
                        uri=event.get("requestURI", ""),
                        code=int((event.get("responseStatus") or {}).get("code", 0)),
                        resource=ref.get("resource", ""),
                        namespace=ref.get("namespace", ""),
                        name=ref.get("name", ""),
                        subresource=ref.get("subresource", ""),
                        user_agent=event.get("userAgent", ""),
                    )
                )
        return events

    # ---- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        for name in reversed(list(self.processes)):
            self.processes[name].stop()

    def logs(self) -> Iterator[tuple[str, str]]:
        for name, proc in self.processes.items():
            yield name, proc.tail(20)


def local_path_stages(stages: Path) -> list[str]:
    """kwok's volume stages (kustomize/stage/volume/fast) for the appliance's `local-path`
    StorageClass, whose provisioner would itself be a fake pod: a claim is provisioned once
    the scheduler has picked its node (WaitForFirstConsumer sets selected-node), with a
    hostPath volume bound to it through claimRef, as pvc-provision does for kwok-volume."""
    kwok_class = "self.spec.storageClassName == 'kwok-volume'"
    provision = (stages / "volume/fast/pvc-provision.yaml").read_text()
    if kwok_class not in provision:
        raise TestbedError("kwok's pvc-provision stage changed: re-read it")
    provision = provision.replace(
        kwok_class,
        "self.spec.storageClassName == 'local-path' && has(self.metadata.annotations)"
        " && 'volume.kubernetes.io/selected-node' in self.metadata.annotations",
    ).replace("name: pvc-provision", "name: local-path-pvc-provision")
    bind = (stages / "volume/fast/pv-bind.yaml").read_text()
    bind = bind.replace(kwok_class, "self.spec.storageClassName == 'local-path'").replace(
        "name: pv-bind", "name: local-path-pv-bind"
    )
    return [provision, bind]


def _http_ok(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
        return bool(answer.status == 200)
