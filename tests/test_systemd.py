"""systemd/alga-bootstrap.service passes `systemd-analyze verify` (issue 6)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO

UNIT = REPO / "systemd" / "alga-bootstrap.service"


def verify(unit_text: str, root: Path) -> subprocess.CompletedProcess[str]:
    """Verify in a scratch root holding the system's units and a stand-in entrypoint, so
    the check does not depend on what is installed on this machine."""
    (root / "usr/local/bin").mkdir(parents=True, exist_ok=True)
    entry = root / "usr/local/bin/alga-bootstrap"
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    if not (root / "usr/lib/systemd/system").exists():
        shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/system/alga-bootstrap.service").write_text(unit_text)
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "alga-bootstrap.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    result = verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""  # not even a warning


def test_the_check_catches_a_broken_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("Type=oneshot", "Type=oneshoot")
    result = verify(broken, tmp_path)
    assert "Failed to parse service type" in result.stderr


def test_hardening_and_retry() -> None:
    text = UNIT.read_text()
    for directive in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "Type=oneshot",
        "Restart=on-failure",
        "RestartSec=30s",
        "After=network-online.target",
        "Wants=network-online.target",
        "DynamicUser=yes",
        "LoadCredential=kubeconfig:",
    ):
        assert directive in text, directive
