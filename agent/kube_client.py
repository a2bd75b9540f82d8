"""The parts of the `kubernetes` package the agent uses: ApiClient, Configuration, rest.

Importing `kubernetes` runs its package init, which imports every API and model class and
the config, watch, stream, dynamic and leader-election packages: about 0.7 s of every run,
for nothing the agent calls (raw paths, responses read as JSON without model classes). So
the two package modules are registered empty here, and only the three modules the agent
needs are loaded from the installed package. `kubernetes.client.models` stays empty:
ApiClient looks model classes up there only to deserialize typed responses, which the
agent never asks for (`_preload_content=False`).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def _register_packages() -> None:
    if "kubernetes.client.api_client" in sys.modules or "kubernetes" in sys.modules:
        return  # already loaded, lean or whole
    spec = importlib.util.find_spec("kubernetes")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the kubernetes package is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("kubernetes", root), ("kubernetes.client", root / "client")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    sys.modules["kubernetes.client.models"] = types.ModuleType("kubernetes.client.models")


_register_packages()

from kubernetes.client.api_client import ApiClient  # noqa: E402
from kubernetes.client.configuration import Configuration  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

__all__ = ["ApiClient", "ApiException", "Configuration"]
