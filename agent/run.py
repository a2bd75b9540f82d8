"""`alga-bootstrap run`: the boot, step by step."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from agent import bundle as flux_bundle
from agent import config as config_module
from agent import desired, log, talos
from agent.credentials import from_machined, kubeconfig_paths
from agent.errors import BootstrapError, ConfigError
from agent.kube import (
    Kube,
    configuration_in_memory,
    kubeconfig_source,
    load_kubeconfig,
    tls_settings,
)
from agent.lease import LeaseWaited, RunLease
from agent.step import Ledger, StepReport
from agent.steps import create_sync, install_flux, preflight, record, seed_site, verify, wait_api

_log = log.get("run")


@dataclass(frozen=True)
class RunOptions:
    config: config_module.Config
    kubeconfig: Path | None
    flux_manifests: Path | None
    timeout_s: float
    force: bool
    dry_run: bool = False
    context: str | None = None  # a kubeconfig context, as kubectl's --context
    started: float | None = None  # time.monotonic() when the command started


def _file_digest(source: str) -> str | None:
    """The sha256 of the config file read, or None for the built-in preset."""
    path = Path(source)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def connect(
    config: config_module.Config,
    kubeconfig: Path | None,
    deadline: float,
    read_only: bool = False,
    context: str | None = None,
) -> Kube:
    """Credentials (kubeconfig files, or machined's admin kubeconfig on a Talos node: the
    caller has checked its socket with credentials.check_machined_socket), then wait until an
    endpoint is ready, bootstrapping etcd if configured and needed. `status` is read-only: it
    never bootstraps nor restarts the service. Raises NothingToDoHere on a worker, or when
    the service must start afresh for a machine config that came late."""
    machined = None
    cluster_endpoint = None
    if from_machined(config, kubeconfig, context):
        machined = talos.Machined(config.talos.socket)
        raw = machined.kubeconfig(deadline)
        if machined.config_arrived_late and not read_only:
            machined.restart_this_service()
            machined.close()
            raise talos.RestartedForConfig(f"restarting {talos.SERVICE_ID}")
        source = "machined's kubeconfig"
        client_config, cluster_endpoint = configuration_in_memory(raw, source)
        endpoints = list(config.cluster.endpoints or config_module.TALOS_ENDPOINTS)
    else:
        paths = kubeconfig_paths(config, kubeconfig)
        source = kubeconfig_source(paths)
        client_config = load_kubeconfig(paths, context)
        if not config.cluster.endpoints and not client_config.host.startswith("https://"):
            raise ConfigError(
                f"{source}: the cluster's server {client_config.host} is not https://; the "
                "agent talks to the API over TLS only: fix the server, or set cluster.endpoints"
            )
        endpoints = list(config.cluster.endpoints or [client_config.host])
    verify, cert, headers = tls_settings(client_config)
    when_slow = None
    if not read_only and config.talos.bootstrap_etcd and machined is not None:
        when_slow = partial(
            talos.bootstrap_etcd_if_needed,
            machined,
            config.talos.bootstrap_etcd,
            cluster_endpoint,
            endpoints,
            deadline,
        )
    try:
        endpoint = wait_api.wait_for_api(
            endpoints,
            verify,
            cert,
            headers,
            deadline,
            when_slow,
            config.talos.bootstrap_after_s,
            source=source,
        )
    finally:
        if machined is not None:
            machined.close()
    return Kube(client_config, endpoint, source)


@dataclass(frozen=True)
class _Pass:
    """One look at the cluster: what each step did, and the revision Flux accepted."""

    reports: list[StepReport]
    revision: str | None


def run(options: RunOptions) -> list[StepReport]:
    """Raises BootstrapError (or a subclass) with the exit code on failure."""
    started_at, started = _now(), options.started or time.monotonic()
    deadline = started + options.timeout_s
    config = options.config
    # First, which config this run loaded: on Talos a tech compares it with the
    # ExtensionServiceConfig they applied (it takes effect only when the service restarts).
    _log.info(
        "starting",
        config=config.source,
        config_sha256=_file_digest(config.source),
        timeout_s=options.timeout_s,
        dry_run=options.dry_run,
    )
    bundle = flux_bundle.load(options.flux_manifests or config.flux.manifests, config.flux.sha256)
    desired.check_manifests(config, bundle.kinds)  # all input refused before any request
    _log.info("flux bundle", flux=bundle.version, sha256=bundle.sha256)
    try:
        kube = connect(config, options.kubeconfig, deadline, context=options.context)
    except talos.NothingToDoHere as err:
        # One image boots every node of a site (a worker has nothing to do), and a service
        # restarted for its config runs again: exit 0, so Talos does not retry every 5 s.
        _log.info(err.event, detail=str(err))
        return []
    kube.deadline = deadline
    kube.dry_run = options.dry_run
    lease = None
    if not options.dry_run:
        home = next(
            n
            for n in desired.site_namespaces(config)
            if n["metadata"]["name"] == config.record.namespace
        )
        lease = RunLease(kube, home, config.lease.name, config.lease.duration_s)
        kube.before_write = lease.before_write
    try:
        try:
            done = _pass(kube, bundle, options, started_at, started, deadline)
        except LeaseWaited:
            # Another run held the lease: what this one read may be stale. Look again, now
            # holding the lease; usually the other run did everything.
            assert lease is not None
            lease.stale = False
            _log.info("the other run finished; checking again")
            done = _pass(kube, bundle, options, started_at, started, deadline)
    finally:
        if lease is not None:
            lease.release()
        kube.close()
    if not options.dry_run:
        # Last, after the release and its warnings: the service log ends with the outcome.
        writes = sum(len(r.changes.writes) for r in done.reports)
        _log.info(
            "done" if writes else "nothing to do",
            revision=done.revision,
            changes=writes,
            seconds=round(time.monotonic() - started, 2),
        )
    return done.reports


def _pass(
    kube: Kube,
    bundle: flux_bundle.FluxBundle,
    options: RunOptions,
    started_at: str,
    started: float,
    deadline: float,
) -> _Pass:
    """One look at the cluster: the steps, then the record."""
    config = options.config
    digest = record.inputs_digest(config, bundle)
    previous = record.load(kube, config)
    # The last recorded run succeeded with these very inputs: steps may confirm health with
    # a few reads instead of comparing every object.
    trusted = bool(
        not kube.dry_run
        and previous
        and previous.get("result") == "succeeded"
        and previous.get("inputsDigest") == digest
    )
    ran = Ledger()
    revision = None
    error = None
    try:
        revision = _steps(ran, kube, bundle, options, deadline, trusted, previous)
    except BootstrapError as err:
        error = err
    if kube.dry_run:
        if error is not None:
            raise error
        return _Pass(ran.reports, revision)
    changed = any(r.changes.writes for r in ran.reports)
    entry = record.build(
        config,
        bundle,
        digest,
        started_at,
        _now(),
        time.monotonic() - started,
        ran.reports,
        revision,
    )
    if error is not None:
        _record_best_effort(kube, config, entry, previous, changed)
        raise error
    record.save(kube, config, entry, previous, changed)
    return _Pass(ran.reports, revision)


def _steps(
    ran: Ledger,
    kube: Kube,
    bundle: flux_bundle.FluxBundle,
    options: RunOptions,
    deadline: float,
    trusted: bool,
    previous: dict[str, object] | None,
) -> str | None:
    """The boot, in order; each step's findings go into the next one's inputs. Returns the
    revision Flux accepted (None in a dry run)."""
    config = options.config
    checked = ran(preflight.check, preflight.Inputs(kube, bundle, options.force))
    flux = ran(
        install_flux.install,
        install_flux.Inputs(
            kube,
            bundle,
            deadline,
            trusted,
            checked.installed_flux_version,
            checked.taking_over_from,
        ),
    )
    ran(seed_site.seed, seed_site.Inputs(kube, config, trusted))
    sync = ran(create_sync.create, create_sync.Inputs(kube, config.sync, options.force, trusted))
    trusted_revision = (str((previous or {}).get("revision") or "") or None) if trusted else None
    verified = ran(
        verify.verify,
        verify.Inputs(
            kube,
            config.sync,
            deadline,
            sync.live,
            trusted_revision,
            bundle,
            flux.running,
        ),
    )
    return verified.revision


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
