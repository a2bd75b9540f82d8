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
    # "controlplane", "worker", or None: machined has no config yet (early boot, maintenance).
    machine_type: str | None = "controlplane"
    machine_type_unset_for: int = 0  # the first N calls still find no machine type
    etcd_configured: bool = True  # the machine config has an etcd CA (control plane)
    bootstrap_not_allowed_for: int = 0  # first N Bootstrap calls: CRI not running yet
    time_unsynced_for: int = 0  # first N Bootstrap calls (past the checks before): no time sync
    unattended_install_for: int = 0  # first N: an unattended install is still in progress
    etcd_data: bool = False  # /var/lib/etcd not empty: bootstrapped before
    on_bootstrap: Callable[[], None] | None = None  # etcd started: what comes up with it
    on_call: Callable[[str], None] | None = None  # every call, by method name (test timing)
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
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
        authz.Injector{Mode: MetadataOnly}); Bootstrap and Kubeconfig need os:admin, Hostname
        any of admin, operator, reader (the rules in services/machined.go). A missing role:
        PermissionDenied "not authorized" (pkg/grpc/middleware/authz/authorizer.go)."""
        metadata = dict(context.invocation_metadata())
        with self._lock:
            self.calls.append((name, metadata))
        if self.on_call is not None:
            self.on_call(name)
        allowed = {"os:admin"} if name != "Hostname" else {"os:admin", "os:operator", "os:reader"}
        if metadata.get("talos-role") not in allowed:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not authorized")

    def _count(self, name: str) -> int:
        with self._lock:
            return sum(1 for n, _ in self.calls if n == name)

    def check_controlplane(self, api: str, call_number: int, context: Any) -> None:
        """internal/app/internal/machinehelper/machinehelper.go, CheckControlplane."""
        if self.machine_type is None or call_number <= self.machine_type_unset_for:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"machine type is not set, cannot use {api} API"
            )
        if self.machine_type != "controlplane":
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"{api} is only available on control plane nodes"
            )


class _Servicer:
    """The three methods the agent calls."""

    def __init__(self, node: FakeMachined) -> None:
        self.node = node

    def Kubeconfig(self, request: Any, context: Any) -> Any:
        """v1alpha1_server.go, Server.Kubeconfig: CheckControlplane, then ONE common.Data
        whose bytes are the tar.gz (no metadata on the local socket)."""
        node = self.node
        node.authorize("Kubeconfig", context)
        node.check_controlplane("kubeconfig", node._count("Kubeconfig"), context)
        _, _, common_pb2 = talos_api()
        yield common_pb2.Data(bytes=kubeconfig_archive(node.kubeconfig))

    def Hostname(self, request: Any, context: Any) -> Any:
        """v1alpha1_monitoring.go, Server.Hostname: os.Hostname() of machined (the node)."""
        node = self.node
        node.authorize("Hostname", context)
        pb = node._pb
        return pb.HostnameResponse(messages=[pb.Hostname(hostname=node.hostname)])

    def Bootstrap(self, request: Any, context: Any) -> Any:
        """v1alpha1_server.go, Server.Bootstrap, its checks in Talos's order."""
        node = self.node
        node.authorize("Bootstrap", context)
        assert not request.recover_etcd and not request.recover_skip_hash_check
        number = node._count("Bootstrap")
        node.bootstrap_calls_at.append(time.monotonic())
        # Runtime.IsBootstrapAllowed (v1alpha1_runtime.go): CRI running and healthy.
        if number <= node.bootstrap_not_allowed_for:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "bootstrap is not available yet")
        if node.talos_version >= (1, 13):
            node.check_controlplane("bootstrap", number, context)
            # 1.14 (after v1.14.0-beta): no etcd CA in the machine config is terminal.
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
        # services/etcd.go, BootstrapEtcd: a plain error, which gRPC sends as Unknown.
        if number <= node.unattended_install_for:
            context.abort(
                grpc.StatusCode.UNKNOWN,
                "bootstrap is not allowed during unattended install (phase: installing)",
            )
        node.etcd_data = True
        if node.on_bootstrap is not None:
            node.on_bootstrap()
        pb = node._pb
        return pb.BootstrapResponse(messages=[pb.Bootstrap()])
