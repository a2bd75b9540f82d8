"""Waits learn of changes from watches (as `kubectl wait` does) and still decide by reading;
Flux's controllers start while the site is seeded, and verify waits for them."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent import log
from agent.apply import wait_until
from agent.errors import BootstrapError
from agent.kube import Kube, Watch, Watched, load_kubeconfig
from kubesim import KubeSim
from tests.conftest import REPO, basic_config, fast_run_args, run_agent
from tests.test_faults import start_agent

_log = log.get("test")
SETTINGS = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "settings", "namespace": "default"},
    "data": {"state": "starting"},
}


@pytest.fixture
def kube(kubesim: KubeSim) -> Iterator[Kube]:
    client = Kube(load_kubeconfig([kubesim.kubeconfig_path]))
    client.apply(SETTINGS)
    yield client
    client.close()


def set_state_later(kube: Kube, seconds: float, state: str) -> threading.Thread:
    def change() -> None:
        time.sleep(seconds)
        kube.apply({**SETTINGS, "data": {"state": state}})

    thread = threading.Thread(target=change)
    thread.start()
    return thread


def state(kube: Kube) -> str:
    found = kube.get("v1", "ConfigMap", "settings", "default")
    assert found is not None
    return str(found["data"]["state"])


def test_a_change_ends_the_sleep_and_existing_objects_do_not(kubesim: KubeSim, kube: Kube) -> None:
    """In the watches' first seconds a change ends the sleep at once; later, once half of
    it has passed (polite to a status that changes all the time)."""
    watch = Watch(kube, [Watched.one(SETTINGS)])
    try:

        def change_once_watched() -> None:  # the sleep opens the watch; a change before is lost
            deadline = time.monotonic() + 30
            while "watch" not in [r["verb"] for r in kubesim.requests]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.1)
            kube.apply({**SETTINGS, "data": {"state": "ready"}})

        changer = threading.Thread(target=change_once_watched)
        changer.start()
        started = time.monotonic()
        watch.sleep(4.0)
        assert 0.1 <= time.monotonic() - started < 2.0
        changer.join()
        started = time.monotonic()
        watch.sleep(2.0)  # the watch opened with an ADDED event for what exists: no wake-up
        assert time.monotonic() - started >= 1.95
        changer = set_state_later(kube, 0.3, "changed again")
        started = time.monotonic()
        watch.sleep(4.0)
        assert 1.95 <= time.monotonic() - started < 3.8  # not the full 4 s
        changer.join()
    finally:
        watch.stop()


def test_a_watched_wait_answers_a_change_at_once(kubesim: KubeSim, kube: Kube) -> None:
    """After its 17th check a wait sleeps about 3.3 s (0.05 s, then 1.3 times longer each
    time). The object changes 0.1 s after that check: the watch ends the sleep at its half,
    so the next check comes long before the next poll would have (with room for a busy
    machine between the two)."""
    checks: list[float] = []
    changer: list[threading.Thread] = []

    def check() -> bool | None:
        checks.append(time.monotonic())
        if len(checks) == 17:
            changer.append(set_state_later(kube, 0.1, "ready"))
        return True if state(kube) == "ready" else None

    found = wait_until(
        "the settings to be ready",
        check,
        time.monotonic() + 60,
        _log,
        interval=5.0,
        wake=Watch(kube, [Watched.one(SETTINGS)]),
    )
    changer[0].join()
    assert found is True
    assert len(checks) == 18
    assert checks[17] - checks[16] < 3.0  # the sleep scheduled was 3.33 s
    assert [r["verb"] for r in kubesim.requests].count("watch") == 1


def test_a_wait_still_polls_when_the_server_refuses_the_watch(kubesim: KubeSim, kube: Kube) -> None:
    kubesim.faults.fail_next(1, 500, verb="watch")
    changer = set_state_later(kube, 1.0, "ready")
    found = wait_until(
        "the settings to be ready",
        lambda: True if state(kube) == "ready" else None,
        time.monotonic() + 30,
        _log,
        interval=0.5,
        wake=Watch(kube, [Watched.one(SETTINGS)]),
    )
    changer.join()
    assert found is True
    watches = [r for r in kubesim.requests if r["verb"] == "watch"]
    assert [r["status"] for r in watches] == [500]  # tried once, then polling alone


def test_a_wait_that_needs_no_sleep_opens_no_watch(kubesim: KubeSim, kube: Kube) -> None:
    wait_until(
        "the settings",
        lambda: state(kube),
        time.monotonic() + 30,
        _log,
        wake=Watch(kube, [Watched.one(SETTINGS)]),
    )
    assert "watch" not in [r["verb"] for r in kubesim.requests]


def test_a_look_the_deadline_overtakes_ends_as_the_wait_timing_out(
    kubesim: KubeSim, kube: Kube
) -> None:
    """On a busy machine a sleep can end after the deadline: the next look's read then has
    no time left. The run says which wait timed out, not which read was never sent; a read
    that failed until the deadline is still named (test_faults)."""
    kube.deadline = time.monotonic() + 0.5

    def slow_look() -> str | None:
        time.sleep(0.6)  # the look starts on time; its read would start after the deadline
        return None if state(kube) == "starting" else "ready"

    with pytest.raises(BootstrapError) as raised:
        wait_until("the settings to be ready", slow_look, kube.deadline, _log)
    assert str(raised.value).startswith("timed out waiting for the settings to be ready after")


def test_a_read_that_failed_before_the_deadline_overtook_it_is_named(
    kubesim: KubeSim, kube: Kube, sleeps_past_the_deadline: Any
) -> None:
    """A look whose read failed (HTTP 503) and whose retry's sleep then ran past the
    deadline: the run names that failure, not the wait."""
    kubesim.faults.fail_next(10**6, 503, path="/configmaps/settings")
    kube.deadline = time.monotonic() + 2.0
    sleeps_past_the_deadline(kube)
    with pytest.raises(BootstrapError) as raised:
        wait_until("the settings to be ready", lambda: state(kube), kube.deadline, _log)
    assert "get ConfigMap default/settings: HTTP 503" in str(raised.value), raised.value


def test_the_site_is_seeded_while_flux_starts(kubesim_factory: Any, write_config: Any) -> None:
    """The sync exists before Flux's controllers are Available; verify waits for them."""
    sim = kubesim_factory(controllers=True, controller_delay=3.0)
    result = run_agent(*fast_run_args(write_config(basic_config()), sim.kubeconfig_path))
    assert result.code == 0, result.output
    applies = [r for r in sim.requests if r["verb"] == "apply"]
    last_controller = max(r["ts"] for r in applies if "/deployments/" in r["path"])
    sync_created = min(r["ts"] for r in applies if "/gitrepositories/" in r["path"])
    assert sync_created < last_controller + 3.0  # before any controller could be Available
    events = [(e["step"], e["event"]) for e in result.events()]
    assert events.index(("verify", "Flux running")) > events.index(
        ("create-sync", "created GitRepository/flux-system/appliance")
    )


