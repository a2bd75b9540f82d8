"""Field techs at a workstation (issue 15): kubeconfig files as kubectl reads them,
--context, failing fast off a Talos node, status for a first boot, completion."""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import build_parser
from kubesim import KubeSim
from tests.conftest import REPO, agent_env, basic_config, fast_run_args, run_agent


def kubeconfig_of(sim: KubeSim, name: str, **cluster: Any) -> dict[str, Any]:
    """One appliance's kubeconfig: cluster, user and context all called `name`."""
    data = sim.kubeconfig()
    entry = {"server": sim.url, **cluster}
    if "certificate-authority" not in cluster:
        entry["certificate-authority-data"] = base64.b64encode(sim.ca_pem).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": name,
        "clusters": [{"name": name, "cluster": entry}],
        "users": [{"name": f"admin-{name}", "user": data["users"][0]["user"]}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"admin-{name}"}}],
    }


@pytest.fixture
def two_appliances(kubesim_factory: Any, tmp_path: Path) -> tuple[KubeSim, KubeSim, str]:
    """Two kubesims and a KUBECONFIG list: a missing file, then site-a's file, then
    site-b's (in another directory, its CA a file named relative to it). site-b's file also
    has a context called site-a, pointing at site-b: the first file's wins, as in kubectl."""
    sim_a, sim_b = kubesim_factory(controllers=True), kubesim_factory(controllers=True)
    first = tmp_path / "a.yaml"
    first.write_text(yaml.safe_dump(kubeconfig_of(sim_a, "site-a")))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ca.crt").write_bytes(sim_b.ca_pem)
    second_data = kubeconfig_of(sim_b, "site-b", **{"certificate-authority": "ca.crt"})
    second_data["contexts"].append(
        {"name": "site-a", "context": {"cluster": "site-b", "user": "admin-site-b"}}
    )
    second = tmp_path / "b" / "config"
    second.write_text(yaml.safe_dump(second_data))
    listed = os.pathsep.join([str(tmp_path / "missing.yaml"), str(first), str(second)])
    return sim_a, sim_b, listed


def with_kubeconfig(listed: str) -> dict[str, str]:
    return {**agent_env(), "KUBECONFIG": listed}


def endpoint(config: Path, listed: str, *extra: str) -> str:
    result = run_agent(
        "status", "--config", str(config), "-o", "json", *extra, env=with_kubeconfig(listed)
    )
    assert result.code == 5, result.output  # fresh: not bootstrapped yet
    server: str = json.loads(result.stdout)["api"]["endpoint"]
    return server


