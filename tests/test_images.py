"""Image builders (issue 6): both images built here, checked as Talos would check the
extension, the entrypoint run in the built root filesystem, and the build reproducible.
The slowest tests in the suite: two full builds."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubesim import upstream
from tests.conftest import BUNDLE, BUNDLE_SHA, REPO, SHARED
from tests.fake_machined import FakeMachined

BUILD = [str(REPO / "images" / "build"), "--flux-bundle", str(BUNDLE), "--flux-sha256", BUNDLE_SHA]
CONTAINER = "rootfs/usr/local/lib/containers/alga-bootstrap"
BUDGET_BYTES = 60_000_000
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
SITE = "/usr/local/lib/alga-bootstrap"  # the agent and its dependencies in the image


def build(out: Path) -> dict[str, Any]:
    result = subprocess.run(
        [*BUILD, "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": "1790000000"},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if " sha256:" in line]
    assert len(lines) == 2  # each image's digest and compressed size is printed
    summary: dict[str, Any] = json.loads((out / "images.json").read_text())
    return summary


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("images")
    build(out)
    return out


def layer(layout: Path) -> tarfile.TarFile:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    assert len(manifest["layers"]) == 1
    blob = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    data = blob.read_bytes()
    assert hashlib.sha256(data).hexdigest() == blob.name
    return tarfile.open(fileobj=io.BytesIO(gzip.decompress(data)))


def test_extension_image_follows_talos_rules(built: Path) -> None:
    with layer(built / "alga-bootstrap-extension.oci") as tar:
        members = tar.getmembers()
        top = {m.name.split("/")[0] for m in members}
        assert top == {"manifest.yaml", "rootfs"}
        for member in members:
            assert member.isfile() or member.isdir() or member.issym(), member.name
            if member.name in ("manifest.yaml", "rootfs") or (
                member.isdir() and "rootfs/usr/local".startswith(member.name)
            ):
                continue
            assert member.name.startswith("rootfs/usr/local/"), member.name
            if not member.issym():
                assert not member.mode & 0o002, f"world-writable: {member.name}"
        manifest = yaml.safe_load(tar.extractfile("manifest.yaml").read())  # type: ignore[union-attr]
        service_file = tar.extractfile("rootfs/usr/local/etc/containers/alga-bootstrap.yaml")
        service = yaml.safe_load(service_file.read())  # type: ignore[union-attr]
        entry = tar.getmember(f"{CONTAINER}{service['container']['entrypoint']}")
        assert entry.isfile() and entry.mode & 0o111
        assert manifest == yaml.safe_load((REPO / "talos" / "manifest.yaml").read_text())
        names = {m.name for m in members}
        for mount in service["container"]["mounts"]:  # mount points exist (read-only root)
            assert f"{CONTAINER}{mount['destination']}" in names, mount
        bundle = tar.extractfile(
            f"{CONTAINER}/usr/local/share/alga-bootstrap/flux/gotk-components.yaml"
        )
        assert hashlib.sha256(bundle.read()).hexdigest() == BUNDLE_SHA  # type: ignore[union-attr]
        assert not any("/kubesim/" in n or n.endswith("/pip") for n in names)
        assert not any("/usr/share/doc/" in n or "/usr/share/locale/" in n for n in names)


@pytest.fixture(scope="module")
def container_root(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The extension's container root filesystem, as Talos unpacks it."""
    out = tmp_path_factory.mktemp("extension")
    with layer(built / "alga-bootstrap-extension.oci") as tar:
        tar.extractall(out, filter="tar")
    return out / CONTAINER


def service() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((REPO / "talos" / "alga-bootstrap.yaml").read_text())
    return spec


