"""Starts agent processes quickly, for tests that start a great many: imports the agent once,
then forks a fresh process per command (`python -m tests.forkserver`, one command at a time).

stdin, one JSON line per command: {"argv": [...], "stdout": path, "stderr": path}
stdout: {"pid": n} once the agent process is started, then {"code": n} when it ended (a
negative code: killed by that signal). Each agent is a real, separate process: SIGKILL stops it
as it would stop `alga-bootstrap run`."""

from __future__ import annotations

import json
import os
import sys

# What the agent spends its first half-second importing, once.
import agent.run
import agent.status  # noqa: F401
from agent import cli


def _child(command: dict[str, object]) -> None:
    for fd, path in ((1, command["stdout"]), (2, command["stderr"])):
        out = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    code = 1
    try:
        code = cli.main([str(a) for a in command["argv"]])  # type: ignore[attr-defined]
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(command)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"code": code}), flush=True)


if __name__ == "__main__":
    main()
