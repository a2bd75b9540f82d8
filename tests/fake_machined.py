"""A stand-in for Talos's machined on a unix socket, speaking Talos's real machine API: the
server classes and messages are generated at test time from ../shared/talos/proto (Talos's
api/machine/machine.proto, api/common/common.proto, google/rpc/status.proto) with
grpcio-tools. Every answer follows Talos's Go code (siderolabs/talos, v1.7 to v1.14), cited
beside it; paths below are relative to that repository.
"""

from __future__ import annotations

import atexit
import gzip
import importlib
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from tests.conftest import SHARED

PROTO_DIR = SHARED / "talos" / "proto"
PROTO_FILES = ["machine/machine.proto", "common/common.proto", "google/rpc/status.proto"]


@cache
def talos_api() -> tuple[ModuleType, ModuleType, ModuleType]:
    """machine_pb2, machine_pb2_grpc and common_pb2, generated from Talos's .proto files."""
    import grpc_tools
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="talos-api-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    status = protoc.main(
        [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *PROTO_FILES,
        ]
    )
    assert status == 0, f"protoc failed on {PROTO_DIR}"
    sys.path.insert(0, str(out))
    try:
        machine_pb2 = importlib.import_module("machine.machine_pb2")
        machine_pb2_grpc = importlib.import_module("machine.machine_pb2_grpc")
        common_pb2 = importlib.import_module("common.common_pb2")
    finally:
        sys.path.remove(str(out))
    return machine_pb2, machine_pb2_grpc, common_pb2


def kubeconfig_archive(kubeconfig: bytes, mtime: float | None = None) -> bytes:
    """What Server.Kubeconfig sends (internal/app/machined/internal/server/v1alpha1/
    v1alpha1_server.go): a gzip writer holding a tar writer; WriteHeader(TypeReg,
    "kubeconfig", mode 0600, ModTime now), then the file, then only the gzip writer is
    closed. The tar writer is never flushed or closed: no padding to 512 bytes after the
    file, no end-of-archive blocks. Go's archive/tar (writer.go, WriteHeader) rounds ModTime
    to the second and writes a USTAR header when the format is left unset."""
    header = tarfile.TarInfo("kubeconfig")
    header.size, header.mode, header.type = len(kubeconfig), 0o600, tarfile.REGTYPE
    header.mtime = round(time.time() if mtime is None else mtime)
    raw = header.tobuf(format=tarfile.USTAR_FORMAT) + kubeconfig
    return gzip.compress(raw, mtime=0)  # Go's gzip.NewWriter: no name, ModTime zero


@dataclass
class FakeMachined:
    socket_path: str
    kubeconfig: bytes = b""
    hostname: str = "appliance"
    talos_version: tuple[int, int] = (1, 14)
    machine_type: str = "controlplane"  # or "worker": what the machine config says
    # Extension services start before machined has loaded its machine config (the boot
    # sequence starts containerd before LoadConfig: runtime/v1alpha1/v1alpha1_sequencer.go,
    # Initialize; maintenance mode waits there): the first N Kubeconfig calls find none.
    config_after_calls: int = 0
    etcd_configured: bool = True  # the machine config has an etcd CA (control plane)
    bootstrap_not_allowed_for: int = 0  # first N Bootstrap calls: CRI not running yet
    time_unsynced_for: int = 0  # first N Bootstrap calls (past the checks before): no time sync
    plain_error_for: int = 0  # first N: BootstrapEtcd fails with a plain Go error
    etcd_data: bool = False  # /var/lib/etcd not empty: bootstrapped before
    on_bootstrap: Callable[[], None] | None = None  # etcd started: what comes up with it
    on_call: Callable[[str], None] | None = None  # every call, by method name (test timing)
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)  # ServiceRestart ids
    bootstrap_calls_at: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, delay_s: float = 0.0) -> FakeMachined:
        """Serve on the socket; with `delay_s`, the socket appears only then (machined still
        starting: clients see UNAVAILABLE, as they would with no socket)."""
        machine_pb2, machine_pb2_grpc, _ = talos_api()
        self._pb = machine_pb2
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        # Every other method answers Unimplemented, as the generated base class does.
        servicer = type("Machined", (_Servicer, machine_pb2_grpc.MachineServiceServicer), {})
        machine_pb2_grpc.add_MachineServiceServicer_to_server(servicer(self), self._server)
        if delay_s:
            threading.Timer(delay_s, self._listen).start()
        else:
            self._listen()
        return self

    def _listen(self) -> None:
        self._server.add_insecure_port(f"unix://{self.socket_path}")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(0)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    # -- the checks Talos makes ------------------------------------------------------------

    def authorize(self, name: str, context: Any) -> None:
        """machined's socket takes roles from the `talos-role` metadata (services/machined.go:
        authz.Injector{Mode: MetadataOnly}); the roles each method needs are the rules in
        services/machined.go. A missing role:
        PermissionDenied "not authorized" (pkg/grpc/middleware/authz/authorizer.go)."""
        metadata = dict(context.invocation_metadata())
        with self._lock:
            self.calls.append((name, metadata))
        if self.on_call is not None:
            self.on_call(name)
        allowed = {
            "Bootstrap": {"os:admin"},
            "Kubeconfig": {"os:admin"},
            "Hostname": {"os:admin", "os:operator", "os:reader"},
            "ServiceList": {"os:admin", "os:operator", "os:reader"},
            "ServiceRestart": {"os:admin", "os:operator"},
        }[name]
        if metadata.get("talos-role") not in allowed:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not authorized")

    def _count(self, name: str) -> int:
        with self._lock:
            return sum(1 for n, _ in self.calls if n == name)

    def has_config(self) -> bool:
        return self.config_after_calls == 0 or self._count("Kubeconfig") > self.config_after_calls

    def check_controlplane(self, api: str, context: Any) -> None:
        """Without a machine config: 1.13+ machinehelper.CheckControlplane finds the
        MachineType resource, which controllers/config/machine_type.go (MachineTypeController)
        writes as unknown from the start, so a node without config answers like a worker;
        up to 1.12 Server.checkControlplane calls Config().Machine() on a nil config, and the
        panic comes back as Internal (pkg/grpc/factory/factory.go, recoveryHandler)."""
        if not self.has_config() and self.talos_version < (1, 13):
            context.abort(
                grpc.StatusCode.INTERNAL,
                "runtime error: invalid memory address or nil pointer dereference",
            )
        if not self.has_config() or self.machine_type != "controlplane":
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"{api} is only available on control plane nodes"
            )

    def services(self) -> list[str]:
        """The services machined has loaded (system.Services(r).List()): the early ones and
        this extension always; with a machine config, kubelet (controllers/k8s/
        kubelet_service.go, KubeletServiceController), and on a control plane trustd and
        etcd (v1alpha1_sequencer_tasks.go, StartAllServices)."""
        loaded = ["apid", "containerd", "machined", "udevd", "ext-alga-bootstrap"]
        if self.has_config():
            loaded += ["cri", "kubelet"]
            if self.machine_type == "controlplane":
                loaded += ["etcd", "trustd"]
        return sorted(loaded)


