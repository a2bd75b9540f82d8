"""Streams and output as kubectl, flux and talosctl have them: answers on stdout, logs on
stderr; `-o json|yaml` documents; NO_COLOR and --no-color; --log-level."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from typing import Any

import pytest
import yaml

from kubesim.server import KubeSim
from tests.conftest import REPO, agent_env, basic_config, fast_run_args, run_agent

ESCAPE = "\x1b["


def parsed(text: str, fmt: str) -> Any:
    return json.loads(text) if fmt == "json" else yaml.safe_load(text)


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_documents_of_version_validate_and_images(write_config: Any, fmt: str) -> None:
    config = str(write_config(basic_config()))

    version = run_agent("version", "-o", fmt)
    assert version.code == 0, version.output
    answer = parsed(version.stdout, fmt)
    assert set(answer) == {"version", "flux"} and answer["version"] == "0.1.0"

    valid = run_agent("validate", "--config", config, "-o", fmt)
    assert valid.code == 0, valid.output
    answer = parsed(valid.stdout, fmt)
    assert set(answer) == {"config", "valid", "flux", "sync"} and answer["valid"] is True
    assert answer["config"] == config and answer["flux"]["version"] == "v2.9.4"
    assert answer["sync"] == {
        "url": "https://git.example/org/appliance.git",
        "ref": {"branch": "main"},
        "path": "./clusters/appliance",
    }

    images = run_agent("images", "--config", config, "-o", fmt)
    assert images.code == 0, images.output
    answer = parsed(images.stdout, fmt)
    assert set(answer) == {"images"}
    text = run_agent("images", "--config", config).stdout.split()
    assert answer["images"] == text and any("source-controller" in i for i in text)


def test_status_documents(kubesim: KubeSim, write_config: Any) -> None:
    config = str(write_config(basic_config()))
    args = ["status", "--config", config, "--kubeconfig", str(kubesim.kubeconfig_path)]
    as_json = run_agent(*args, "-o", "json")
    as_yaml = run_agent(*args, "-o", "yaml")
    assert as_json.code == as_yaml.code == 5, as_json.output  # not bootstrapped yet
    report, same = json.loads(as_json.stdout), yaml.safe_load(as_yaml.stdout)
    assert {"api", "flux", "state"} <= set(report) and set(same) == set(report)
    assert report["state"] == same["state"] == "not-bootstrapped"
    assert same["api"]["reachable"] is True and same["flux"]["bundled"] == "v2.9.4"


def on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the agent with stdout and stderr on one pseudo-terminal; what it showed there."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *argv],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        assert ready, shown
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return proc.wait(timeout=60), shown.decode()


@pytest.mark.parametrize(
    ("flags", "no_color", "coloured"),
    [
        ((), None, True),
        ((), "", True),  # NO_COLOR only counts with a value (no-color.org)
        ((), "1", False),
        (("--no-color",), None, False),
    ],
)
def test_colours_on_a_terminal(
    kubesim: KubeSim,
    write_config: Any,
    flags: tuple[str, ...],
    no_color: str | None,
    coloured: bool,
) -> None:
    env = agent_env()
    env.pop("NO_COLOR", None)
    if no_color is not None:
        env["NO_COLOR"] = no_color
    config = str(write_config(basic_config()))
    # status's marks, and a console log line (the config read, at debug level)
    code, shown = on_a_terminal(
        [
            "status",
            "--config",
            config,
            "--kubeconfig",
            str(kubesim.kubeconfig_path),
            "--log-level",
            "debug",
            *flags,
        ],
        env,
    )
    assert code == 5, shown
    assert "config read" in shown and "✓" in shown  # console log line, status marks
    assert (ESCAPE in shown) is coloured, shown


def test_log_level(write_config: Any) -> None:
    config = str(write_config(basic_config()))
    args = ["validate", "--config", config, "--log-format", "json"]
    debug = run_agent(*args, "--log-level", "debug")
    assert debug.code == 0 and debug.stdout.startswith(f"{config}: valid")
    assert [e["event"] for e in debug.events()] == ["config read"]
    assert debug.events()[0]["level"] == "debug"
    default = run_agent(*args)  # warning: no debug line
    assert default.code == 0 and default.stderr == "", default.stderr


def test_run_logs_on_stderr_and_a_dry_run_prints_only_the_plan(
    kubesim: KubeSim, write_config: Any
) -> None:
    config = write_config(basic_config())
    plan = run_agent(
        *fast_run_args(config, kubesim.kubeconfig_path, "--dry-run", "--log-level", "info")
    )
    assert plan.code == 0, plan.output
    lines = plan.stdout.splitlines()
    assert lines[0].startswith("dry run") and len(lines) > 30, lines
    assert not [line for line in lines if '"event"' in line or line.startswith("{")]
    assert any(e["level"] == "info" for e in plan.events())  # the narration, on stderr

    run = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert run.code == 0, run.output
    assert run.stdout == "" and run.events()[-1]["event"] == "done"
    assert all(line.startswith("{") for line in run.stderr.splitlines())

    quiet = run_agent(*fast_run_args(config, kubesim.kubeconfig_path, "--log-level", "error"))
    assert quiet.code == 0, quiet.output
    assert quiet.stdout == "" and quiet.stderr == ""  # "nothing to do" is info: hidden
    again = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert again.events()[-1]["event"] == "nothing to do"  # what error hid
