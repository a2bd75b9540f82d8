"""kubesim: a Kubernetes API simulator over real HTTPS, for tests, the demo and the benchmark."""

from kubesim.server import KubeSim

__all__ = ["KubeSim"]
