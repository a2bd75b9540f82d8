"""Shared fixtures: the simulator, the Flux bundle from ../shared, and an agent runner that
drives the real CLI in a subprocess (real exit codes, real log output)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest_plugins = ["kubesim.pytest_plugin"]

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
BUNDLE = SHARED / "flux" / "v2.9.4" / "gotk-components.yaml"
BUNDLE_SHA = hashlib.sha256(BUNDLE.read_bytes()).hexdigest()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def events(self) -> list[dict[str, Any]]:
        """The run's log: JSON lines on stderr (stderr is not a terminal here); the one-line
        error a failed run ends with is no event."""
        return [json.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]

    def messages(self) -> list[str]:
        """What stderr holds besides the log: the one-line error, if any."""
        return [line for line in self.stderr.splitlines() if not line.startswith("{")]


def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "ALGA_BOOTSTRAP_CONFIG")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_agent(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or agent_env(),
        cwd=REPO,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def basic_config(**sync: Any) -> dict[str, Any]:
    """A general (non-Alga) config: the bundle from ../shared and a plain sync."""
    return {
        "flux": {"manifests": str(BUNDLE), "sha256": BUNDLE_SHA},
        "sync": {
            "name": "appliance",
            "url": "https://git.example/org/appliance.git",
            "ref": {"branch": "main"},
            "path": "./clusters/appliance",
            **sync,
        },
    }


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def write(data: dict[str, Any], name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def fast_run_args(config: Path, kubeconfig: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--config",
        str(config),
        "--kubeconfig",
        str(kubeconfig),
        "--log-format",
        "json",
        *extra,
    ]


# The run's own bookkeeping: its record, the Lease it holds while writing, their namespace.
BOOKKEEPING = re.compile(
    r"(/leases(/alga-bootstrap)?|/configmaps/alga-bootstrap-run"
    r"|^/api/v1/namespaces(/alga-system)?)$"
)


def writes_beyond_bookkeeping(sim: Any) -> list[str]:
    return [r["path"] for r in sim.writes() if not BOOKKEEPING.search(r["path"])]


@pytest.fixture
def sleeps_past_the_deadline(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], None]:
    """Call with a Kube client: from then on every retry's sleep ends 0.2 s past its
    deadline, as on a machine too busy to wake the run on time."""
    from agent import interrupt

    real_sleep = interrupt.sleep

    def arm(kube: Any) -> None:
        def past_the_deadline(seconds: float, woken: Any = None) -> None:
            real_sleep(max(seconds, kube.deadline - time.monotonic() + 0.2), woken)

        monkeypatch.setattr(interrupt, "sleep", past_the_deadline)

    return arm
