"""Talos's machined API over its unix socket: an admin kubeconfig, and etcd bootstrap.

gRPC with the `talos-role: os:admin` metadata, as Talos's own on-node helpers call it. The
few messages involved are encoded by hand (no protobuf runtime needed):
  Kubeconfig(google.protobuf.Empty) returns (stream common.Data)
    common.Data { Metadata metadata = 1; bytes bytes = 2; }, the bytes a tar.gz
  Bootstrap(BootstrapRequest) returns (BootstrapResponse)
    BootstrapRequest { bool recover_etcd = 1; bool recover_skip_hash_check = 2; }
"""

from __future__ import annotations

import io
import socket
import tarfile
import time
from typing import Any
from urllib.parse import urlsplit

import tenacity

from agent import log
from agent.errors import BootstrapError, ConfigError

_log = log.get("talos")
KUBECONFIG_METHOD = "/machine.MachineService/Kubeconfig"
BOOTSTRAP_METHOD = "/machine.MachineService/Bootstrap"
ROLE_METADATA = (("talos-role", "os:admin"),)


# -- protobuf wire format, just what these messages need ----------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def data_bytes(message: bytes) -> bytes:
    """The `bytes` field (2) of a common.Data message; other fields are skipped."""
    pos, out = 0, b""
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(message, pos)
        elif wire == 2:
            size, pos = _read_varint(message, pos)
            if field == 2:
                out += message[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


def bootstrap_request(recover_etcd: bool = False) -> bytes:
    return b"\x08\x01" if recover_etcd else b""  # proto3: false fields are not sent


# -- the calls -------------------------------------------------------------------------------------


class Machined:
    def __init__(self, socket_path: str) -> None:
        import grpc  # only the Talos credential source needs it

        self._grpc = grpc
        self.socket_path = socket_path
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")

    def close(self) -> None:
        self._channel.close()

    def _retrying(
        self, codes: set[Any], waiting_event: str, deadline: float, max_wait: float
    ) -> tenacity.Retrying:
        """Retry calls failing with one of `codes` until the deadline, logging each wait."""

        def waiting(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            _log.info(
                waiting_event,
                socket=self.socket_path,
                attempt=state.attempt_number,
                detail=getattr(exc, "details", str)(),
            )

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda err: self._code(err) in codes),
            wait=tenacity.wait_exponential_jitter(multiplier=0.25, max=max_wait),
            stop=tenacity.stop_before_delay(max(deadline - time.monotonic(), 0.1)),
            before_sleep=waiting,
            reraise=True,
        )

    def _code(self, err: BaseException) -> Any:
        return err.code() if isinstance(err, self._grpc.RpcError) else None

    def kubeconfig(self, deadline: float) -> bytes:
        """The admin kubeconfig (YAML) machined generates; retried while machined is not
        ready. A worker node has none: that is a config error."""
        grpc = self._grpc
        call = self._channel.unary_stream(
            KUBECONFIG_METHOD, request_serializer=lambda _: b"", response_deserializer=data_bytes
        )

        def fetch() -> bytes:
            return b"".join(call(None, metadata=ROLE_METADATA, timeout=10))

        try:
            archive: bytes = self._retrying(
                {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED},
                "machined not ready yet",
                deadline,
                max_wait=5,
            )(fetch)
        except grpc.RpcError as err:
            code, details = self._code(err), err.details()
            if code in (
                grpc.StatusCode.UNIMPLEMENTED,
                grpc.StatusCode.FAILED_PRECONDITION,
            ) and "control plane" in (details or ""):
                raise ConfigError(
                    "cluster.credentials: talos gives a kubeconfig only on a control-plane "
                    f"node ({details}); on this node use credentials: kubeconfig"
                ) from None
            raise BootstrapError(
                f"machined ({self.socket_path}) did not give a kubeconfig: "
                f"{code.name if code else ''} {details}"
            ) from None
        return _untar_kubeconfig(archive)

    def bootstrap(self, deadline: float) -> str:
        """Ask machined to bootstrap etcd. Returns "bootstrapped" or "already bootstrapped";
        FailedPrecondition (not ready, time not in sync) is retried with backoff."""
        grpc = self._grpc
        call = self._channel.unary_unary(
            BOOTSTRAP_METHOD, request_serializer=lambda r: r, response_deserializer=lambda b: b
        )

        def attempt() -> str:
            try:
                call(bootstrap_request(), metadata=ROLE_METADATA, timeout=30)
            except grpc.RpcError as err:
                code, details = self._code(err), err.details()
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    _log.info("etcd is already bootstrapped", detail=details)
                    return "already bootstrapped"
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ConfigError(
                        f"talos.bootstrapEtcd: machined refused ({details}): this is not a "
                        "control-plane node; set talos.bootstrapEtcd: false"
                    ) from None
                raise
            _log.info("etcd bootstrap requested")
            return "bootstrapped"

        retryable = {
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }
        try:
            result: str = self._retrying(
                retryable, "etcd bootstrap not possible yet; retrying", deadline, max_wait=10
            )(attempt)
        except grpc.RpcError as err:
            raise BootstrapError(f"etcd bootstrap failed: {err.details()}") from None
        return result


def _untar_kubeconfig(archive: bytes) -> bytes:
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            member = tar.getmember("kubeconfig")
            extracted = tar.extractfile(member)
            if extracted is None:
                raise KeyError("kubeconfig")
            return extracted.read()
    except (tarfile.TarError, KeyError, OSError) as err:
        raise BootstrapError(f"machined's kubeconfig archive is unreadable: {err}") from None


def bootstrap_etcd_if_needed(
    machined: Machined, cluster_endpoint: str | None, local_endpoints: list[str], deadline: float
) -> None:
    """The API has stayed down: bootstrap etcd, unless this node joins an existing cluster,
    that is, something listens at its cluster endpoint elsewhere. Every decision is logged."""
    if cluster_endpoint and cluster_endpoint not in local_endpoints:
        parts = urlsplit(cluster_endpoint)
        try:
            with socket.create_connection((parts.hostname, parts.port or 443), timeout=3):
                pass
        except OSError as err:
            _log.info(
                "cluster endpoint does not answer; this node creates the cluster",
                endpoint=cluster_endpoint,
                detail=type(err).__name__,
            )
        else:
            _log.info(
                "cluster endpoint answers: this node joins an existing cluster, so etcd "
                "is not bootstrapped here",
                endpoint=cluster_endpoint,
            )
            return
    _log.info("the API is still down: asking machined to bootstrap etcd")
    result = machined.bootstrap(deadline)
    _log.info("etcd bootstrap", result=result)
