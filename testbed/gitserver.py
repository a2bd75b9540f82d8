"""A smart-HTTP Git server for the real test bed, from which Flux's source-controller (go-git
v5: smart HTTP only, shallow clones) and the git CLI clone repositories made at test time.

Each request runs Debian git's git-http-backend as a CGI (RFC 3875) here, not through
CGIHTTPRequestHandler: that one drops the CGI Status header (a missing repository would be
200, not 404) and is gone in Python 3.15. Repositories are <root>/<name>.git, served at
/git/<name>.git; Basic auth, when on, checks a `user:password` file read on every request.

    python -m testbed.gitserver --root DIR [--cert C --key K] [--users F] [--port-file P]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import io
import os
import signal
import socketserver
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
PREFIX = "/git"
CHUNK = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0
# No system or user git config applies, to the backend or to make_repo: the same behaviour
# on every machine, configured or not.
HERMETIC_GIT = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
# A fixed identity and date: a commit's sha depends on its tree and parent only.
IDENTITY = {
    "GIT_AUTHOR_NAME": "Alga Testbed",
    "GIT_AUTHOR_EMAIL": "testbed@alga.invalid",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00+0000",
    "GIT_COMMITTER_NAME": "Alga Testbed",
    "GIT_COMMITTER_EMAIL": "testbed@alga.invalid",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00+0000",
}


@dataclass(frozen=True)
class Request:
    """One access-log entry. `path` is as sent, query included; `user` is the one who
    authenticated, or who offered a wrong password (None without auth or credentials)."""

    method: str
    path: str
    status: int
    user: str | None


class GitServer:
    def __init__(
        self,
        root: Path,
        cert: Path | None = None,
        key: Path | None = None,
        users_file: Path | None = None,
        *,
        verbose: bool = False,
    ) -> None:
        """HTTPS with `cert` and `key`, plain HTTP without; auth only with `users_file`.
        `verbose` logs requests and backend errors to stderr."""
        if (cert is None) != (key is None):
            raise ValueError("cert and key go together")
        self.root = root.resolve()
        self.users_file = users_file
        self.verbose = verbose
        self.ssl_context: ssl.SSLContext | None = None
        if cert is not None:
            self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ssl_context.load_cert_chain(cert, key)
        self._log: list[Request] = []
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> GitServer:
        """Listen on a free port of 127.0.0.1 and serve on a daemon thread."""
        self._httpd = _Server(self)
        # A short poll interval: stop() waits up to one for the serving loop to notice.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="gitserver",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = self._thread = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("not started")
        return self._httpd.server_address[1]

    def url(self, repo: str) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}{PREFIX}/{repo}.git"

    def requests(self) -> list[Request]:
        """The access log so far, oldest first."""
        with self._lock:
            return list(self._log)

    def _record(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: GitServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own also looks up the host's FQDN, which a machine with broken DNS
        # answers only after a resolver timeout; nothing here uses it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, on the connection's own thread, so that a slow or
        # refusing client cannot stall accept() for the others.
        context = self.owner.ssl_context
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = context.wrap_socket(request, server_side=True)
        except OSError:
            return  # e.g. a client that does not trust our certificate hung up
        with tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response are routine: a traceback only when verbose.
        if self.owner.verbose:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a clone is several requests
    timeout = 60  # an idle keep-alive connection ends rather than hold its thread forever
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def _serve(self) -> None:
        owner = self.server.owner
        url = urlsplit(self.path)
        if not url.path.startswith(PREFIX + "/"):
            self._reply(404, None)
            return
        user, authorized = self._authenticate()
        if not authorized:
            self._reply(401, user, ("WWW-Authenticate", 'Basic realm="git"'))
            return
        # The body goes to the backend from a file, not a pipe: no deadlock with a backend
        # that writes before it has read everything, and no writer thread.
        with tempfile.TemporaryFile() as body:
            length = self._read_body(body)
            env = {
                **HERMETIC_GIT,
                "PATH": os.environ.get("PATH", os.defpath),
                "GIT_PROJECT_ROOT": str(owner.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "GATEWAY_INTERFACE": "CGI/1.1",
                "SERVER_PROTOCOL": self.request_version,
                "REQUEST_METHOD": self.command,
                "PATH_INFO": unquote(url.path[len(PREFIX) :]),
                "QUERY_STRING": url.query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(length),
                "REMOTE_ADDR": self.client_address[0],
            }
            optional = {
                # The backend inflates a gzip body itself (http-backend.c inflate_request).
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding"),
                # Protocol v2 is asked for with this header; upload-pack reads it from env.
                "GIT_PROTOCOL": self.headers.get("Git-Protocol"),
                "REMOTE_USER": user,
            }
            env.update({k: v for k, v in optional.items() if v})
            with subprocess.Popen(
                [HTTP_BACKEND],
                stdin=body,
                stdout=subprocess.PIPE,
                stderr=None if owner.verbose else subprocess.DEVNULL,
                env=env,
            ) as backend:
                assert isinstance(backend.stdout, io.BufferedReader)
                try:
                    self._relay(backend.stdout, user)
                except BaseException:
                    backend.kill()  # the client went away: the backend may block on stdout
                    raise

    def _authenticate(self) -> tuple[str | None, bool]:
        users_file = self.server.owner.users_file
        if users_file is None:
            return None, True
        offered = _basic_credentials(self.headers.get("Authorization"))
        if offered is None:
            return None, False
        user, password = offered
        expected = _read_users(users_file).get(user)
        return user, expected is not None and hmac.compare_digest(
            expected.encode(), password.encode()
        )

    def _read_body(self, body: BinaryIO) -> int:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            # git sends a request bigger than http.postBuffer chunked; CGI wants it plain.
            while size := int(self.rfile.readline(CHUNK).split(b";")[0], 16):
                _copy(self.rfile, body, size)
                self.rfile.readline(CHUNK)  # the CRLF that ends the chunk
            while self.rfile.readline(CHUNK) not in (b"\r\n", b"\n", b""):
                pass  # trailers
        else:
            _copy(self.rfile, body, int(self.headers.get("Content-Length") or 0))
        length = body.tell()
        body.seek(0)
        return length

    def _relay(self, out: io.BufferedReader, user: str | None) -> None:
        """The backend's CGI response to the client: its Status header as the HTTP status,
        its other headers as they are, its body streamed."""
        status, reason, headers = 200, "", []
        while (line := out.readline(CHUNK)) not in (b"\r\n", b"\n"):
            if not line:  # the backend died before it ended its headers
                status, reason, headers = 502, "", []
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "status":
                code, _, reason = value.strip().partition(" ")
                status = int(code)
            else:
                headers.append((name.strip(), value.strip()))
        self.server.owner._record(Request(self.command, self.path, status, user))
        self.send_response(status, reason or None)
        for name, value in headers:
            self.send_header(name, value)
        sized = any(name.lower() == "content-length" for name, _ in headers)
        chunked = not sized and self.request_version == "HTTP/1.1"
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not sized:
            self.send_header("Connection", "close")  # an HTTP/1.0 body ends at close
        self.end_headers()
        while data := out.read1(CHUNK):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _reply(self, status: int, user: str | None, *headers: tuple[str, str]) -> None:
        self.server.owner._record(Request(self.command, self.path, status, user))
        text = f"{status} {self.responses[status][0]}\n".encode()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.send_header("Connection", "close")  # the request's body, if any, is unread
        self.end_headers()
        self.wfile.write(text)


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def _read_users(path: Path) -> dict[str, str]:
    """`user:password` lines (the password may hold colons); none if the file is missing,
    so that a removed file locks everyone out."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    users = {}
    for line in lines:
        user, sep, password = line.strip().partition(":")
        if sep and user and not user.startswith("#"):
            users[user] = password
    return users


