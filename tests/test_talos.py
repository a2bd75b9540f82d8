"""The Talos credential source and unattended etcd bootstrap, against machined's stand-in
(generated from Talos's real .proto files, answering as Talos's Go code does) on a unix
socket, and kubesim (issue: a real Talos node)."""

from __future__ import annotations

import gzip
import io
import itertools
import math
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import talos
from agent.errors import ConfigError
from kubesim import KubeSim
from tests.conftest import (
    REPO,
    Result,
    agent_env,
    basic_config,
    run_agent,
    writes_beyond_bookkeeping,
)
from tests.fake_machined import FakeMachined, kubeconfig_archive, talos_api

CLOSED_ENDPOINT = "https://127.0.0.2:9"  # the cluster endpoint of a node whose API is down
REMOTE_ENDPOINT = "https://198.51.100.10:6443"  # a VIP elsewhere (TEST-NET-2; never contacted)


@pytest.fixture
def machined_factory(tmp_path: Path) -> Iterator[Callable[..., FakeMachined]]:
    started: list[FakeMachined] = []

    def start(
        sim: KubeSim,
        cluster_endpoint: str = CLOSED_ENDPOINT,
        delay_s: float = 0.0,
        **options: Any,
    ) -> FakeMachined:
        kubeconfig = sim.client_cert_kubeconfig()  # Talos's admin kubeconfig: a client cert
        kubeconfig["clusters"][0]["cluster"]["server"] = cluster_endpoint
        node = FakeMachined(
            str(tmp_path / f"machine{len(started)}.sock"),
            yaml.safe_dump(kubeconfig).encode(),
            **options,
        ).start(delay_s)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def talos_config(
    write_config: Any, sim: KubeSim, node: FakeMachined, name: str = "config.yaml", **settings: Any
) -> Path:
    data = basic_config()
    data["cluster"] = {"credentials": "talos", "endpoints": [sim.url]}
    data["talos"] = {"socket": node.socket_path, **settings}
    path: Path = write_config(data, name)
    return path


def node_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**agent_env(), "TMPDIR": str(tmp_path / "tmp")}


def run_on_node(config: Path, tmp_path: Path, *extra: str) -> Result:
    return run_agent(
        "run", "--config", str(config), "--log-format", "json", *extra, env=node_env(tmp_path)
    )


# -- what machined sends, read as Talos writes it ------------------------------------------------


@pytest.mark.parametrize("size", [1000, 1024, 5000])
def test_the_unclosed_archive_is_read_as_a_stream(size: int) -> None:
    kubeconfig = b"k" * size
    archive = kubeconfig_archive(kubeconfig)
    assert len(gzip.decompress(archive)) == 512 + size  # no padding, no end-of-archive blocks
    if size % 512:
        with (
            pytest.raises(tarfile.ReadError),  # what random access made of it
            tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar,
        ):
            tar.extractfile("kubeconfig")
    assert talos.kubeconfig_from_archive(archive) == kubeconfig


