"""The run's Lease, one request at a time: waits the deadline overtakes, renewals that
conflict, renewals that fell behind. (Whole runs holding and losing it: test_faults.py.)"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.errors import BootstrapError
from agent.kube import Kube, load_kubeconfig
from agent.lease import RunLease
from kubesim import KubeSim

NAMESPACE = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "alga-system"}}
LEASE_API = "coordination.k8s.io/v1"


@pytest.fixture
def kube(kubesim: KubeSim) -> Iterator[Kube]:
    client = Kube(load_kubeconfig([kubesim.kubeconfig_path]))
    yield client
    client.close()


def put_lease(sim: KubeSim, holder: str, **extra: Any) -> None:
    sim.put(NAMESPACE)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    sim.put(
        {
            "apiVersion": LEASE_API,
            "kind": "Lease",
            "metadata": {"name": "alga-bootstrap", "namespace": "alga-system", **extra},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 600, "renewTime": now},
        },
        "other-run",
    )


def holder(sim: KubeSim) -> str | None:
    lease = sim.get(LEASE_API, "Lease", "alga-bootstrap", "alga-system")
    return None if lease is None else lease["spec"].get("holderIdentity")


def test_a_lease_wait_the_deadline_overtakes_says_who_kept_it(
    kubesim: KubeSim, kube: Kube, sleeps_past_the_deadline: Any
) -> None:
    """On a machine too busy to wake the run on time, the sleep between two looks at the
    holder's Lease ends after the deadline: the run says who kept the lease, not which read
    it had no time left to send."""
    put_lease(kubesim, "other-node")
    kube.deadline = time.monotonic() + 2.0
    sleeps_past_the_deadline(kube)
    with pytest.raises(BootstrapError) as raised:
        RunLease(kube, NAMESPACE, "alga-bootstrap", 30).before_write()
    assert str(raised.value) == (
        "another run kept Lease alga-system/alga-bootstrap (holder other-node) past the "
        "deadline; re-run later"
    )


def test_a_first_write_after_the_deadline_blames_no_other_run(kube: Kube) -> None:
    kube.deadline = time.monotonic() - 0.01
    with pytest.raises(BootstrapError) as raised:
        RunLease(kube, NAMESPACE, "alga-bootstrap", 30).before_write()
    assert str(raised.value).startswith(
        "timed out: no time left before the run's deadline (--timeout) to retry POST "
    ), raised.value


def test_a_conflict_on_a_lease_still_ours_is_renewed(kubesim: KubeSim, kube: Kube) -> None:
    """A renewal whose answer was lost is retried and conflicts with itself; someone may
    also edit the Lease (a label). The holder is still this run: it renews, and writes on."""
    lease = RunLease(kube, NAMESPACE, "alga-bootstrap", 600)  # its thread renews in 200 s
    lease.before_write()  # takes it
    put_lease(kubesim, lease.identity, labels={"edited-by": "an-admin"})
    lease._renewed = 0.0  # as if the renewals had fallen behind: the next write renews
    lease.before_write()
    assert holder(kubesim) == lease.identity
    renewals = [r for r in kubesim.requests if r["verb"] == "update" and "/leases/" in r["path"]]
    assert [r["status"] for r in renewals] == [409, 200]
    lease.release()
    assert holder(kubesim) is None


def test_a_write_after_the_renewals_fell_behind_finds_the_lease_taken(
    kubesim: KubeSim, kube: Kube
) -> None:
    """A run paused (a suspended VM) past its lease's duration may have lost it: before its
    next write it renews, finds another holder, and writes no more."""
    lease = RunLease(kube, NAMESPACE, "alga-bootstrap", 600)
    lease.before_write()
    put_lease(kubesim, "other-node")
    lease._renewed = time.monotonic() - 401  # more than two thirds of 600 s ago
    for _ in range(2):  # and on every write after
        with pytest.raises(BootstrapError) as raised:
            lease.before_write()
        assert str(raised.value).startswith(
            "another run (holder other-node) took over Lease alga-system/alga-bootstrap"
        )
    lease.release()
    assert holder(kubesim) == "other-node"  # left alone


def test_a_renewal_that_fails_before_a_write_fails_the_writes_after_it_at_once(
    kubesim: KubeSim, kube: Kube
) -> None:
    """The writes of one apply run side by side: after one failed renewal, the others fail
    at once instead of each retrying the renewal in turn."""
    lease = RunLease(kube, NAMESPACE, "alga-bootstrap", 600)
    lease.before_write()
    kubesim.faults.fail_next(10**6, 422, verb="update", path="/leases/")
    lease._renewed = time.monotonic() - 401
    asked = len(kubesim.requests)
    for _ in range(3):
        with pytest.raises(BootstrapError) as raised:
            lease.before_write()
        assert str(raised.value).startswith(
            "could not renew Lease alga-system/alga-bootstrap before writing (last renewed 401s"
        ), raised.value
    assert len(kubesim.requests) == asked + 1  # one renewal tried, not three
