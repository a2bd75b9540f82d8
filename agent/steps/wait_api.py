"""Step 1: wait until one of the API endpoints answers /readyz."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import tenacity

from agent import interrupt, log
from agent.errors import BootstrapError
from agent.kube import RetryAfterOrBackoff, is_certificate_problem, tls_failure

_log = log.get("wait-api")


class NotReady(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def wait_for_api(
    endpoints: list[str],
    verify: str | bool,
    cert: tuple[str, str] | None,
    headers: dict[str, str],
    deadline: float,
    when_slow: Callable[[], None] | None = None,
    slow_after_s: float = 0.0,
    source: str = "the kubeconfig",
) -> str:
    """Probe each endpoint's /readyz in order until one says ok; return that endpoint.
    Refused connections, TLS errors while the server starts, 5xx and 429 are expected.
    `when_slow` (etcd bootstrap) runs once if the API is still down after `slow_after_s`."""
    started = time.monotonic()
    slow_handled = when_slow is None
    with httpx.Client(verify=verify, cert=cert, headers=headers, timeout=3.0) as client:

        def probe() -> str:
            failures = []
            retry_after = None
            for endpoint in endpoints:
                interrupt.check()
                left = max(deadline - time.monotonic(), 0.1)  # a probe ends by the deadline
                try:
                    response = client.get(f"{endpoint}/readyz", timeout=min(3.0, left))
                except httpx.HTTPError as err:
                    if is_certificate_problem(str(err)):  # retrying cannot fix a certificate
                        raise BootstrapError(tls_failure(endpoint, str(err))) from None
                    failures.append(f"{endpoint}: {type(err).__name__}: {err}"[:200])
                    continue
                if response.status_code == 200:
                    return endpoint
                # /readyz is public, but a server rejects bad credentials on every path
                # (kubernetes pkg/kubeapiserver/authenticator/config.go, New:
                # union.NewFailOnError before the anonymous authenticator).
                if response.status_code in (401, 403):
                    raise BootstrapError(
                        "the API server rejected the credentials (token or client "
                        f"certificate) from {source}: {endpoint}/readyz answered HTTP "
                        f"{response.status_code}; renew them (expired certificate or token?) "
                        "or use the cluster's admin kubeconfig"
                    )
                header = response.headers.get("Retry-After", "")
                if header.isdigit():
                    retry_after = float(header)
                failures.append(f"{endpoint}: HTTP {response.status_code}")
            raise NotReady("; ".join(failures), retry_after)

        def progress(state: tenacity.RetryCallState) -> None:
            nonlocal slow_handled
            if not slow_handled and time.monotonic() - started >= slow_after_s:
                slow_handled = True
                assert when_slow is not None
                when_slow()
            exc = state.outcome.exception() if state.outcome else None
            _log.info(
                "API not ready yet",
                attempt=state.attempt_number,
                waited_s=round(time.monotonic() - started, 1),
                deadline_in_s=round(deadline - time.monotonic()),
                detail=str(exc),
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(NotReady),
            wait=RetryAfterOrBackoff(multiplier=0.25, max_s=10),
            stop=tenacity.stop_before_delay(max(deadline - time.monotonic(), 0.1)),
            before_sleep=progress,
            sleep=interrupt.sleep,
            reraise=True,
        )
        try:
            endpoint: str = retrying(probe)
        except NotReady as err:
            raise BootstrapError(
                f"the Kubernetes API did not become ready within "
                f"{round(time.monotonic() - started)}s ({err}); it is "
                "retried on the next run"
            ) from None
    _log.info("API ready", endpoint=endpoint, waited_s=round(time.monotonic() - started, 2))
    return endpoint
