"""Errors a tech can act on (issue 11, point 7): one line naming what failed, and no retrying
what a retry cannot fix."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from kubesim import KubeSim
from tests.conftest import basic_config, fast_run_args, run_agent


@pytest.fixture
def config(write_config: Any) -> Path:
    path: Path = write_config(basic_config())
    return path


def write_kubeconfig(path: Path, kubeconfig: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(kubeconfig))
    return path


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if not line.startswith("{")]  # not the log
    assert len(lines) == 1, stderr
    assert lines[0].startswith("alga-bootstrap: error: ")
    return lines[0]


@pytest.mark.parametrize("credential", ["expired certificate", "foreign certificate", "token"])
def test_rejected_credentials_say_so_at_once(
    kubesim: KubeSim, config: Path, tmp_path: Path, credential: str
) -> None:
    if credential == "token":
        kubeconfig = kubesim.kubeconfig()
        kubeconfig["users"][0]["user"]["token"] = "not-the-token"
    else:
        kubeconfig = kubesim.client_cert_kubeconfig(
            expired=credential == "expired certificate",
            foreign=credential == "foreign certificate",
        )
    path = write_kubeconfig(tmp_path / "bad.kubeconfig", kubeconfig)
    started = time.monotonic()
    result = run_agent(*fast_run_args(config, path, "--timeout", "60s"))
    assert result.code == 1
    assert time.monotonic() - started < 15  # not retried until the deadline
    line = error_line(result.stderr)
    assert (
        f"the API server rejected the credentials (token or client certificate) from {path}" in line
    )
    assert "EOF" not in line and "not-the-token" not in result.output
    assert kubesim.writes() == []


def test_a_server_certificate_from_another_ca_is_a_certificate_problem(
    kubesim: KubeSim, config: Path, tmp_path: Path
) -> None:
    kubeconfig = kubesim.kubeconfig()
    other = base64.b64encode(trustme.CA().cert_pem.bytes()).decode()
    kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"] = other
    path = write_kubeconfig(tmp_path / "other-ca.kubeconfig", kubeconfig)
    started = time.monotonic()
    result = run_agent(*fast_run_args(config, path, "--timeout", "60s"))
    assert result.code == 1
    assert time.monotonic() - started < 15
    line = error_line(result.stderr)
    assert f"TLS handshake with {kubesim.url} failed: certificate problem" in line
    assert "CERTIFICATE_VERIFY_FAILED" in line


def test_an_http_server_is_a_config_error(kubesim: KubeSim, config: Path, tmp_path: Path) -> None:
    kubeconfig = kubesim.kubeconfig()
    kubeconfig["clusters"][0]["cluster"]["server"] = kubesim.url.replace("https", "http")
    path = write_kubeconfig(tmp_path / "http.kubeconfig", kubeconfig)
    kubesim.clear_log()
    result = run_agent(*fast_run_args(config, path))
    assert result.code == 2
    line = error_line(result.stderr)
    assert str(path) in line and "is not https://" in line
    assert kubesim.requests == []


def test_insecure_skip_tls_verify_warns_once(
    kubesim: KubeSim, config: Path, tmp_path: Path
) -> None:
    kubeconfig = kubesim.kubeconfig()
    cluster = kubeconfig["clusters"][0]["cluster"]
    del cluster["certificate-authority-data"]
    cluster["insecure-skip-tls-verify"] = True
    path = write_kubeconfig(tmp_path / "insecure.kubeconfig", kubeconfig)
    result = run_agent(*fast_run_args(config, path))
    assert result.code == 0, result.output
    assert len(kubesim.requests) > 50
    assert "InsecureRequestWarning" not in result.output
    warnings = [e for e in result.events() if "TLS verification is off" in e["event"]]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert "insecure-skip-tls-verify" in warnings[0]["event"]


def test_a_permanent_server_error_names_the_object_and_verb(kubesim: KubeSim, config: Path) -> None:
    crd = "customresourcedefinitions/kustomizations.kustomize.toolkit.fluxcd.io"
    kubesim.faults.fail_next(1000, 500, verb="apply", path=crd)
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path, "--timeout", "60s"))
    assert result.code == 1
    line = error_line(result.stderr)
    assert (
        "apply CustomResourceDefinition kustomizations.kustomize.toolkit.fluxcd.io: HTTP 500"
        in line
    )
    assert "injected failure" in line


def test_a_server_that_stops_answering_is_named(kubesim: KubeSim, config: Path) -> None:
    crd = "customresourcedefinitions/kustomizations.kustomize.toolkit.fluxcd.io"
    kubesim.faults.reset_next(1000, verb="apply", path=crd)
    result = run_agent(*fast_run_args(config, kubesim.kubeconfig_path, "--timeout", "60s"))
    assert result.code == 1
    line = error_line(result.stderr)
    assert "internal error" not in line
    assert (
        "apply CustomResourceDefinition kustomizations.kustomize.toolkit.fluxcd.io: no answer "
        f"from {kubesim.url}" in line
    )
