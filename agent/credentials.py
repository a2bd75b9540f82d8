"""Where a command's cluster credentials come from, decided before the Kubernetes client is
imported (about a second on a busy node), so a wrong choice fails at once."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.config import Config
from agent.errors import ConfigError


def from_machined(config: Config, kubeconfig: Path | None, context: str | None) -> bool:
    """machined's admin kubeconfig (cluster.credentials: talos), unless --kubeconfig or
    --context choose a kubeconfig."""
    return kubeconfig is None and context is None and config.cluster.credentials == "talos"


def check_machined_socket(config: Config, kubeconfig: Path | None, context: str | None) -> None:
    """Talos starts the service only once machined's socket exists (talos/alga-bootstrap.yaml,
    `depends: path`), so no socket means this is not a Talos node: say so now rather than wait
    out the deadline. A socket that does not answer yet is waited for (talos.Machined)."""
    if not from_machined(config, kubeconfig, context):
        return
    path = config.talos.socket
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise ConfigError(
            f"cluster.credentials: talos, but there is no machined socket at {path} (not a "
            "Talos node?); pass --kubeconfig PATH (or --context NAME from $KUBECONFIG), or set "
            "cluster.credentials: kubeconfig"
        )


def kubeconfig_paths(config: Config, kubeconfig: Path | None) -> list[Path]:
    """As kubectl: one named file (--kubeconfig, else cluster.kubeconfig), else $KUBECONFIG
    as a path list, else ~/.kube/config (client-go tools/clientcmd/loader.go,
    NewDefaultClientConfigLoadingRules)."""
    named = kubeconfig or config.cluster.kubeconfig
    if named is not None:
        return [named]
    listed = [Path(p) for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed:
        return listed
    home = Path(os.path.expanduser("~/.kube/config"))
    if home.is_file():
        return [home]
    raise ConfigError(
        f"{config.source}: cluster.kubeconfig: no credentials; pass "
        "--kubeconfig PATH, set cluster.kubeconfig, or set KUBECONFIG"
    )
