"""Fixtures of the real test bed: a control plane with Flux's own controllers and a Git
server holding upstream's appliance tree, shared by the tests of a module (starting one
takes about half a minute)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.cluster import Cluster
from testbed.gitserver import GitServer, make_repo
from tests.conftest import BUNDLE, REPO, SHARED, Result, agent_env

UPSTREAM_TREE = (
    SHARED / "alga" / "upstream" / "tree-26bb86fa3aade6d4e4289db3a71f8803ed4ff144.tar.gz"
)
GIT_USER, GIT_PASSWORD = "site", "s3cret-git-password"
SITE_URL = "https://psa.example.test"


@dataclass
class Testbed:
    __test__ = False  # not a test class, though its name starts with Test
    cluster: Cluster
    git: GitServer
    repos: Path
    commit: str
    config: Path
    workdir: Path

    def run(self, *args: str, timeout: float = 600, config: Path | None = None) -> Result:
        """The agent as a tech runs it on a workstation: the real CLI, its own user."""
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                args[0],
                "--config",
                str(config or self.config),
                "--kubeconfig",
                str(self.cluster.agent_kubeconfig),
                *args[1:],
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=agent_env(),
            cwd=REPO,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def status(self) -> dict[str, Any]:
        result = self.run("status", "-o", "json", "--timeout", "30s")
        return dict(json.loads(result.stdout))


def upstream_tree(into: Path) -> Path:
    with tarfile.open(UPSTREAM_TREE) as tar:
        tar.extractall(into, filter="data")
    return into / "alga-psa"


def site_config(directory: Path, git: GitServer, commit: str, ca: Path, **extra: Any) -> Path:
    """The Alga preset as a site sets it, pointed at the test bed's Git server."""
    (directory / "git-username").write_text(GIT_USER)
    (directory / "git-password").write_text(GIT_PASSWORD)
    config = {
        "preset": "alga-talos-single-node",
        "cluster": {"credentials": "kubeconfig"},
        "flux": {"manifests": str(BUNDLE)},
        "sync": {
            "url": git.url("alga-psa"),
            "ref": {"branch": "main", "commit": commit},
            "credentials": {
                "usernameFile": str(directory / "git-username"),
                "passwordFile": str(directory / "git-password"),
                "caFile": str(ca),
            },
        },
        "alga": {"appUrl": SITE_URL},
        **extra,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    workdir = tmp_path_factory.mktemp("testbed")
    cluster = Cluster(workdir / "cluster")
    cluster.workdir.mkdir()
    git = None
    try:
        cluster.start()
        serving = cluster.ca.issue("git", "git", hosts=("127.0.0.1", "localhost"), server=True)
        repos = workdir / "repos"
        repos.mkdir()
        commit = make_repo(repos, "alga-psa", upstream_tree(workdir / "upstream"))
        users = workdir / "git-users"
        users.write_text(f"{GIT_USER}:{GIT_PASSWORD}\n")
        git = GitServer(repos, serving.cert, serving.key, users).start()
        config = site_config(workdir, git, commit, cluster.ca.cert)
        cluster.flux_controllers_when_served()
        yield Testbed(cluster, git, repos, commit, config, workdir)
    finally:
        if git is not None:
            git.stop()
        cluster.stop()
