"""All cluster I/O: a small client over the `kubernetes` package's ApiClient.

Objects are plain dicts. Paths come from a kind table (built-ins plus the CRDs the agent
installs), so no discovery requests are spent. Every request is retried with tenacity on
throttling, server errors and dropped connections, never past the run's deadline.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenacity
import urllib3
import yaml

from agent import interrupt, log
from agent import kube_client as k8s
from agent.errors import BootstrapError, ConfigError
from agent.kube_client import ApiException

Obj = dict[str, Any]
Query = list[tuple[str, str]]
FIELD_MANAGER = "alga-bootstrap"
RETRYABLE_STATUS = {0, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Kind:
    plural: str
    namespaced: bool


BUILTIN_KINDS: dict[tuple[str, str], Kind] = {
    ("v1", "Namespace"): Kind("namespaces", False),
    ("v1", "ConfigMap"): Kind("configmaps", True),
    ("v1", "Secret"): Kind("secrets", True),
    ("v1", "ServiceAccount"): Kind("serviceaccounts", True),
    ("v1", "Service"): Kind("services", True),
    ("v1", "ResourceQuota"): Kind("resourcequotas", True),
    ("v1", "Node"): Kind("nodes", False),
    ("apps/v1", "Deployment"): Kind("deployments", True),
    ("apps/v1", "DaemonSet"): Kind("daemonsets", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): Kind("clusterroles", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): Kind("clusterrolebindings", False),
    ("rbac.authorization.k8s.io/v1", "Role"): Kind("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): Kind("rolebindings", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): Kind("networkpolicies", True),
    ("storage.k8s.io/v1", "StorageClass"): Kind("storageclasses", False),
    ("coordination.k8s.io/v1", "Lease"): Kind("leases", True),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): Kind(
        "customresourcedefinitions", False
    ),
}
# The Flux kinds read by name (status, verify), known before the bundle's CRDs are read, or
# when the bundle is unreadable; register_crds adds every kind the bundle defines.
FLUX_KINDS: dict[tuple[str, str], Kind] = {
    ("source.toolkit.fluxcd.io/v1", "GitRepository"): Kind("gitrepositories", True),
    ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"): Kind("kustomizations", True),
    ("helm.toolkit.fluxcd.io/v2", "HelmRelease"): Kind("helmreleases", True),
}


def custom_kinds(crds: list[Obj]) -> dict[tuple[str, str], Kind]:
    """The kinds CustomResourceDefinitions define; ConfigError for one that defines none."""
    kinds = {}
    for crd in crds:
        try:
            spec = crd["spec"]
            for version in spec["versions"]:
                api_version = f"{spec['group']}/{version['name']}"
                kinds[(api_version, spec["names"]["kind"])] = Kind(
                    spec["names"]["plural"], spec.get("scope") == "Namespaced"
                )
        except (KeyError, TypeError):
            name = crd["metadata"]["name"]
            raise ConfigError(
                f"CustomResourceDefinition {name} lacks spec.group, spec.names or spec.versions"
            ) from None
    return kinds


def placement_problem(obj: Obj, kinds: dict[tuple[str, str], Kind]) -> str | None:
    """Why the agent could not write `obj` (no path for its kind, no namespace), or None."""
    api_version, kind, meta = obj["apiVersion"], obj["kind"], obj["metadata"]
    found = kinds.get((api_version, kind))
    if found is None:
        return (
            f"kind {kind} ({api_version}) is neither one the agent knows nor a "
            "CustomResourceDefinition of the Flux bundle"
        )
    if found.namespaced and not meta.get("namespace"):
        return f"{kind} {meta['name']} needs metadata.namespace"
    return None


class ApiError(BootstrapError):
    """The API server refused a request, after retries where a retry could help."""

    def __init__(self, status: int, reason: str, message: str, retryable: bool = True) -> None:
        super().__init__(log.redact(message))
        self.status, self.reason = status, reason
        self.retryable = retryable and status in RETRYABLE_STATUS
        self.retry_after: int | None = None


# What OpenSSL says when a certificate is the problem (its own, or the peer's alert about
# ours): retrying cannot help. A bare EOF may be a server restarting, so it is retried.
_CERTIFICATE_PROBLEMS = (
    "CERTIFICATE_VERIFY_FAILED",
    "ALERT_CERTIFICATE",
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "certificate verify failed",
)


def is_certificate_problem(detail: str) -> bool:
    return any(problem in detail for problem in _CERTIFICATE_PROBLEMS)


def tls_failure(endpoint: str, detail: str) -> str:
    """One line for a TLS handshake that failed over a certificate."""
    detail = " ".join(detail.split())[:300]
    return (
        f"TLS handshake with {endpoint} failed: certificate problem ({detail}); check the "
        "kubeconfig's certificate-authority-data (the cluster's CA) and its client "
        "certificate (expired, or issued by another cluster's CA?)"
    )


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.retryable
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


class RetryAfterOrBackoff(tenacity.wait.wait_base):
    """Honour the server's Retry-After (an exception's `retry_after`, in seconds, up to 30)
    when it sends one; otherwise back off with jitter."""

    def __init__(self, multiplier: float = 0.2, max_s: float = 5) -> None:
        self.backoff = tenacity.wait_exponential_jitter(multiplier=multiplier, max=max_s)

    def __call__(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float):
            return float(min(retry_after, 30))
        return float(self.backoff(state))


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.get("kube").warning(
        "request failed, retrying", attempt=state.attempt_number, error=str(exc)[:300]
    )


class StopAtDeadline(tenacity.stop.stop_base):
    """Stop retrying when the next attempt would start after `deadline` (a monotonic time)."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def __call__(self, state: tenacity.RetryCallState) -> bool:
        return self.deadline is not None and (
            time.monotonic() + state.upcoming_sleep >= self.deadline
        )


