"""Reading a configuration mapping: the field-by-field reader every section and every preset
uses, the patterns it checks names against, and the one duration parser (the config's
intervals and the command line's --timeout).

Every error is one line that names the file, the field path and the fix.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, NoReturn

from agent import safe_yaml
from agent.errors import ConfigError

# Patterns are matched whole (fullmatch), so a trailing newline never slips through.
# Kubernetes' names, as k8s.io/apimachinery/pkg/util/validation/validation.go checks them:
# IsDNS1123Label (namespaces), IsDNS1123Subdomain (object names), IsConfigMapKey (Secret and
# ConfigMap data keys; also never ".", ".." or a "..x" prefix), IsQualifiedName (label keys)
# and IsValidLabelValue.
DNS_LABEL = re.compile(r"(?=.{1,63}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
SECRET_KEY = re.compile(r"(?=.{1,253}\Z)(?!\.\.)(?!\.\Z)[-._a-zA-Z0-9]+")
LABEL_NAME = r"(?=.{1,63}(\Z|/))[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
LABEL_KEY = re.compile(rf"({DNS_SUBDOMAIN.pattern}/)?{LABEL_NAME}")
LABEL_VALUE = re.compile(r"(?=.{0,63}\Z)(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
NAME_HINTS = {
    DNS_LABEL: "a DNS-1123 label: lowercase letters, digits and '-', at most 63 characters",
    DNS_SUBDOMAIN: "a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 "
    "characters",
}
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
LABEL_HINT = (
    "label keys are [prefix/]name, names and values at most 63 letters, digits, '-', '_' "
    "or '.', starting and ending with a letter or digit"
)
DATA_KEY_HINT = "data keys hold letters, digits, '-', '_' and '.' (at most 253; not '.' or '..')"
MAX_DURATION_S = (2**63 - 1) / 1e9  # Go's time.Duration, which Flux parses intervals into
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def duration_seconds(text: str, positive: bool = False) -> float:
    """Seconds in a Go duration such as 90s, 1m30s or 2h; `positive`: above zero too.
    ValueError, whose message names the fix, otherwise."""
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(
            f"{safe_yaml.shown(text)} is not valid; use a Go duration such as 30s, 5m or 1h"
        )
    seconds = sum(float(n) * DURATION_UNITS[u] for n, u in parts)
    if positive and seconds <= 0:
        raise ValueError(f"{safe_yaml.shown(text)} must be longer than zero")
    if seconds > MAX_DURATION_S:
        raise ValueError(
            f"{safe_yaml.shown(text)} is longer than a Go duration can hold (2562047h)"
        )
    return seconds


class Section:
    """A mapping being read; `close()` rejects any key nobody asked for."""

    def __init__(self, data: Any, path: str, source: str, base_dir: Path) -> None:
        self.path, self.source, self.base_dir = path, source, base_dir
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail("must be a mapping")
        self.data: dict[str, Any] = data
        self.read: set[str] = set()

    def fail(self, message: str, key: str | None = None) -> NoReturn:
        where = f"{self.path}.{key}" if key and self.path else (key or self.path or "(top)")
        raise ConfigError(f"{self.source}: {where}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str) -> Any:
        self.read.add(key)
        return self.data.get(key)

    def section(self, key: str) -> Section:
        child = f"{self.path}.{key}" if self.path else key
        return Section(self.raw(key), child, self.source, self.base_dir)

    def text(
        self,
        key: str,
        default: str | None = None,
        pattern: re.Pattern[str] | None = None,
        hint: str = "",
    ) -> str:
        value = self.raw(key)
        if value is None:
            if default is None:
                self.fail(f"is required{hint and '; ' + hint}", key)
            return default
        if not isinstance(value, str) or not value:
            self.fail(f"must be a non-empty string, got {type(value).__name__}", key)
        if CONTROL.search(value):
            self.fail("must not hold control characters (a tab, a line break)", key)
        if pattern is not None and not pattern.fullmatch(value):
            hint = hint or NAME_HINTS.get(pattern, "")
            self.fail(f"{safe_yaml.shown(value)} is not valid{hint and '; ' + hint}", key)
        return value

    def duration(self, key: str, default: str, positive: bool = True) -> str:
        """A Go duration; Flux's intervals and timeouts must be above zero."""
        value = self.text(key, default)
        try:
            duration_seconds(value, positive)
        except ValueError as err:
            self.fail(str(err), key)
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(f"must be true or false, got {value!r}", key)
        return value

    def number(self, key: str, default: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(f"must be a whole number, got {value!r}", key)
        return value

    def file(self, key: str, required: bool = True) -> Path | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.fail("is required", key)
            return None
        if not isinstance(value, str) or not value or CONTROL.search(value):
            self.fail("must be a file path", key)
        path = Path(value) if Path(value).is_absolute() else self.base_dir / value
        try:
            info = os.stat(path)
        except OSError:
            self.fail(f"file {str(path)!r} does not exist or is not a file", key)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            self.fail(f"{str(path)!r} is not a regular file", key)
        if info.st_size > safe_yaml.CONFIG_LIMIT:
            self.fail(f"{str(path)!r} is larger than 1 MiB; is it the right file?", key)
        return path

    def items(self, key: str) -> list[Any]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail("must be a list", key)
        return value

    def string_map(
        self,
        key: str,
        key_pattern: re.Pattern[str],
        value_pattern: re.Pattern[str] | None = None,
        hint: str = "",
    ) -> dict[str, str]:
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            self.fail("must be a mapping of strings to strings (quote numbers and booleans)", key)
        for k, v in value.items():
            if not key_pattern.fullmatch(k):
                self.fail(f"key {safe_yaml.shown(k)} is not valid; {hint}", key)
            if value_pattern is not None and not value_pattern.fullmatch(v):
                self.fail(f"value {safe_yaml.shown(v)} of {k!r} is not valid; {hint}", key)
        return dict(value)

    def close(self) -> None:
        unknown = sorted(map(str, set(self.data) - self.read))
        if unknown:
            known = ", ".join(sorted(self.read)) or "none"
            self.fail(f"unknown field (known fields here: {known})", unknown[0])

    def item(self, data: Any, path: str) -> Section:
        """A mapping in one of this section's lists, read as a section of its own."""
        return Section(data, path, self.source, self.base_dir)