def kubectl_server(listed: str, *extra: str) -> str:
    """What kubectl itself picks from the same KUBECONFIG (an independent reader)."""
    return subprocess.run(
        [
            "kubectl",
            "config",
            "view",
            "--minify",
            *extra,
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ],
        env={**os.environ, "KUBECONFIG": listed},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


# -- kubeconfig as kubectl reads it ------------------------------------------------------------


def test_a_kubeconfig_list_is_merged_as_kubectl_merges_it(
    two_appliances: tuple[KubeSim, KubeSim, str], write_config: Any
) -> None:
    sim_a, sim_b, listed = two_appliances
    config = write_config(basic_config())
    # The current context comes from the first file that sets one; site-a is the first
    # file's, not the second's context of the same name.
    assert endpoint(config, listed) == sim_a.url == kubectl_server(listed)
    assert endpoint(config, listed, "--context", "site-a") == sim_a.url
    # --context picks the other appliance (its CA a file relative to its kubeconfig).
    assert endpoint(config, listed, "--context", "site-b") == sim_b.url
    assert kubectl_server(listed, "--context", "site-b") == sim_b.url


def test_run_with_a_context_bootstraps_that_appliance_only(
    two_appliances: tuple[KubeSim, KubeSim, str], write_config: Any
) -> None:
    sim_a, sim_b, listed = two_appliances
    config = write_config(basic_config())
    result = run_agent(
        "run",
        "--config",
        str(config),
        "--context",
        "site-b",
        "--log-format",
        "json",
        env=with_kubeconfig(listed),
    )
    assert result.code == 0, result.output
    assert sim_b.exists("source.toolkit.fluxcd.io/v1", "GitRepository", "appliance", "flux-system")
    assert sim_a.requests == []


def test_an_unknown_context_names_the_ones_there_are(
    two_appliances: tuple[KubeSim, KubeSim, str], write_config: Any
) -> None:
    sim_a, sim_b, listed = two_appliances
    config = write_config(basic_config())
    result = run_agent(
        "status", "--config", str(config), "--context", "site-c", env=with_kubeconfig(listed)
    )
    assert result.code == 2
    assert result.stderr.count("\n") == 1
    assert 'context "site-c" not found; contexts: site-a, site-b' in result.stderr
    assert listed in result.stderr  # names the files it read
    assert sim_a.requests == [] and sim_b.requests == []


def test_kubeconfig_errors_name_the_file_and_the_context(
    kubesim: KubeSim, write_config: Any, tmp_path: Path
) -> None:
    config = write_config(basic_config())
    broken = kubeconfig_of(kubesim, "site-a")
    broken["contexts"][0]["context"]["user"] = "nobody"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = run_agent("run", "--config", str(config), "--kubeconfig", str(path))
    assert result.code == 2
    assert f'{path}: context "site-a": user "nobody" is not in the kubeconfig' in result.stderr
    none_there = os.pathsep.join([str(tmp_path / "x"), str(tmp_path / "y")])
    missing = run_agent("status", "--config", str(config), env=with_kubeconfig(none_there))
    assert missing.code == 2 and "cannot read kubeconfig (no such file)" in missing.stderr
    assert kubesim.requests == []


def test_key_material_from_a_kubeconfig_file_stays_in_memory(
    kubesim: KubeSim, write_config: Any, tmp_path: Path
) -> None:
    """A client certificate kubeconfig: the run works, TMPDIR stays empty, no key logged."""
    path = tmp_path / "cert.yaml"
    data = kubesim.client_cert_kubeconfig()
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "tmp").mkdir()
    env = {**agent_env(), "TMPDIR": str(tmp_path / "tmp")}
    result = run_agent(*fast_run_args(write_config(basic_config()), path), env=env)
    assert result.code == 0, result.output
    assert list((tmp_path / "tmp").iterdir()) == []
    assert data["users"][0]["user"]["client-key-data"] not in result.output


# -- off a Talos node --------------------------------------------------------------------------


def test_talos_credentials_without_a_socket_fail_at_once(write_config: Any, tmp_path: Path) -> None:
    data = basic_config()
    data["cluster"] = {"credentials": "talos"}
    data["talos"] = {"socket": str(tmp_path / "machine.sock")}
    config = write_config(data)
    for command in ("run", "status"):
        started = time.monotonic()
        result = run_agent(command, "--config", str(config))  # deadline: the default 30m
        elapsed = time.monotonic() - started
        assert result.code == 2, result.output
        assert elapsed < 5  # the interpreter's start included; about 0.5 s on an idle machine
        assert result.stderr.startswith("alga-bootstrap: error: cluster.credentials: talos")
        assert result.stderr.count("\n") == 1
        assert f"no machined socket at {tmp_path / 'machine.sock'}" in result.stderr
        assert "pass --kubeconfig" in result.stderr
        assert "cluster.credentials: kubeconfig" in result.stderr
    # A directory where the socket should be is not a socket either.
    (tmp_path / "machine.sock").mkdir()
    assert run_agent("run", "--config", str(config)).code == 2


def test_a_context_chooses_the_kubeconfig_over_talos_credentials(
    kubesim: KubeSim, write_config: Any, tmp_path: Path
) -> None:
    """A site config made for the node (credentials: talos) used from a workstation."""
    data = basic_config()
    data["cluster"] = {"credentials": "talos"}
    data["talos"] = {"socket": str(tmp_path / "machine.sock")}
    env = {**agent_env(), "KUBECONFIG": str(kubesim.kubeconfig_path)}
    result = run_agent(
        "status", "--config", str(write_config(data)), "--context", "kubesim", env=env
    )
    assert result.code == 5, result.output


# -- status for a first boot -------------------------------------------------------------------


def test_status_before_anything_was_bootstrapped(kubesim: KubeSim, write_config: Any) -> None:
    config = write_config(basic_config())
    args = ["status", "--config", str(config), "--kubeconfig", str(kubesim.kubeconfig_path)]
    result = run_agent(*args)
    assert result.code == 5, result.output
    assert result.stdout.splitlines()[-1] == "state: not-bootstrapped"
    assert "nothing bootstrapped yet" in result.stdout and "alga-bootstrap run" in result.stdout
    assert "✗" not in result.stdout  # missing is expected here, not a failure
    assert json.loads(run_agent(*args, "-o", "json").stdout)["state"] == "not-bootstrapped"
    assert kubesim.writes() == []