def chroot(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROOT, str(root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_entrypoint_runs_in_the_extensions_root_filesystem(container_root: Path) -> None:
    entrypoint = service()["container"]["entrypoint"]
    version = chroot(container_root, entrypoint, "version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("alga-bootstrap 0.1.0 (Flux v2.9.4")
    config = "/usr/local/share/alga-bootstrap/config.yaml"
    validate = chroot(container_root, entrypoint, "validate", "--config", config)
    assert validate.returncode == 0, validate.stderr
    # No ExtensionServiceConfig: the empty mount point at the default path means the preset.
    default = chroot(container_root, entrypoint, "validate")
    assert default.returncode == 0, default.stderr
    images = chroot(container_root, entrypoint, "images")
    assert images.returncode == 0 and len(images.stdout.split()) >= 6


def test_every_agent_module_imports_in_the_image(container_root: Path) -> None:
    """Whatever mode a run takes (grpc on Talos, kubernetes, httpx), its imports resolve
    with the image's own Python and libraries."""
    script = f"""
import importlib, pkgutil, sys
sys.path.insert(0, "{SITE}")
import agent
names = [m.name for m in pkgutil.walk_packages(agent.__path__, "agent.")]
for name in names:
    if not name.endswith("__main__"):
        importlib.import_module(name)
import grpc, grpc._cython.cygrpc
print(len(names))
"""
    result = chroot(container_root, "/usr/bin/python3", "-I", "-c", script)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 20


def test_every_native_library_resolves_in_the_image(container_root: Path) -> None:
    """ldd, from the image's own files: the image's dynamic loader lists what each ELF
    file needs, inside the root filesystem; nothing may be 'not found'."""
    loaders = sorted(container_root.glob("lib*/ld-linux*.so*"))
    assert loaders, "no dynamic loader in the image"
    loader = "/" + str(loaders[0].relative_to(container_root))
    elf_files = [
        path
        for path in container_root.rglob("*")
        if path.is_file()
        and not path.is_symlink()
        and (path.suffix == ".so" or ".so." in path.name or path.parent.name == "bin")
        and path.read_bytes()[:4] == b"\x7fELF"
    ]
    assert any("cygrpc" in p.name for p in elf_files)
    missing = {}
    for path in elf_files:
        inside = "/" + str(path.relative_to(container_root))
        listed = chroot(container_root, loader, "--list", inside)
        lost = [line.strip() for line in listed.stdout.splitlines() if "not found" in line]
        if lost:
            missing[inside] = lost
    assert missing == {}


def test_the_talos_boot_path_runs_in_the_image(
    container_root: Path, kubesim_factory: Any, tmp_path: Path
) -> None:
    """`run` as Talos starts it: the service's entrypoint, arguments and environment, a
    read-only root filesystem, machined's socket and the config file bind-mounted where the
    service and its ExtensionServiceConfig put them, /proc and /dev from the runtime. The
    default preset with credentials from machined (a stand-in speaking Talos's API), etcd
    bootstrapped unattended, then the whole run against kubesim."""
    spec = service()["container"]
    sim = kubesim_factory(controllers=True, controller_delay=0.05, refuse_seconds=math.inf)
    # The stand-in Flux applies upstream's appliance, so verify can see the site's patches.
    sim.controllers.sources.update(upstream.reference_sources(SHARED / "alga"))
    kubeconfig = sim.client_cert_kubeconfig()
    kubeconfig["clusters"][0]["cluster"]["server"] = "https://127.0.0.2:9"  # this node, API down
    node = FakeMachined(
        str(tmp_path / "machine.sock"),
        yaml.safe_dump(kubeconfig).encode(),
        on_bootstrap=sim.accept_connections,
    ).start()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "preset": "alga-talos-single-node",
                "cluster": {"endpoints": [sim.url]},
                "talos": {"bootstrapAfter": "500ms"},
            }
        )
    )
    mounts = {
        "/system/run/machined/machine.sock": node.socket_path,
        "/etc/alga-bootstrap/config.yaml": str(config),
        "/etc/ssl/certs": "/etc/ssl/certs",
    }
    assert set(mounts) == {m["destination"] for m in spec["mounts"]} | {
        "/etc/alga-bootstrap/config.yaml"
    }
    root = shlex.quote(str(container_root))
    setup = [
        f"mount --bind {root} {root}",
        f"mount -o remount,bind,ro {root}",
        f"mount -t proc proc {root}/proc",
        f"mount --rbind /dev {root}/dev",
        *(f"mount --bind -o ro {shlex.quote(src)} {root}{dest}" for dest, src in mounts.items()),
        f"exec chroot {root} {shlex.join([spec['entrypoint'], *spec['args']])}",
    ]
    environment = dict(item.split("=", 1) for item in spec.get("environment", []))
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **environment}

    def boot() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec", "\n".join(setup)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )

    try:
        first = boot()
        assert first.returncode == 0, first.stdout + first.stderr[-3000:]
        events = [json.loads(line) for line in first.stderr.splitlines()]  # JSON: not a TTY
        assert events[0]["event"] == "starting"
        assert events[0]["config"] == "/etc/alga-bootstrap/config.yaml"
        assert events[-1]["event"] == "done"
        assert node.names().count("Bootstrap") == 1
        assert sim.exists(
            "source.toolkit.fluxcd.io/v1", "GitRepository", "alga-appliance", "flux-system"
        )
        again = boot()
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stderr.splitlines()[-1])["event"] == "nothing to do"
    finally:
        node.stop()


def test_agent_image_and_size_budget(built: Path) -> None:
    summary = json.loads((built / "images.json").read_text())
    for name in ("alga-bootstrap", "alga-bootstrap-extension"):
        assert summary[name]["compressed_bytes"] <= BUDGET_BYTES
        assert (built / f"{name}.oci.tar").stat().st_size > 0
    index = json.loads((built / "alga-bootstrap.oci" / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    assert manifest_digest == summary["alga-bootstrap"]["digest"]
    manifest = json.loads(
        (
            built / "alga-bootstrap.oci" / "blobs" / "sha256" / manifest_digest.split(":")[1]
        ).read_text()
    )
    config = json.loads(
        (
            built
            / "alga-bootstrap.oci"
            / "blobs"
            / "sha256"
            / manifest["config"]["digest"].split(":")[1]
        ).read_text()
    )
    assert config["config"]["Entrypoint"] == ["/usr/local/bin/alga-bootstrap"]
    assert config["config"]["Cmd"] == ["run"]


def test_an_independent_client_reads_both_archives(built: Path) -> None:
    summary = json.loads((built / "images.json").read_text())
    for name in ("alga-bootstrap", "alga-bootstrap-extension"):
        inspected = subprocess.run(
            ["skopeo", "inspect", f"oci-archive:{built}/{name}.oci.tar"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert inspected.returncode == 0, inspected.stderr
        assert json.loads(inspected.stdout)["Digest"] == summary[name]["digest"]


def test_same_inputs_give_the_same_digests(built: Path, tmp_path: Path) -> None:
    first = json.loads((built / "images.json").read_text())
    again = build(tmp_path / "again")
    assert again == first
    shutil.rmtree(tmp_path / "again")


def test_a_wrong_bundle_digest_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [*BUILD[:-1], "0" * 64, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "refusing to bake an unverified Flux" in result.stderr
    assert not (tmp_path / "images.json").exists()
