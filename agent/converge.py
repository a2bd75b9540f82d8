"""Shared mechanics of the steps: bring objects to their desired state, wait for conditions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tenacity

from agent.drift import differences
from agent.errors import BootstrapError
from agent.kube import Kube

Obj = dict[str, Any]
T = TypeVar("T")
PARALLEL_REQUESTS = 8


@dataclass
class StepResult:
    name: str
    changes: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def outcome(self) -> str:
        return "changed" if self.changes else "unchanged"


def describe(obj: Obj) -> str:
    meta = obj["metadata"]
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj['kind']}/{where}{meta['name']}"


def parallel(func: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
    items = list(items)
    if len(items) <= 1:
        return [func(item) for item in items]
    with ThreadPoolExecutor(min(PARALLEL_REQUESTS, len(items))) as pool:
        return list(pool.map(func, items))


def ensure(kube: Kube, objects: list[Obj], log: Any,
           live: list[Obj | None] | None = None) -> list[str]:
    """Apply each object whose live copy is missing or differs; independent objects go
    concurrently. Returns what was created or updated."""
    if live is None:
        live = parallel(kube.get_like, objects)
    todo: list[tuple[Obj, str, list[str]]] = []
    for desired, current in zip(objects, live, strict=True):
        if current is None:
            todo.append((desired, "created", []))
        else:
            drifted = differences(desired, current)
            if drifted:
                todo.append((desired, "updated", drifted))

    def apply(item: tuple[Obj, str, list[str]]) -> str:
        desired, verb, drifted = item
        kube.apply(desired)
        # Field paths only: values (which may be secret) are never logged.
        log.info(f"{verb} {describe(desired)}", fields=drifted[:10] or None)
        return f"{verb} {describe(desired)}"

    return parallel(apply, todo)


def wait_until(what: str, check: Callable[[], T | None], deadline: float, log: Any,
               interval: float = 1.0) -> T:
    """Poll `check` until it returns something, or fail when the run's deadline passes."""
    started = time.monotonic()

    def note(state: tenacity.RetryCallState) -> None:
        if state.attempt_number % 10 == 0:
            log.info(f"still waiting for {what}", waited_s=round(time.monotonic() - started),
                     deadline_in_s=round(deadline - time.monotonic()))

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda result: result is None),
        wait=tenacity.wait_fixed(interval),
        stop=tenacity.stop_before_delay(max(deadline - time.monotonic(), 0.1)),
        before_sleep=note,
        retry_error_callback=lambda _: None,
    )
    result = retrying(check)
    if result is None:
        raise BootstrapError(f"timed out waiting for {what} after "
                             f"{round(time.monotonic() - started)}s; re-run with a longer "
                             "--timeout, or check the cluster (alga-bootstrap status)")
    return result


def condition(obj: Obj | None, kind: str) -> Obj | None:
    for cond in (obj or {}).get("status", {}).get("conditions", []):
        if cond.get("type") == kind:
            found: Obj = cond
            return found
    return None


def is_true(obj: Obj | None, kind: str) -> bool:
    cond = condition(obj, kind)
    return cond is not None and cond.get("status") == "True"


def observed_current(obj: Obj) -> bool:
    return bool(obj.get("status", {}).get("observedGeneration", -1)
                >= obj["metadata"].get("generation", 0))
