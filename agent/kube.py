"""All cluster I/O: a small client over the `kubernetes` package's ApiClient.

Objects are plain dicts. Paths come from a kind table (built-ins plus the CRDs the agent
installs), so no discovery requests are spent. Every request is retried with tenacity on
throttling, server errors and dropped connections, never past the run's deadline.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenacity
import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.kube_config import load_kube_config_from_dict

from agent import interrupt, log
from agent.errors import BootstrapError, ConfigError

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


class ApiError(BootstrapError):
    """The API server refused a request, after retries where a retry could help."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(log.redact(message))
        self.status, self.reason = status, reason
        self.retry_after: int | None = None


def _describe(err: ApiException) -> ApiError:
    try:
        body = json.loads(err.body or "{}")
        return ApiError(err.status, body.get("reason", ""), body.get("message", str(err.reason)))
    except ValueError:
        return ApiError(err.status, "", str(err.reason))


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.status in RETRYABLE_STATUS
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


class _RetryAfterOrBackoff(tenacity.wait.wait_base):
    """Honour the server's Retry-After when it sends one; otherwise back off with jitter."""

    def __init__(self) -> None:
        self.backoff = tenacity.wait_exponential_jitter(multiplier=0.2, max=5)

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
        detail = f": {str(last)[:300]}" if last else ""
        super().__init__(
            log.redact(
                f"timed out: no time left before the run's deadline (--timeout) to retry "
                f"{method} {path}{detail}; re-run with a longer --timeout, or check the cluster"
            )
        )


def load_kubeconfig(path: Path) -> k8s.Configuration:
    """Parse a kubeconfig file into client settings; a broken one is a config error."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(
            f"{path}: cannot read kubeconfig ({err.strerror}); pass --kubeconfig "
            "or set cluster.kubeconfig"
        ) from None
    except Exception:
        raise ConfigError(f"{path}: kubeconfig is not valid YAML") from None
    return configuration_from_dict(data, str(path))


def configuration_in_memory(kubeconfig: bytes, source: str) -> tuple[k8s.Configuration, str]:
    """Client settings from a kubeconfig that must never touch a disk (machined's admin
    kubeconfig): certificates and key go to anonymous in-memory files (memfd), open for the
    life of the process. Returns the settings and the kubeconfig's own server."""
    try:
        data = yaml.safe_load(kubeconfig)
        contexts = {c["name"]: c["context"] for c in data["contexts"]}
        context = contexts[data.get("current-context") or next(iter(contexts))]
        cluster = next(c["cluster"] for c in data["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in data["users"] if u["name"] == context["user"])
        server = cluster["server"]
    except (yaml.YAMLError, KeyError, TypeError, StopIteration, AttributeError):
        raise BootstrapError(f"{source}: not a usable kubeconfig") from None
    configuration = k8s.Configuration()
    configuration.host = server
    if cluster.get("certificate-authority-data"):
        configuration.ssl_ca_cert = _memory_file("ca", cluster["certificate-authority-data"])
    if user.get("client-certificate-data") and user.get("client-key-data"):
        log.register_secret(base64.b64decode(user["client-key-data"]))
        log.register_secret(user["client-key-data"])
        configuration.cert_file = _memory_file("cert", user["client-certificate-data"])
        configuration.key_file = _memory_file("key", user["client-key-data"])
    if user.get("token"):
        log.register_secret(user["token"])
        configuration.api_key = {"authorization": f"Bearer {user['token']}"}
    return configuration, server


def _memory_file(name: str, base64_data: str) -> str:
    content = base64.b64decode(base64_data)
    fd = os.memfd_create(f"alga-bootstrap-{name}", os.MFD_CLOEXEC)
    os.write(fd, content)
    return f"/proc/{os.getpid()}/fd/{fd}"


def _inline_data_in_memory(data: dict[str, Any]) -> dict[str, Any]:
    """The kubeconfig with its inline certificates and keys moved to memory files: given
    `*-data`, the kubernetes client would write them to temp files on disk."""
    data = copy.deepcopy(data)
    entries = [(c, "cluster") for c in data.get("clusters") or []] + [
        (u, "user") for u in data.get("users") or []
    ]
    for entry, section in entries:
        fields = entry.get(section) if isinstance(entry, dict) else None
        if not isinstance(fields, dict):
            continue  # the loader names what is wrong with it
        for key in ("certificate-authority", "client-certificate", "client-key"):
            inline = fields.get(f"{key}-data")
            if not isinstance(inline, str) or not inline:
                continue
            try:
                fields[key] = _memory_file(key, inline)
            except ValueError:  # not base64: leave it to the loader's own error
                continue
            if key == "client-key":
                log.register_secret(inline)
                log.register_secret(base64.b64decode(inline))
            del fields[f"{key}-data"]
    return data


def configuration_from_dict(data: Any, source: str) -> k8s.Configuration:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: kubeconfig must be a YAML mapping")
    data = _inline_data_in_memory(data)
    configuration = k8s.Configuration()
    try:
        load_kube_config_from_dict(data, client_configuration=configuration, persist_config=False)
    except (ConfigException, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{source}: kubeconfig is unusable: {err}") from None
    for value in (configuration.api_key or {}).values():
        log.register_secret(value.removeprefix("Bearer "))
    return configuration


class Kube:
    """The agent's only way to talk to the cluster."""

    def __init__(self, configuration: k8s.Configuration, host: str | None = None) -> None:
        configuration = copy.copy(configuration)  # the caller's settings stay as they were
        if host:
            configuration.host = host
        configuration.retries = False  # tenacity does all retrying
        configuration.connection_pool_maxsize = 16
        self.host = configuration.host
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
        for crd in crds:
            spec = crd["spec"]
            for version in spec["versions"]:
                api_version = f"{spec['group']}/{version['name']}"
                self.kinds[(api_version, spec["names"]["kind"])] = Kind(
                    spec["names"]["plural"], spec.get("scope") == "Namespaced"
                )

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
                if left <= 0:
                    raise DeadlineExceeded(method, path, None)
                timeout = (min(5, left), min(30, left))
            return self._request(method, path, query, body, content_type, timeout)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_retryable),
            wait=_RetryAfterOrBackoff(),
            stop=tenacity.stop_any(
                tenacity.stop_after_attempt(8), tenacity.stop_after_delay(90), past_deadline
            ),
            sleep=interrupt.sleep if not lease else time.sleep,
            before_sleep=_log_retry,
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
        except ApiException as err:
            failure = _describe(err)
            retry_after = (err.headers or {}).get("Retry-After")
            if retry_after and retry_after.isdigit():
                failure.retry_after = int(retry_after)
            raise failure from None
        return json.loads(response.data or b"null")

    def version(self) -> Obj:
        result: Obj = self._call("GET", "/version")
        return result

    def get(self, api_version: str, kind: str, name: str, namespace: str = "") -> Obj | None:
        try:
            found: Obj = self._call("GET", self.path(api_version, kind, namespace, name))
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
    # In dry-run mode every write is sent with dryRun=All: the server validates and answers
    # as if, and nothing changes. `before_write` (the run's Lease) is called before a real
    # write that is not the lease itself.

    def _write(
        self,
        method: str,
        path: str,
        query: Query,
        body: Any,
        content_type: str = "application/json",
        guarded: bool = True,
    ) -> Any:
        if self.dry_run:
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

    def apply(self, obj: Obj) -> Obj:
        """Server-side apply as the agent's field manager, forced as `flux install` does."""
        result: Obj = self._write(
            "PATCH", self.path_of(obj), [("force", "true")], obj, "application/apply-patch+yaml"
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
