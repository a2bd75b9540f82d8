"""Promises under faults (issue #11): `--timeout` covers the whole run whatever the API does,
SIGTERM and SIGINT stop a run cleanly, the Lease is judged by this host's clock, polling
stays polite. The slow cases run side by side, each against its own kubesim."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubesim import KubeSim
from tests.conftest import REPO, Result, agent_env, basic_config, fast_run_args

URL = "https://git.example/org/appliance.git"
LEASE_API = "coordination.k8s.io/v1"
LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/alga-system/leases/alga-bootstrap"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]


@dataclass
class Agent:
    """`alga-bootstrap run` in a subprocess with a TMPDIR of its own; its output is read
    as it comes."""

    proc: subprocess.Popen[str]
    tmpdir: Path
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    result: Result | None = None
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        self.lines.extend(self.proc.stderr)  # the run's log
        self.proc.wait()
        self.seconds = time.monotonic() - self.started

    def wait_for_event(self, event: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(
            json.loads(line)["event"] == event
            for line in list(self.lines)
            if line.startswith("{")  # not the one-line error
        ):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.lines
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> Result:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self._reader.join(timeout)
        self.result = Result(self.proc.returncode, out, "".join(self.lines))
        return self.result


def finish_all(agents: list[Agent]) -> None:
    """Wait for every agent at once, so that each one's time is its own."""
    threads = [threading.Thread(target=agent.finish) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def start_agent(kubeconfig: Path, config: Path, tmp: Path, *extra: str) -> Agent:
    tmpdir = tmp / "agent-tmp"
    tmpdir.mkdir(exist_ok=True)
    env = {**agent_env(), "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *fast_run_args(config, kubeconfig, *extra)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return Agent(proc, tmpdir)


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def micro_time(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def put_lease(sim: KubeSim, holder: str, duration: int, renewed: dt.datetime) -> None:
    sim.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "alga-system"}})
    sim.put(
        {
            "apiVersion": LEASE_API,
            "kind": "Lease",
            "metadata": {"name": "alga-bootstrap", "namespace": "alga-system"},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": duration,
                "acquireTime": micro_time(renewed),
                "renewTime": micro_time(renewed),
            },
        },
        "other-run",
    )