class DeadlineExceeded(BootstrapError):
    """The run's deadline (--timeout) passed while a request was still failing or pending."""

    def __init__(self, method: str, path: str, last: BaseException | None) -> None:
        self.last = last  # None: the deadline came before the request was ever sent
        detail = f": {str(last)[:300]}" if last else ""
        super().__init__(
            log.redact(
                f"timed out: no time left before the run's deadline (--timeout) to retry "
                f"{method} {path}{detail}; re-run with a longer --timeout, or check the cluster"
            )
        )


def kubeconfig_source(paths: Sequence[Path]) -> str:
    """How errors name where the credentials came from."""
    return str(paths[0]) if len(paths) == 1 else "KUBECONFIG=" + os.pathsep.join(map(str, paths))


def load_kubeconfig(paths: Sequence[Path], context: str | None = None) -> k8s.Configuration:
    """Kubeconfig files as kubectl reads them (client-go tools/clientcmd/loader.go,
    ClientConfigLoadingRules.Load): in order, a missing file skipped (all missing is an error),
    the first file to name a cluster, user or context wins that entry whole,
    current-context comes from the first file that sets it, and relative file references
    resolve against the file they are in (ResolveLocalPaths). The merged result goes through
    configuration_in_memory, so inline key material never touches a disk."""
    source = kubeconfig_source(paths)
    merged: Obj = {"clusters": [], "users": [], "contexts": [], "current-context": None}
    missing = []
    for path in dict.fromkeys(paths):  # a path listed twice is read once (loader.go deduplicate)
        try:
            data = yaml.safe_load(path.read_text()) or {}  # an empty file is an empty config
        except FileNotFoundError:
            missing.append(str(path))
            continue
        except OSError as err:
            raise ConfigError(f"{path}: cannot read kubeconfig ({err.strerror})") from None
        except yaml.YAMLError:
            raise ConfigError(f"{path}: kubeconfig is not valid YAML") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: kubeconfig must be a YAML mapping")
        _merge_kubeconfig(merged, data, path)
    if len(missing) == len(dict.fromkeys(paths)):
        raise ConfigError(
            f"{source}: cannot read kubeconfig (no such file); pass --kubeconfig PATH, "
            "set cluster.kubeconfig, or set KUBECONFIG"
        )
    configuration, _ = configuration_in_memory(merged, source, context)
    return configuration


