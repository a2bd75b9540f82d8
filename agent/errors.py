"""Errors that end a command, each with its documented exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a re-run may succeed: API never ready, timeout, Flux reports a failure
EXIT_BAD_INPUT = 2  # bad config, bundle or usage; nothing was changed
EXIT_NEEDS_DECISION = 3  # the cluster holds something only an operator may overrule (--force)
EXIT_PROGRESSING = 4  # `status` only: things are still rolling out
EXIT_NOT_BOOTSTRAPPED = 5  # `status` only: no run has finished yet, and none is running

EXIT_CODES_HELP = """exit codes:
  0  done, or nothing to do
  1  failed; a re-run may succeed (API never ready, timeout, Flux reported a failure)
  2  bad config, bundle or usage; nothing was changed
  3  needs an operator decision; re-run with --force after reading the message
  4  (status) still progressing
  5  (status) not bootstrapped yet: no run has finished, none is running
  130, 143  stopped by SIGINT (Ctrl-C) or SIGTERM (a service restart) at a safe point;
            the Lease was released; re-run to finish"""


class BootstrapError(Exception):
    """A failure a re-run may fix."""

    exit_code = EXIT_FAILED


class ConfigError(BootstrapError):
    """Bad input: one line naming the file or field and the fix."""

    exit_code = EXIT_BAD_INPUT


class NeedsDecision(BootstrapError):
    """The agent will not overrule what it found without --force."""

    exit_code = EXIT_NEEDS_DECISION
