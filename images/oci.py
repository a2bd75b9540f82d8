"""Deterministic OCI image layouts: the same files and epoch give the same digests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Image:
    digest: str  # of the manifest
    compressed_bytes: int  # the layer blobs, gzip-compressed


def _filter(epoch: int):  # type: ignore[no-untyped-def]
    def reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = epoch
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    return reset


def layer_from_dir(root: Path, epoch: int) -> bytes:
    """A gzip'd tar of `root`'s contents: sorted entries, fixed owner and times."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = sorted(p for p in root.rglob("*"))
        for path in entries:
            mode = path.lstat().st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                raise ValueError(f"special file in an image: {path}")
            tar.add(
                path, arcname=str(path.relative_to(root)), recursive=False, filter=_filter(epoch)
            )
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_layout(
    layout: Path, layer: bytes, config: dict[str, Any], ref_name: str, annotations: dict[str, str]
) -> Image:
    """An OCI image layout directory holding one single-layer image."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    image_config = {**config, "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    config_blob = _blob(layout, json.dumps(image_config, sort_keys=True).encode())
    layer_blob = _blob(layout, layer)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_blob},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer_blob}],
        "annotations": annotations,
    }
    manifest_blob = _blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_blob,
                "annotations": {"org.opencontainers.image.ref.name": ref_name},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True))
    return Image(manifest_blob["digest"], layer_blob["size"])


def archive_layout(layout: Path, archive: Path, epoch: int) -> None:
    """The layout as one tar (an "oci-archive"), itself deterministic."""
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(
                path, arcname=str(path.relative_to(layout)), recursive=False, filter=_filter(epoch)
            )
    os.utime(archive, (epoch, epoch))