def test_status_watch_follows_a_first_boot_until_ready(
    kubesim_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    sim = kubesim_factory(controllers=True, controller_delay=1.0, latency_ms=10)
    config = write_config(basic_config())
    shown = tmp_path / "watch.out"
    argv = ["status", "--watch", "--config", str(config), "--kubeconfig", str(sim.kubeconfig_path)]
    with shown.open("w") as out:  # not a terminal: a new block only when something changed
        watch = subprocess.Popen(
            [sys.executable, "-m", "agent", *argv], cwd=REPO, env=agent_env(), stdout=out
        )
        deadline = time.monotonic() + 30
        while "state: " not in shown.read_text():
            assert time.monotonic() < deadline and watch.poll() is None
            time.sleep(0.05)
        boot = run_agent(*fast_run_args(config, sim.kubeconfig_path))
        assert boot.code == 0, boot.output
        assert watch.wait(timeout=60) == 0
    text = shown.read_text()
    states = [line for line in text.splitlines() if line.startswith("state: ")]
    assert states[0] == "state: not-bootstrapped", text
    assert "state: progressing" in states, text  # the run, holding its lease
    assert states[-1] == "state: ready"
    blocks = text.strip().split("\n\n")
    assert len(blocks) == len(states)
    assert all(a != b for a, b in itertools.pairwise(blocks))  # printed only when changed


def test_status_timeout_bounds_the_api_probe(write_config: Any, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "current-context": "x",
                "clusters": [{"name": "x", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "x", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
            }
        )
    )
    args = [
        "status",
        "--config",
        str(write_config(basic_config())),
        "--kubeconfig",
        str(kubeconfig),
    ]
    result = run_agent(*args, "--timeout", "1s", "-o", "json")
    assert result.code == 1
    report = json.loads(result.stdout)
    assert report["api"]["reachable"] is False
    waited = re.search(r"did not become ready within (\d+)s", report["api"]["error"])
    assert waited and int(waited[1]) <= 2, report  # not the default 5s


# -- help and completion ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", ["run", "status", "validate", "images", "completion", "version"]
)
def test_every_help_ends_with_examples(command: str) -> None:
    result = run_agent(command, "--help")
    assert result.code == 0
    examples = result.stdout.split("\nexamples:\n")[1]
    commands = [line for line in examples.splitlines() if not line.lstrip().startswith("#")]
    assert len([line for line in examples.splitlines() if line.lstrip().startswith("#")]) >= 2
    assert any("alga-bootstrap" in line or "talosctl" in line for line in commands)


def test_bash_completion(tmp_path: Path) -> None:
    result = run_agent("completion", "bash")
    assert result.code == 0
    script = tmp_path / "alga-bootstrap.bash"
    script.write_text(result.stdout)
    subprocess.run(["bash", "-n", str(script)], check=True)

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        probe = (
            f"source {script}; COMP_WORDS=(alga-bootstrap {line}); "
            f"COMP_CWORD={len(words)}; _alga_bootstrap; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        )
        done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
        return done.stdout.split()

    assert complete("st") == ["status"]
    assert complete("status", "--w") == ["--watch"]
    assert complete("status", "-o", "") == ["text", "json", "yaml"]
    assert complete("images", "--output", "y") == ["yaml"]
    assert complete("run", "--log-level", "") == ["debug", "info", "warning", "error"]
    assert complete("completion", "") == ["bash", "zsh", "-h", "--help"]
    assert "--context" in complete("run", "--")
    # Every option the parser has, for every command: the script is built from it.
    for name, command in _subcommands(build_parser()).items():
        offered = set(complete(name, "-"))
        assert {o for a in command._actions for o in a.option_strings} <= offered, name
    for name in ("run", "status", "validate", "images", "version"):
        assert {"--log-level", "--log-format", "--no-color"} <= set(complete(name, "--")), name
    for name in ("status", "validate", "images", "version"):
        assert {"-o", "--output"} <= set(complete(name, "-")), name


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(
        dict(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_parses(tmp_path: Path) -> None:
    script = tmp_path / "_alga-bootstrap"
    script.write_text(run_agent("completion", "zsh").stdout)
    subprocess.run(["zsh", "-n", str(script)], check=True)
