"""`alga-bootstrap run`: the boot, step by step."""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent import bundle as flux_bundle
from agent import config as config_module
from agent import log
from agent.context import RunContext
from agent.converge import StepResult
from agent.errors import BootstrapError, ConfigError
from agent.kube import Kube, load_kubeconfig, tls_settings
from agent.steps import create_sync, install_flux, preflight, record, seed_site, verify, wait_api

_log = log.get("run")


@dataclass(frozen=True)
class RunOptions:
    config_path: Path | None
    kubeconfig: Path | None
    flux_manifests: Path | None
    timeout_s: float
    force: bool


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(options: RunOptions) -> None:
    """Raises BootstrapError (or a subclass) with the exit code on failure."""
    started_at, started = _now(), time.monotonic()
    deadline = started + options.timeout_s
    config = config_module.load(options.config_path)
    bundle = flux_bundle.load(options.flux_manifests or config.flux.manifests, config.flux.sha256)
    kubeconfig_path = (
        options.kubeconfig
        or config.cluster.kubeconfig
        or (Path(os.environ["KUBECONFIG"]) if os.environ.get("KUBECONFIG") else None)
    )
    if kubeconfig_path is None:
        raise ConfigError(
            f"{config.source}: cluster.kubeconfig: no credentials; pass "
            "--kubeconfig PATH, set cluster.kubeconfig, or set KUBECONFIG"
        )
    client_config = load_kubeconfig(kubeconfig_path)
    endpoints = list(config.cluster.endpoints or [client_config.host])
    _log.info(
        "starting",
        config=config.source,
        flux=bundle.version,
        endpoints=endpoints,
        timeout_s=options.timeout_s,
    )

    endpoint = wait_api.wait_for_api(endpoints, *tls_settings(client_config), deadline)
    kube = Kube(client_config, endpoint)
    ctx = RunContext(config, bundle, kube, deadline, force=options.force)
    previous = record.load(kube, config)
    digest = record.inputs_digest(config, bundle)
    ctx.trust_previous = bool(
        previous
        and previous.get("result") == "succeeded"
        and previous.get("inputsDigest") == digest
    )

    results: list[StepResult] = []
    error: BootstrapError | None = None
    try:
        for step in (
            preflight.check,
            install_flux.install,
            seed_site.seed,
            create_sync.create,
            verify.verify,
        ):
            results.append(step(ctx))
    except BootstrapError as err:
        error = err
        results.append(StepResult(_step_name(len(results)), note=str(err)))
    changed = any(r.changes for r in results)
    revision = next((r.note for r in results if r.name == "verify"), None)
    entry = record.build(
        config,
        bundle,
        digest,
        started_at,
        _now(),
        time.monotonic() - started,
        results,
        str(error) if error else None,
        revision,
    )
    if error is not None:
        entry["steps"][-1]["outcome"] = "failed"
        _record_best_effort(kube, config, entry, previous, changed)
        raise error
    record.save(kube, config, entry, previous, changed)
    _log.info(
        "done" if changed else "nothing to do",
        revision=revision,
        changes=sum(len(r.changes) for r in results),
        seconds=round(time.monotonic() - started, 2),
    )
    kube.close()


STEP_NAMES = ("preflight", "install-flux", "seed-site", "create-sync", "verify")


def _step_name(index: int) -> str:
    return STEP_NAMES[min(index, len(STEP_NAMES) - 1)]


def _record_best_effort(
    kube: Kube,
    config: config_module.Config,
    entry: dict[str, object],
    previous: dict[str, object] | None,
    changed: bool,
) -> None:
    """A failed run is recorded too, unless the API is what failed."""
    try:
        record.save(kube, config, entry, previous, changed)
    except BootstrapError as err:
        _log.warning("could not record the failed run", error=str(err))
