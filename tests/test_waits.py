"""Waits learn of changes from watches (as `kubectl wait` does) and still decide by reading;
Flux's controllers start while the site is seeded, and verify waits for them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent import log
from agent.apply import wait_until
from agent.kube import Kube, Watch, Watched, load_kubeconfig
from kubesim import KubeSim
from tests.conftest import basic_config, fast_run_args, run_agent
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


def test_a_change_ends_the_sleep_and_existing_objects_do_not(kube: Kube) -> None:
    watch = Watch(kube, [Watched.one(SETTINGS)])
    try:
        started = time.monotonic()
        watch.sleep(1.0)  # the watch opens with an ADDED event for what exists: no wake-up
        assert time.monotonic() - started >= 0.95
        changer = set_state_later(kube, 0.3, "ready")
        started = time.monotonic()
        watch.sleep(30)
        assert time.monotonic() - started < 5
        changer.join()
    finally:
        watch.stop()


def test_a_watched_wait_answers_a_change_at_once(kubesim: KubeSim, kube: Kube) -> None:
    """By its 14th check a wait polls about every 1.5 s (0.05 s, then 1.3 times longer each
    time). The object changes 0.1 s after that check: the watch ends the sleep, so the next
    check comes long before the next poll would have."""
    checks: list[float] = []
    changer: list[threading.Thread] = []

    def check() -> bool | None:
        checks.append(time.monotonic())
        if len(checks) == 14:
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
    assert len(checks) == 15
    assert checks[14] - checks[13] < 0.7  # the sleep scheduled was about 1.5 s
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


def test_the_site_is_seeded_while_flux_starts(kubesim_factory: Any, write_config: Any) -> None:
    """The sync exists before Flux's controllers are Available; verify waits for them."""
    sim = kubesim_factory(controllers=True, controller_delay=1.0)
    result = run_agent(*fast_run_args(write_config(basic_config()), sim.kubeconfig_path))
    assert result.code == 0, result.output
    applies = [r for r in sim.requests if r["verb"] == "apply"]
    last_controller = max(r["ts"] for r in applies if "/deployments/" in r["path"])
    sync_created = min(r["ts"] for r in applies if "/gitrepositories/" in r["path"])
    assert sync_created < last_controller + 1.0  # before any controller could be Available
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
        "alga-bootstrap: error: Flux did not start: Deployment flux-system/kustomize-controller: "
        f"{message} (ProgressDeadlineExceeded); see `kubectl -n flux-system describe "
        "deployments`, then re-run"
    ]