class _Servicer:
    """The methods the agent calls."""

    def __init__(self, node: FakeMachined) -> None:
        self.node = node

    def Kubeconfig(self, request: Any, context: Any) -> Any:
        """v1alpha1_server.go, Server.Kubeconfig: the control-plane check, then ONE
        common.Data whose bytes are the tar.gz (no metadata on the local socket)."""
        node = self.node
        node.authorize("Kubeconfig", context)
        node.check_controlplane("kubeconfig", context)
        _, _, common_pb2 = talos_api()
        yield common_pb2.Data(bytes=kubeconfig_archive(node.kubeconfig))

    def Hostname(self, request: Any, context: Any) -> Any:
        """v1alpha1_monitoring.go, Server.Hostname: os.Hostname() of machined, the kernel
        hostname: the first label of machine.network.hostname (network/hostname_spec.go)."""
        node = self.node
        node.authorize("Hostname", context)
        pb = node._pb
        return pb.HostnameResponse(messages=[pb.Hostname(hostname=node.hostname)])

    def ServiceList(self, request: Any, context: Any) -> Any:
        """v1alpha1_server.go, Server.ServiceList: every loaded service, as ServiceInfo."""
        node = self.node
        node.authorize("ServiceList", context)
        pb = node._pb
        infos = [pb.ServiceInfo(id=name, state="Running") for name in node.services()]
        return pb.ServiceListResponse(messages=[pb.ServiceList(services=infos)])

    def ServiceRestart(self, request: Any, context: Any) -> Any:
        """v1alpha1_server.go, Server.ServiceRestart -> system.APIRestart: an unknown id is
        a plain error (Unknown) "service %q not defined"; otherwise Stop, then Start."""
        node = self.node
        node.authorize("ServiceRestart", context)
        if request.id not in node.services():
            context.abort(grpc.StatusCode.UNKNOWN, f"service {request.id!r} not defined")
        node.restarted.append(request.id)
        pb = node._pb
        return pb.ServiceRestartResponse(
            messages=[pb.ServiceRestart(resp=f'Service "{request.id}" restarted')]
        )

    def Bootstrap(self, request: Any, context: Any) -> Any:
        """v1alpha1_server.go, Server.Bootstrap, its checks in Talos's order."""
        node = self.node
        node.authorize("Bootstrap", context)
        assert not request.recover_etcd and not request.recover_skip_hash_check
        number = node._count("Bootstrap")
        node.bootstrap_calls_at.append(time.monotonic())
        # Runtime.IsBootstrapAllowed (v1alpha1_runtime.go): CRI running and healthy (and, from
        # 1.14, no unattended install before its reboot, no reboot pending).
        if number <= node.bootstrap_not_allowed_for or not node.has_config():
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "bootstrap is not available yet")
        if node.talos_version >= (1, 13):
            node.check_controlplane("bootstrap", context)
            # 1.14 (v1.14.0-rc.1): no etcd CA in the machine config is terminal.
            if node.talos_version >= (1, 14) and not node.etcd_configured:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "etcd is not configured, bootstrap is not possible",
                )
        elif node.machine_type == "worker":  # 1.7 to 1.12
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "bootstrap can only be performed on a control plane node",
            )
        # timeresource.NewSyncCondition, waited on for 5 s.
        if number <= node.time_unsynced_for:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "time is not in sync yet")
        if node.etcd_data:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "etcd data directory is not empty")
        # services/etcd.go, BootstrapEtcd: plain Go errors, which gRPC sends as Unknown.
        if number <= node.plain_error_for:
            context.abort(grpc.StatusCode.UNKNOWN, "failed to stop etcd: context deadline exceeded")
        node.etcd_data = True
        if node.on_bootstrap is not None:
            node.on_bootstrap()
        pb = node._pb
        return pb.BootstrapResponse(messages=[pb.Bootstrap()])
