"""The files under talos/ against Talos's rules for system extensions and extension
services (pkg/machinery/extensions), and the examples against the agent itself."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from agent import __version__
from tests.conftest import BUNDLE, REPO, run_agent

TALOS = REPO / "talos"
SERVICE_NAME = re.compile(r"^[-_a-z0-9]+$")
DEPENDENCY_KEYS = {"service", "path", "network", "time", "configuration"}
NETWORK_STATUSES = {"addresses", "connectivity", "hostname", "etcfiles"}
OCI_MOUNT_KEYS = {"source", "destination", "type", "options", "uidMappings", "gidMappings"}
SEMVER_RANGE = re.compile(r"^(>=|>|<=|<|=)?\s*v?\d+\.\d+\.\d+$")


def load(name: str) -> Any:
    return yaml.safe_load((TALOS / name).read_text())


def test_manifest() -> None:
    manifest = load("manifest.yaml")
    assert set(manifest) == {"version", "metadata"}
    assert manifest["version"] == "v1alpha1"
    meta = manifest["metadata"]
    assert {"name", "version", "author", "description", "compatibility"} <= set(meta)
    assert meta["name"] == "alga-bootstrap"
    assert meta["version"] == __version__  # the package's version
    constraint = meta["compatibility"]["talos"]["version"]
    assert all(SEMVER_RANGE.match(part.strip()) for part in constraint.split(","))
    assert constraint == ">= v1.7.0"  # ExtensionServiceConfig; see the comment in the file


def test_service_definition() -> None:
    service = load("alga-bootstrap.yaml")
    assert set(service) <= {"name", "container", "depends", "restart", "logToConsole"}
    assert SERVICE_NAME.match(service["name"]) and service["name"] == "alga-bootstrap"
    container = service["container"]
    assert container["entrypoint"].startswith("/")
    assert container["args"] == ["run"]
    assert service["restart"] == "untilSuccess"
    assert container.get("security", {}).get("writeableRootfs", False) is False
    paths = set()
    for item in service["depends"]:
        assert len(item) == 1 and set(item) <= DEPENDENCY_KEYS, item
        if "path" in item:
            assert item["path"].startswith("/")
            paths.add(item["path"])
        if "network" in item:
            assert set(item["network"]) <= NETWORK_STATUSES
        if "time" in item:
            assert item["time"] is True
    # The documented choice: boot without an ExtensionServiceConfig (see the file).
    assert not any("configuration" in item for item in service["depends"])
    assert {"network", "time"} <= {key for item in service["depends"] for key in item}
    for mount in container["mounts"]:
        assert set(mount) <= OCI_MOUNT_KEYS and {"source", "destination", "type"} <= set(mount)
        assert mount["destination"].startswith("/")
        assert all(isinstance(o, str) for o in mount.get("options", []))
        if mount["type"] == "bind":
            assert "ro" in mount["options"]  # read-only, every one
            assert mount["source"] in paths, f"{mount['source']} is not a path dependency"
    assert "/system/run/machined/machine.sock" in {m["source"] for m in container["mounts"]}


def test_extension_service_config_example_validates(tmp_path: Path) -> None:
    doc = load("extension-service-config.example.yaml")
    assert doc["apiVersion"] == "v1alpha1" and doc["kind"] == "ExtensionServiceConfig"
    assert doc["name"] == load("alga-bootstrap.yaml")["name"]
    files = {f["mountPath"]: f["content"] for f in doc["configFiles"]}
    assert all(path.startswith("/") for path in files)
    # Lay the files out as Talos mounts them, under tmp_path, and validate the config.
    for path, content in files.items():
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            content.replace("/etc/alga-bootstrap/", f"{tmp_path}/etc/alga-bootstrap/")
        )
    config = tmp_path / "etc/alga-bootstrap/config.yaml"
    result = run_agent("validate", "--config", str(config), "--flux-manifests", str(BUNDLE))
    assert result.code == 0, result.output


def test_machine_config_patches() -> None:
    single = load("patches/single-node.yaml")
    assert single["cluster"]["allowSchedulingOnControlPlanes"] is True
    assert single["machine"]["install"]["image"]
    old = list(yaml.safe_load_all((TALOS / "patches/image-cache-talos-1.13.yaml").read_text()))
    assert old[0]["machine"]["features"]["imageCache"]["localEnabled"] is True
    new = list(yaml.safe_load_all((TALOS / "patches/image-cache-talos-1.14.yaml").read_text()))
    assert new[0]["kind"] == "ImageCacheConfig" and new[0]["local"]["enabled"] is True
    for docs in (old, new):
        assert any(d.get("kind") == "VolumeConfig" and d.get("name") == "IMAGECACHE" for d in docs)


def test_imager_profiles() -> None:
    iso, installer = load("imager/iso.yaml"), load("imager/installer.yaml")
    assert iso["output"]["kind"] == "iso" and installer["output"]["kind"] == "installer"
    for profile in (iso, installer):
        extensions = profile["input"]["systemExtensions"]
        assert len(extensions) == 1
        assert set(extensions[0]) & {"imageRef", "tarballPath", "ociPath"}
        assert profile["version"] == iso["version"]
    assert iso["input"]["imageCache"]["ociPath"]


def test_three_node_example_names_one_bootstrap_node() -> None:
    example = TALOS / "examples" / "three-node.yaml"
    assert load("examples/three-node.yaml")["talos"]["bootstrapEtcd"] == {"node": "cp-1"}
    result = run_agent("validate", "--config", str(example), "--flux-manifests", str(BUNDLE))
    assert result.code == 0, result.output