def test_a_controller_past_its_progress_deadline_fails_the_run_at_once(
    kubesim_factory: Any, write_config: Any, tmp_path: Any
) -> None:
    """kube-controller-manager marks a Deployment that cannot roll out (an image that is
    never pulled) Progressing=False, ProgressDeadlineExceeded: waiting longer cannot help."""
    sim = kubesim_factory(controllers=True, controller_delay=60)
    config = write_config(basic_config())
    agent = start_agent(sim.kubeconfig_path, config, tmp_path, "--timeout", "5m")
    deployments = sim.store.type_for_kind("apps/v1", "Deployment")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = sim.store.list(deployments, "flux-system")[0]
        if any(d["metadata"]["name"] == "kustomize-controller" for d in found):
            break
        time.sleep(0.05)
    live = sim.get("apps/v1", "Deployment", "kustomize-controller", "flux-system")
    message = 'ReplicaSet "kustomize-controller-5d8f" has timed out progressing.'
    sim.store.update(
        deployments,
        "flux-system",
        "kustomize-controller",
        {
            "status": {
                "observedGeneration": live["metadata"]["generation"],
                "conditions": [
                    {
                        "type": "Progressing",
                        "status": "False",
                        "reason": "ProgressDeadlineExceeded",
                        "message": message,
                    }
                ],
            }
        },
        "kube-controller-manager",
        subresource="status",
    )
    result = agent.finish(timeout=30)
    assert result.code == 1, result.output
    assert agent.seconds < 20
    assert result.messages() == [
        "alga-bootstrap: error: Flux did not start: Deployment flux-system/kustomize-controller "
        'ProgressDeadlineExceeded: ReplicaSet "kustomize-controller-5d8f" has timed out '
        "progressing; see `kubectl -n flux-system describe deployment kustomize-controller`, "
        "then re-run"
    ]


