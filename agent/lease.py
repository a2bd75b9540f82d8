"""The run's Lease: one writer at a time (another control-plane node, or a field tech while
the boot-time run is active). Taken on the first write, so a run that writes nothing never
touches it; a holder that stops renewing is taken over after the lease's duration."""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import uuid
from typing import Any

import tenacity

from agent import log
from agent.errors import BootstrapError
from agent.kube import ApiError, Kube

_log = log.get("lease")
Obj = dict[str, Any]
MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


class LeaseWaited(Exception):  # a signal to the run, not an error
    """The run waited for another holder: what it read before may be stale."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _format(moment: dt.datetime) -> str:
    return moment.strftime(MICRO_TIME)


def _parse(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    for fmt in (MICRO_TIME, "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            continue
    return None


def active_holder(lease: Obj | None) -> str | None:
    """Who holds the lease now: a holder that renewed it within its duration, else None."""
    spec = (lease or {}).get("spec", {})
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    if not spec.get("holderIdentity") or renewed is None:
        return None
    expired = (_now() - renewed).total_seconds() > spec.get("leaseDurationSeconds", 0)
    return None if expired else str(spec["holderIdentity"])


class RunLease:
    def __init__(
        self, kube: Kube, namespace: str, name: str, duration_s: int, deadline_in_s: float
    ) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.duration_s = duration_s
        self.deadline_in_s = deadline_in_s
        self.identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started = _now()  # reads from here on may be stale if another run writes
        self.held = False
        self._live: Obj | None = None  # the lease as last written by this run
        self.stale = False  # another run wrote while this pass was reading: look again
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def before_write(self) -> None:
        """The Kube client's write hook: hold the lease before the first write."""
        with self._lock:
            if not self.held:
                self._take()
            if self.stale:
                raise LeaseWaited(self.identity)

    def _take(self) -> None:
        self.stale = self._acquire()
        self.held = True
        threading.Thread(target=self._renew, name="lease-renew", daemon=True).start()

    def _lease(self, live: Obj | None, transitions: int) -> Obj:
        now = _format(_now())
        obj: Obj = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "alga-bootstrap"},
            },
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.duration_s,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }
        if live is not None:
            obj["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        return obj

    def _create(self) -> bool:
        """Create the lease as ours (and its namespace on a first boot); False if it exists."""
        try:
            created = self.kube.create(self._lease(None, 0), guarded=False)
        except ApiError as err:
            if err.status != 404:  # 404: the namespace is not there yet
                raise
            self.kube.create(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}},
                guarded=False,
            )
            created = self.kube.create(self._lease(None, 0), guarded=False)
        if created is not None:
            self._live = created
        return created is not None

    def _acquire(self) -> bool:
        """Take the lease, waiting while another live run holds it. True when another run
        held it at any time since this run started: what this run read may be stale."""
        waited_for: str | None = None
        others_active = False

        def attempt() -> bool:
            nonlocal waited_for, others_active
            if self._create():
                return True
            live = self.kube.get("coordination.k8s.io/v1", "Lease", self.name, self.namespace)
            if live is None:
                return False  # released and gone meanwhile; look again
            spec = live.get("spec", {})
            holder = spec.get("holderIdentity")
            renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
            duration = spec.get("leaseDurationSeconds", self.duration_s)
            expired = renewed is None or (_now() - renewed).total_seconds() > duration
            # Held, renewed or released (a release stamps renewTime) since this run started.
            if renewed is not None and renewed >= self.started and holder != self.identity:
                others_active = True
            if holder and holder != self.identity and not expired:
                if waited_for != holder:
                    _log.info(
                        "another run holds the lease; waiting",
                        holder=holder,
                        lease=f"{self.namespace}/{self.name}",
                        duration_s=duration,
                    )
                waited_for = holder
                return False
            if holder and holder != self.identity:
                _log.warning(
                    "taking over the lease of a run that stopped renewing it",
                    holder=holder,
                    last_renewed=spec.get("renewTime"),
                )
                waited_for = waited_for or holder
            try:
                self._live = self.kube.replace(
                    self._lease(live, spec.get("leaseTransitions", 0) + 1), guarded=False
                )
            except ApiError as err:
                if err.status == 409:
                    return False  # someone else took it first; look again
                raise
            return True

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda taken: not taken),
            wait=tenacity.wait_fixed(0.5),
            stop=tenacity.stop_after_delay(max(self.deadline_in_s, 1)),
            retry_error_callback=lambda _: False,
        )
        if not retrying(attempt):
            raise BootstrapError(
                f"another run kept Lease {self.namespace}/{self.name} "
                f"(holder {waited_for}) past the deadline; re-run later"
            )
        _log.info("lease acquired", lease=f"{self.namespace}/{self.name}", identity=self.identity)
        return others_active or waited_for is not None

    def _renew(self) -> None:
        while not self._stop.wait(max(self.duration_s / 3, 0.5)):
            with self._lock:
                if not self.held or self._live is None:
                    return
                lease = self._live
                lease["spec"]["renewTime"] = _format(_now())
                try:
                    self._live = self.kube.replace(lease, guarded=False)
                except ApiError as err:
                    if err.status == 409:  # changed by someone else: not ours any more
                        _log.warning("lost the lease", lease=f"{self.namespace}/{self.name}")
                        return
                    _log.warning("could not renew the lease", error=str(err))
                except BootstrapError as err:
                    _log.warning("could not renew the lease", error=str(err))

    def release(self) -> None:
        """Hand the lease back (it is never deleted: the agent deletes nothing)."""
        self._stop.set()
        with self._lock:
            if not self.held or self._live is None:
                return
            self.held = False
            lease = self._live
        lease["spec"].pop("holderIdentity", None)
        lease["spec"]["leaseDurationSeconds"] = 1
        lease["spec"]["renewTime"] = _format(_now())  # when this run stopped writing
        try:
            self.kube.replace(lease, guarded=False)  # 409: someone took it over meanwhile
        except BootstrapError as err:
            _log.warning("could not release the lease; it expires by itself", error=str(err))
