"""The HTTPS front of the simulator: routing, authentication, faults and the request log."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import re
import secrets
import select
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from kubesim.controllers import Controllers
from kubesim.resources import api_group_list, api_resource_list
from kubesim.store import ApiError, FieldValidation, Store

PUBLIC_PATHS = {"/readyz", "/livez", "/healthz", "/version"}
_X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL's; Python's ssl has no name for it
WRITE_VERBS = {"create", "update", "patch", "apply", "delete"}


@dataclass
class FailRule:
    """Fail the next `count` matching requests; `status` None resets the connection."""

    count: int
    status: int | None
    verb: str | None = None
    path: str | None = None  # a regular expression searched in the path
    retry_after: int | None = None


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rules: list[FailRule] = []
        self.readyz_unavailable_until = 0.0
        self.readyz_unavailable_for = 0.0
        self.latency = 0.0

    def fail_next(
        self,
        count: int,
        status: int = 500,
        verb: str | None = None,
        path: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        with self._lock:
            self.rules.append(FailRule(count, status, verb, path, retry_after))

    def reset_next(self, count: int, verb: str | None = None, path: str | None = None) -> None:
        with self._lock:
            self.rules.append(FailRule(count, None, verb, path))

    def readyz_unavailable(self, seconds: float) -> None:
        """/readyz answers 503 for `seconds` from the first probe (a client that starts
        late still sees the server starting)."""
        self.readyz_unavailable_for = seconds

    def readyz_ok(self) -> bool:
        with self._lock:
            if self.readyz_unavailable_for:
                self.readyz_unavailable_until = time.monotonic() + self.readyz_unavailable_for
                self.readyz_unavailable_for = 0.0
            return time.monotonic() >= self.readyz_unavailable_until

    def take(self, verb: str, path: str) -> FailRule | None:
        with self._lock:
            for rule in self.rules:
                if (
                    rule.count > 0
                    and rule.verb in (None, verb)
                    and (rule.path is None or re.search(rule.path, path))
                ):
                    rule.count -= 1
                    return rule
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    sim: KubeSim

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs in the request's own thread, never in the accept loop.
        request.settimeout(30)
        # Headers and body go out as separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every response.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self.sim.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.RequestHandlerClass(tls, client_address, self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up before its answer was written (a run at its deadline, a
        # killed process) is not a fault of the server: no traceback for it.
        if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError | TimeoutError):
            super().handle_error(request, client_address)


class KubeSim:
    """A Kubernetes API server stand-in. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        kubeconfig_out: str | Path | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        latency_ms: float = 0,
        crd_established_delay: float = 0.0,
        controllers: bool = False,
        controller_delay: float = 0.2,
        request_log: str | Path | None = None,
        k8s_version: str = "1.33.2",
        refuse_seconds: float = 0.0,
        readyz_unavailable_seconds: float = 0.0,
    ) -> None:
        self.host, self.requested_port = host, port
        self.k8s_version = k8s_version
        self.token = secrets.token_hex(16)
        self.store = Store(crd_established_delay)
        self.faults = Faults()
        self.faults.latency = latency_ms / 1000
        if readyz_unavailable_seconds:
            self.faults.readyz_unavailable(readyz_unavailable_seconds)
        self.refuse_seconds = refuse_seconds
        self.controllers = Controllers(self.store, controller_delay)
        self.run_controllers = controllers
        self.requests: list[dict[str, Any]] = []
        # For tests: called with (verb, path, body) before a real (not dry-run) write is
        # served; False drops the connection unanswered, as a server that died would. And
        # with the log entry after the write was answered.
        self.before_write: Callable[[str, str, bytes], bool] | None = None
        self.after_write: Callable[[dict[str, Any]], None] | None = None
        self._log_lock = threading.Lock()
        self._log_file = open(request_log, "a") if request_log else None  # noqa: SIM115
        self._tmp = tempfile.TemporaryDirectory(prefix="kubesim-")
        self.kubeconfig_path = Path(kubeconfig_out or Path(self._tmp.name) / "kubeconfig")
        self.stopping = threading.Event()
        self._accept_now = threading.Event()
        self._serving = threading.Event()
        ca = trustme.CA()
        self._ca = ca
        self.ca_pem = ca.cert_pem.bytes()
        self._ca_cert = x509.load_pem_x509_certificate(self.ca_pem)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1", "localhost", "::1").configure_cert(self.tls)
        # Clients may also authenticate with a certificate this CA issued (as Talos's admin
        # kubeconfig does); `client_cert_kubeconfig()` writes one. The real server requests a
        # client certificate without verifying it in the handshake (k8s.io/apiserver
        # pkg/server/secure_serving.go, tlsConfig: tls.RequestClientCert); its x509
        # authenticator verifies it per request, and a bad one gets 401. Python's ssl cannot
        # request without verifying, so the handshake here accepts this CA's certificates at
        # any time and those of a second, foreign CA (for tests), and `_authenticated` checks.
        self._foreign_ca = trustme.CA()
        ca.configure_trust(self.tls)
        self._foreign_ca.configure_trust(self.tls)
        self.tls.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
        self.tls.verify_mode = ssl.CERT_OPTIONAL
        self._client_cert = ca.issue_cert("admin", common_name="admin")
        self._server: _Server | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> KubeSim:
        server = _Server((self.host, self.requested_port), _Handler, bind_and_activate=False)
        server.sim = self
        server.server_bind()
        self._server = server
        self.port = server.server_address[1]
        self.url = f"https://{self.host}:{self.port}"
        self.write_kubeconfig(self.kubeconfig_path)
        if self.run_controllers:
            self.controllers.start()

        def serve() -> None:
            # Bound but not listening: clients get "connection refused" until then.
            if self.refuse_seconds:
                self._accept_now.wait(
                    None if self.refuse_seconds == math.inf else self.refuse_seconds
                )
                if self.stopping.is_set():
                    return
                server.server_activate()
            self._serving.set()
            server.serve_forever(poll_interval=0.1)

        if not self.refuse_seconds:
            server.server_activate()  # listening before start() returns

        threading.Thread(target=serve, name="kubesim-serve", daemon=True).start()
        return self

    def accept_connections(self) -> None:
        """Start listening now (refuse_seconds=math.inf waits for this): a fresh Talos
        control plane's kube-apiserver (a static pod whose storage is etcd) comes up only
        once etcd runs, and on a fresh node etcd waits for the Bootstrap call (siderolabs/talos
        internal/app/machined/pkg/system/services/etcd.go, BootstrapEtcd; docs.siderolabs.com
        "Getting Started": `talosctl bootstrap`)."""
        self._accept_now.set()

    def stop(self) -> None:
        self.stopping.set()
        self._accept_now.set()
        self.controllers.stop()
        if self._server is not None:
            if self._serving.is_set():
                self._server.shutdown()  # returns once serve_forever has stopped
            self._server.server_close()
        if self._log_file:
            self._log_file.close()
        self._tmp.cleanup()

    def __enter__(self) -> KubeSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "kubesim",
            "clusters": [
                {
                    "name": "kubesim",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "kubesim-admin", "user": {"token": self.token}}],
            "contexts": [
                {"name": "kubesim", "context": {"cluster": "kubesim", "user": "kubesim-admin"}}
            ],
        }

    def client_cert_kubeconfig(
        self, expired: bool = False, foreign: bool = False
    ) -> dict[str, Any]:
        """The same server, authenticating with a client certificate instead of the token:
        a valid one, or one that `expired`, or one a `foreign` CA (another cluster) issued."""
        config = self.kubeconfig()
        cert = self._client_cert
        if expired or foreign:
            now = dt.datetime.now(dt.UTC)
            cert = (self._foreign_ca if foreign else self._ca).issue_cert(
                "admin",
                common_name="admin",
                not_before=now - dt.timedelta(days=400) if expired else None,
                not_after=now - dt.timedelta(days=30) if expired else None,
            )
        config["users"] = [
            {
                "name": "admin",
                "user": {
                    "client-certificate-data": base64.b64encode(
                        cert.cert_chain_pems[0].bytes()
                    ).decode(),
                    "client-key-data": base64.b64encode(cert.private_key_pem.bytes()).decode(),
                },
            }
        ]
        config["contexts"][0]["context"]["user"] = "admin"
        return config

    def write_kubeconfig(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.kubeconfig()))
        Path(path).chmod(0o600)

    # -- for tests ---------------------------------------------------------------------------

    def record(self, entry: dict[str, Any]) -> None:
        with self._log_lock:
            self.requests.append(entry)
            if self._log_file:
                self._log_file.write(json.dumps(entry) + "\n")
                self._log_file.flush()

    def writes(self) -> list[dict[str, Any]]:
        """Requests that changed (or tried to change) state; dry runs excluded."""
        return [r for r in self.requests if r["verb"] in WRITE_VERBS and not r["dry_run"]]

    def clear_log(self) -> None:
        with self._log_lock:
            self.requests.clear()

    def get(self, api_version: str, kind: str, name: str, namespace: str = "") -> dict[str, Any]:
        return self.store.get(self.store.type_for_kind(api_version, kind), namespace, name)

    def exists(self, api_version: str, kind: str, name: str, namespace: str = "") -> bool:
        try:
            self.get(api_version, kind, name, namespace)
        except ApiError:
            return False
        return True

    def put(self, obj: dict[str, Any], manager: str = "test") -> dict[str, Any]:
        """Create or replace an object as a test fixture would (server-side apply, forced)."""
        t = self.store.type_for_kind(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        return self.store.apply(t, meta.get("namespace", ""), meta["name"], obj, manager, True)

    def set_status(
        self, api_version: str, kind: str, name: str, status: dict[str, Any], namespace: str = ""
    ) -> dict[str, Any]:
        t = self.store.type_for_kind(api_version, kind)
        return self.store.update(
            t, namespace, name, {"status": status}, "test", subresource="status"
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log replaces http.server's stderr lines

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    @property
    def sim(self) -> KubeSim:
        return self.server.sim

    def _handle(self) -> None:
        started = time.monotonic()
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.sim.faults.latency:
            time.sleep(self.sim.faults.latency)
        verb = self._verb(url.path, query)
        entry = {
            "ts": round(time.time(), 4),
            "method": self.command,
            "verb": verb,
            "path": url.path,
            "query": url.query,
            "dry_run": query.get("dryRun") == "All",
            "user_agent": self.headers.get("User-Agent", ""),
        }
        write = verb in WRITE_VERBS and not entry["dry_run"]
        self._entry: dict[str, Any] | None = entry
        self._started = started
        if write and self.sim.before_write and not self.sim.before_write(verb, url.path, raw):
            self.close_connection = True
            self.connection.close()
            status = 0
        else:
            status = self._dispatch(url.path, query, verb, raw)
        self._log(status)  # if unanswered (a dropped connection)
        if write and status and self.sim.after_write:
            self.sim.after_write(entry)

    def _verb(self, path: str, query: dict[str, str]) -> str:
        if not path.startswith(("/api/", "/apis/")) or self._is_discovery(path):
            return "get" if self.command == "GET" else self.command.lower()
        if self.command == "GET":
            if query.get("watch") in ("1", "true"):
                return "watch"
            return "get" if self._has_name(path) else "list"
        if self.command == "PATCH":
            ctype = self.headers.get("Content-Type", "")
            return "apply" if "apply-patch" in ctype else "patch"
        return {"POST": "create", "PUT": "update", "DELETE": "delete"}.get(self.command, "?")

    @staticmethod
    def _is_discovery(path: str) -> bool:
        parts = path.strip("/").split("/")
        return (parts[0] == "api" and len(parts) <= 2) or (parts[0] == "apis" and len(parts) <= 3)

    def _has_name(self, path: str) -> bool:
        try:
            return bool(self._route(path)[3])
        except ApiError:
            return False

    def _dispatch(self, path: str, query: dict[str, str], verb: str, raw: bytes) -> int:
        rule = self.sim.faults.take(verb, path)
        if rule is not None and rule.status is None:
            self.close_connection = True
            self.connection.close()
            return 0
        if rule is not None:
            return self._error(
                ApiError(
                    rule.status or 500,
                    "InternalError",
                    f"kubesim: injected failure ({rule.status})",
                    rule.retry_after,
                )
            )
        authenticated = self._authenticated()
        # Credentials that fail are refused on every path, public ones too; no credentials at
        # all is anonymous, which may read only the public paths (kubernetes
        # pkg/kubeapiserver/authenticator/config.go, New: union.NewFailOnError in front of
        # the anonymous authenticator).
        if authenticated is False or (authenticated is None and path not in PUBLIC_PATHS):
            return self._error(ApiError(401, "Unauthorized", "Unauthorized"))
        try:
            return self._serve(path, query, verb, raw)
        except ApiError as err:
            return self._error(err)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):  # the client is gone
            self.close_connection = True
            return 0

    def _authenticated(self) -> bool | None:
        """True if a credential presented is valid, False if all presented fail, None if
        none was presented. Any one valid credential is enough (the union authenticator)."""
        header = self.headers.get("Authorization")
        if header == f"Bearer {self.sim.token}":
            return True
        try:
            der = self.connection.getpeercert(binary_form=True)
        except ValueError:  # the client went away mid-request
            der = None
        if der is None:
            return None if header is None else False
        # The x509 authenticator: signed by the cluster's CA and within its validity
        # (k8s.io/apiserver pkg/authentication/request/x509/x509.go, AuthenticateRequest).
        cert = x509.load_der_x509_certificate(der)
        try:
            cert.verify_directly_issued_by(self.sim._ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        now = dt.datetime.now(dt.UTC)
        return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc

    def _serve(self, path: str, query: dict[str, str], verb: str, raw: bytes) -> int:
        if path in ("/livez", "/healthz"):
            return self._text(200, "ok")
        if path == "/readyz":
            if not self.sim.faults.readyz_ok():
                return self._text(503, "[-]etcd failed: reason withheld\nreadyz check failed")
            return self._text(200, "ok")
        if path == "/version":
            major, minor, _ = self.sim.k8s_version.split(".", 2)
            return self._json(
                200,
                {
                    "major": major,
                    "minor": minor,
                    "gitVersion": f"v{self.sim.k8s_version}",
                    "platform": "linux/amd64",
                },
            )
        if path == "/api":
            return self._json(
                200,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {
                            "clientCIDR": "0.0.0.0/0",
                            "serverAddress": f"{self.sim.host}:{self.sim.port}",
                        }
                    ],
                },
            )
        group_versions = self.sim.store.group_versions()
        if path.startswith("/openapi/v3"):
            return self._json(200, openapi_v3(path, group_versions))
        if path == "/apis":
            all_types = [t for gv, ts in group_versions.items() if "/" in gv for t in ts]
            return self._json(200, api_group_list(all_types))
        parts = path.strip("/").split("/")
        if parts[0] == "apis" and "/".join(parts[1:3]) not in group_versions:
            # No handler serves a group version nobody registered: the mux's own answer
            # (k8s.io/apiserver pkg/server/mux/pathrecorder.go, NotFoundHandler).
            return self._text(404, "404 page not found\n")
        if self._is_discovery(path) and path.startswith(("/api/", "/apis/")):
            gv = path.strip("/").split("/", 1)[1]
            if gv not in group_versions:
                raise ApiError(
                    404, "NotFound", "the server could not find the requested resource", None, {}
                )
            return self._json(200, api_resource_list(gv, group_versions[gv]))
        if not path.startswith(("/api/", "/apis/")):
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource", None, {}
            )
        return self._resource(path, query, verb, raw)

    def _route(self, path: str) -> tuple[Any, str, str, str, str]:
        parts = path.strip("/").split("/")
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            group, version, rest = parts[1], parts[2], parts[3:]
        store = self.sim.store
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            candidate = store.types.get((group, version, rest[2]))
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        t = store.find_type(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub and sub != "status":
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource", None, {}
            )
        return t, namespace, rest[0], name, sub

    def _resource(self, path: str, query: dict[str, str], verb: str, raw: bytes) -> int:
        t, namespace, _, name, sub = self._route(path)
        store = self.sim.store
        dry_run = query.get("dryRun") == "All"
        manager = (
            query.get("fieldManager") or self.headers.get("User-Agent", "unknown").split("/")[0]
        )
        if verb == "watch":
            return self._watch(t, namespace, query)
        if verb == "list":
            items, revision = store.list(
                t, namespace, query.get("labelSelector", ""), query.get("fieldSelector", "")
            )
            if self._wants_table():
                return self._json(200, _table(t, items, revision))
            if t.schema is None:
                # A built-in kind's list items carry no apiVersion and kind (the typed list is
                # encoded whole: k8s.io/apimachinery runtime, the items' TypeMeta is empty).
                for item in items:
                    item.pop("apiVersion", None)
                    item.pop("kind", None)
            return self._json(
                200,
                {
                    "kind": f"{t.kind}List",
                    "apiVersion": t.group_version,
                    "metadata": {"resourceVersion": str(revision)},
                    "items": items,
                },
            )
        if verb == "get":
            obj = store.get(t, namespace, name)
            return self._json(200, _table(t, [obj], store.revision) if self._wants_table() else obj)
        if verb == "delete":
            gone = store.delete(t, namespace, name, dry_run)
            details = {"name": name, **({"group": t.group} if t.group else {}), "kind": t.plural}
            return self._json(
                200,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {**details, "uid": gone["metadata"].get("uid", "")},
                },
            )
        body = self._body(raw, verb)
        checks = FieldValidation(query.get("fieldValidation") or "Warn")
        if checks.directive not in ("Strict", "Warn", "Ignore"):
            # The request's options fail validation (pkg/apis/meta/v1/validation,
            # ValidateCreateOptions and the like: ValidateFieldValidation).
            options = {"create": "CreateOptions", "update": "UpdateOptions"}.get(
                verb, "PatchOptions"
            )
            what = (
                f"Unsupported value: {json.dumps(checks.directive)}: "
                'supported values: "", "Ignore", "Strict", "Warn"'
            )
            raise ApiError(
                422,
                "Invalid",
                f'{options}.meta.k8s.io "" is invalid: fieldValidation: {what}',
                None,
                {
                    "group": "meta.k8s.io",
                    "kind": options,
                    "causes": [
                        {
                            "reason": "FieldValueNotSupported",
                            "message": what,
                            "field": "fieldValidation",
                        }
                    ],
                },
            )
        if verb == "create":
            obj = store.create(t, namespace, body, manager, dry_run, checks)
            return self._json(201, obj, checks.warnings)
        if verb == "update":
            obj = store.update(
                t, namespace, name, body, manager, sub, dry_run, checks, conditional=True
            )
            return self._json(200, obj, checks.warnings)
        if verb == "apply":
            force = query.get("force") in ("true", "1")
            existed = _exists(store, t, namespace, name)
            obj = store.apply(
                t, namespace, name, body, query.get("fieldManager", ""), force, sub, dry_run, checks
            )
            return self._json(200 if existed else 201, obj, checks.warnings)
        ctype = self.headers.get("Content-Type", "")
        if "json-patch+json" in ctype:
            raise ApiError(415, "UnsupportedMediaType", f"kubesim does not serve {ctype}")
        obj = store.merge_patch(t, namespace, name, body, manager, sub, dry_run, checks)
        return self._json(200, obj, checks.warnings)

    def _body(self, raw: bytes, verb: str) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None  # apply bodies may be YAML; JSON is tried first as it is far faster
        try:
            if body is None and verb == "apply":
                body = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            elif body is None:
                raise ValueError("request body is not valid JSON")
        except (ValueError, yaml.YAMLError) as err:
            raise ApiError(400, "BadRequest", f"error decoding request body: {err}") from err
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "request body must be an object")
        return body

    def _wants_table(self) -> bool:
        return "as=Table" in self.headers.get("Accept", "")

    def _watch(self, t: Any, namespace: str, query: dict[str, str]) -> int:
        store = self.sim.store
        label_sel, field_sel = query.get("labelSelector", ""), query.get("fieldSelector", "")
        since = query.get("resourceVersion", "")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._log(200)  # as it starts: a watch may last minutes
        if since in ("", "0"):
            items, revision = store.list(t, namespace, label_sel, field_sel)
            for item in items:
                self._chunk({"type": "ADDED", "object": item})
            since = str(revision)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        try:
            for event, obj in store.watch(
                t,
                namespace,
                int(since),
                label_sel,
                field_sel,
                deadline,
                lambda: self.sim.stopping.is_set() or self._client_gone(),
            ):
                self._chunk({"type": event, "object": obj})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True
        return 200

    def _client_gone(self) -> bool:
        """A watch ends when its client goes, as the request's context ends it in
        k8s.io/apiserver pkg/endpoints/handlers/watch.go (WatchServer.HandleHTTP, `done`).
        A watch client sends nothing more, so a readable socket means it closed. The read
        must not block: a part of a TLS record is readable too."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        timeout = self.connection.gettimeout()
        self.connection.settimeout(0)
        try:
            return self.connection.recv(1) == b""
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            self.connection.settimeout(timeout)

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, code: int, body: dict[str, Any], warnings: list[str] | None = None) -> int:
        # Each warning is one header, `299 - "<text>"` (k8s.io/apiserver
        # pkg/endpoints/handlers/responsewriters/warning.go; RFC 7234 warn-code 299).
        headers = [("Warning", f"299 - {json.dumps(w)}") for w in warnings or []]
        return self._send(code, "application/json", json.dumps(body).encode(), headers)

    def _text(self, code: int, text: str) -> int:
        return self._send(code, "text/plain; charset=utf-8", text.encode())

    def _error(self, err: ApiError) -> int:
        data = json.dumps(err.status()).encode()
        headers = [("Retry-After", str(err.retry_after))] if err.retry_after is not None else []
        return self._send(err.code, "application/json", data, headers)

    def _log(self, status: int) -> None:
        """Log the request before its answer goes out: a test that looks at the log once its
        client has the answer finds it there."""
        if self._entry is not None:
            ms = round((time.monotonic() - self._started) * 1000, 2)
            self._entry.update(status=status, ms=ms)
            self.sim.record(self._entry)
            self._entry = None

    def _send(
        self, code: int, ctype: str, data: bytes, headers: list[tuple[str, str]] | None = None
    ) -> int:
        self._log(code)
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers or []:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        return code


def openapi_v3(path: str, group_versions: dict[str, list[Any]]) -> dict[str, Any]:
    """Just enough OpenAPI v3 for kubectl to see that every kind supports server-side field
    validation (a PATCH operation with a `fieldValidation` query parameter), so it lets the
    server validate instead of downloading full schemas."""

    def prefix(gv: str) -> str:
        return f"api/{gv}" if "/" not in gv else f"apis/{gv}"

    if path.rstrip("/") == "/openapi/v3":
        paths = {}
        for gv, types in group_versions.items():
            digest = hashlib.sha256(repr(sorted(t.plural for t in types)).encode()).hexdigest()
            paths[prefix(gv)] = {"serverRelativeURL": f"/openapi/v3/{prefix(gv)}?hash={digest}"}
        return {"paths": paths}
    gv = path.removeprefix("/openapi/v3/").split("/", 1)[1]
    if gv not in group_versions:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    ops = {}
    for t in group_versions[gv]:
        scope = "namespaces/{namespace}/" if t.namespaced else ""
        ops[f"/{prefix(gv)}/{scope}{t.plural}/{{name}}"] = {
            "patch": {
                "x-kubernetes-group-version-kind": {
                    "group": t.group,
                    "version": t.version,
                    "kind": t.kind,
                },
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "OK"}},
            }
        }
    return {"openapi": "3.0.0", "info": {"title": "kubesim", "version": "v1"}, "paths": ops}


def _exists(store: Store, t: Any, namespace: str, name: str) -> bool:
    try:
        store.get(t, namespace, name)
    except ApiError:
        return False
    return True


def _table(t: Any, items: list[dict[str, Any]], revision: int) -> dict[str, Any]:
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name"}]
    extra = [c for c in t.printer_columns if c.get("jsonPath", "").startswith(".status")]
    columns += [
        {"name": c["name"], "type": "string", "format": "", "description": ""} for c in extra
    ]
    columns.append({"name": "Age", "type": "string", "format": "", "description": "Age"})
    rows = []
    for obj in items:
        cells: list[Any] = [obj["metadata"]["name"]]
        for column in extra:
            cells.append(_json_path(obj, column["jsonPath"]))
        cells.append(_age(obj["metadata"].get("creationTimestamp", "")))
        rows.append(
            {
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                },
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": str(revision)},
        "columnDefinitions": columns,
        "rows": rows,
    }


def _json_path(obj: dict[str, Any], path: str) -> str:
    """Enough of JSONPath for Flux's printer columns, such as
    .status.conditions[?(@.type=="Ready")].status."""
    match = re.fullmatch(r'\.status\.conditions\[\?\(@\.type=="(\w+)"\)\]\.(\w+)', path)
    if match:
        for cond in obj.get("status", {}).get("conditions", []):
            if cond.get("type") == match.group(1):
                return str(cond.get(match.group(2), ""))
        return ""
    node: Any = obj
    for key in path.strip(".").split("."):
        node = node.get(key, "") if isinstance(node, dict) else ""
    return str(node)


def _age(timestamp: str) -> str:
    if not timestamp:
        return ""
    created = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    seconds = int((dt.datetime.now(dt.UTC) - created).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"
