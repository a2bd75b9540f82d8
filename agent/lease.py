"""The run's Lease: one writer at a time (another control-plane node, or a field tech while
the boot-time run is active). Taken on the first write, so a run that writes nothing never
touches it. A holder that stops renewing is taken over after the lease's duration, judged by
this host's clock; one that died on this host, at once."""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import tenacity

from agent import interrupt, log
from agent.errors import BootstrapError
from agent.kube import ApiError, DeadlineExceeded, Kube, StopAtDeadline

_log = log.get("lease")
Obj = dict[str, Any]
MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
LEASE_API = "coordination.k8s.io/v1"


class LeaseWaited(Exception):  # a signal to the run, not an error
    """The run waited for another holder: what it read before may be stale."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "unknown"


def _died_here(holder: str) -> bool:
    """True when the holder's identity (host-pid-boot-random) names a run on this host whose
    process is gone: an earlier boot, or a pid that is no longer running (or is this run's
    own: in a container every run may get the same pid)."""
    parts = holder.rsplit("-", 3)
    if len(parts) != 4 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    _, pid, boot, _ = parts
    if boot != _boot_id() or int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists, as another user's process
    return False


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
    def __init__(self, kube: Kube, namespace: Obj, name: str, duration_s: int) -> None:
        """`namespace`: the Namespace object it lives in, as the run would create it."""
        self.kube, self.name = kube, name
        self.namespace, self._namespace = namespace["metadata"]["name"], namespace
        self.duration_s = duration_s
        # Says where the run lives, so that a run on the same host can tell it died.
        self.identity = f"{socket.gethostname()}-{os.getpid()}-{_boot_id()}-{uuid.uuid4().hex[:6]}"
        self.started = _now()  # reads from here on may be stale if another run writes
        self.held = False
        self._live: Obj | None = None  # the lease as last written by this run
        self.stale = False  # another run wrote while this pass was reading: look again
        # Every later write fails with this: the lease was never had (waited until the
        # deadline) or was lost to another run.
        self._refused: BootstrapError | None = None
        self._renewed = 0.0  # time.monotonic() when this run last took or renewed the lease
        self._behind: BootstrapError | None = None  # an inline renewal failed: no writes
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def before_write(self) -> None:
        """The Kube client's write hook: hold the lease before the first write, and one
        renewed within two thirds of its duration before every other. Renewals fall behind
        only when the run was paused (a suspended VM) or the API was slow: another run may
        have taken the lease over meanwhile, and a write must not follow before that is
        known (client-go's leader election stops leading after its RenewDeadline)."""
        with self._lock:
            if self._refused is not None:
                raise self._refused
            if not self.held:
                self._take()
            elif time.monotonic() - self._renewed > self.duration_s * 2 / 3:
                self._renew_before_write()
            if self.stale:
                raise LeaseWaited(self.identity)

    def _renew_before_write(self) -> None:
        """Renew inline; once that failed, every later write fails at once (the writes of
        one apply run side by side: each must not retry the renewal in turn) until the
        renew thread succeeds."""
        if self._behind is None:
            behind_s = round(time.monotonic() - self._renewed)
            try:
                self._renew_now()
                return
            except BootstrapError as err:
                if self._refused is not None:
                    raise
                self._behind = BootstrapError(
                    f"could not renew Lease {self.namespace}/{self.name} before writing (last "
                    f"renewed {behind_s}s ago; another run may take it over): {err}; re-run"
                )
        raise self._behind

    def _take(self) -> None:
        self.stale = self._acquire()
        self._renewed = time.monotonic()
        self.held = True
        threading.Thread(target=self._renew, name="lease-renew", daemon=True).start()

    def _lease(self, live: Obj | None, transitions: int) -> Obj:
        now = _format(_now())
        obj: Obj = {
            "apiVersion": LEASE_API,
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
            # As the site's namespaces are created: the run's later compare finds it as is.
            self.kube.create(self._namespace, guarded=False)
            created = self.kube.create(self._lease(None, 0), guarded=False)
        if created is not None:
            self._live = created
        return created is not None

    def _acquire(self) -> bool:
        """Take the lease, waiting while another live run holds it. True when another run
        held it at any time since this run started: what this run read may be stale."""
        waited_for: str | None = None
        others_active = False
        may_be_missing = True  # POST only when the lease may not exist, not on every look
        observed_version: str | None = None
        observed_at = 0.0  # time.monotonic() when this run saw the lease change last

        def attempt() -> bool:
            nonlocal waited_for, others_active, may_be_missing, observed_version, observed_at
            interrupt.check()
            if may_be_missing and self._create():
                return True
            try:
                live = self.kube.get(LEASE_API, "Lease", self.name, self.namespace)
            except DeadlineExceeded as late:
                if late.last is not None or waited_for is None:
                    raise  # the API failed, or this run never waited: say what happened
                return False  # a sleep ran past the deadline: the wait for the holder ends
            may_be_missing = live is None
            if live is None:
                return False  # released and gone meanwhile; look again
            spec = live.get("spec", {})
            holder = spec.get("holderIdentity")
            renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
            duration = spec.get("leaseDurationSeconds", self.duration_s)
            # As client-go's leader election (tools/leaderelection/leaderelection.go,
            # tryAcquireOrRenew with setObservedRecord and isLeaseValid): a holder is live
            # until the lease's duration has passed, on this host's clock, since this run
            # last saw the record change. The holder's renewTime comes from another clock: a
            # skewed one (say, in the future) must neither block nor hasten a take-over.
            if live["metadata"].get("resourceVersion") != observed_version:
                observed_version = live["metadata"].get("resourceVersion")
                observed_at = time.monotonic()
            expired = time.monotonic() > observed_at + duration
            # Held, renewed or released (a release stamps renewTime) since this run started.
            if renewed is not None and renewed >= self.started and holder != self.identity:
                others_active = True
            died_here = bool(holder) and holder != self.identity and _died_here(holder)
            if holder and holder != self.identity and not expired and not died_here:
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
                    "taking over the lease of a run that died on this host"
                    if died_here
                    else "taking over the lease of a run that stopped renewing it",
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
            # Polite: a run that waits minutes looks at most every 2 s.
            wait=tenacity.wait_exponential(multiplier=0.1, max=2),
            stop=StopAtDeadline(self.kube.deadline),
            sleep=interrupt.sleep,
            retry_error_callback=lambda _: False,
        )
        if not retrying(attempt):
            self._refused = BootstrapError(
                f"another run kept Lease {self.namespace}/{self.name} "
                f"(holder {waited_for}) past the deadline; re-run later"
            )
            raise self._refused
        _log.info("lease acquired", lease=f"{self.namespace}/{self.name}", identity=self.identity)
        return others_active or waited_for is not None

    def _renew(self) -> None:
        while not self._stop.wait(max(self.duration_s / 3, 0.5)):
            with self._lock:
                if not self.held or self._live is None:
                    return
                try:
                    self._renew_now()
                except BootstrapError as err:
                    if self._refused is not None:
                        return
                    _log.warning("could not renew the lease", error=str(err))

    def _renew_now(self) -> None:
        """Renew the lease (holding self._lock). As client-go's tryAcquireOrRenew
        (tools/leaderelection/leaderelection.go): when the quick update conflicts, read the
        lease. Still this run's (an earlier answer was lost and the write retried, or
        someone edited it): renew that. Another holder's, or gone: the lease is lost, and
        as client-go then stops leading (renew returns, Run calls OnStoppedLeading, and
        release writes only while IsLeader), this run writes no more and leaves it alone."""
        assert self._live is not None
        lease = self._live
        lease["spec"]["renewTime"] = _format(_now())
        sent = time.monotonic()  # a late answer must not extend the lease's term here
        try:
            self._live = self.kube.replace(lease, guarded=False)
        except ApiError as err:
            if err.status != 409:
                raise
            live = self.kube.get(LEASE_API, "Lease", self.name, self.namespace, lease=True)
            holder = ((live or {}).get("spec") or {}).get("holderIdentity")
            if live is None or holder != self.identity:
                raise self._lose(str(holder or "none")) from None
            live["spec"]["renewTime"] = _format(_now())
            sent = time.monotonic()
            self._live = self.kube.replace(live, guarded=False)
        self._renewed, self._behind = sent, None

    def _lose(self, holder: str) -> BootstrapError:
        lease = f"{self.namespace}/{self.name}"
        _log.warning("lost the lease", lease=lease, holder=holder)
        self._refused = BootstrapError(
            f"another run (holder {holder}) took over Lease {lease} while this run held it, "
            "because this run did not renew it in time; this run stopped writing; re-run"
        )
        self._live = None
        return self._refused

    def release(self) -> None:
        """Hand the lease back (it is never deleted: the agent deletes nothing)."""
        self._stop.set()
        with self._lock:
            if self._live is None:  # never taken (or taken and not known: see _died_here)
                return
            self.held = False
            lease, self._live = self._live, None
        self.kube.allow_cleanup(1.0)  # also after the deadline or a stop
        lease["spec"].pop("holderIdentity", None)
        lease["spec"]["leaseDurationSeconds"] = 1
        lease["spec"]["renewTime"] = _format(_now())  # when this run stopped writing
        try:
            self.kube.replace(lease, guarded=False)  # 409: someone took it over meanwhile
        except BootstrapError as err:
            _log.warning("could not release the lease; it expires by itself", error=str(err))
