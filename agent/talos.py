"""Talos's machined API over its unix socket: an admin kubeconfig, the node's hostname, and
etcd bootstrap.

gRPC with the `talos-role: os:admin` metadata: machined's socket trusts the role in the
metadata (siderolabs/talos internal/app/machined/pkg/system/services/machined.go, the
authz.Injector in MetadataOnly mode). The few messages involved are encoded by hand, so the
image needs no protobuf runtime (tests check them against code generated from Talos's
api/machine/machine.proto):
  Kubeconfig(google.protobuf.Empty) returns (stream common.Data)
    common.Data { Metadata metadata = 1; bytes bytes = 2; }, the bytes a tar.gz
  Hostname(google.protobuf.Empty) returns (HostnameResponse)
    HostnameResponse { repeated Hostname messages = 1; } Hostname { ...; string hostname = 2; }
  ServiceList(google.protobuf.Empty) returns (ServiceListResponse)
    ServiceListResponse { repeated ServiceList messages = 1; }
    ServiceList { ...; repeated ServiceInfo services = 2; } ServiceInfo { string id = 1; ... }
  ServiceRestart(ServiceRestartRequest) returns (ServiceRestartResponse)
    ServiceRestartRequest { string id = 1; }
  Bootstrap(BootstrapRequest) returns (BootstrapResponse)
    BootstrapRequest { bool recover_etcd = 1; bool recover_skip_hash_check = 2; }
From Talos 1.13 the socket also checks the caller's namespaces (services/machined.go,
unix.Authorizer); extension services pass.
"""

from __future__ import annotations

import io
import ipaddress
import posixpath
import socket
import tarfile
import time
from typing import Any
from urllib.parse import urlsplit

import tenacity

from agent import interrupt, log
from agent.errors import BootstrapError, ConfigError

_log = log.get("talos")
KUBECONFIG_METHOD = "/machine.MachineService/Kubeconfig"
HOSTNAME_METHOD = "/machine.MachineService/Hostname"
SERVICE_LIST_METHOD = "/machine.MachineService/ServiceList"
SERVICE_RESTART_METHOD = "/machine.MachineService/ServiceRestart"
BOOTSTRAP_METHOD = "/machine.MachineService/Bootstrap"
ROLE_METADATA = (("talos-role", "os:admin"),)
KUBECONFIG_MAX_BYTES = 1 << 20  # an admin kubeconfig is a few KiB
ARCHIVE_MAX_ENTRIES = 8
CALL_TIMEOUT_S = 10.0


SERVICE_ID = "ext-alga-bootstrap"  # Talos's id for talos/alga-bootstrap.yaml's service


class NothingToDoHere(ConfigError):
    """This run ends here without a failure on the node itself (the service exits 0, its
    log says `event`); for a field tech it is bad input (exit 2)."""

    event = ""


class NotControlPlane(NothingToDoHere):
    event = (
        "this is a worker node: the agent on a control-plane node bootstraps the cluster; "
        "nothing to do here"
    )


class RestartedForConfig(NothingToDoHere):
    # Talos mounts the ExtensionServiceConfig's files when it starts the service and does
    # not restart a running one for the first document (extension_service.go,
    # handleRestart): a run that went on could use the built-in preset instead.
    event = (
        "the machine config arrived after this service started: asked Talos to start it "
        "afresh, with the config's files mounted"
    )


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


def _length_delimited(message: bytes, wanted: int) -> list[bytes]:
    """Every length-delimited field numbered `wanted` in a message; other fields skipped."""
    pos, found = 0, []
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(message, pos)
        elif wire == 2:
            size, pos = _read_varint(message, pos)
            if pos + size > len(message):
                raise ValueError("truncated field")
            if field == wanted:
                found.append(message[pos : pos + size])
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return found


def data_bytes(message: bytes) -> bytes:
    """The `bytes` field (2) of a common.Data message."""
    return b"".join(_length_delimited(message, 2))


def hostname_of(message: bytes) -> str:
    """HostnameResponse.messages[0].hostname."""
    for entry in _length_delimited(message, 1):
        for name in _length_delimited(entry, 2):
            return name.decode()
    return ""


def service_ids(message: bytes) -> list[str]:
    """ServiceListResponse.messages[*].services[*].id."""
    return [
        name.decode()
        for listing in _length_delimited(message, 1)
        for info in _length_delimited(listing, 2)
        for name in _length_delimited(info, 1)
    ]


def _string_field(number: int, value: str) -> bytes:
    data = value.encode()
    assert len(data) < 128  # one-byte length: ids are short
    return bytes([number << 3 | 2, len(data)]) + data