def kubectl_lease(sim: KubeSim) -> dict[str, Any] | None:
    """The Lease as kubectl (an independent client) sees it; None when there is none."""
    got = subprocess.run(
        ["kubectl", "-n", "alga-system", "get", "lease", "alga-bootstrap", "-o", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": str(sim.kubeconfig_path)},
        timeout=30,
    )
    if got.returncode != 0:
        assert "NotFound" in got.stderr, got.stderr
        return None
    lease: dict[str, Any] = json.loads(got.stdout)
    return lease


@pytest.fixture
def cli_kubesim(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`kubesim serve` with command-line faults; returns its kubeconfig."""
    procs: list[subprocess.Popen[str]] = []

    def serve(*flags: str) -> Path:
        kubeconfig = tmp_path / f"cli-kubesim-{len(procs)}" / "kubeconfig"
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubesim", "serve", "--kubeconfig-out", str(kubeconfig), *flags],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready ")
        return kubeconfig

    yield serve
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


# -- the deadline matrix ----------------------------------------------------------------------


@dataclass
class Case:
    name: str
    last_line: str  # what the one-line error must say
    sim: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[KubeSim], None] | None = None
    cli_flags: tuple[str, ...] = ()  # a `kubesim serve` with these flags instead


def _renew_forever(sim: KubeSim, stop: threading.Event) -> None:
    # A live holder on another host, renewing every 0.5 s a lease that lasts 6 s: this thread
    # shares the test process with ten kubesims, and on a busy CI machine it may not run for
    # a few seconds. The run must still wait, not take over.
    while not stop.wait(0.5):
        _renew_once(sim)


def _renew_once(sim: KubeSim) -> None:
    put_lease(sim, f"other-node-4242-{BOOT_ID}-abcdef", 6, dt.datetime.now(dt.UTC))


def _hold_and_keep_renewing(sim: KubeSim, stop: threading.Event) -> None:
    """The Lease is held before the run starts (the thread's first renewal, 0.5 s later, lost
    the race to the run's first look on a busy machine), then renewed from a thread."""
    _renew_once(sim)
    threading.Thread(target=_renew_forever, args=(sim, stop), daemon=True).start()


def test_timeout_covers_the_whole_run_under_every_fault(
    kubesim_factory: Callable[..., KubeSim], cli_kubesim: Callable[..., Path], tmp_path: Path
) -> None:
    """`run --timeout 10s` ends by 12 s with exit 1 and a one-line reason, for each fault."""
    stop_renewing = threading.Event()
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    cases = [
        Case("refused", "did not become ready", {"refuse_seconds": 60}),
        Case("readyz-503", "did not become ready", {"readyz_unavailable_seconds": 60}),
        Case(
            "500",
            "InternalError|injected failure \\(500\\)",
            setup=lambda s: s.faults.fail_next(10**6, 500, path="^/api"),
        ),
        Case(
            "503-retry-after-30",
            "deadline",
            setup=lambda s: s.faults.fail_next(10**6, 503, path="^/api", retry_after=30),
        ),
        Case(
            "429-retry-after-30",
            "deadline",
            cli_flags=(
                *("--fail-next", "1000000", "--fail-status", "429"),
                *("--fail-retry-after", "30"),
            ),
        ),
        Case(
            "reset",
            "deadline|Connection aborted|RemoteDisconnected|reset",
            cli_flags=("--reset-next", "1000000", "--fail-path", "^/api"),
        ),
        Case("latency", "deadline|timed out", {"latency_ms": 1500}),
        Case(
            "lease-held",
            "kept Lease alga-system/alga-bootstrap",
            setup=lambda s: _hold_and_keep_renewing(s, stop_renewing),
        ),
        Case(
            "lease-renewed-in-the-future",
            "kept Lease alga-system/alga-bootstrap",
            setup=lambda s: put_lease(s, f"other-node-4242-{BOOT_ID}-abcdef", 30, future),
        ),
        Case(
            "source-never-ready",
            "timed out waiting for Flux to accept flux-system/appliance",
            setup=lambda s: s.controllers.unreconciled_sources.add(URL),
        ),
    ]
    config = write(tmp_path / "config.yaml", basic_config())
    runs: list[tuple[Case, Agent, KubeSim | None]] = []
    try:
        for case in cases:
            sim = None
            if case.cli_flags:
                kubeconfig = cli_kubesim(*case.cli_flags)
            else:
                sim = kubesim_factory(**{"controllers": True, "controller_delay": 0.05, **case.sim})
                if case.setup:
                    case.setup(sim)
                kubeconfig = sim.kubeconfig_path
            workdir = tmp_path / case.name
            workdir.mkdir()
            agent = start_agent(kubeconfig, config, workdir, "--timeout", "10s")
            runs.append((case, agent, sim))
            # Side by side, but one start-up at a time: on a busy 2-core machine ten Python
            # start-ups at once would take longer than the timeout under test.
            agent.wait_for_event("starting")
        finish_all([agent for _, agent, _ in runs])
    finally:
        stop_renewing.set()
    failures = []
    for case, agent, sim in runs:
        result = agent.result
        assert result is not None
        last = result.messages()[-1] if result.messages() else ""
        final = result.events()[-1] if result.events() else {}
        if (
            result.code != 1
            or final.get("seconds", 99) > 12
            or len(result.messages()) != 1
            or not last.startswith("alga-bootstrap: error: ")
            or not re.search(case.last_line, last)
            or final.get("event") != "run failed"
            or os.listdir(agent.tmpdir)
        ):
            failures.append(f"{case.name}: exit {result.code}: {result.output[-3000:]}")
        print(
            f"{case.name}: exit {result.code} after {final.get('seconds')}s "
            f"(process {agent.seconds:.1f}s): {last}"
        )
        if case.name == "lease-held" and sim is not None:
            # A waiting run looks at the Lease with a capped backoff; it POSTs it only while
            # the lease may be missing.
            lease_requests = [r for r in sim.requests if "/leases" in r["path"]]
            creates = [r for r in lease_requests if r["verb"] == "create"]
            print([(r["ts"], r["verb"], r["path"], r["status"]) for r in lease_requests])
            print(result.output)
            assert len(creates) <= 2 and len(lease_requests) <= 20, lease_requests
    assert not failures, "\n\n".join(failures)


def test_a_long_verify_wait_is_polite(kubesim: KubeSim, tmp_path: Path) -> None:
    """While verify waits for a source that never becomes Ready, the agent reads at most a
    few times a second, and about once a second once the wait is long."""
    kubesim.controllers.unreconciled_sources.add(URL)
    config = write(tmp_path / "config.yaml", basic_config())
    agent = start_agent(kubesim.kubeconfig_path, config, tmp_path, "--timeout", "25s")
    result = agent.finish()
    assert result.code == 1 and "timed out waiting for Flux" in result.stderr, result.output
    sim = kubesim
    started = next(
        r["ts"]
        for r in sim.requests
        if r["verb"] == "apply" and r["path"].endswith("/gitrepositories/appliance")
    )
    waiting = [r for r in sim.requests if r["ts"] > started and "/leases" not in r["path"]]
    span = waiting[-1]["ts"] - started
    assert span > 5, waiting
    late = [r for r in waiting if r["ts"] > started + 5]
    assert len(waiting) / span <= 4, len(waiting)
    assert len(late) / (waiting[-1]["ts"] - started - 5) <= 1.5, late
    print(f"verify wait: {len(waiting)} requests in {span:.1f}s, {len(late)} after the first 5s")


# -- signals -----------------------------------------------------------------------------------


@dataclass
class Stop:
    point: str
    signum: signal.Signals
    sim: KubeSim
    kubeconfig: Path
    agent: Agent | None = None


def _reached(stop: Stop) -> bool:
    """Whether the run is where the test wants to stop it."""
    assert stop.agent is not None
    if stop.point == "waiting for the API":
        return any('"API not ready yet"' in line for line in list(stop.agent.lines))
    if stop.point == "install-flux":
        return len(stop.sim.writes()) >= 8
    return (
        any(  # verify: the sync exists and Flux never reports on it
            r["verb"] == "apply" and r["path"].endswith("/kustomizations/appliance")
            for r in stop.sim.requests
        )
        and time.monotonic() - stop.agent.started > 1
    )


def test_sigterm_and_sigint_stop_at_a_safe_point(
    kubesim_factory: Callable[..., KubeSim], tmp_path: Path
) -> None:
    """At each point: exit 143 (SIGTERM) or 130 (SIGINT) with a final event, the Lease
    released (kubectl sees no holder), no key material in TMPDIR (the kubeconfig has a client
    key), and the next run finishes without waiting for the lease."""
    config = write(tmp_path / "config.yaml", basic_config())
    stops = []
    for point in ("waiting for the API", "install-flux", "verify"):
        for signum in (signal.SIGTERM, signal.SIGINT):
            sim = kubesim_factory(
                controllers=True,
                controller_delay=0.05,
                latency_ms=40 if point == "install-flux" else 0,
                readyz_unavailable_seconds=600 if point == "waiting for the API" else 0,
            )
            if point == "verify":
                sim.controllers.unreconciled_sources.add(URL)
            kubeconfig = write(
                tmp_path / f"{len(stops)}-client-cert.kubeconfig", sim.client_cert_kubeconfig()
            )
            stops.append(Stop(point, signum, sim, kubeconfig))
    for n, stop in enumerate(stops):
        workdir = tmp_path / f"stop-{n}"
        workdir.mkdir()
        # One at a time up to its point; then the next starts while this one stops.
        stop.agent = start_agent(stop.kubeconfig, config, workdir, "--timeout", "5m")
        deadline = time.monotonic() + 60
        while not _reached(stop):
            assert time.monotonic() < deadline and stop.agent.proc.poll() is None, stop.agent.lines
            time.sleep(0.02)
        stop.agent.proc.send_signal(stop.signum)
    finish_all([stop.agent for stop in stops if stop.agent])
    for stop in stops:
        assert stop.agent is not None and stop.agent.result is not None
        result, what = stop.agent.result, f"{stop.point}, {stop.signum.name}"
        assert result.code == 128 + stop.signum, (what, result.output)
        assert result.messages() == [
            f"alga-bootstrap: stopped by {stop.signum.name}; re-run to finish"
        ], what
        final = result.events()[-1]
        assert final["event"] == "run stopped" and final["exit_code"] == result.code, what
        assert os.listdir(stop.agent.tmpdir) == [], what
        lease = kubectl_lease(stop.sim)
        if stop.point == "waiting for the API":
            assert lease is None, what  # nothing was written, so no lease was ever taken
        else:
            assert lease is not None and "holderIdentity" not in lease["spec"], (what, lease)
        stop.sim.faults.readyz_unavailable_until = 0
        stop.sim.controllers.unreconciled_sources.clear()
    # The next runs: each finishes without waiting for a lease (its duration is 30 s).
    for n, stop in enumerate(stops):
        stop.agent = start_agent(stop.kubeconfig, config, tmp_path / f"stop-{n}")
    finish_all([stop.agent for stop in stops if stop.agent])
    for stop in stops:
        assert stop.agent is not None and stop.agent.result is not None
        result = stop.agent.result
        assert result.code == 0, result.output
        events = [e["event"] for e in result.events()]
        assert "another run holds the lease; waiting" not in events, result.output
        assert not any(event.startswith("taking over") for event in events), result.output
        assert os.listdir(stop.agent.tmpdir) == []


# -- the lease, by this host's clock -----------------------------------------------------------


def test_lease_holders_judged_by_host_and_local_clock(
    kubesim_factory: Callable[..., KubeSim], tmp_path: Path
) -> None:
    """A holder that died on this host is taken over at once (its lease lasts 30 s); one on
    another host whose renewTime is an hour ahead (clock skew) after its 3 s duration, counted
    on this host's clock since the lease last changed."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    died_here = f"{socket.gethostname()}-{dead.pid}-{BOOT_ID}-abcdef"
    skewed = f"other-node-4242-{BOOT_ID}-abcdef"
    config = write(tmp_path / "config.yaml", basic_config())
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    runs = []
    for name, holder, duration, renewed in (
        ("died-here", died_here, 30, dt.datetime.now(dt.UTC)),
        ("skewed", skewed, 3, future),
    ):
        sim = kubesim_factory(controllers=True, controller_delay=0.05)
        put_lease(sim, holder, duration, renewed)
        (tmp_path / name).mkdir()
        runs.append((name, sim, start_agent(sim.kubeconfig_path, config, tmp_path / name)))
    finish_all([agent for _, _, agent in runs])
    results = {name: agent.result for name, _, agent in runs}
    for name, result in results.items():
        assert result is not None and result.code == 0, (name, result)

    def event_time(result: Result, prefix: str) -> dt.datetime:
        stamp = next(e for e in result.events() if e["event"].startswith(prefix))["timestamp"]
        return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")

    here, skew = results["died-here"], results["skewed"]
    assert here is not None and skew is not None
    assert "another run holds the lease; waiting" not in here.stderr
    takeover = [e for e in here.events() if e["event"].startswith("taking over")]
    assert takeover[0]["event"] == "taking over the lease of a run that died on this host"
    assert takeover[0]["holder"] == died_here
    waited = event_time(skew, "taking over the lease of a run that stopped") - event_time(
        skew, "another run holds the lease; waiting"
    )
    assert 2.5 <= waited.total_seconds() <= 8, waited


def test_a_run_that_loses_its_lease_writes_no_more(kubesim: KubeSim, tmp_path: Path) -> None:
    """Another run takes the Lease over while this one waits in verify (as if this one had
    not renewed it in time): this run writes nothing more, fails with a line that says so,
    and leaves the new holder's Lease alone."""
    kubesim.controllers.unreconciled_sources.add(URL)
    config = write(tmp_path / "config.yaml", {**basic_config(), "lease": {"durationSeconds": 3}})
    agent = start_agent(kubesim.kubeconfig_path, config, tmp_path, "--timeout", "60s")
    agent.wait_for_event("lease acquired")
    deadline = time.monotonic() + 30
    while not any(  # in verify: the sync exists, and Flux never reports on it
        r["verb"] == "apply" and r["path"].endswith("/kustomizations/appliance")
        for r in kubesim.requests
    ):
        assert time.monotonic() < deadline and agent.proc.poll() is None, agent.lines
        time.sleep(0.05)
    new_holder = f"other-node-4242-{BOOT_ID}-abcdef"
    taken = len(kubesim.writes())
    put_lease(kubesim, new_holder, 30, dt.datetime.now(dt.UTC))
    agent.wait_for_event("lost the lease")  # its next renewal, within a second
    kubesim.controllers.unreconciled_sources.clear()  # verify passes; the record is next
    result = agent.finish()
    assert result.code == 1, result.output
    assert result.messages() == [
        f"alga-bootstrap: error: another run (holder {new_holder}) took over Lease "
        "alga-system/alga-bootstrap while this run held it, because this run did not renew "
        "it in time; this run stopped writing; re-run"
    ], result.output
    assert result.events()[-1]["event"] == "run failed", result.output
    # After the take-over only the renewal that found it (409 Conflict) tried to write: no
    # record, no release. (One renewal may have gone through just before the take-over.)
    tried = [(r["verb"], r["path"], r["status"]) for r in kubesim.writes()[taken:]]
    assert tried and tried[-1] == ("update", LEASE_PATH, 409), tried
    assert set(tried[:-1]) <= {("update", LEASE_PATH, 200)}, tried
    lease = kubectl_lease(kubesim)
    assert lease is not None and lease["spec"]["holderIdentity"] == new_holder, lease
    assert not kubesim.exists("v1", "ConfigMap", "alga-bootstrap-run", "alga-system")


def test_the_log_ends_with_the_outcome_when_the_release_fails(
    kubesim: KubeSim, tmp_path: Path
) -> None:
    """The service log's last line is the run's outcome (README, Talos), also when handing
    the Lease back fails and is warned about."""
    kubesim.faults.fail_next(1, 409, verb="update", path="/leases/")  # taken meanwhile
    # A lease that lasts 10 minutes is not renewed during the run: the 409 meets the release.
    config = write(tmp_path / "config.yaml", {**basic_config(), "lease": {"durationSeconds": 600}})
    result = start_agent(kubesim.kubeconfig_path, config, tmp_path).finish()
    assert result.code == 0, result.output
    events = [e["event"] for e in result.events()]
    assert "could not release the lease; it expires by itself" in events, result.output
    assert events[-1] == "done", result.output