# File references in kubeconfig entries, resolved against their file (loader.go,
# GetClusterFileReferences and GetAuthInfoFileReferences).
_FILE_REFERENCES = {
    "clusters": ("cluster", ("certificate-authority",)),
    "users": ("user", ("client-certificate", "client-key", "tokenFile")),
    "contexts": ("context", ()),
}


def _merge_kubeconfig(merged: Obj, data: Obj, path: Path) -> None:
    """Add one file's entries to `merged`: an entry whose name is already there is skipped
    whole, as client-go's merge never changes a map key once set."""
    base = path.absolute().parent
    for kind, (body_key, references) in _FILE_REFERENCES.items():
        entries = data.get(kind) or []
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: kubeconfig {kind} must be a list")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ConfigError(f"{path}: every entry of {kind} needs a name")
            if any(known["name"] == entry["name"] for known in merged[kind]):
                continue
            body = dict(entry.get(body_key) or {})
            for reference in references:
                if body.get(reference):
                    body[reference] = str(base / body[reference])  # an absolute one stays
            merged[kind].append({"name": entry["name"], body_key: body, "origin": str(path)})
    merged["current-context"] = merged["current-context"] or data.get("current-context")


def configuration_in_memory(
    kubeconfig: bytes | Obj, source: str, context: str | None = None
) -> tuple[k8s.Configuration, str]:
    """Client settings from a kubeconfig whose key material must never touch a disk
    (machined's admin kubeconfig, or files merged by load_kubeconfig): certificates and keys
    given inline go to anonymous in-memory files (memfd), open for the life of the process.
    Uses `context`, else the current context. Returns the settings and the context's server."""
    try:
        data = yaml.safe_load(kubeconfig) if isinstance(kubeconfig, bytes) else kubeconfig
        named = {
            kind: {entry["name"]: entry for entry in data.get(kind) or []}
            for kind in ("clusters", "users", "contexts")
        }
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{source}: not a usable kubeconfig") from None
    contexts = named["contexts"]
    known = ", ".join(sorted(contexts)) or "none"
    name = context or data.get("current-context")
    if not name and len(contexts) == 1:
        name = next(iter(contexts))
    if not name:
        raise ConfigError(f"{source}: no current-context; pass --context NAME (contexts: {known})")
    if name not in contexts:
        raise ConfigError(f'{source}: context "{name}" not found; contexts: {known}')
    origin = contexts[name].get("origin", source)
    where = f'{origin}: context "{name}"'
    chosen = contexts[name].get("context") or {}
    cluster = named["clusters"].get(chosen.get("cluster"), {}).get("cluster")
    if not cluster or not cluster.get("server"):
        raise ConfigError(f'{where}: cluster "{chosen.get("cluster")}" is missing or has no server')
    user: Obj = {}
    if chosen.get("user"):
        found = named["users"].get(chosen["user"])
        if found is None:
            raise ConfigError(f'{where}: user "{chosen["user"]}" is not in the kubeconfig')
        user = found.get("user") or {}
    unsupported = sorted({"exec", "auth-provider", "username", "password"} & set(user))
    if unsupported:
        raise ConfigError(
            f'{where}: user "{chosen["user"]}" authenticates with {", ".join(unsupported)}, '
            "which alga-bootstrap does not take; use a client certificate or a token "
            "(talosctl kubeconfig gives one)"
        )
    configuration = k8s.Configuration()
    configuration.host = cluster["server"]
    configuration.verify_ssl = not cluster.get("insecure-skip-tls-verify", False)
    if cluster.get("tls-server-name"):
        configuration.tls_server_name = cluster["tls-server-name"]
    configuration.ssl_ca_cert = _material(where, "ca", cluster, "certificate-authority")
    configuration.cert_file = _material(where, "cert", user, "client-certificate")
    configuration.key_file = _material(where, "key", user, "client-key", secret=True)
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = _read_reference(where, user["tokenFile"]).decode().strip()
    if token:
        log.register_secret(token)
        configuration.api_key = {"authorization": f"Bearer {token}"}
    return configuration, str(cluster["server"])


