"""The parts of the `kubernetes` package the agent uses: ApiClient, Configuration, rest.

Importing `kubernetes` runs its package init, which imports every API and model class and
the config, watch, stream, dynamic and leader-election packages: about 0.7 s of every run,
for nothing the agent calls (raw paths, responses read as JSON without model classes). So
the two package modules are registered empty here, and only the three modules the agent
needs are loaded from the installed package. `kubernetes.client.models` stays empty:
ApiClient looks model classes up there only to deserialize typed responses, which the
agent never asks for (`_preload_content=False`).

Three more imports of those modules are needed seldom or never: `requests` (only when a
proxy is set, HTTPS_PROXY and the like), `dateutil` (to deserialize model dates) and
`multiprocessing.pool` (for async_req). Together about 0.1 s of every run. While the three
modules load, stand-ins take their place that load the real function on their first call;
they are gone from sys.modules afterwards, so nothing else in the process sees them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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


def _loaded_when_called(module: str, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    return call


_STAND_INS: dict[str, dict[str, object]] = {
    "requests": {},
    "requests.utils": {
        "should_bypass_proxies": _loaded_when_called("requests.utils", "should_bypass_proxies")
    },
    "dateutil": {},
    "dateutil.parser": {"parse": _loaded_when_called("dateutil.parser", "parse")},
    "multiprocessing.pool": {
        "ThreadPool": _loaded_when_called("multiprocessing.pool", "ThreadPool")
    },
}


@contextlib.contextmanager
def _stand_ins() -> Iterator[None]:
    added = [name for name in _STAND_INS if name not in sys.modules]
    for name in added:
        module = types.ModuleType(name)
        module.__dict__.update(_STAND_INS[name])
        sys.modules[name] = module
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


_register_packages()
with _stand_ins():
    from kubernetes.client.api_client import ApiClient
    from kubernetes.client.configuration import Configuration
    from kubernetes.client.rest import ApiException

__all__ = ["ApiClient", "ApiException", "Configuration"]
