"""A first boot whose Git source fails, on the real test bed: the run ends early with the
real source-controller's own message, as the README promises, and the next run with the
mistake fixed converges."""

from __future__ import annotations

from pathlib import Path

from testbed.pki import CA
from tests.real.conftest import Testbed, site_config


def fresh_source(testbed: Testbed) -> None:
    """The next case meets a GitRepository that has never fetched."""
    testbed.cluster.kubectl(
        "delete", "gitrepository", "alga-appliance", "-n", "flux-system", "--ignore-not-found"
    )


def test_a_wrong_git_password_ends_the_run_with_source_controllers_message(
    testbed: Testbed,
) -> None:
    config = site_config(testbed.workdir, testbed.git, testbed.commit, testbed.cluster.ca.cert)
    (testbed.workdir / "git-password").write_text("not-the-password")
    result = testbed.run("run", "--log-format", "json", "--timeout", "4m", config=config)
    assert result.code == 1, result.output[-3000:]
    messages = result.messages()
    assert len(messages) == 1, messages  # the Git server's text holds newlines
    (error,) = messages
    assert "alga-appliance" in error, error
    # source-controller's words for the Git server's 401, not a timeout of ours.
    assert "authentication required" in error.lower() or "401" in error, error
    assert "timed out" not in error, error
    assert "not-the-password" not in result.output
    refused = [r for r in testbed.git.requests() if r.status == 401]
    assert refused, "the Git server never saw the wrong password"


def test_a_wrong_ca_ends_the_run_with_source_controllers_message(
    testbed: Testbed, tmp_path: Path
) -> None:
    fresh_source(testbed)
    other = CA(tmp_path / "other-ca", "other-ca")
    config = site_config(testbed.workdir, testbed.git, testbed.commit, other.cert)
    result = testbed.run("run", "--log-format", "json", "--timeout", "4m", config=config)
    assert result.code == 1, result.output[-3000:]
    messages = result.messages()
    assert len(messages) == 1, messages
    (error,) = messages
    assert "x509" in error or "certificate" in error, error
    assert "timed out" not in error, error


def test_with_the_mistakes_fixed_the_next_run_converges(testbed: Testbed) -> None:
    fresh_source(testbed)
    config = site_config(testbed.workdir, testbed.git, testbed.commit, testbed.cluster.ca.cert)
    result = testbed.run("run", "--log-format", "json", "--timeout", "5m", config=config)
    assert result.code == 0, result.output[-3000:]
    repo = testbed.cluster.get("gitrepository", "alga-appliance", "-n", "flux-system")
    assert repo["status"]["artifact"]["revision"] == f"main@sha1:{testbed.commit}"
