"""Build the agent's container image and the Talos system extension image.

  images/build --flux-bundle PATH --flux-sha256 SHA [--version V] [--out DIR]

1. The container root filesystem: Debian's Python (mmdebstrap, packages only, no
   maintainer scripts), the agent and its locked, hash-checked dependencies, the Flux
   bundle (sha256 checked) at a fixed path, the default (Alga) config; docs, locales,
   tests and pip left out; bytecode compiled ahead (the root filesystem is read-only).
2. The agent image, an OCI layout and its archive: out/alga-bootstrap.oci[.tar].
3. The Talos extension image (manifest.yaml and rootfs/ only), likewise:
   out/alga-bootstrap-extension.oci[.tar].
Timestamps come from SOURCE_DATE_EPOCH (default: the last commit's time), so the same
inputs (and the same Debian packages) give the same digests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from images import oci

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
MIRRORS = [
    "http://deb.debian.org/debian",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
]
# libstdc++6: grpcio's native module (machined's API, the Talos boot path) links it.
PACKAGES = ["python3-minimal", "libpython3.11-stdlib", "libstdc++6"]
PYTHON = "/usr/lib/python3.11"
SITE = "/usr/local/lib/alga-bootstrap"  # the agent and its dependencies
SHARE = "/usr/local/share/alga-bootstrap"
FLUX_BUNDLE = f"{SHARE}/flux/gotk-components.yaml"
ENTRYPOINT = "/usr/local/bin/alga-bootstrap"
CONTAINER_DIR = "rootfs/usr/local/lib/containers/alga-bootstrap"
SERVICE_FILE = "rootfs/usr/local/etc/containers/alga-bootstrap.yaml"
# Mount points must exist in a read-only root filesystem (see talos/alga-bootstrap.yaml).
MOUNT_POINT_FILES = ["/system/run/machined/machine.sock", "/etc/alga-bootstrap/config.yaml"]
MOUNT_POINT_DIRS = ["/etc/ssl/certs"]
PRUNE = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/polkit-1",
    "usr/lib/x86_64-linux-gnu/gconv",
    "var/cache",
    "var/log",
    "var/lib/apt",
    *(
        f"{PYTHON.lstrip('/')}/{m}"
        for m in (
            "test",
            "idlelib",
            "tkinter",
            "turtledemo",
            "ensurepip",
            "lib2to3",
            "pydoc_data",
            "distutils",
            "venv",
        )
    ),
    *(
        f"usr/bin/{tool}"
        for tool in (
            "dpkg",
            "dpkg-deb",
            "dpkg-divert",
            "dpkg-query",
            "dpkg-split",
            "dpkg-statoverride",
            "dpkg-trigger",
            "dpkg-maintscript-helper",
            "dpkg-realpath",
        )
    ),
]
ENTRYPOINT_SCRIPT = f"""#!/usr/bin/python3 -IB
import sys

sys.path.insert(0, "{SITE}")
from agent.cli import main

