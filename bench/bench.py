"""Benchmark: the agent against kubectl on kubesim with 20 ms latency, side by side.

Prints a table, then one line:
fresh_ratio_vs_kubectl=<x> noop_writes=<n> noop_requests=<n> noop_seconds=<s> peak_rss_mb=<m>
Targets: ratio <= 0.5; no-op writes 0, requests <= 15, seconds < 1.5; peak RSS < 100 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from agent import config as config_module
from agent import desired
from agent.steps import create_sync
from kubesim import KubeSim, upstream

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO.parent / "shared" / "flux" / "v2.9.4" / "gotk-components.yaml"
LATENCY_MS = 20
TIME = "/usr/bin/time"  # GNU time (Debian package `time`)
CONTROLLER_DELAY = 0.2


def run_timed(argv: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """Wall seconds, exit code and peak RSS (KiB) of one command. GNU time measures the RSS:
    a child forked from this (large) process would report this process's pages as its own."""
    with tempfile.NamedTemporaryFile(mode="r") as rss:
        started = time.monotonic()
        proc = subprocess.run(
            [TIME, "-f", "%M", "-o", rss.name, *argv],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr.decode())
        return elapsed, proc.returncode, int(rss.read().strip().splitlines()[-1])


def the_same_objects(config: config_module.Config, path: Path) -> None:
    """What the agent applies after Flux, for kubectl: site objects and the sync."""
    objects: list[dict[str, Any]] = [desired.namespace(n) for n in config.site.namespaces]
    for manifest in config.site.manifests:
        objects += manifest.objects
    for secret in config.site.secrets:
        values = {k.name: os.urandom(k.generate_bytes).hex().encode() for k in secret.keys}
        objects.append(desired.generated_secret(secret, values))
    objects += [desired.config_map(c) for c in config.site.config_maps]
    objects += [desired.git_repository(config.sync), desired.kustomization(config.sync)]
    if config.sync.credentials:
        objects.append(create_sync.credentials_secret(config.sync.credentials, "flux-system"))
    path.write_text(yaml.safe_dump_all(objects))


def new_sim(work: Path, name: str) -> KubeSim:
    sim = KubeSim(
        kubeconfig_out=work / f"{name}.kubeconfig",
        latency_ms=LATENCY_MS,
        controllers=True,
        controller_delay=CONTROLLER_DELAY,
    )
    # The stand-in Flux applies upstream's appliance, so the agent can check its patches.
    sim.controllers.sources.update(upstream.reference_sources(REPO.parent / "shared" / "alga"))
    return sim.start()


def measured(sim: KubeSim, seconds: float, rss_kb: int) -> dict[str, Any]:
    """One row of the table: time, what the simulator saw, peak memory."""
    return {
        "seconds": seconds,
        "requests": len(sim.requests),
        "writes": len(sim.writes()),
        "rss_kb": rss_kb,
    }


def kubectl_install(
    work: Path, round_no: int, config: config_module.Config, objects: Path
) -> dict[str, Any]:
    sim = new_sim(work, f"kubectl-{round_no}")
    env = {
        **os.environ,
        "KUBECONFIG": str(sim.kubeconfig_path),
        "KUBECACHEDIR": str(work / f"kubectl-cache-{round_no}"),
    }  # fresh cache each time
    sync = f"{config.sync.namespace}"
    steps = [
        ["kubectl", "apply", "--server-side", "-f", str(BUNDLE)],
        ["kubectl", "wait", "--for=condition=Established", "crd", "--all", "--timeout=120s"],
        [
            "kubectl",
            "wait",
            "--for=condition=Available",
            "deployment",
            "--all",
            "-n",
            config.flux.namespace,
            "--timeout=120s",
        ],
        ["kubectl", "apply", "--server-side", "-f", str(objects)],
        [
            "kubectl",
            "wait",
            "--for=condition=Ready",
            "-n",
            sync,
            "--timeout=120s",
            f"gitrepository/{config.sync.name}",
            f"kustomization/{config.sync.name}",
        ],
    ]
    total, peak = 0.0, 0
    for argv in steps:
        seconds, code, rss = run_timed(argv, env)
        if code != 0:
            raise SystemExit(f"kubectl baseline failed at: {' '.join(argv)}")
        total, peak = total + seconds, max(peak, rss)
    result = measured(sim, total, peak)
    sim.stop()
    return result


def agent_env(work: Path) -> dict[str, str]:
    """The agent as the image ships it: every module compiled to bytecode ahead of time
    (images/build.py, compile_bytecode). Here into a cache of the benchmark's own, filled by
    one import of the agent before the rounds; the source tree is left alone."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PYTHONDONTWRITEBYTECODE")
    }
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    subprocess.run(
        [sys.executable, "-c", "import agent.cli, agent.run, agent.status"],
        env=env,
        cwd=REPO,
        check=True,
    )
    return env


def agent_install(
    work: Path, round_no: int, config_path: Path, env: dict[str, str]
) -> dict[str, Any]:
    sim = new_sim(work, f"agent-{round_no}")
    argv = [
        sys.executable,
        "-m",
        "agent",
        "run",
        "--config",
        str(config_path),
        "--kubeconfig",
        str(sim.kubeconfig_path),
        "--log-format",
        "json",
    ]
    runs = {}
    for label in ("fresh", "noop"):  # the first boot, then a re-run on the converged cluster
        sim.clear_log()
        seconds, code, rss = run_timed(argv, env)
        if code != 0:
            raise SystemExit(f"agent {label} run failed")
        runs[label] = measured(sim, seconds, rss)
    sim.stop()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="median of this many rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="alga-bench-") as tmp:
        work = Path(tmp)
        config_path = work / "config.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "preset": "alga-talos-single-node",
                    "flux": {
                        "manifests": str(BUNDLE),
                        "sha256": hashlib.sha256(BUNDLE.read_bytes()).hexdigest(),
                    },
                    "alga": {"appUrl": "https://psa.bench.example"},
                }
            )
        )
        config = config_module.load(config_path)
        objects = work / "objects.yaml"
        the_same_objects(config, objects)
        kubectl_rounds, agent_rounds = [], []
        env = agent_env(work)
        for round_no in range(args.rounds):
            kubectl_rounds.append(kubectl_install(work, round_no, config, objects))
            agent_rounds.append(agent_install(work, round_no, config_path, env))

    def median(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    fresh = [r["fresh"] for r in agent_rounds]
    noop = [r["noop"] for r in agent_rounds]
    table = [
        ("kubectl apply + wait (fresh)", kubectl_rounds),
        ("alga-bootstrap run (fresh)", fresh),
        ("alga-bootstrap run (no-op)", noop),
    ]
    print(
        f"kubesim latency {LATENCY_MS} ms, controller delay {CONTROLLER_DELAY} s, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'':32} {'seconds':>8} {'requests':>9} {'writes':>7} {'peak RSS MB':>12}")
    for label, rows in table:
        print(
            f"{label:32} {median(rows, 'seconds'):8.2f} {median(rows, 'requests'):9.0f} "
            f"{median(rows, 'writes'):7.0f} {median(rows, 'rss_kb') / 1024:12.1f}"
        )
    ratio = median(fresh, "seconds") / median(kubectl_rounds, "seconds")
    peak = max(r["rss_kb"] for r in fresh + noop) / 1024
    print(
        f"fresh_ratio_vs_kubectl={ratio:.2f} noop_writes={median(noop, 'writes'):.0f} "
        f"noop_requests={median(noop, 'requests'):.0f} "
        f"noop_seconds={median(noop, 'seconds'):.2f} peak_rss_mb={peak:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