def _copy(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    while size > 0:
        data = src.read(min(size, CHUNK))
        if not data:
            raise ConnectionError("request body cut short")
        dst.write(data)
        size -= len(data)


def _git(*args: str, env: Mapping[str, str] | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        ["git", *args],
        env={**os.environ, **HERMETIC_GIT, **IDENTITY, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and proc.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def make_repo(
    root: Path,
    name: str,
    tree: Path | Mapping[str, str | bytes],
    branch: str = "main",
    message: str = "testbed",
) -> str:
    """Commit `tree` (a directory, or relative path -> content) as the whole content of
    `branch` of the bare repository <root>/<name>.git, and return the commit's sha. The
    repository is made if missing (its HEAD then names `branch`); a branch that exists gets
    the commit on top of its last one, so a test can move what Flux sees."""
    git_dir = root / f"{name}.git"
    if not git_dir.exists():
        _git("init", "--quiet", "--bare", f"--initial-branch={branch}", str(git_dir))
    ref = f"refs/heads/{branch}"
    with tempfile.TemporaryDirectory() as scratch:
        work = tree if isinstance(tree, Path) else _write_tree(Path(scratch) / "tree", tree)
        # Plumbing on the bare repository with a throwaway index: no clone, no push.
        env = {
            "GIT_DIR": str(git_dir),
            "GIT_WORK_TREE": str(work),
            "GIT_INDEX_FILE": str(Path(scratch) / "index"),
        }
        # --force: the directory as it is, even what a .gitignore in it would leave out.
        _git("add", "--all", "--force", env=env)
        tree_sha = _git("write-tree", env=env)
        parent = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", env=env, check=False)
        parents = ["-p", parent] if parent else []
        commit = _git("commit-tree", tree_sha, *parents, "-m", message, env=env)
        # The old value guards against a concurrent writer ("" = the branch must not exist).
        _git("update-ref", ref, commit, parent, env=env)
    return commit


def _write_tree(directory: Path, files: Mapping[str, str | bytes]) -> Path:
    for relative, content in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    directory.mkdir(parents=True, exist_ok=True)  # an empty mapping is an empty tree
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.gitserver",
        description="Serve <root>/<name>.git at /git/<name>.git on 127.0.0.1, in the foreground.",
    )
    parser.add_argument("--root", type=Path, required=True, help="directory of bare repositories")
    parser.add_argument("--cert", type=Path, help="serving certificate (PEM); with --key, HTTPS")
    parser.add_argument("--key", type=Path, help="its private key (PEM)")
    parser.add_argument("--users", type=Path, help="user:password lines; Basic auth if given")
    parser.add_argument("--port-file", type=Path, help="where to write the port once listening")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    server = GitServer(args.root, args.cert, args.key, args.users, verbose=args.verbose)
    # SIGTERM, how a harness stops us, unwinds like Ctrl-C: through stop().
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server.start()
    try:
        if args.port_file is not None:
            # Renamed into place, so that a poller never reads a half-written port.
            partial = args.port_file.with_name(args.port_file.name + ".partial")
            partial.write_text(f"{server.port}\n")
            partial.replace(args.port_file)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