def _material(where: str, name: str, entry: Obj, field: str, secret: bool = False) -> str | None:
    """A certificate or key: inline data into an in-memory file; a file reference as is."""
    if entry.get(f"{field}-data"):
        if secret:
            log.register_secret(entry[f"{field}-data"])
            log.register_secret(base64.b64decode(entry[f"{field}-data"]))
        return _memory_file(name, entry[f"{field}-data"])
    if entry.get(field):
        _read_reference(where, entry[field])  # unreadable: a one-line error now, not a TLS one
        return str(entry[field])
    return None


def _read_reference(where: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{where}: cannot read {path} ({err.strerror})") from None


def _memory_file(name: str, base64_data: str) -> str:
    content = base64.b64decode(base64_data)
    fd = os.memfd_create(f"alga-bootstrap-{name}", os.MFD_CLOEXEC)
    os.write(fd, content)
    return f"/proc/{os.getpid()}/fd/{fd}"


@dataclass(frozen=True)
class Watched:
    """A collection, or one object of it when `name` is given."""

    api_version: str
    kind: str
    namespace: str = ""
    name: str = ""

    @classmethod
    def one(cls, obj: Obj) -> Watched:
        meta = obj["metadata"]
        return cls(obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


class Watch:
    """Tells a wait when to look again, as `kubectl wait` learns of changes: a watch per
    target, each followed in a thread of its own, sets `changed` when an object changes. The
    wait still decides by reading, and still polls (slowly) if a watch fails or ends.

    Opened without a resourceVersion, a watch starts with a synthetic ADDED event for every
    object that exists ("Semantics for watch" on the API concepts page), so only MODIFIED and
    DELETED count: every wait is for objects the agent has already created."""

    SECONDS = 300  # each watch's timeoutSeconds; the server ends it then and it is reopened
    EAGER_S = 2.0  # most waits are over by then
    MIN_GAP_S = 0.05

    def __init__(self, kube: Kube, targets: Sequence[Watched]) -> None:
        self.changed = threading.Event()
        self._kube = kube
        self._targets = targets
        self._stopped = threading.Event()
        self._open: set[Any] = set()
        self._lock = threading.Lock()
        self._opened: float | None = None  # when the first sleep opened the watches

    def sleep(self, seconds: float) -> None:
        """A wait's sleep: ends after `seconds`, at a stop (SIGTERM), or at a change: at once
        in the watches' first seconds (a check at most every MIN_GAP_S), later once half of
        it has passed. The half keeps a long wait polite to an object whose status changes
        all the time: it reads at most twice as often as its polling would."""
        if self._opened is None:  # only a wait that has to wait opens watches
            self._opened = time.monotonic()
            for target in self._targets:
                threading.Thread(target=self._follow, args=(target,), daemon=True).start()
        started = time.monotonic()
        interrupt.sleep(seconds, woken=self.changed)
        eager = started - self._opened < self.EAGER_S
        floor = min(self.MIN_GAP_S, seconds) if eager else seconds / 2
        interrupt.sleep(max(floor - (time.monotonic() - started), 0))
        self.changed.clear()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            for response in self._open:
                _shutdown(response)

    def _follow(self, target: Watched) -> None:
        try:
            self._follow_until_stopped(target)
        except (Exception, interrupt.Interrupted) as err:  # a watch only hints: polling goes on
            log.get("kube").debug("watch ended; polling instead", error=repr(err)[:200])

    def _follow_until_stopped(self, target: Watched) -> None:
        while not self._stopped.is_set():
            opened = time.monotonic()
            response = self._kube.open_watch(target, self.SECONDS)
            with self._lock:
                self._open.add(response)
            if self._stopped.is_set():
                _shutdown(response)
            try:
                for line in _lines(response):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("type") in ("MODIFIED", "DELETED"):
                        self.changed.set()
            finally:
                with self._lock:
                    self._open.discard(response)
                response.close()
                response.release_conn()
            if time.monotonic() - opened < 1:
                return  # ended at once (an ERROR event, a server that does not watch)


def _shutdown(response: Any) -> None:
    """End a follower's blocked read. Its stream may have ended on its own meanwhile (the
    socket closed, or the connection back in the pool): then there is nothing to end."""
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        response.shutdown()


def _lines(response: Any) -> Iterator[bytes]:
    """A watch's answer: one JSON event per line, however the chunks fall."""
    pending = b""
    for chunk in response.stream(None, decode_content=False):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line for line in lines if line.strip())


class Kube:
    """The agent's only way to talk to the cluster."""

    def __init__(
        self,
        configuration: k8s.Configuration,
        host: str | None = None,
        source: str = "the kubeconfig",
    ) -> None:
        configuration = copy.copy(configuration)  # the caller's settings stay as they were
        if host:
            configuration.host = host
        configuration.retries = False  # tenacity does all retrying
        configuration.connection_pool_maxsize = 16
        if not configuration.verify_ssl:
            # urllib3 would warn on every request; say it once.
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            log.get("kube").warning(
                f"TLS verification is off (insecure-skip-tls-verify in {source}): the API "
                "server's identity is not checked"
            )
        self.host = configuration.host
        self.source = source
        self.kinds = dict(BUILTIN_KINDS)
        self.dry_run = False
        self.deadline: float | None = None  # time.monotonic() after which no request starts
        self.before_write: Callable[[], None] | None = None
        self._api = k8s.ApiClient(configuration)

    def close(self) -> None:
        self._api.close()

    def allow_cleanup(self, seconds: float) -> None:
        """Leave `seconds` past the deadline for the clean-up (releasing the Lease)."""
        if self.deadline is not None:
            self.deadline = max(self.deadline, time.monotonic() + seconds)

    # -- kinds -------------------------------------------------------------------------------

    def register_crds(self, crds: list[Obj]) -> None:
        """Learn the paths of custom kinds from their definitions, without discovery."""
        self.kinds.update(custom_kinds(crds))

    def path(self, api_version: str, kind: str, namespace: str = "", name: str = "") -> str:
        found = self.kinds.get((api_version, kind))
        if found is None:
            raise BootstrapError(f"kind {kind} ({api_version}) is unknown to the agent")
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        if found.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{found.plural}"
        return f"{base}/{name}" if name else base

    def path_of(self, obj: Obj) -> str:
        meta = obj["metadata"]
        return self.path(obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])

    # -- requests ----------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        lease: bool = False,
    ) -> Any:
        """One request, retried while a retry can help and the run's deadline allows. A
        stop (SIGTERM, SIGINT) ends it before the next attempt, except the Lease's own
        requests: releasing it is the clean-up."""
        deadline = self.deadline
        past_deadline = StopAtDeadline(deadline)
        failed: BaseException | None = None  # the last attempt's failure, if any

        def retry_later(state: tenacity.RetryCallState) -> None:
            nonlocal failed
            failed = state.outcome.exception() if state.outcome else None
            _log_retry(state)

        def give_up(state: tenacity.RetryCallState) -> Any:
            last = state.outcome.exception() if state.outcome else None
            if past_deadline(state):
                raise DeadlineExceeded(method, path, last)
            assert last is not None
            raise last

        def attempt() -> Any:
            if not lease:
                interrupt.check()
            timeout: tuple[float, float] = (5, 30)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:  # a retry's sleep (or the caller's) ran past the deadline
                    raise DeadlineExceeded(method, path, failed)
                timeout = (min(5, left), min(30, left))
            return self._request(method, path, query, body, content_type, timeout)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_retryable),
            wait=RetryAfterOrBackoff(),
            stop=tenacity.stop_any(
                tenacity.stop_after_attempt(8), tenacity.stop_after_delay(90), past_deadline
            ),
            sleep=interrupt.sleep if not lease else time.sleep,
            before_sleep=retry_later,
            retry_error_callback=give_up,
        )
        return retrying(attempt)

    def _request(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None,
        body: Any,
        content_type: str,
        timeout: tuple[float, float],
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            response = self._api.call_api(
                path,
                method,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=timeout,
            )
            data = response.data
        except ApiException as err:
            failure = self._describe(err, method, path, content_type)
            retry_after = (err.headers or {}).get("Retry-After")
            if retry_after and retry_after.isdigit():
                failure.retry_after = int(retry_after)
            raise failure from None
        except urllib3.exceptions.HTTPError as err:  # refused, reset, timed out: retried
            detail = re.sub(r"<[^>]* object at 0x[0-9a-f]+>: ", "", str(err))[:300]
            what = self._request_name(method, path, content_type)
            raise ApiError(
                0, "", f"{what}: no answer from {self.host}: {type(err).__name__}: {detail}"
            ) from None
        return json.loads(data or b"null")

    def _describe(self, err: ApiException, method: str, path: str, content_type: str) -> ApiError:
        """One line naming the request (verb and object) and what the server said."""
        if err.status == 0:  # no HTTP answer: the TLS connection failed
            detail = str(err.reason).replace("\n", ": ")
            if is_certificate_problem(detail):
                return ApiError(0, "", tls_failure(self.host, detail), retryable=False)
            return ApiError(0, "", f"TLS connection to {self.host} failed: {detail}")
        try:
            body = json.loads(err.body or "{}")
            reason, message = body.get("reason", ""), body.get("message", str(err.reason))
        except ValueError:
            reason, message = "", str(err.reason)
        what = self._request_name(method, path, content_type)
        if err.status == 401:
            message = (
                "the API server rejected the credentials (token or client certificate) from "
                f"{self.source}: {what}: HTTP 401 {reason or 'Unauthorized'}; renew them "
                "(expired certificate or token?) or use the cluster's admin kubeconfig"
            )
        elif err.status == 403:
            message = (
                f"the credentials from {self.source} may not {what}: HTTP 403 {message}; "
                "the agent needs cluster-admin"
            )
        else:
            message = f"{what}: HTTP {err.status} {reason}: {message}".replace("  ", " ")
        return ApiError(err.status, reason, message)

    def _request_name(self, method: str, path: str, content_type: str) -> str:
        """`apply CustomResourceDefinition gitrepositories.source.toolkit.fluxcd.io`, from a
        request's method and path (via the kind table)."""
        parts = path.strip("/").split("/")
        if parts[0] not in ("api", "apis"):
            return f"{method} {path}"
        api_version = "/".join(parts[1:3]) if parts[0] == "apis" else parts[1]
        rest = parts[3:] if parts[0] == "apis" else parts[2:]
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        kind = next(
            (
                k
                for (v, k), found in self.kinds.items()
                if v == api_version and found.plural == rest[0]
            ),
            rest[0],
        )
        verb = {"POST": "create", "PUT": "update", "DELETE": "delete"}.get(method, method)
        if method == "GET":
            verb = "get" if len(rest) > 1 else "list"
        elif method == "PATCH":
            verb = "apply" if "apply-patch" in content_type else "patch"
        if len(rest) > 1:
            return f"{verb} {kind} {namespace + '/' if namespace else ''}{rest[1]}"
        return f"{verb} {kind} in namespace {namespace}" if namespace else f"{verb} {kind}"

    def open_watch(self, target: Watched, seconds: int) -> Any:
        """A watch on `target` (GET ?watch=1: the API concepts page, "Efficient detection of
        changes"), its answer left unread for the caller to stream. One attempt, never
        retried: the waits that use a watch read and poll as well."""
        interrupt.check()
        query = [("watch", "1"), ("timeoutSeconds", str(seconds))]
        if target.name:
            query.append(("fieldSelector", f"metadata.name={target.name}"))
        path = self.path(target.api_version, target.kind, target.namespace)
        try:
            return self._api.call_api(
                path,
                "GET",
                query_params=query,
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=(5, seconds + 10),
            )
        except ApiException as err:
            raise self._describe(err, "GET", path, "application/json") from None
        except urllib3.exceptions.HTTPError as err:
            raise ApiError(0, "", f"watch {path}: no answer from {self.host}: {err}") from None

    def version(self) -> Obj:
        result: Obj = self._call("GET", "/version")
        return result

    def get(
        self, api_version: str, kind: str, name: str, namespace: str = "", lease: bool = False
    ) -> Obj | None:
        """`lease`: the Lease's own read, which a stop does not interrupt (see _call)."""
        try:
            found: Obj = self._call(
                "GET", self.path(api_version, kind, namespace, name), lease=lease
            )
        except ApiError as err:
            if err.status == 404:
                return None
            raise
        return found

    def get_like(self, obj: Obj) -> Obj | None:
        meta = obj["metadata"]
        return self.get(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace", ""))

    def list(
        self, api_version: str, kind: str, namespace: str = "", label_selector: str = ""
    ) -> list[Obj]:
        query = [("labelSelector", label_selector)] if label_selector else []
        try:
            result = self._call("GET", self.path(api_version, kind, namespace), query)
        except ApiError as err:
            if err.status == 404:
                return []
            raise
        items: list[Obj] = result.get("items", [])
        for item in items:
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    # -- writes ------------------------------------------------------------------------------
    # In dry-run mode (or for one dry-run request) every write is sent with dryRun=All: the
    # server validates and answers as if, and nothing changes. `before_write` (the run's
    # Lease) is called before a real write that is not the lease itself.

    def _write(
        self,
        method: str,
        path: str,
        query: Query,
        body: Any,
        content_type: str = "application/json",
        guarded: bool = True,
        dry_run: bool = False,
    ) -> Any:
        if self.dry_run or dry_run:
            query = [*query, ("dryRun", "All")]
        elif guarded and self.before_write is not None:
            self.before_write()
        return self._call(
            method,
            path,
            [("fieldManager", FIELD_MANAGER), *query],
            body,
            content_type,
            lease=not guarded,
        )

    def apply(self, obj: Obj, dry_run: bool = False) -> Obj:
        """Server-side apply as the agent's field manager, forced as `flux install` does.
        `dry_run`: only ask what the object would become (not a write: no Lease needed)."""
        result: Obj = self._write(
            "PATCH",
            self.path_of(obj),
            [("force", "true")],
            obj,
            "application/apply-patch+yaml",
            dry_run=dry_run,
        )
        return result

    def create(self, obj: Obj, guarded: bool = True) -> Obj | None:
        """Create `obj`; None when it already exists (someone else created it first)."""
        meta = obj["metadata"]
        path = self.path(obj["apiVersion"], obj["kind"], meta.get("namespace", ""))
        try:
            created: Obj = self._write("POST", path, [], obj, guarded=guarded)
        except ApiError as err:
            if err.status == 409:
                return None
            raise
        return created

    def replace(self, obj: Obj, guarded: bool = True) -> Obj:
        """Update `obj` as read: 409 when it changed since (its resourceVersion)."""
        result: Obj = self._write("PUT", self.path_of(obj), [], obj, guarded=guarded)
        return result

    def merge_patch(self, obj: Obj, patch: Obj) -> Obj:
        result: Obj = self._write(
            "PATCH", self.path_of(obj), [], patch, "application/merge-patch+json"
        )
        return result


def tls_settings(
    configuration: k8s.Configuration,
) -> tuple[str | bool, tuple[str, str] | None, dict[str, str]]:
    """What an httpx probe needs to reach the same server as the client: CA, client
    certificate and auth header."""
    verify: str | bool = configuration.ssl_ca_cert or configuration.verify_ssl
    cert = (
        (configuration.cert_file, configuration.key_file)
        if configuration.cert_file and configuration.key_file
        else None
    )
    headers = {}
    token = (configuration.api_key or {}).get("authorization")
    if token:
        headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
    return verify, cert, headers
