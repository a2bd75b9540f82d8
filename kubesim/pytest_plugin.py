"""pytest fixtures: `kubesim` (a running simulator with controllers) and `kubesim_factory`.

Load with `pytest_plugins = ["kubesim.pytest_plugin"]` in a conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kubesim.server import KubeSim


@pytest.fixture
def kubesim_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., KubeSim]]:
    started: list[KubeSim] = []

    def start(**options: Any) -> KubeSim:
        options.setdefault("kubeconfig_out", tmp_path_factory.mktemp("kubesim") / "kubeconfig")
        sim = KubeSim(**options).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def kubesim(kubesim_factory: Callable[..., KubeSim]) -> KubeSim:
    return kubesim_factory(controllers=True, controller_delay=0.05)
