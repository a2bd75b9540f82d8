"""The test bed's Git server against the real git CLI: shallow clones over HTTPS with Basic
auth, the statuses git-http-backend chooses (401, 404), certificate verification, gzip and
chunked request bodies, and the command-line entry a harness runs as its own process."""

from __future__ import annotations

import base64
import gzip
import http.client
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from testbed.gitserver import GitServer, make_repo
from tests.conftest import REPO

USER, PASSWORD = "flux", "s3cret:with-colon"
TIMEOUT = 60  # every git run and HTTP exchange here takes well under a second


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")  # an IP SAN: clients dial 127.0.0.1
    files = Pki(*(directory / n for n in ("ca.crt", "git.crt", "git.key", "other-ca.crt")))
    ca.cert_pem.write_to_path(str(files.ca))
    leaf.cert_chain_pems[0].write_to_path(str(files.cert))
    leaf.private_key_pem.write_to_path(str(files.key))
    trustme.CA().cert_pem.write_to_path(str(files.other_ca))
    return files


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"# the test's only user\n{USER}:{PASSWORD}\n")
    return path


@pytest.fixture
def server(tmp_path: Path, pki: Pki, users: Path) -> Iterator[GitServer]:
    repos = tmp_path / "repos"
    repos.mkdir()
    git_server = GitServer(repos, pki.cert, pki.key, users).start()
    yield git_server
    git_server.stop()


def git(*args: str, home: Path, ca: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The git CLI with no config but its own, no prompts, no proxy, English messages."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
    }
    if ca is not None:
        env["GIT_SSL_CAINFO"] = str(ca)
    return subprocess.run(
        ["git", *args], env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def with_credentials(url: str, user: str, password: str) -> str:
    return url.replace("://", f"://{user}:{password}@", 1)


def clone(url: str, into: Path, ca: Path | None) -> subprocess.CompletedProcess[str]:
    return git("clone", "--depth", "1", "--branch", "main", url, str(into), home=into.parent, ca=ca)


def test_shallow_clone_over_https(server: GitServer, pki: Pki, tmp_path: Path) -> None:
    make_repo(server.root, "app", {"README": "first\n", "old/file": "gone later\n"})
    head = make_repo(server.root, "app", {"README": "second\n", "deploy/kustomization.yaml": ""})

    proc = clone(with_credentials(server.url("app"), USER, PASSWORD), tmp_path / "app", pki.ca)

    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "app"
    assert git("-C", str(work), "rev-parse", "HEAD", home=tmp_path).stdout.strip() == head
    # Shallow: one commit of the two, and only the second one's tree.
    assert git("-C", str(work), "rev-list", "--count", "HEAD", home=tmp_path).stdout == "1\n"
    assert (work / ".git" / "shallow").read_text().strip() == head
    assert (work / "README").read_text() == "second\n"
    assert not (work / "old").exists()
    served = [
        (r.method, r.path.split("?")[0], r.user) for r in server.requests() if r.status == 200
    ]
    assert ("GET", "/git/app.git/info/refs", USER) in served
    assert ("POST", "/git/app.git/git-upload-pack", USER) in served


def test_wrong_password_is_401(server: GitServer, pki: Pki, tmp_path: Path) -> None:
    make_repo(server.root, "app", {"README": "x\n"})

    proc = clone(with_credentials(server.url("app"), USER, "wrong"), tmp_path / "app", pki.ca)

    assert proc.returncode != 0
    assert "Authentication failed" in proc.stderr, proc.stderr
    log = server.requests()
    assert log and {r.status for r in log} == {401}
    assert any(r.user == USER for r in log)  # the offered name, logged though rejected


def test_password_file_is_read_on_every_request(
    server: GitServer, pki: Pki, users: Path, tmp_path: Path
) -> None:
    make_repo(server.root, "app", {"README": "x\n"})
    users.write_text(f"{USER}:rotated\n")

    old = clone(with_credentials(server.url("app"), USER, PASSWORD), tmp_path / "old", pki.ca)
    new = clone(with_credentials(server.url("app"), USER, "rotated"), tmp_path / "new", pki.ca)

    assert old.returncode != 0
    assert "Authentication failed" in old.stderr, old.stderr
    assert new.returncode == 0, new.stderr


def test_missing_repository_is_404(server: GitServer, pki: Pki, tmp_path: Path) -> None:
    url = with_credentials(server.url("missing"), USER, PASSWORD)

    proc = clone(url, tmp_path / "missing", pki.ca)

    assert proc.returncode != 0
    assert "not found" in proc.stderr, proc.stderr
    assert server.requests()[-1].status == 404
    assert server.requests()[-1].user == USER


def test_untrusted_certificate_fails_verification(
    server: GitServer, pki: Pki, tmp_path: Path
) -> None:
    make_repo(server.root, "app", {"README": "x\n"})

    url = with_credentials(server.url("app"), USER, PASSWORD)
    proc = clone(url, tmp_path / "app", pki.other_ca)

    assert proc.returncode != 0
    # GnuTLS's curl (Debian's git) says the first, OpenSSL's the second.
    assert re.search(r"certificate (verification failed|problem)", proc.stderr), proc.stderr
    assert server.requests() == []  # no request got past the handshake


def pkt_line(data: bytes) -> bytes:
    return b"%04x%s" % (len(data) + 4, data)


@pytest.mark.parametrize("chunked", [False, True], ids=["sized", "chunked"])
def test_gzip_request_body(server: GitServer, pki: Pki, chunked: bool) -> None:
    """A protocol v0 fetch, as go-git makes it, with its body gzipped as git does for large
    ones: git-http-backend inflates it, and a chunked one arrives whole."""
    head = make_repo(server.root, "app", {"README": "x\n"})
    request = gzip.compress(pkt_line(b"want %s\n" % head.encode()) + b"0000" + pkt_line(b"done\n"))
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    context = ssl.create_default_context(cafile=pki.ca)
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=TIMEOUT)
    try:
        # Anonymous first: the challenge git needs to send its credentials.
        conn.request("GET", "/git/app.git/info/refs?service=git-upload-pack")
        challenge = conn.getresponse()
        challenge.read()
        assert challenge.status == 401
        assert challenge.getheader("WWW-Authenticate") == 'Basic realm="git"'

        conn.close()  # a 401 closes the connection: a body sent with it is left unread
        conn.request(
            "POST",
            "/git/app.git/git-upload-pack",
            # An iterable has no length, so http.client sends it chunked.
            body=iter([request]) if chunked else request,
            headers={
                "Authorization": f"Basic {auth}",
                "Content-Type": "application/x-git-upload-pack-request",
                "Content-Encoding": "gzip",
            },
        )
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()

    assert response.status == 200, body
    assert response.getheader("Content-Type") == "application/x-git-upload-pack-result"
    assert body.startswith(b"0008NAK\nPACK")


def test_command_line_serves_in_its_own_process(tmp_path: Path) -> None:
    """Plain HTTP, no auth, the port in a file; SIGTERM ends it cleanly and quietly."""
    repos = tmp_path / "repos"
    repos.mkdir()
    head = make_repo(repos, "app", {"README": "x\n"})
    port_file = tmp_path / "port"
    command = ["--root", str(repos), "--port-file", str(port_file)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.gitserver", *command],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no port file"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{int(port_file.read_text())}/git/app.git"

        cloned = clone(url, tmp_path / "app", ca=None)

        assert cloned.returncode == 0, cloned.stderr
        rev = git("-C", str(tmp_path / "app"), "rev-parse", "HEAD", home=tmp_path)
        assert rev.stdout.strip() == head
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert (proc.returncode, out, err) == (0, "", "")
