"""Image builders (issue 6): both images built here, checked as Talos would check the
extension, the entrypoint run in the built root filesystem, and the build reproducible.
The slowest tests in the suite: two full builds."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import BUNDLE, BUNDLE_SHA, REPO

BUILD = [str(REPO / "images" / "build"), "--flux-bundle", str(BUNDLE), "--flux-sha256", BUNDLE_SHA]
CONTAINER = "rootfs/usr/local/lib/containers/alga-bootstrap"
BUDGET_BYTES = 60_000_000
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


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


def test_entrypoint_runs_in_the_extensions_root_filesystem(built: Path, tmp_path: Path) -> None:
    with layer(built / "alga-bootstrap-extension.oci") as tar:
        tar.extractall(tmp_path, filter="tar")
    root = tmp_path / CONTAINER
    entrypoint = yaml.safe_load((REPO / "talos" / "alga-bootstrap.yaml").read_text())["container"][
        "entrypoint"
    ]

    def chroot(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CHROOT, str(root), entrypoint, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )

    version = chroot("version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("alga-bootstrap 0.1.0 (Flux v2.9.4")
    validate = chroot("validate", "--config", "/usr/local/share/alga-bootstrap/config.yaml")
    assert validate.returncode == 0, validate.stderr
    # No ExtensionServiceConfig: the empty mount point at the default path means the preset.
    default = chroot("validate")
    assert default.returncode == 0, default.stderr
    images = chroot("images")
    assert images.returncode == 0 and len(images.stdout.split()) == 6


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