def bootstrap_request(recover_etcd: bool = False) -> bytes:
    return b"\x08\x01" if recover_etcd else b""  # proto3: false fields are not sent


# -- the calls -------------------------------------------------------------------------------------


class Machined:
    def __init__(self, socket_path: str) -> None:
        import grpc  # only the Talos credential source needs it

        self._grpc = grpc
        self.socket_path = socket_path
        self.config_arrived_late = False  # machined had no machine config when first asked
        # Reconnect soon after machined's socket appears (gRPC's default backoff grows to
        # 120 s, and calls fail fast meanwhile).
        self._channel = grpc.insecure_channel(
            f"unix://{socket_path}",
            options=[
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )

    def close(self) -> None:
        self._channel.close()

    def _code(self, err: BaseException) -> Any:
        return err.code() if isinstance(err, self._grpc.RpcError) else None

    def _retrying(self, retry_if: Any, waiting_event: str, deadline: float) -> tenacity.Retrying:
        """Retry calls for which `retry_if(err)` holds until the deadline, with capped
        exponential backoff (never a hot loop), logging each wait."""

        def waiting(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            code = self._code(exc) if exc else None
            _log.info(
                waiting_event,
                socket=self.socket_path,
                attempt=state.attempt_number,
                code=code.name if code else None,
                detail=getattr(exc, "details", str)(),
                deadline_in_s=round(deadline - time.monotonic()),
            )

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(retry_if),
            wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=10),
            stop=tenacity.stop_before_delay(max(deadline - time.monotonic(), 0.1)),
            before_sleep=waiting,
            sleep=interrupt.sleep,
            reraise=True,
        )

    def _timeout(self, deadline: float) -> float:
        return max(min(CALL_TIMEOUT_S, deadline - time.monotonic()), 0.1)

    def kubeconfig(self, deadline: float) -> bytes:
        """The admin kubeconfig (YAML) machined generates, waited for while machined starts
        or has no machine config yet (then `config_arrived_late` is set). A worker has none
        (NotControlPlane)."""
        grpc = self._grpc
        call = self._channel.unary_stream(
            KUBECONFIG_METHOD, request_serializer=lambda _: b"", response_deserializer=data_bytes
        )

        def fetch() -> bytes:
            interrupt.check()
            return b"".join(call(None, metadata=ROLE_METADATA, timeout=self._timeout(deadline)))

        def later(err: BaseException) -> bool:
            code, details = self._code(err), _details(err)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return True
            # No machine config yet (early boot, maintenance mode): up to Talos 1.12 a nil
            # config panics into Internal (Server.checkControlplane); from 1.13 the machine
            # type is "unknown" and the answer is the worker's, so the services tell.
            if code == grpc.StatusCode.INTERNAL or "machine type is not set" in details:
                self.config_arrived_late = True
                return True
            if "only available on control plane" in details and not self._has_config(deadline):
                self.config_arrived_late = True
                return True
            return False

        try:
            archive: bytes = self._retrying(later, "machined not ready yet", deadline)(fetch)
        except grpc.RpcError as err:
            code, details = self._code(err), _details(err)
            if "only available on control plane" in details and not self.config_arrived_late:
                raise NotControlPlane(
                    f"this is not a control-plane node (machined: {details}): "
                    "cluster.credentials: talos works only on a control-plane node; "
                    "elsewhere pass --kubeconfig PATH"
                ) from None
            if self.config_arrived_late:
                raise BootstrapError(
                    f"Talos has no machine config yet (maintenance mode, or still loading; "
                    f"machined: {details}): apply one; the service is retried and then "
                    "starts afresh with it"
                ) from None
            raise BootstrapError(
                f"machined ({self.socket_path}) did not give a kubeconfig: "
                f"{code.name if code else ''} {details}; it is retried on the next run"
            ) from None
        return kubeconfig_from_archive(archive)

    def _has_config(self, deadline: float) -> bool:
        """Whether machined has loaded a machine config: then kubelet is among its services
        (controllers/k8s/kubelet_service.go, KubeletServiceController, every machine type)."""
        call = self._channel.unary_unary(
            SERVICE_LIST_METHOD, request_serializer=lambda _: b"", response_deserializer=service_ids
        )
        try:
            ids: list[str] = call(None, metadata=ROLE_METADATA, timeout=self._timeout(deadline))
        except self._grpc.RpcError:
            return False  # cannot tell yet: wait as for a node still loading its config
        return "kubelet" in ids

    def restart_this_service(self) -> None:
        """Ask Talos to stop and start this service (Server.ServiceRestart): a new start
        mounts the ExtensionServiceConfig Talos has now (extension.go, Runner). Talos stops
        this container meanwhile; a slow answer is expected, not an error."""
        grpc = self._grpc
        call = self._channel.unary_unary(
            SERVICE_RESTART_METHOD, request_serializer=lambda i: i, response_deserializer=bytes
        )
        try:
            call(_string_field(1, SERVICE_ID), metadata=ROLE_METADATA, timeout=2)
        except grpc.RpcError as err:
            if self._code(err) not in (grpc.StatusCode.DEADLINE_EXCEEDED,):
                raise BootstrapError(
                    f"could not ask Talos to restart {SERVICE_ID} ({_details(err)}): restart "
                    f"it: talosctl service {SERVICE_ID} restart"
                ) from None

    def hostname(self, deadline: float) -> str:
        """The node's hostname as machined knows it (this container has its own UTS
        namespace, so the local hostname may differ)."""
        grpc = self._grpc
        call = self._channel.unary_unary(
            HOSTNAME_METHOD, request_serializer=lambda _: b"", response_deserializer=hostname_of
        )

        def unavailable(err: BaseException) -> bool:
            return bool(self._code(err) == grpc.StatusCode.UNAVAILABLE)

        try:
            name: str = self._retrying(unavailable, "machined not ready yet", deadline)(
                lambda: call(None, metadata=ROLE_METADATA, timeout=self._timeout(deadline))
            )
        except grpc.RpcError as err:
            raise BootstrapError(
                f"machined did not say the node's hostname: {_details(err)}"
            ) from None
        return name

    def bootstrap(self, deadline: float) -> str:
        """Ask machined to bootstrap etcd: "bootstrapped" or "already bootstrapped".
        Each refusal as Talos means it (v1alpha1_server.go, Server.Bootstrap):
        FailedPrecondition "not available yet" / "time is not in sync yet" and plain errors
        (Unknown, for example "failed to stop etcd: ...") become possible later: retried
        with backoff until the deadline. AlreadyExists: done before. A worker
        (FailedPrecondition "can only be performed on a control plane node" up to 1.12,
        Unimplemented "only available on control plane nodes" from 1.13) and InvalidArgument
        (no etcd configured, 1.14) never become possible: stop at once."""
        grpc = self._grpc
        call = self._channel.unary_unary(
            BOOTSTRAP_METHOD, request_serializer=lambda r: r, response_deserializer=lambda b: b
        )

        def never(err: BaseException) -> str | None:
            code, details = self._code(err), _details(err)
            if "control plane node" in details and code in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.UNIMPLEMENTED,
            ):
                return f"this is not a control-plane node (machined: {details})"
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                return (
                    f"this control-plane node has no etcd configured (machined: {details}); "
                    "check the machine config's cluster.etcd, or set talos.bootstrapEtcd: false"
                )
            if code == grpc.StatusCode.PERMISSION_DENIED:
                return f"machined refused the os:admin role ({details})"
            return None

        def later(err: BaseException) -> bool:
            return isinstance(err, grpc.RpcError) and never(err) is None

        def attempt() -> str:
            try:
                timeout = max(min(30.0, deadline - time.monotonic()), 0.1)
                call(bootstrap_request(), metadata=ROLE_METADATA, timeout=timeout)
            except grpc.RpcError as err:
                if self._code(err) == grpc.StatusCode.ALREADY_EXISTS:
                    _log.info("etcd is already bootstrapped", detail=_details(err))
                    return "already bootstrapped"
                raise
            _log.info("etcd bootstrap requested")
            return "bootstrapped"

        try:
            result: str = self._retrying(
                later, "etcd bootstrap not possible yet; retrying", deadline
            )(attempt)
        except grpc.RpcError as err:
            reason = never(err)
            if reason is not None:
                raise ConfigError(f"talos.bootstrapEtcd: {reason}") from None
            raise BootstrapError(
                f"etcd bootstrap was not possible within the run's deadline: "
                f"{self._code(err).name} {_details(err)}; it is retried on the next run"
            ) from None
        return result


