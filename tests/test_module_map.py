"""The agent's modules import one another without a circle: every import, at the top of a
module or inside a function, read from the source. (A package's own `__init__` running
first is how Python imports submodules, not an edge here.)"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

AGENT = REPO / "agent"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each agent module and the agent modules it imports."""
    files = {_module_name(p): p for p in AGENT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x
                    anchor = package.rsplit(".", node.level - 1)[0]
                    base = f"{anchor}.{base}".rstrip(".")
                # `from agent.config import sections` imports the module agent.config.sections
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path for each circle found by a depth-first walk."""
    found: list[list[str]] = []
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "agent.config.loader" in graph and "agent.presets.alga" in graph  # it reads them
    assert cycles(graph) == []


def test_the_walk_sees_a_circle() -> None:
    """The check itself can fail: the old layout (config <-> presets.alga) is a circle."""
    graph = {"agent.config": {"agent.presets.alga"}, "agent.presets.alga": {"agent.config"}}
    assert cycles(graph) == [["agent.config", "agent.presets.alga", "agent.config"]]


def test_the_config_loader_never_names_a_preset() -> None:
    """Presets plug into the loader's registry; the config package imports none of them."""
    graph = import_graph()
    config_modules = [m for m in graph if m == "agent.config" or m.startswith("agent.config.")]
    assert len(config_modules) >= 4
    for module in config_modules:
        assert not any(m.startswith("agent.presets.") for m in graph[module]), module