def test_a_status_that_changes_all_the_time_is_read_politely(
    kubesim_factory: Any, write_config: Any, tmp_path: Any
) -> None:
    """Past a wait's first seconds a watch wakes a sleep only once half of it has passed: an
    object whose status changes twenty times a second is read at most about twice as often
    as polling would."""
    sim = kubesim_factory(controllers=True, controller_delay=0.05)
    sim.controllers.unreconciled_sources.add(basic_config()["sync"]["url"])
    config = write_config(basic_config())
    agent = start_agent(sim.kubeconfig_path, config, tmp_path, "--timeout", "25s")
    flapping = threading.Event()

    def flap() -> None:
        count = 0
        while agent.proc.poll() is None:
            if sim.exists(
                "source.toolkit.fluxcd.io/v1", "GitRepository", "appliance", "flux-system"
            ):
                count += 1
                sim.store.update(
                    sim.store.type_for_kind("source.toolkit.fluxcd.io/v1", "GitRepository"),
                    "flux-system",
                    "appliance",
                    {"status": {"observedGeneration": -1, "conditions": [_fetching(count)]}},
                    "source-controller",
                    subresource="status",
                )
                flapping.set()
            time.sleep(0.05)

    flapper = threading.Thread(target=flap)
    flapper.start()
    result = agent.finish()
    flapper.join()
    assert flapping.is_set()
    assert result.code == 1 and "timed out waiting for Flux" in result.stderr, result.output
    created = next(
        r["ts"]
        for r in sim.requests
        if r["verb"] == "apply" and r["path"].endswith("/gitrepositories/appliance")
    )
    late = [r for r in sim.requests if r["ts"] > created + 5 and r["verb"] == "get"]
    span = max(r["ts"] for r in late) - created - 5
    assert len(late) / span <= 2.5, (len(late), span)


def _fetching(count: int) -> dict[str, Any]:
    return {
        "type": "Reconciling",
        "status": "True",
        "reason": "Progressing",
        "message": f"building artifact (attempt {count})",
        "lastTransitionTime": "2026-11-29T00:00:00Z",
    }


SLEEPING_WHEN_STOPPED = """
import os, signal, sys, threading, time
from agent import interrupt
interrupt.install()
changed = threading.Event()
threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
try:
    while True:  # Watch.sleep's pattern, at its fastest: wait on `changed`, then clear it
        interrupt.sleep(0.0, woken=changed)
        changed.clear()
except interrupt.Interrupted as stop:
    sys.exit(stop.exit_code)
"""


def test_a_stop_never_deadlocks_a_sleep() -> None:
    """The signal arrives while the main thread holds an Event's lock (inside a wait or a
    clear): the handler must not take it too. Before the handler woke sleeps from a thread
    of its own, about one run in three of this loop hung for good."""
    for _ in range(20):
        proc = subprocess.run(
            [sys.executable, "-c", SLEEPING_WHEN_STOPPED], cwd=REPO, timeout=10, check=False
        )
        assert proc.returncode == 143


def test_a_proxy_in_the_environment_is_used_as_the_client_always_did(
    kubesim: KubeSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubernetes client reads HTTPS_PROXY and friends and asks `requests` whether to
    bypass them: kube_client's stand-in for it loads the real one when called."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    client = Kube(load_kubeconfig([kubesim.kubeconfig_path]))
    try:
        assert type(client._api.rest_client.pool_manager).__name__ == "ProxyManager"
    finally:
        client.close()


def test_a_controller_that_never_becomes_available_is_named_at_the_deadline(
    kubesim_factory: Any, write_config: Any
) -> None:
    sim = kubesim_factory(controllers=True, controller_delay=600)
    result = run_agent(
        *fast_run_args(write_config(basic_config()), sim.kubeconfig_path, "--timeout", "4s")
    )
    assert result.code == 1, result.output
    (message,) = result.messages()
    assert message.startswith(
        "alga-bootstrap: error: timed out waiting for the Flux controllers to be Available "
    )
    assert "(waiting_for: Deployment flux-system/" in message, message
    assert message.endswith(
        "; re-run with a longer --timeout, or check the cluster (alga-bootstrap status)"
    )
