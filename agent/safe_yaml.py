"""Reading the files the agent is given (config, Flux bundle, manifests, values), bounded.

A file must be a regular file (a FIFO would block the read forever, a device may never end),
no larger than its cap, UTF-8 text. Its YAML may not repeat a key in a mapping (PyYAML
would silently keep the last), may not use anchors, aliases or merge keys (an alias bomb
expands to billions of nodes), and may nest only so deep. Every failure is a ConfigError
naming the file.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError

MIB = 1024 * 1024
CONFIG_LIMIT = 1 * MIB  # a config or values file
# The Flux bundle (270 KB for v2.9), or all site manifests together. PyYAML builds about
# 100k nodes a second on a busy small machine: these caps keep the worst file to seconds.
MANIFEST_LIMIT = 2 * MIB
MAX_DEPTH = 64  # the Flux v2.9 bundle nests 21 deep
Obj = dict[str, Any]

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # all but tab and line breaks


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_bytes(path: Path, limit: int, where: str = "") -> bytes:
    """The whole of a regular file of at most `limit` bytes. The type is checked before
    opening (opening a FIFO blocks until a writer comes), and again on the open file."""
    prefix = f"{where}: {path}" if where else str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(f"{prefix}: is {_kind_of(os.stat(path).st_mode)}; name a file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{prefix}: file not found") from None
    except OSError as err:
        raise ConfigError(f"{prefix}: cannot read: {err.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):  # replaced between the two looks
            raise ConfigError(f"{prefix}: is {_kind_of(info.st_mode)}; name a file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{prefix}: is larger than {limit // MIB} MiB; is it the right file?")
    return data


def text_of(data: bytes, source: str) -> str:
    """UTF-8 text without control characters other than tab and line breaks."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{source}: is not UTF-8 text (byte {err.start} is invalid); save it as UTF-8"
        ) from None
    control = _CONTROL.search(text)
    if control:
        raise ConfigError(
            f"{source}: is not a text file (control character {ord(control[0]):#04x} at line "
            f"{text.count(chr(10), 0, control.start()) + 1})"
        )
    return text.removeprefix("\ufeff")


class _StrictLoader(_BaseLoader):  # type: ignore[misc]
    """PyYAML's safe loader, refusing duplicate keys, merge keys and non-scalar keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                raise yaml.constructor.ConstructorError(
                    None, None, "merge keys (<<) are not accepted", key_node.start_mark
                )
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                )
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = line
        mapping: dict[Any, Any] = super().construct_mapping(node, deep)
        return mapping


def _check_shape(root: yaml.Node) -> None:
    """Refuse aliases (a node reached twice) and nesting past MAX_DEPTH, level by level
    (no recursion; set operations keep a large document quick)."""
    seen = {id(root)}
    level: list[yaml.Node] = [root]
    for _ in range(MAX_DEPTH):
        children: list[yaml.Node] = []
        for node in level:
            if isinstance(node, yaml.MappingNode):
                children += [part for pair in node.value for part in pair]
            elif isinstance(node, yaml.SequenceNode):
                children += node.value
        ids = set(map(id, children))
        if len(ids) != len(children) or not seen.isdisjoint(ids):
            raise yaml.composer.ComposerError(
                None,
                None,
                "anchors and aliases (&, *) are not accepted; write the values out",
                _repeated(children, seen).start_mark,
            )
        seen |= ids
        level = [n for n in children if not isinstance(n, yaml.ScalarNode)]
        if not level:
            return
    raise yaml.composer.ComposerError(
        None, None, f"nested deeper than {MAX_DEPTH} levels", level[0].start_mark
    )


def _repeated(nodes: list[yaml.Node], seen: set[int]) -> yaml.Node:
    """The first node met again: where the alias is."""
    met = set(seen)
    for node in nodes:
        if id(node) in met:
            return node
        met.add(id(node))
    raise AssertionError("no repeated node")


def documents(text: str, source: str) -> list[Any]:
    """Every document of a YAML stream; empty documents are dropped."""
    loader = _StrictLoader(text)
    out = []
    try:
        while loader.check_node():
            node = loader.get_node()
            _check_shape(node)
            out.append(loader.construct_document(node))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None
    except (ValueError, RecursionError) as err:  # an integer of 5000 digits, a 31st of February
        raise ConfigError(f"{source}: invalid YAML: {err}") from None
    finally:
        loader.dispose()
    return [doc for doc in out if doc is not None]


def load_mapping(path: Path, limit: int = CONFIG_LIMIT, where: str = "") -> dict[str, Any]:
    """A file holding one YAML mapping (a config, a values file); empty: {}."""
    source = f"{where}: {path}" if where else str(path)
    docs = documents(text_of(read_bytes(path, limit, where), source), source)
    if len(docs) > 1:
        raise ConfigError(f"{source}: holds {len(docs)} YAML documents; expected one mapping")
    data = docs[0] if docs else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must hold a YAML mapping, not {type(data).__name__}")
    return data


API_VERSION = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?v[0-9]+((alpha|beta)[0-9]+)?")
KIND = re.compile(r"[A-Z][A-Za-z0-9]{0,62}")
# A name that fits in a URL path (k8s.io/apimachinery/pkg/api/validation/path:
# IsValidPathSegmentName); each kind's own naming rule is the API server's to check.
OBJECT_NAME = re.compile(r"(?!\.{1,2}\Z)[^/%\x00-\x1f\x7f]{1,253}")
NAMESPACE = re.compile(r"(?=.{1,63}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # IsDNS1123Label


def load_objects(path: Path, where: str = "", limit: int = MANIFEST_LIMIT) -> tuple[Obj, ...]:
    """The Kubernetes objects in a manifest file."""
    source = f"{where}: {path}" if where else str(path)
    return objects_in(text_of(read_bytes(path, limit, where), source), source)


def objects_in(text: str, source: str) -> tuple[Obj, ...]:
    """Each document a Kubernetes object: a mapping with apiVersion, kind and metadata.name
    (and a valid metadata.namespace if it has one)."""
    objects = documents(text, source)
    for number, obj in enumerate(objects, 1):
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(meta, dict):
            raise ConfigError(
                f"{source}: document {number} is not a Kubernetes object (a mapping with "
                "apiVersion, kind and metadata.name)"
            )
        for field, value, pattern in (
            ("apiVersion", obj.get("apiVersion"), API_VERSION),
            ("kind", obj.get("kind"), KIND),
            ("metadata.name", meta.get("name"), OBJECT_NAME),
            ("metadata.namespace", meta.get("namespace", "default"), NAMESPACE),
        ):
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise ConfigError(
                    f"{source}: document {number}: {field} {shown(value)} is missing or not valid"
                )
        labels = meta.get("labels", {})
        if not isinstance(labels, dict):
            raise ConfigError(f"{source}: document {number}: metadata.labels must be a mapping")
    return tuple(objects)


def shown(value: Any, limit: int = 60) -> str:
    """A value for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
