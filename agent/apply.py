"""The apply engine, in the manner of fluxcd/pkg ssa's ResourceManager: apply one object,
apply many concurrently, apply in stages (definitions first), wait. Each returns a ChangeSet
saying what happened to every object, with the changed field paths (never values).

"Configured or unchanged" is decided as ssa decides it (ssa/manager_apply.go, Apply, and
hasDrifted): a server-side dry-run apply of the object, compared with the live copy, fields
the server owns ignored. A real API server stores its own canonical form (quantities,
defaults, merged lists), so only the server can say whether an apply would change anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import tenacity

from agent import health, interrupt
from agent.errors import BootstrapError
from agent.kube import ApiError, DeadlineExceeded, Kube, Watch, Watched

Obj = dict[str, Any]
T = TypeVar("T")
PARALLEL_REQUESTS = 16
PROGRESS_EVERY_S = 10.0
FIELDS_SHOWN = 10  # in a log or plan line; the record keeps them all

# What the server sets on every write; never a difference (ssa/utils, the fields
# hasDrifted removes before comparing).
_SERVER_METADATA = {"managedFields", "resourceVersion", "generation", "uid", "creationTimestamp"}


class Action(StrEnum):
    """What happened to an object (ssa/changeset.go, Action), and its dry-run forms."""

    CREATED = "created"
    CONFIGURED = "configured"
    TAKEN_OVER = "taken over"  # --force: another tool's ownership marks removed
    UNCHANGED = "unchanged"
    SKIPPED = "skipped"  # deliberately left alone (a prerequisite whose marker exists)
    WOULD_CREATE = "would create"
    WOULD_CONFIGURE = "would configure"
    WOULD_TAKE_OVER = "would take over"

    @property
    def writes(self) -> bool:
        return self not in (Action.UNCHANGED, Action.SKIPPED)

    def planned(self) -> Action:
        """The dry-run form: what a real run would do."""
        return _PLANNED.get(self, self)


_PLANNED = {
    Action.CREATED: Action.WOULD_CREATE,
    Action.CONFIGURED: Action.WOULD_CONFIGURE,
    Action.TAKEN_OVER: Action.WOULD_TAKE_OVER,
}


@dataclass(frozen=True)
class Change:
    """One object's entry in a ChangeSet: field paths only, never values (secrets)."""

    kind: str
    namespace: str
    name: str
    action: Action
    fields: tuple[str, ...] = ()
    note: str = ""

    @classmethod
    def of(cls, obj: Obj, action: Action, fields: Iterable[str] = (), note: str = "") -> Change:
        """The entry for a desired or live object."""
        meta = obj["metadata"]
        return cls(
            obj["kind"], meta.get("namespace", ""), meta["name"], action, tuple(fields), note
        )

    @property
    def subject(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{where}{self.name}"

    def __str__(self) -> str:
        shown = ", ".join(self.fields[:FIELDS_SHOWN])
        more = (
            f" (+{len(self.fields) - FIELDS_SHOWN} more)" if len(self.fields) > FIELDS_SHOWN else ""
        )
        fields = f": {shown}{more}" if self.fields else ""
        note = f" ({self.note})" if self.note else ""
        return f"{self.action} {self.subject}{fields}{note}"

    def as_record(self) -> Obj:
        out: Obj = {"action": str(self.action), "kind": self.kind, "name": self.name}
        if self.namespace:
            out["namespace"] = self.namespace
        if self.fields:
            out["fields"] = list(self.fields)
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class ChangeSet:
    entries: tuple[Change, ...] = ()

    def __add__(self, other: ChangeSet) -> ChangeSet:
        return ChangeSet(self.entries + other.entries)

    def __iter__(self) -> Iterator[Change]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def writes(self) -> tuple[Change, ...]:
        """What was (in a dry run: would be) written."""
        return tuple(c for c in self.entries if c.action.writes)


def done(kube: Kube, action: Action) -> Action:
    """`action` as this connection does it: its dry-run form when every write is a dry run."""
    return action.planned() if kube.dry_run else action


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


def changed_fields(live: Any, applied: Any, path: str = "") -> list[str]:
    """The paths where `applied` (the server's answer to a dry-run apply) differs from
    `live`, both ways; what the server owns (status, resourceVersion, managedFields...) is
    ignored. Lists are compared item by item."""
    if isinstance(live, dict) and isinstance(applied, dict):
        out: list[str] = []
        for key in sorted(set(live) | set(applied)):
            if (path == ".metadata" and key in _SERVER_METADATA) or (not path and key == "status"):
                continue
            out += changed_fields(live.get(key), applied.get(key), f"{path}.{key}")
        return out
    if isinstance(live, list) and isinstance(applied, list) and len(live) == len(applied):
        out = []
        for index, (before, after) in enumerate(zip(live, applied, strict=True)):
            out += changed_fields(before, after, f"{path}[{index}]")
        return out
    return [] if live == applied else [path or "."]


def unmet_fields(desired: Any, live: Any, path: str = "") -> list[str]:
    """Paths where `live` lacks or differs from a field of `desired` as written (fields the
    server adds are not counted). Only a cheap confirmation for the trusted re-run and for
    what Flux applied: a server's canonical form can differ from what was sent, so it never
    decides a write (that is `apply`'s dry run)."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return [path or "."]
        out: list[str] = []
        for key, value in desired.items():
            if (path == ".metadata" and key in _SERVER_METADATA) or (not path and key == "status"):
                continue
            out += unmet_fields(value, live.get(key), f"{path}.{key}")
        return out
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return [path]
        out = []
        for index, (want, have) in enumerate(zip(desired, live, strict=True)):
            out += unmet_fields(want, have, f"{path}[{index}]")
        return out
    return [] if desired == live else [path]


def apply(kube: Kube, obj: Obj, live: Obj | None, log: Any) -> Change:
    """Bring one object to `obj` (server-side apply). A missing object is created without
    a dry run first; an existing one is written only if a dry-run apply says it would change."""
    if live is None:
        return _write(kube, obj, Action.CREATED, [], log)
    try:
        answer = kube.apply(obj, dry_run=True)
    except ApiError as err:
        # A dry run cannot validate what needs a type or namespace not created yet.
        if not (kube.dry_run and err.status == 404):
            raise
        return Change.of(obj, Action.WOULD_CONFIGURE, note=_NOT_VALIDATED)
    fields = changed_fields(live, answer)
    if not fields:
        return Change.of(obj, Action.UNCHANGED)
    if kube.dry_run:  # the dry run just made was the write
        return Change.of(obj, Action.WOULD_CONFIGURE, fields)
    return _write(kube, obj, Action.CONFIGURED, fields, log)


_NOT_VALIDATED = "not validated: it needs objects the run creates first"


def _write(kube: Kube, obj: Obj, action: Action, fields: list[str], log: Any) -> Change:
    try:
        kube.apply(obj)
    except ApiError as err:
        if not (kube.dry_run and err.status == 404):
            raise
        return Change.of(obj, action.planned(), fields, _NOT_VALIDATED)
    change = Change.of(obj, done(kube, action), fields)
    if not kube.dry_run:
        log.info(f"{action} {change.subject}", **({"fields": list(fields)} if fields else {}))
    return change


def apply_all(
    kube: Kube, objects: list[Obj], log: Any, live: list[Obj | None] | None = None
) -> ChangeSet:
    """Apply independent objects concurrently; `live`, if the caller has read them."""
    if live is None:
        live = fetch_live(kube, objects)
    pairs = list(zip(objects, live, strict=True))
    return ChangeSet(tuple(parallel(lambda pair: apply(kube, pair[0], pair[1], log), pairs)))


def apply_staged(
    kube: Kube,
    first: list[Obj],
    rest: list[Obj],
    log: Any,
    deadline: float,
    live_first: list[Obj | None] | None = None,
) -> ChangeSet:
    """Definitions first (CRDs, Namespaces, ClusterRoles), then wait until the CRDs among
    them are Established, then the rest (ssa/manager_apply.go, ApplyAllStaged). In a dry run
    nothing was created, so there is nothing to wait for."""
    changes = apply_all(kube, first, log, live_first)
    crds = {o["metadata"]["name"] for o in first if o["kind"] == "CustomResourceDefinition"}
    if crds and not kube.dry_run:
        wait_until(
            "the CRDs to be Established",
            lambda: _established(kube, crds),
            deadline,
            log,
            wake=Watch(kube, [Watched(health.CRD_API, "CustomResourceDefinition")]),
        )
    return changes + apply_all(kube, rest, log)


def _established(kube: Kube, names: set[str]) -> bool | None:
    return True if names <= health.established_crds(kube).keys() else None


def wait_until(
    what: str,
    check: Callable[[], T | None],
    deadline: float,
    log: Any,
    interval: float = 1.0,
    progress: Callable[[], dict[str, object]] | None = None,
    wake: Watch | None = None,
) -> T:
    """Poll `check` until it returns something, or fail when the run's deadline passes.
    Most waits are short: the first polls come 0.05 s apart, then each 1.3 times later than
    the one before, up to every `interval` (polite to a server during a long wait). `wake`
    (watches on what the check reads) ends a sleep as soon as one of them changes.
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
        sleep=wake.sleep if wake is not None else interrupt.sleep,
        retry_error_callback=lambda _: None,
    )

    def look() -> T | None:
        try:
            return check()
        except DeadlineExceeded as late:
            if late.last is not None:
                raise  # the API failed until the deadline: that is what to report
            # A sleep overran the deadline (a busy machine) before this look could read:
            # the wait itself timed out, and says what it waited for.
            return None

    try:
        result = retrying(look)
    finally:
        if wake is not None:
            wake.stop()
    if result is None:
        waited = time.monotonic() - started
        last_seen = ", ".join(f"{k}: {v}" for k, v in (progress() if progress else {}).items())
        raise BootstrapError(
            f"timed out waiting for {what} after {waited:.0f}s"
            + (f" ({last_seen})" if last_seen else "")
            + "; re-run with a longer --timeout, or check the cluster (alga-bootstrap status)"
        )
    return result