def test_archives_without_a_usable_kubeconfig_are_clear_errors() -> None:
    def archive(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.type = len(data), kind
        return gzip.compress(info.tobuf(format=tarfile.USTAR_FORMAT) + data)

    assert talos.kubeconfig_from_archive(archive("./kubeconfig", b"x")) == b"x"
    with pytest.raises(talos.BootstrapError, match="no file named kubeconfig"):
        talos.kubeconfig_from_archive(archive("other", b"x"))
    with pytest.raises(talos.BootstrapError, match="not a file"):
        talos.kubeconfig_from_archive(archive("kubeconfig", b"", tarfile.SYMTYPE))
    with pytest.raises(talos.BootstrapError, match="over the"):
        talos.kubeconfig_from_archive(
            archive("kubeconfig", b"x" * (talos.KUBECONFIG_MAX_BYTES + 1))
        )
    with pytest.raises(talos.BootstrapError, match="unreadable"):
        talos.kubeconfig_from_archive(b"not gzip at all")
    truncated = gzip.compress(gzip.decompress(archive("kubeconfig", b"x" * 900))[:700])
    with pytest.raises(talos.BootstrapError, match=r"truncated|unreadable"):
        talos.kubeconfig_from_archive(truncated)


def test_hand_encoded_messages_match_talos_api() -> None:
    machine_pb2, _, common_pb2 = talos_api()
    data = common_pb2.Data(metadata=common_pb2.Metadata(hostname="cp-1"), bytes=b"\x00payload")
    assert talos.data_bytes(data.SerializeToString()) == b"\x00payload"
    response = machine_pb2.HostnameResponse(
        messages=[machine_pb2.Hostname(metadata=common_pb2.Metadata(hostname="x"), hostname="cp-2")]
    )
    assert talos.hostname_of(response.SerializeToString()) == "cp-2"
    assert machine_pb2.BootstrapRequest.FromString(talos.bootstrap_request()) == (
        machine_pb2.BootstrapRequest()
    )
    assert machine_pb2.BootstrapRequest.FromString(talos.bootstrap_request(True)).recover_etcd


# -- credentials from machined -------------------------------------------------------------------


def test_kubeconfig_from_machined_completes_a_run(
    kubesim: KubeSim, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    node = machined_factory(kubesim)
    assert len(node.kubeconfig) % 512  # so the archive really ends without padding
    config = talos_config(write_config, kubesim, node)
    result = run_on_node(config, tmp_path)
    assert result.code == 0, result.output
    assert node.names() == ["Kubeconfig"]
    assert node.calls[0][1]["talos-role"] == "os:admin"
    assert kubesim.exists(
        "source.toolkit.fluxcd.io/v1", "GitRepository", "appliance", "flux-system"
    )
    # The first line names the config this run loaded, with its digest.
    first = result.events()[0]
    assert first["event"] == "starting" and first["config"] == str(config)
    assert len(first["config_sha256"]) == 64
    # The kubeconfig (with its client key) stayed in memory: nothing in TMPDIR, nothing logged.
    assert list((tmp_path / "tmp").iterdir()) == []
    key = yaml.safe_load(node.kubeconfig)["users"][0]["user"]["client-key-data"]
    assert key not in result.output
    assert "PRIVATE KEY" not in result.output
    # It went to the configured local endpoint, not the kubeconfig's cluster endpoint.
    assert not any(e.get("endpoint") == CLOSED_ENDPOINT for e in result.events())


@pytest.mark.parametrize("version", [(1, 12), (1, 14)])
def test_a_machine_config_that_arrives_late_restarts_the_service(
    kubesim: KubeSim, write_config: Any, tmp_path: Path, version: tuple[int, int]
) -> None:
    # The socket is there but nothing answers yet (an absent socket fails at once: not a
    # Talos node, tests/test_workstation.py); then machined has no machine config for two
    # calls (Internal up to 1.12, the worker's answer from 1.13); then it has one.
    kubeconfig = kubesim.client_cert_kubeconfig()
    node = FakeMachined(
        str(tmp_path / "machine.sock"),
        yaml.safe_dump(kubeconfig).encode(),
        talos_version=version,
        config_after_calls=2,
    )
    silent = socket.socket(socket.AF_UNIX)  # bound, not listening: connections refused
    silent.bind(node.socket_path)
    config = talos_config(write_config, kubesim, node)
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node_env(tmp_path),
        cwd=REPO,
    )
    assert agent.stderr is not None
    first_wait = ""
    while '"machined not ready yet"' not in first_wait:
        first_wait = agent.stderr.readline()
        assert first_wait, agent.stdout.read() if agent.stdout else ""
    silent.close()
    os.unlink(node.socket_path)
    node.start()
    try:
        out, err = agent.communicate(timeout=60)
    finally:
        node.stop()
    result = Result(agent.returncode, out, first_wait + err)
    assert result.code == 0, result.output
    assert node.names().count("Kubeconfig") == 3
    waits = [e for e in result.events() if e["event"] == "machined not ready yet"]
    no_config = "INTERNAL" if version < (1, 13) else "UNIMPLEMENTED"
    assert waits[0]["code"] == "UNAVAILABLE"
    assert {e["code"] for e in waits} == {"UNAVAILABLE", no_config}, result.output
    # Its mounts were decided without the config: Talos starts it afresh, nothing written.
    assert node.restarted == ["ext-alga-bootstrap"]
    assert result.events()[-1]["event"] == talos.RestartedForConfig.event
    assert kubesim.requests == []


def test_maintenance_mode_is_waited_out_without_writing(
    kubesim: KubeSim, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    node = machined_factory(kubesim, config_after_calls=10**6)  # no machine config at all
    config = talos_config(write_config, kubesim, node)
    result = run_on_node(config, tmp_path, "--timeout", "3s")
    assert result.code == 1, result.output  # Talos retries; it restarts itself once it has one
    assert "Talos has no machine config yet" in result.stderr
    assert "ServiceList" in node.names() and node.restarted == []
    assert kubesim.requests == []


def test_a_worker_node_has_nothing_to_do(
    kubesim: KubeSim, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    node = machined_factory(kubesim, machine_type="worker")
    result = run_on_node(talos_config(write_config, kubesim, node), tmp_path)
    assert result.code == 0, result.output  # Talos marks the service Finished
    assert node.names() == ["Kubeconfig", "ServiceList"]  # kubelet runs: a config is loaded
    assert result.stdout == "" and result.messages() == []  # its log only
    assert [e["event"] for e in result.events()][-1].startswith("this is a worker node")
    assert kubesim.requests == []


def test_a_field_tech_with_a_kubeconfig_on_a_worker_still_works(
    kubesim: KubeSim, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    node = machined_factory(kubesim, machine_type="worker")
    config = talos_config(write_config, kubesim, node)
    result = run_on_node(config, tmp_path, "--kubeconfig", str(kubesim.kubeconfig_path))
    assert result.code == 0, result.output
    assert node.calls == []
    assert kubesim.exists(
        "source.toolkit.fluxcd.io/v1", "GitRepository", "appliance", "flux-system"
    )


# -- etcd bootstrap ------------------------------------------------------------------------------


@pytest.fixture
def slow_node(
    kubesim_factory: Any, machined_factory: Any, write_config: Any, tmp_path: Path
) -> Callable[..., tuple[FakeMachined, Result]]:
    """A fresh control-plane node: its API comes up only once etcd is bootstrapped, or
    `api_after_s` after the agent's first call to machined (a node whose etcd runs already,
    or joins another). Returns its machined and the agent's result."""

    def run(
        bootstrap: Any = True,
        cluster_endpoint: str = CLOSED_ENDPOINT,
        api_after_s: float = math.inf,
        timeout: str = "60s",
        **node_options: Any,
    ) -> tuple[FakeMachined, Result]:
        sim = kubesim_factory(controllers=True, controller_delay=0.05, refuse_seconds=math.inf)

        def api_later(name: str) -> None:
            if name == "Kubeconfig" and api_after_s != math.inf:
                threading.Timer(api_after_s, sim.accept_connections).start()

        node = machined_factory(
            sim,
            cluster_endpoint,
            on_bootstrap=sim.accept_connections,
            on_call=api_later,
            **node_options,
        )
        settings = {"bootstrapEtcd": bootstrap, "bootstrapAfter": "500ms"} if bootstrap else {}
        config = talos_config(write_config, sim, node, **settings)
        return node, run_on_node(config, tmp_path, "--timeout", timeout)

    return run


def test_bootstrap_waits_until_talos_allows_it(slow_node: Any) -> None:
    # CRI not up yet, then time not in sync, then a plain error from BootstrapEtcd.
    node, result = slow_node(bootstrap_not_allowed_for=1, time_unsynced_for=2, plain_error_for=3)
    assert result.code == 0, result.output
    assert node.names().count("Bootstrap") == 4
    assert all(md["talos-role"] == "os:admin" for _, md in node.calls)
    events = result.events()
    waits = [e for e in events if e["event"] == "etcd bootstrap not possible yet; retrying"]
    assert [w["code"] for w in waits] == ["FAILED_PRECONDITION", "FAILED_PRECONDITION", "UNKNOWN"]
    assert "failed to stop etcd" in waits[-1]["detail"]
    assert "cluster endpoint does not answer; this node creates the cluster" in [
        e["event"] for e in events
    ]
    # Backoff, not a hot loop.
    calls_at = node.bootstrap_calls_at
    gaps = [b - a for a, b in itertools.pairwise(calls_at)]
    assert min(gaps) >= 0.25, gaps


def test_bootstrap_already_done(slow_node: Any) -> None:
    node, result = slow_node(etcd_data=True, api_after_s=3)
    assert result.code == 0, result.output
    assert node.names().count("Bootstrap") == 1
    assert any(e["event"] == "etcd is already bootstrapped" for e in result.events())


def test_a_control_plane_without_etcd_says_so(slow_node: Any) -> None:
    node, result = slow_node(etcd_configured=False, api_after_s=30)
    assert result.code == 2
    assert node.names().count("Bootstrap") == 1  # terminal: not retried
    assert "no etcd configured" in result.stderr and "etcd is not configured" in result.stderr
    assert "not a control-plane node" not in result.stderr


@pytest.mark.parametrize("version", [(1, 12), (1, 13)])
def test_bootstrap_on_a_worker_is_terminal_in_every_talos_version(
    kubesim: KubeSim, machined_factory: Any, version: tuple[int, int]
) -> None:
    node = machined_factory(kubesim, machine_type="worker", talos_version=version)
    machined = talos.Machined(node.socket_path)
    try:
        with pytest.raises(ConfigError, match="not a control-plane node"):
            machined.bootstrap(time.monotonic() + 10)
    finally:
        machined.close()
    assert node.names() == ["Bootstrap"]


def test_bootstrap_that_never_becomes_possible_ends_at_the_deadline(slow_node: Any) -> None:
    node, result = slow_node(bootstrap_not_allowed_for=1000, timeout="5s")
    assert result.code == 1
    # The run's own time (the deadline plus up to 1 s to clean up), not the process's: on a
    # busy machine Python's start-up alone can take seconds.
    assert result.events()[-1]["seconds"] <= 6, result.output
    assert "bootstrap is not available yet" in result.stderr
    assert 2 <= node.names().count("Bootstrap") <= 10  # backoff, bounded by the deadline


def test_never_bootstraps_a_node_that_joins_an_existing_cluster(
    slow_node: Any, kubesim_factory: Any
) -> None:
    existing = kubesim_factory()  # the cluster this node joins answers at its endpoint
    node, result = slow_node(cluster_endpoint=existing.url, api_after_s=3)
    assert result.code == 0, result.output
    assert "Bootstrap" not in node.names()
    assert any(
        e["event"].startswith("cluster endpoint answers: this node joins") for e in result.events()
    )


def test_no_bootstrap_when_the_api_comes_up_in_time(
    kubesim: KubeSim, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    node = machined_factory(kubesim)
    config = talos_config(write_config, kubesim, node, bootstrapEtcd=True)
    assert run_on_node(config, tmp_path).code == 0
    assert node.names() == ["Kubeconfig"]


def test_bootstrap_is_off_unless_configured(slow_node: Any) -> None:
    started = time.monotonic()
    node, result = slow_node(bootstrap=False, api_after_s=3)
    assert result.code == 0, result.output
    assert time.monotonic() - started >= 2.5
    assert node.names() == ["Kubeconfig"]


def test_single_node_bootstrap_is_refused_on_a_multi_node_site(slow_node: Any) -> None:
    node, result = slow_node(cluster_endpoint=REMOTE_ENDPOINT, api_after_s=30)
    assert result.code == 2
    assert "Bootstrap" not in node.names()
    assert "talos.bootstrapEtcd: true bootstraps a single-node site only" in result.stderr
    assert "{node: <hostname>}" in result.stderr


def test_the_named_node_refuses_an_endpoint_that_is_its_own_address(slow_node: Any) -> None:
    own = [a for a in talos.local_addresses() if a.version == 4 and not a.is_loopback]
    if not own:
        pytest.skip("this machine has no non-loopback IPv4 address")
    node, result = slow_node(
        bootstrap={"node": "appliance"}, cluster_endpoint=f"https://{own[0]}:6443", api_after_s=30
    )
    assert result.code == 2
    assert "Bootstrap" not in node.names()
    assert "this node's own address" in result.stderr and "VIP" in result.stderr


def test_only_the_named_node_bootstraps(slow_node: Any) -> None:
    node, result = slow_node(bootstrap={"node": "cp-1"}, hostname="cp-2", api_after_s=3)
    assert result.code == 0, result.output
    assert "Bootstrap" not in node.names()
    assert any(e["event"].startswith("not the bootstrap node") for e in result.events())


def test_status_never_bootstraps(
    kubesim_factory: Any, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    sim = kubesim_factory(refuse_seconds=math.inf)
    node = machined_factory(sim, on_bootstrap=sim.accept_connections)
    config = talos_config(write_config, sim, node, bootstrapEtcd=True, bootstrapAfter="1ms")
    result = run_agent("status", "--config", str(config), env=node_env(tmp_path))
    assert result.code == 1, result.output
    assert "Bootstrap" not in node.names()


def test_three_control_plane_nodes_bootstrap_etcd_once(
    kubesim_factory: Any, machined_factory: Any, write_config: Any, tmp_path: Path
) -> None:
    """One image on three control-plane nodes: exactly one Bootstrap call, the Lease lets
    one run write, and all three finish."""
    sim = kubesim_factory(controllers=True, controller_delay=0.05, refuse_seconds=math.inf)
    nodes = [
        machined_factory(sim, hostname=f"cp-{i}", on_bootstrap=sim.accept_connections)
        for i in (1, 2, 3)
    ]
    example = yaml.safe_load((REPO / "talos" / "examples" / "three-node.yaml").read_text())
    assert example["talos"]["bootstrapEtcd"] == {"node": "cp-1"}
    runs = []
    for i, node in enumerate(nodes):
        config = talos_config(
            write_config,
            sim,
            node,
            f"cp{i}.yaml",
            bootstrapEtcd=example["talos"]["bootstrapEtcd"],
            bootstrapAfter="500ms",
        )
        runs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agent",
                    "run",
                    "--config",
                    str(config),
                    "--log-format",
                    "json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=node_env(tmp_path),
                cwd=REPO,
            )
        )
    results = []
    for proc in runs:
        out, err = proc.communicate(timeout=120)
        results.append(Result(proc.returncode, out, err))
    assert [r.code for r in results] == [0, 0, 0], [r.output[-2000:] for r in results]
    assert [n.names().count("Bootstrap") for n in nodes] == [1, 0, 0]
    # The Lease: each object was written by one run only, never by two.
    assert [p for p, n in Counter(writes_beyond_bookkeeping(sim)).items() if n > 1] == []
    assert sum("etcd bootstrap requested" in r.stderr for r in results) == 1


def test_bootstrap_etcd_takes_false_true_or_one_node(write_config: Any, tmp_path: Path) -> None:
    data = basic_config()
    data["talos"] = {"bootstrapEtcd": "yes"}
    result = run_agent("validate", "--config", str(write_config(data)))
    assert result.code == 2
    assert "talos.bootstrapEtcd" in result.stderr and "{node: HOSTNAME}" in result.stderr
    data["talos"] = {"bootstrapEtcd": {"node": "cp-1"}}
    assert run_agent("validate", "--config", str(write_config(data))).code == 0
    data["talos"] = {"bootstrapEtcd": {"node": "cp-1.example.com"}}  # machined: the short name
    result = run_agent("validate", "--config", str(write_config(data)))
    assert result.code == 2 and "short hostname" in result.stderr
    data["talos"] = {"bootstrapEtcd": {"nodes": "cp-1"}}
    result = run_agent("validate", "--config", str(write_config(data)))
    assert result.code == 2 and "talos.bootstrapEtcd" in result.stderr


def test_memfd_paths_are_not_files_on_disk(kubesim: KubeSim, machined_factory: Any) -> None:
    from agent.kube import configuration_in_memory

    node = machined_factory(kubesim)
    configuration, server = configuration_in_memory(node.kubeconfig, "test")
    assert server == CLOSED_ENDPOINT
    for path in (configuration.ssl_ca_cert, configuration.cert_file, configuration.key_file):
        assert path.startswith(f"/proc/{os.getpid()}/fd/")
        assert os.readlink(path).startswith("/memfd:alga-bootstrap-")
