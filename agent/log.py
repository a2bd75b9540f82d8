"""Structured logs: JSON lines for Talos, readable lines on a terminal. Secrets never appear."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "<redacted>"
LEVELS = ("debug", "info", "warning", "error")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | bytes) -> None:
    """Remember a secret value so that no log line or error message can carry it."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    with _secrets_lock:
        for piece in (text, text.strip()):
            if len(piece) >= 4:  # shorter values would redact ordinary words
                _secrets.add(piece)


def redact(text: str) -> str:
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """Text for one terminal line: control characters (a Git server's message that Flux
    passes on may hold newlines, or escape sequences) shown as visible escapes."""
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return _CONTROL.sub(lambda m: named.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def _redact_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str | bytes):
            event[key] = redact(
                value.decode(errors="replace") if isinstance(value, bytes) else value
            )
        elif value is not None and not isinstance(value, int | float | bool):
            event[key] = redact(str(value))
    return event


def colour_wanted(stream: TextIO, no_color: bool = False) -> bool:
    """Colours on a terminal only, and never with --no-color or with NO_COLOR set to anything
    but the empty string (no-color.org)."""
    return stream.isatty() and not no_color and not os.environ.get("NO_COLOR")


def configure(fmt: str | None = None, level: str = "info", no_color: bool = False) -> None:
    """Logs go to stderr, as kubectl, flux and talosctl write theirs: stdout carries a
    command's answer only. `fmt` json or console; by default console when stderr is a
    terminal, JSON lines otherwise (Talos's service log). `level`: one of LEVELS."""
    console = sys.stderr.isatty() if fmt is None else fmt == "console"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=colour_wanted(sys.stderr, no_color))
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_event,
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    return structlog.get_logger(step=name)