sys.exit(main())
"""


class BuildError(Exception):
    pass


def run(argv: list[str], **kwargs: object) -> None:
    print("+", " ".join(argv), file=sys.stderr)
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]


def default_epoch() -> int:
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    out = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%ct"], capture_output=True, text=True
    )
    return int(out.stdout.strip() or 0)


def debian_base(root: Path, epoch: int) -> None:
    mode = "root" if os.geteuid() == 0 else "unshare"
    run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=extract",
            f"--mode={mode}",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(root),
            *MIRRORS,
        ],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
    )


def install_agent(root: Path) -> None:
    site = root / SITE.lstrip("/")
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-compile",
        "--target",
        str(site),
        "--disable-pip-version-check",
    ]
    run(
        [
            *pip,
            "--require-hashes",
            "--only-binary=:all:",
            "-r",
            str(REPO / "requirements" / "runtime.lock"),
        ]
    )
    with tempfile.TemporaryDirectory() as build:  # keep build/ out of the work tree
        run([*pip, "--no-deps", "--no-build-isolation", str(REPO)], cwd=build)
    # The simulator and the console scripts (host shebangs) are not part of the agent.
    for leftover in ("kubesim", "bin"):
        shutil.rmtree(site / leftover, ignore_errors=True)
    for tests in [p for p in site.rglob("*") if p.is_dir() and p.name in ("tests", "test")]:
        shutil.rmtree(tests, ignore_errors=True)


def add_files(root: Path, bundle: Path) -> None:
    target = root / FLUX_BUNDLE.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle, target)
    (root / SHARE.lstrip("/") / "config.yaml").write_text(
        "# The image's default config: the Alga PSA Talos single-node appliance.\n"
        "preset: alga-talos-single-node\n"
    )
    entry = root / ENTRYPOINT.lstrip("/")
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(ENTRYPOINT_SCRIPT)
    entry.chmod(0o755)
    for path in MOUNT_POINT_FILES:
        placeholder = root / path.lstrip("/")
        placeholder.parent.mkdir(parents=True, exist_ok=True)
        placeholder.write_bytes(b"")  # an empty config file means "the default preset"
    for path in MOUNT_POINT_DIRS:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)


def prune_and_normalise(root: Path) -> None:
    for relative in PRUNE:
        target = root / relative
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for pycache in list(root.rglob("__pycache__")):
        shutil.rmtree(pycache)
    # Device nodes: Talos refuses special files, and the runtime provides /dev anyway. The
    # runtime mounts /dev, /proc and /sys on empty directories (the agent's in-memory
    # kubeconfig files live under /proc/self/fd).
    for runtime_dir in ("dev", "proc", "sys"):
        shutil.rmtree(root / runtime_dir, ignore_errors=True)
        (root / runtime_dir).mkdir()
    for path in root.rglob("*"):
        mode = path.lstat().st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            path.unlink()
        elif not stat.S_ISLNK(mode) and mode & 0o002:
            path.chmod(stat.S_IMODE(mode) & ~0o002 & ~stat.S_ISVTX)  # e.g. /tmp


def compile_bytecode(root: Path) -> None:
    """Ahead of time, hash-checked (no mtimes): the agent starts fast on a read-only root."""
    for directory in (PYTHON, SITE):
        run(
            [
                sys.executable,
                "-m",
                "compileall",
                "-q",
                "-j",
                "0",
                "--invalidation-mode",
                "unchecked-hash",
                "-d",
                directory,
                "-x",
                r"/(test|tests)/",
                str(root / directory.lstrip("/")),
            ]
        )


def container_rootfs(root: Path, bundle: Path, epoch: int) -> None:
    debian_base(root, epoch)
    install_agent(root)
    add_files(root, bundle)
    prune_and_normalise(root)
    compile_bytecode(root)


def image_config(epoch: int, version: str, entrypoint: list[str] | None) -> dict[str, object]:
    created = subprocess.run(
        ["date", "-u", "-d", f"@{epoch}", "+%Y-%m-%dT%H:%M:%SZ"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    config: dict[str, object] = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "Labels": {
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.title": "alga-bootstrap",
            }
        },
    }
    if entrypoint:
        config["config"] = {
            **config["config"],
            "Entrypoint": entrypoint,  # type: ignore[dict-item]
            "Cmd": ["run"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
        }
    return config


def extension_tree(staging: Path, rootfs: Path, version: str) -> None:
    manifest = yaml.safe_load((REPO / "talos" / "manifest.yaml").read_text())
    if manifest["metadata"]["version"] != version:
        raise BuildError(
            f"talos/manifest.yaml says version {manifest['metadata']['version']}"
            f", the build is {version}; they must match"
        )
    shutil.copyfile(REPO / "talos" / "manifest.yaml", staging / "manifest.yaml")
    service = staging / SERVICE_FILE
    service.parent.mkdir(parents=True)
    shutil.copyfile(REPO / "talos" / "alga-bootstrap.yaml", service)
    shutil.copytree(rootfs, staging / CONTAINER_DIR, symlinks=True)


def main(argv: list[str] | None = None) -> int:
    from agent import __version__

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--flux-bundle",
        type=Path,
        required=True,
        help="`flux install --export` file, e.g. ../shared/flux/v2.9.4/gotk-components.yaml",
    )
    parser.add_argument("--flux-sha256", required=True, help="its expected sha256")
    parser.add_argument("--version", default=__version__, help="default: the package's")
    parser.add_argument("--out", type=Path, default=REPO / "out", help="default: out/")
    args = parser.parse_args(argv)
    try:
        digest = hashlib.sha256(args.flux_bundle.read_bytes()).hexdigest()
    except OSError as err:
        raise BuildError(
            f"{args.flux_bundle}: cannot read the Flux bundle ({err.strerror})"
        ) from None
    if digest != args.flux_sha256:
        raise BuildError(
            f"{args.flux_bundle}: sha256 is {digest}, expected "
            f"{args.flux_sha256}; refusing to bake an unverified Flux"
        )
    if args.version != __version__:
        raise BuildError(f"--version {args.version} but the package is {__version__}")
    epoch = default_epoch()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="alga-image-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        container_rootfs(rootfs, args.flux_bundle, epoch)
        staging = Path(tmp) / "extension"
        staging.mkdir()
        extension_tree(staging, rootfs, args.version)
        shutil.rmtree(args.out / "rootfs", ignore_errors=True)
        shutil.copytree(rootfs, args.out / "rootfs", symlinks=True)  # for inspection, tests
        results = {}
        for name, tree, entrypoint in (
            ("alga-bootstrap", rootfs, [ENTRYPOINT]),
            ("alga-bootstrap-extension", staging, None),
        ):
            layout = args.out / f"{name}.oci"
            shutil.rmtree(layout, ignore_errors=True)
            image = oci.write_layout(
                layout,
                oci.layer_from_dir(tree, epoch),
                image_config(epoch, args.version, entrypoint),
                args.version,
                {"org.opencontainers.image.version": args.version},
            )
            oci.archive_layout(layout, args.out / f"{name}.oci.tar", epoch)
            results[name] = {"digest": image.digest, "compressed_bytes": image.compressed_bytes}
            print(
                f"{name}:{args.version} {image.digest} "
                f"{image.compressed_bytes / 1e6:.1f} MB compressed"
            )
    (args.out / "images.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BuildError as err:
        print(f"images/build: error: {err}", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as err:
        print(
            f"images/build: error: {' '.join(map(str, err.cmd))} failed ({err.returncode})",
            file=sys.stderr,
        )
        sys.exit(1)