def _details(err: BaseException) -> str:
    details = getattr(err, "details", None)
    return str(details() if callable(details) else err) or ""


def kubeconfig_from_archive(archive: bytes) -> bytes:
    """The `kubeconfig` entry of machined's tar.gz, read as a stream as talosctl does
    (cmd/talosctl/pkg/talos/helpers/archive.go, ExtractFileFromTarGz): machined never
    closes its tar writer, so there is no padding after the file and no end-of-archive
    blocks (v1alpha1_server.go, Server.Kubeconfig); random access would fail on it."""
    others: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r|gz") as tar:
            for member in tar:
                if posixpath.normpath(member.name).lstrip("/") != "kubeconfig":
                    others.append(member.name)
                    if len(others) >= ARCHIVE_MAX_ENTRIES:
                        break
                    continue
                return _read_kubeconfig(tar, member)
    except (tarfile.TarError, EOFError, OSError) as err:
        if not others:
            raise BootstrapError(f"machined's kubeconfig archive is unreadable: {err}") from None
    raise BootstrapError(
        f"machined's kubeconfig archive holds no file named kubeconfig (found {others[:3]})"
    )


def _read_kubeconfig(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if not member.isreg():
        raise BootstrapError("machined's kubeconfig archive: kubeconfig is not a file")
    if member.size > KUBECONFIG_MAX_BYTES:
        raise BootstrapError(
            f"machined's kubeconfig archive: kubeconfig is {member.size} bytes, "
            f"over the {KUBECONFIG_MAX_BYTES} this agent accepts"
        )
    extracted = tar.extractfile(member)
    data = extracted.read() if extracted else b""
    if len(data) != member.size:
        raise BootstrapError("machined's kubeconfig archive is truncated")
    return data


# -- which node bootstraps etcd ----------------------------------------------------------------


def is_this_node(host: str, node_hostname: str, loopback: bool = True) -> bool:
    """Whether `host` (a cluster endpoint's host) names this node: its hostname, loopback
    (unless `loopback` is False), or only addresses assigned here."""
    name = host.strip("[]").rstrip(".").lower()
    if name == node_hostname.lower() or (loopback and name == "localhost"):
        return True
    try:
        addresses = [ipaddress.ip_address(name)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except OSError:
            return False
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    local = local_addresses()
    if not loopback:
        local = {a for a in local if not a.is_loopback}
    return bool(addresses) and all((loopback and a.is_loopback) or a in local for a in addresses)


def local_addresses(
    proc_net: str = "/proc/net",
) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses assigned on this node, from the kernel's own tables: the container
    shares the host's network namespace (extension.go, getOCIOptions:
    WithHostNamespace(network)). Not a bind() probe: with net.ipv4.ip_nonlocal_bind set
    (common on HA sites) any address binds."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    last = ""
    try:
        with open(f"{proc_net}/fib_trie") as fib:  # "|-- A.B.C.D" then "/32 host LOCAL"
            for line in fib:
                text = line.strip()
                if text.startswith("|-- "):
                    last = text[4:]
                elif text.startswith("/32 host LOCAL") and last:
                    found.add(ipaddress.IPv4Address(last))
    except OSError:
        pass
    try:
        with open(f"{proc_net}/if_inet6") as inet6:  # 32 hex digits, then index and flags
            for line in inet6:
                found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass
    return found


def bootstrap_etcd_if_needed(
    machined: Machined,
    mode: str | bool,
    cluster_endpoint: str | None,
    local_endpoints: list[str],
    deadline: float,
) -> None:
    """The API has stayed down. Bootstrap etcd only on the one node meant to, and never
    when something already answers at the cluster endpoint (this node joins a cluster).
    `mode`: True (a single-node site: the cluster endpoint must be this node) or the
    hostname of the one control-plane node that bootstraps. Every decision is logged."""
    hostname = machined.hostname(deadline)
    host = urlsplit(cluster_endpoint or "").hostname or ""
    if isinstance(mode, str):
        if hostname.lower() != mode.lower():
            _log.info(
                "not the bootstrap node: etcd is bootstrapped by the agent on the node named "
                "in talos.bootstrapEtcd.node; waiting for the API",
                node=hostname,
                bootstrap_node=mode,
            )
            return
        if is_this_node(host, hostname, loopback=False):
            # A reinstalled bootstrap node would find nothing at its own address and start
            # a second cluster beside the one the other nodes still run.
            raise ConfigError(
                f"talos.bootstrapEtcd.node: the cluster endpoint {cluster_endpoint} is this "
                "node's own address; with several control-plane nodes use a VIP or load "
                "balancer, so the agent can see a cluster already running; etcd was not "
                "bootstrapped"
            )
    else:
        if not is_this_node(host, hostname):
            raise ConfigError(
                f"talos.bootstrapEtcd: true bootstraps a single-node site only, but the "
                f"cluster endpoint {cluster_endpoint} is not this node ({hostname}): on a "
                "site with several control-plane nodes name the one that bootstraps, "
                "talos.bootstrapEtcd: {node: <hostname>}; etcd was not bootstrapped"
            )
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
    _log.info("the API is still down: asking machined to bootstrap etcd", node=hostname)
    result = machined.bootstrap(deadline)
    _log.info("etcd bootstrap", result=result)
