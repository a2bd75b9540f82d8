"""Shared mechanics of the steps: bring objects to their desired state, wait for conditions."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tenacity

from agent import interrupt
from agent.drift import differences
from agent.errors import BootstrapError
from agent.kube import ApiError, Kube

Obj = dict[str, Any]
T = TypeVar("T")
PARALLEL_REQUESTS = 16
PROGRESS_EVERY_S = 10.0


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


def fetch_live(kube: Kube, objects: list[Obj]) -> list[Obj | None]:
    """The live copy of each object (None where missing): one list request per kind and
    namespace holding several of them, a get for the rest, all concurrently."""
    groups: dict[tuple[str, str, str], list[Obj]] = {}
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace", ""))
        groups.setdefault(key, []).append(obj)

    def read(group: tuple[tuple[str, str, str], list[Obj]]) -> dict[str, Obj]:
        (api_version, kind, namespace), members = group
        if len(members) == 1:
            found = kube.get_like(members[0])
            return {found["metadata"]["name"]: found} if found else {}
        return {o["metadata"]["name"]: o for o in kube.list(api_version, kind, namespace)}

    by_group = dict(zip(groups, parallel(read, groups.items()), strict=True))
    return [
        by_group[(o["apiVersion"], o["kind"], o["metadata"].get("namespace", ""))].get(
            o["metadata"]["name"]
        )
        for o in objects
    ]


def ensure(
    kube: Kube, objects: list[Obj], log: Any, live: list[Obj | None] | None = None
) -> list[str]:
    """Apply each object whose live copy is missing or differs; independent objects go
    concurrently. Returns what was created or updated; in a dry run, what would be, and
    what would be left alone."""
    if live is None:
        live = fetch_live(kube, objects)
    todo: list[tuple[Obj, str, list[str]]] = []
    for desired, current in zip(objects, live, strict=True):
        if current is None:
            todo.append((desired, "create", []))
        else:
            drifted = differences(desired, current)
            if drifted:
                todo.append((desired, "update", drifted))

    def apply(item: tuple[Obj, str, list[str]]) -> str:
        desired, verb, drifted = item
        note = ""
        try:
            kube.apply(desired)
        except ApiError as err:
            # A dry run cannot validate what needs a type or namespace not created yet.
            if not (kube.dry_run and err.status == 404):
                raise
            note = " (not validated: it needs objects the run creates first)"
        # Field paths only: values (which may be secret) are never logged.
        fields = f": {', '.join(drifted[:10])}" if drifted else ""
        if kube.dry_run:
            return f"would {verb} {describe(desired)}{fields}{note}"
        log.info(f"{verb}d {describe(desired)}", **({"fields": drifted[:10]} if drifted else {}))
        return f"{verb}d {describe(desired)}"

    changes = parallel(apply, todo)
    if kube.dry_run:
        todo_ids = {id(d) for d, _, _ in todo}
        changes += [f"unchanged {describe(o)}" for o in objects if id(o) not in todo_ids]
    return changes


def wait_until(
    what: str,
    check: Callable[[], T | None],
    deadline: float,
    log: Any,
    interval: float = 1.0,
    progress: Callable[[], dict[str, object]] | None = None,
) -> T:
    """Poll `check` until it returns something, or fail when the run's deadline passes.
    Most waits are short: the first polls come 0.05 s apart, then each 1.3 times later than
    the one before, up to every `interval` (polite to a server during a long wait).
    `progress` adds what the awaited controller says to each progress line."""
    started = time.monotonic()

    last_note = started

    def note(_: tenacity.RetryCallState) -> None:
        nonlocal last_note
        if time.monotonic() - last_note >= PROGRESS_EVERY_S:
            last_note = time.monotonic()
            log.info(
                f"still waiting for {what}",
                waited_s=round(time.monotonic() - started),
                deadline_in_s=round(deadline - time.monotonic()),
                **(progress() if progress else {}),
            )

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda result: result is None),
        wait=tenacity.wait_exponential(multiplier=0.05, exp_base=1.3, max=interval),
        stop=tenacity.stop_before_delay(max(deadline - time.monotonic(), 0.1)),
        before_sleep=note,
        sleep=interrupt.sleep,
        retry_error_callback=lambda _: None,
    )
    result = retrying(check)
    if result is None:
        raise BootstrapError(
            f"timed out waiting for {what} after "
            f"{round(time.monotonic() - started)}s; re-run with a longer "
            "--timeout, or check the cluster (alga-bootstrap status)"
        )
    return result


def seconds_since(timestamp: str) -> float:
    """Seconds from a Kubernetes timestamp (RFC 3339, UTC) to now; never negative."""
    then = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return max((dt.datetime.now(dt.UTC) - then).total_seconds(), 0.0)
