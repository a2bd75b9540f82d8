"""The Talos credential source and unattended etcd bootstrap, against a gRPC machined
stand-in on a unix socket and kubesim (issue: Talos)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubesim import KubeSim
from tests.conftest import Result, agent_env, basic_config, run_agent
from tests.fake_machined import FakeMachined

CLOSED_ENDPOINT = "https://127.0.0.2:9"  # the cluster endpoint of a node whose API is down


@pytest.fixture
def machined_factory(tmp_path: Path) -> Iterator[Callable[..., FakeMachined]]:
    started: list[FakeMachined] = []

    def start(
        sim: KubeSim, cluster_endpoint: str = CLOSED_ENDPOINT, **options: Any
    ) -> FakeMachined:
        kubeconfig = sim.client_cert_kubeconfig()  # Talos's admin kubeconfig: a client cert
        kubeconfig["clusters"][0]["cluster"]["server"] = cluster_endpoint
        node = FakeMachined(
            str(tmp_path / f"machine{len(started)}.sock"),
            yaml.safe_dump(kubeconfig).encode(),
            **options,
        ).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def talos_config(write_config: Any, sim: KubeSim, node: FakeMachined, **talos: Any) -> Path:
    data = basic_config()
    data["cluster"] = {"credentials": "talos", "endpoints": [sim.url]}
    data["talos"] = {"socket": node.socket_path, **talos}
    path: Path = write_config(data)
    return path


def run_on_node(config: Path, tmp_path: Path, *extra: str) -> Result:
    env = {**agent_env(), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return run_agent("run", "--config", str(config), "--log-format", "json", *extra, env=env)


def test_kubeconfig_from_machined_completes_a_run(
    kubesim: KubeSim, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    node = machined_factory(kubesim)
    result = run_on_node(talos_config(write_config, kubesim, node), tmp_path)
    assert result.code == 0, result.output
    assert [name for name, _ in node.calls] == ["Kubeconfig"]
    assert node.calls[0][1]["talos-role"] == "os:admin"
    assert node.chunks_sent >= 3  # the archive arrived in several messages
    assert kubesim.exists(
        "source.toolkit.fluxcd.io/v1", "GitRepository", "appliance", "flux-system"
    )
    # The kubeconfig (with its client key) stayed in memory: nothing in TMPDIR, nothing logged.
    assert list((tmp_path / "tmp").iterdir()) == []
    key = yaml.safe_load(node.kubeconfig)["users"][0]["user"]["client-key-data"]
    assert key not in result.output
    assert "PRIVATE KEY" not in result.output
    # It went to the configured local endpoint, not the kubeconfig's cluster endpoint.
    assert not any(e.get("endpoint") == CLOSED_ENDPOINT for e in result.events())


def test_machined_not_ready_is_retried(
    kubesim: KubeSim, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    node = machined_factory(kubesim, unavailable_calls=3)
    result = run_on_node(talos_config(write_config, kubesim, node), tmp_path)
    assert result.code == 0, result.output
    assert len(node.calls) == 4
    assert sum(e["event"] == "machined not ready yet" for e in result.events()) == 3


def test_missing_socket_until_the_deadline_is_a_failure(
    kubesim: KubeSim, write_config: Any, tmp_path: Path
) -> None:
    data = basic_config()
    data["cluster"] = {"credentials": "talos", "endpoints": [kubesim.url]}
    data["talos"] = {"socket": str(tmp_path / "absent.sock")}
    result = run_on_node(write_config(data), tmp_path, "--timeout", "2s")
    assert result.code == 1
    assert "did not give a kubeconfig" in result.stderr
    assert kubesim.requests == []


def test_a_worker_node_is_a_clear_error(
    kubesim: KubeSim, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    node = machined_factory(kubesim, worker=True)
    result = run_on_node(talos_config(write_config, kubesim, node), tmp_path)
    assert result.code == 2
    assert "only on a control-plane node" in result.stderr
    assert "credentials: kubeconfig" in result.stderr
    assert kubesim.requests == []


# -- etcd bootstrap ------------------------------------------------------------------------------


@pytest.fixture
def slow_node(
    kubesim_factory: Any, machined_factory: Any, write_config: Any, tmp_path: Path
) -> Callable[..., tuple[FakeMachined, Result]]:
    """Run on a node whose API stays down for 3 s; returns its machined and the result."""

    def run(
        bootstrap: bool = True, cluster_endpoint: str = CLOSED_ENDPOINT, **node_options: Any
    ) -> tuple[FakeMachined, Result]:
        sim = kubesim_factory(controllers=True, controller_delay=0.05, refuse_seconds=3)
        node = machined_factory(sim, cluster_endpoint, **node_options)
        talos = {"bootstrapEtcd": True, "bootstrapAfter": "500ms"} if bootstrap else {}
        return node, run_on_node(talos_config(write_config, sim, node, **talos), tmp_path)

    return run


def test_bootstrap_retries_failed_precondition(slow_node: Any) -> None:
    node, result = slow_node(bootstrap_answers=["FAILED_PRECONDITION", "FAILED_PRECONDITION", "ok"])
    assert result.code == 0, result.output
    assert [n for n, _ in node.calls].count("Bootstrap") == 3
    assert all(md["talos-role"] == "os:admin" for _, md in node.calls)
    events = [e["event"] for e in result.events()]
    assert "cluster endpoint does not answer; this node creates the cluster" in events
    assert events.count("etcd bootstrap not possible yet; retrying") == 2
    assert "etcd bootstrap requested" in events


def test_bootstrap_already_done(slow_node: Any) -> None:
    node, result = slow_node(bootstrap_answers=["ALREADY_EXISTS"])
    assert result.code == 0, result.output
    assert [n for n, _ in node.calls].count("Bootstrap") == 1
    assert any(e["event"] == "etcd is already bootstrapped" for e in result.events())


def test_bootstrap_on_a_node_without_etcd_is_a_clear_error(slow_node: Any) -> None:
    _, result = slow_node(bootstrap_answers=["INVALID_ARGUMENT"])
    assert result.code == 2
    assert "talos.bootstrapEtcd" in result.stderr and "etcd is not configured" in result.stderr


def test_never_bootstraps_a_node_that_joins_an_existing_cluster(
    slow_node: Any, kubesim_factory: Any
) -> None:
    existing = kubesim_factory()  # the cluster this node joins answers at its endpoint
    node, result = slow_node(cluster_endpoint=existing.url)
    assert result.code == 0, result.output
    assert [n for n, _ in node.calls] == ["Kubeconfig"]
    assert any(
        e["event"].startswith("cluster endpoint answers: this node joins") for e in result.events()
    )


def test_no_bootstrap_when_the_api_comes_up_in_time(
    kubesim: KubeSim, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    node = machined_factory(kubesim)
    config = talos_config(write_config, kubesim, node, bootstrapEtcd=True)
    assert run_on_node(config, tmp_path).code == 0
    assert [n for n, _ in node.calls] == ["Kubeconfig"]


def test_bootstrap_is_off_unless_configured(slow_node: Any) -> None:
    started = time.monotonic()
    node, result = slow_node(bootstrap=False)
    assert result.code == 0, result.output
    assert time.monotonic() - started >= 2.5
    assert [n for n, _ in node.calls] == ["Kubeconfig"]


def test_memfd_paths_are_not_files_on_disk(kubesim: KubeSim, machined_factory: Any) -> None:
    from agent.kube import configuration_in_memory

    node = machined_factory(kubesim)
    configuration, server = configuration_in_memory(node.kubeconfig, "test")
    assert server == CLOSED_ENDPOINT
    for path in (configuration.ssl_ca_cert, configuration.cert_file, configuration.key_file):
        assert path.startswith(f"/proc/{os.getpid()}/fd/")
        assert os.readlink(path).startswith("/memfd:alga-bootstrap-")
