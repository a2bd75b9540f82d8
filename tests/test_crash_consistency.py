"""Crash consistency (issue 11): a run killed right after its k-th write, for every k of a
fresh run, is completed by the next run, which keeps every generated value first written,
never writes a second value for a generated key, and never deletes anything."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubesim import KubeSim
from tests.conftest import BUNDLE, REPO, Result, agent_env, fast_run_args
from tests.test_alga_preset import with_upstream

WORKERS = 3  # concurrent cases, each its own simulator and agent process
CONFIG = {
    "preset": "alga-talos-single-node",  # the appliance: storage, generated secrets, ConfigMaps
    "flux": {"manifests": str(BUNDLE)},
    "lease": {"durationSeconds": 1},  # a killed run's lease expires quickly
}
GENERATED = {("appliance-system", "appliance-status-auth"), ("msp", "alga-psa-shared")}


class ForkServer:
    """Agent processes without the import time (tests/forkserver.py): one at a time."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=agent_env(),
            cwd=REPO,
        )

    def run(self, argv: list[str], started: Callable[[int], None]) -> Result:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        out, err = self.work / "stdout", self.work / "stderr"
        command = {"argv": argv, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        started(json.loads(self.proc.stdout.readline())["pid"])
        code = json.loads(self.proc.stdout.readline())["code"]
        return Result(code, out.read_text(), err.read_text())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@dataclass
class KillAfter:
    """kubesim write hooks: SIGKILL the agent once its k-th write is answered; refuse any
    write after it (one already on its way from another thread)."""

    k: int | None  # None: never kill, only record
    pidfd: int = -1
    started: threading.Event = field(default_factory=threading.Event)
    written: list[tuple[str, str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def before(self, verb: str, path: str, body: bytes) -> bool:
        with self.lock:
            if self.k is not None and len(self.written) >= self.k:
                self._kill()
                return False
            self.written.append((verb, path, body))
            return True

    def after(self, _: dict[str, Any]) -> None:
        with self.lock:
            if self.k is not None and len(self.written) >= self.k:
                self._kill()

    def _kill(self) -> None:  # under self.lock
        assert self.started.wait(10)
        if self.pidfd < 0:  # this run is over: a late write of it must not kill the next
            return
        # A pidfd names this very process even after it ended, so no other is ever hit.
        with contextlib.suppress(ProcessLookupError):  # it ended (or was killed) already
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def run(self, sim: KubeSim, config: Path, agents: ForkServer) -> Result:
        sim.before_write, sim.after_write = self.before, self.after

        def started(pid: int) -> None:
            self.pidfd = os.pidfd_open(pid)
            self.started.set()

        try:
            return agents.run(fast_run_args(config, sim.kubeconfig_path), started)
        finally:
            # Closed under the lock, so no late hook sends to the number once it is reused
            # (the next run's pidfd gets the same one).
            with self.lock:
                os.close(self.pidfd)
                self.pidfd = -1


def generated_values(writes: list[tuple[str, str, bytes]]) -> dict[tuple[str, str, str], set[str]]:
    """Every value written for a key of a generated secret: creates and patches alike."""
    values: dict[tuple[str, str, str], set[str]] = {}
    for _, path, body in writes:
        parts = path.strip("/").split("/")  # api/v1/namespaces/<ns>/secrets[/<name>]
        if len(parts) < 5 or parts[4] != "secrets":
            continue
        obj = yaml.safe_load(body) or {}
        name = parts[5] if len(parts) > 5 else obj.get("metadata", {}).get("name")
        if (parts[3], name) not in GENERATED:
            continue
        for key, value in (obj.get("data") or {}).items():
            values.setdefault((parts[3], name, key), set()).add(value)
    return values


def kill_and_rerun(k: int | None, config: Path, agents: ForkServer) -> dict[str, Any]:
    """One case: a run killed after its k-th write, then a run to completion."""
    with KubeSim(
        kubeconfig_out=agents.work / f"k{k}.kubeconfig", controllers=True, controller_delay=0.05
    ) as sim:
        with_upstream(sim)  # Flux applies upstream's objects: the run checks its patches took
        killed, rerun = KillAfter(k), KillAfter(None)
        first = killed.run(sim, config, agents)
        second = rerun.run(sim, config, agents)
        secrets = {
            (ns, name): sim.get("v1", "Secret", name, ns).get("data", {})
            for ns, name in GENERATED
            if sim.exists("v1", "Secret", name, ns)
        }
        return {
            "k": k,
            "first": first,
            "second": second,
            "writes": [killed.written, rerun.written],
            "deletes": [r for r in sim.requests if r["verb"] == "delete"],
            "secrets": secrets,
        }


def test_a_run_killed_after_any_write_is_completed_without_a_second_value(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    idle: queue.Queue[ForkServer] = queue.Queue()
    for worker in range(WORKERS):
        (tmp_path / str(worker)).mkdir()
        idle.put(ForkServer(tmp_path / str(worker)))

    def case(k: int | None) -> dict[str, Any]:
        agents = idle.get()
        try:
            return kill_and_rerun(k, config, agents)
        finally:
            idle.put(agents)

    try:
        fresh = case(None)  # how many writes a fresh run makes
        assert fresh["first"].code == 0, fresh["first"].stderr
        total = len(fresh["writes"][0])
        assert total > 40  # Flux, the site, the sync, the record, the lease
        with ThreadPoolExecutor(WORKERS) as pool:
            cases = list(pool.map(case, range(1, total + 1)))
    finally:
        while not idle.empty():
            idle.get().close()

    killed = 0
    for outcome in cases:
        k, first, second = outcome["k"], outcome["first"], outcome["second"]
        where = f"killed after write {k}: {outcome['writes'][0][-1][:2]}"
        # It really stopped there: killed, unless that write was its last (then it may have
        # exited first) or this run needed fewer writes (lease renewals vary).
        assert len(outcome["writes"][0]) <= k, where
        assert first.code in (-signal.SIGKILL, 0), where
        killed += first.code == -signal.SIGKILL
        assert second.code == 0, f"{where}\n{second.stderr}"
        last = second.events()[-1]
        assert last["event"] in ("done", "nothing to do"), where
        assert outcome["deletes"] == [], where
        # No generated key was ever written with two values, and the value first written
        # is the one the cluster holds.
        written = generated_values(outcome["writes"][0] + outcome["writes"][1])
        assert len(written) == 2, where  # token, ALGA_AUTH_KEY
        for (ns, name, key), values in written.items():
            assert len(values) == 1, f"{where}: {ns}/{name} {key} written twice"
            assert outcome["secrets"][(ns, name)][key] == next(iter(values)), where
    assert killed >= total - 3, f"only {killed} of {total} runs were killed"
