"""A stand-in for Talos's machined API on a unix socket, wire-compatible with
api/machine/machine.proto for Kubeconfig and Bootstrap (real gRPC, hand-encoded messages)."""

from __future__ import annotations

import gzip
import io
import tarfile
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def common_data(chunk: bytes, hostname: str) -> bytes:
    """common.Data { Metadata metadata = 1 { string hostname = 1; }; bytes bytes = 2; }"""
    return _field(1, _field(1, hostname.encode())) + _field(2, chunk)


def kubeconfig_archive(kubeconfig: bytes) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("kubeconfig")
        info.size, info.mode = len(kubeconfig), 0o600
        tar.addfile(info, io.BytesIO(kubeconfig))
    return gzip.compress(raw.getvalue())


@dataclass
class FakeMachined:
    socket_path: str
    kubeconfig: bytes = b""
    worker: bool = False  # a worker node has no admin kubeconfig
    unavailable_calls: int = 0  # answer UNAVAILABLE this many times first (machined starting)
    # What Bootstrap answers, call by call; the last answer repeats. "ok" or a StatusCode name.
    bootstrap_answers: list[str] = field(default_factory=lambda: ["ok"])
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    chunks_sent: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FakeMachined:
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        handlers = {
            "Kubeconfig": grpc.unary_stream_rpc_method_handler(
                self._kubeconfig, request_deserializer=lambda b: b, response_serializer=lambda b: b
            ),
            "Bootstrap": grpc.unary_unary_rpc_method_handler(
                self._bootstrap, request_deserializer=lambda b: b, response_serializer=lambda b: b
            ),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("machine.MachineService", handlers),)
        )
        self._server.add_insecure_port(f"unix://{self.socket_path}")
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)

    def _record(self, name: str, context: Any) -> None:
        metadata = dict(context.invocation_metadata())
        with self._lock:
            self.calls.append((name, metadata))
        if metadata.get("talos-role") != "os:admin":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not authorized")
        with self._lock:
            if self.unavailable_calls > 0:
                self.unavailable_calls -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "machined is starting")

    def _kubeconfig(self, request: bytes, context: Any) -> Any:
        self._record("Kubeconfig", context)
        assert request == b""  # google.protobuf.Empty
        if self.worker:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "kubeconfig is only available on control plane nodes"
            )
        archive = kubeconfig_archive(self.kubeconfig)
        size = max(1, len(archive) // 4)  # several chunks, as a stream may carry
        for start in range(0, len(archive), size):
            self.chunks_sent += 1
            yield common_data(archive[start : start + size], "appliance")

    def _bootstrap(self, request: bytes, context: Any) -> bytes:
        self._record("Bootstrap", context)
        assert request == b""  # BootstrapRequest{} with both flags false
        with self._lock:
            index = sum(1 for name, _ in self.calls if name == "Bootstrap") - 1
            answer = self.bootstrap_answers[min(index, len(self.bootstrap_answers) - 1)]
        messages = {
            "FAILED_PRECONDITION": "bootstrap is not available yet",
            "ALREADY_EXISTS": "etcd data directory is not empty",
            "INVALID_ARGUMENT": "etcd is not configured",
        }
        if answer != "ok":
            context.abort(getattr(grpc.StatusCode, answer), messages[answer])
        return _field(1, _field(1, _field(1, b"appliance")))  # BootstrapResponse
