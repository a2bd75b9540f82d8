"""`alga-bootstrap status`: where the bootstrap and Flux stand, at a glance. Reads only."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tenacity
import yaml

from agent import bundle as flux_bundle
from agent import config as config_module
from agent import desired, health, interrupt, patch_effects
from agent.errors import (
    EXIT_FAILED,
    EXIT_NOT_BOOTSTRAPPED,
    EXIT_OK,
    EXIT_PROGRESSING,
    BootstrapError,
    ConfigError,
)
from agent.health import seconds_since
from agent.kube import FLUX_KINDS, Kube
from agent.lease import active_holder
from agent.output import document
from agent.run import connect
from agent.steps import record
from agent.steps.verify import source_progress

Obj = dict[str, Any]
READY, PROGRESSING, FAILED = health.READY, health.PROGRESSING, health.FAILED
SUSPENDED = health.SUSPENDED  # a Flux object a tech paused: never progresses by itself
NOT_BOOTSTRAPPED = "not-bootstrapped"  # no run has finished yet, and none is running
WATCH_POLL_MAX_S = 5.0
KS_API, HR_API = "kustomize.toolkit.fluxcd.io/v1", "helm.toolkit.fluxcd.io/v2"
OWNER_NAME, OWNER_NS = "kustomize.toolkit.fluxcd.io/name", "kustomize.toolkit.fluxcd.io/namespace"


# How status shows each state of the readiness model (agent/health.py).
_SHOWN = {health.STALLED: FAILED, health.MISSING: FAILED}


def shown(found: health.Health) -> str:
    return _SHOWN.get(found.state, found.state)


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return ""
    return _duration(seconds_since(timestamp))


def _duration(total: float) -> str:
    seconds = int(total)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _flux_object(obj: Obj, source_revision: str | None = None) -> Obj:
    ready = health.condition(obj, "Ready") or {}
    status = obj.get("status", {})
    found = health.flux(obj, source_revision)
    return {
        "kind": obj["kind"],
        "namespace": obj["metadata"]["namespace"],
        "name": obj["metadata"]["name"],
        "state": shown(found),
        "ready": ready.get("status", "Unknown"),
        "reason": found.reason,
        "message": found.message,
        "lastAppliedRevision": status.get("lastAppliedRevision")
        or status.get("lastAttemptedRevision")
        or "",
        "age": _age(ready.get("lastTransitionTime") or obj["metadata"].get("creationTimestamp")),
        "dependsOn": [d["name"] for d in obj.get("spec", {}).get("dependsOn", [])],
    }


def _source_revision(ks: Obj, source: Obj | None) -> str | None:
    """The artifact revision of the Kustomization's source, when that is the sync's
    GitRepository (the one status reads)."""
    ref = ks.get("spec", {}).get("sourceRef", {})
    if source is None or (ref.get("kind"), ref.get("name")) != ("GitRepository", source["name"]):
        return None
    if ref.get("namespace", ks["metadata"]["namespace"]) != source["namespace"]:
        return None
    return str(source["revision"]) if source["state"] == READY else None


def _tree(kube: Kube, root: Obj, source: Obj | None) -> Obj:
    """A Kustomization with what it applied: child Kustomizations in dependency order, and
    the HelmReleases each child applied (by Flux's ownership labels)."""
    node = _flux_object(root, _source_revision(root, source))
    selector = f"{OWNER_NAME}={root['metadata']['name']},{OWNER_NS}={root['metadata']['namespace']}"
    node["helmReleases"] = [_flux_object(h) for h in kube.list(HR_API, "HelmRelease", "", selector)]
    children = [
        c
        for c in kube.list(KS_API, "Kustomization", "", selector)
        if c["metadata"]["name"] != root["metadata"]["name"]
    ]
    ordered: list[Obj] = []
    remaining = {c["metadata"]["name"]: c for c in children}
    while remaining:  # dependencies first; a cycle falls back to name order
        ready = [
            n
            for n, c in sorted(remaining.items())
            if not set(d["name"] for d in c.get("spec", {}).get("dependsOn", [])) & set(remaining)
        ] or sorted(remaining)[:1]
        for name in ready:
            ordered.append(remaining.pop(name))
    node["children"] = [_tree(kube, child, source) for child in ordered]
    return node


def _worst(states: list[str]) -> str:
    # Suspended before progressing: what waits on a suspended object never gets there.
    for state in (FAILED, SUSPENDED, PROGRESSING):
        if state in states:
            return state
    return READY


def _states(node: Obj) -> list[str]:
    return [
        node["state"],
        *(h["state"] for h in node["helmReleases"]),
        *(s for c in node["children"] for s in _states(c)),
    ]


def collect(
    config: config_module.Config,
    kubeconfig: Path | None,
    flux_manifests: Path | None,
    context: str | None = None,
    timeout_s: float = 5.0,
) -> Obj:
    report: Obj = {
        "api": {"reachable": False},
        "flux": {},
        "source": None,
        "kustomizations": [],
        "site": [],
        "patches": [],
        "release": [],
        "lastRun": None,
    }
    try:
        bundle: flux_bundle.FluxBundle | None = flux_bundle.load(
            flux_manifests or config.flux.manifests, config.flux.sha256
        )
    except ConfigError:
        bundle = None
    report["flux"]["bundled"] = bundle.version if bundle else None
    try:
        kube = connect(
            config, kubeconfig, time.monotonic() + timeout_s, read_only=True, context=context
        )
    except ConfigError:
        raise
    except BootstrapError as err:
        report["api"]["error"] = str(err)
        report["state"] = FAILED
        return report
    try:
        return _collect(kube, config, bundle, report)
    finally:
        kube.close()


def _collect(
    kube: Kube, config: config_module.Config, bundle: flux_bundle.FluxBundle | None, report: Obj
) -> Obj:
    server = kube.version()
    report["api"] = {
        "reachable": True,
        "endpoint": kube.host,
        "kubernetes": server.get("gitVersion"),
    }
    kube.kinds.update(FLUX_KINDS)
    if bundle:
        kube.register_crds(bundle.crds)
    flux = health.installed_flux(kube)
    report["flux"]["installed"] = flux.version if flux else None
    controllers = []
    for deploy in kube.list(
        "apps/v1", "Deployment", config.flux.namespace, "app.kubernetes.io/part-of=flux"
    ):
        found = health.deployment(deploy)
        controllers.append(
            {
                "name": deploy["metadata"]["name"],
                "state": shown(found),
                "message": found.message,
            }
        )
    report["flux"]["controllers"] = controllers
    sync = config.sync
    repo = kube.get_like(desired.git_repository(sync)) if flux else None
    if repo is not None:
        fetching = source_progress(repo)
        report["source"] = {
            **_flux_object(repo),
            "url": config_module.url_without_secrets(repo["spec"].get("url") or ""),
            "ref": repo["spec"].get("ref", {}),
            "revision": repo.get("status", {}).get("artifact", {}).get("revision", ""),
            # source-controller at work (fetching): its message and for how long
            "progress": {"message": fetching[0], "age": _duration(fetching[1])}
            if fetching
            else None,
        }
    root = kube.get_like(desired.kustomization(sync)) if flux else None
    if root is not None:
        report["kustomizations"] = [_tree(kube, root, report["source"])]
    report["site"] = _site(kube, config)
    # The lease before the record: a run records, then releases, so no record and a free
    # lease mean no run has finished.
    running = active_holder(
        kube.get("coordination.k8s.io/v1", "Lease", config.lease.name, config.record.namespace)
    )
    report["patches"] = _patches(kube, config, root, report["source"])
    if config.alga is not None:
        report["release"] = _release(kube, config)
    report["lastRun"] = record.load(kube, config)
    states = [c["state"] for c in controllers] or [FAILED]
    states.append(report["source"]["state"] if report["source"] else FAILED)
    states += [s for node in report["kustomizations"] for s in _states(node)] or [FAILED]
    states += [READY if _site_ready(item) else FAILED for item in report["site"]]
    states += [p["state"] for p in report["patches"]]
    states += [r["state"] for r in report["release"]]
    report["state"] = _worst(states)
    if report["lastRun"] is None and report["state"] != READY:
        # A first boot: in progress while a run holds the lease, else not started (or cut off).
        report["state"] = PROGRESSING if running else NOT_BOOTSTRAPPED
    return report


_EFFECT_STATE = {patch_effects.OK: READY, patch_effects.PENDING: PROGRESSING}


def _patches(
    kube: Kube, config: config_module.Config, root: Obj | None, source: Obj | None
) -> list[Obj]:
    """Whether each of the root's patches took effect (see patch_effects)."""
    sync = config.sync
    if not sync.patches or root is None or source is None:
        return []
    revision = source["revision"]
    done = patch_effects.applied_at(root, revision)
    if done is not True:
        return [
            {
                "kind": "Kustomization",
                "namespace": sync.namespace,
                "name": sync.name,
                "state": FAILED if isinstance(done, str) else PROGRESSING,
                "message": done if isinstance(done, str) else "patches not applied yet",
            }
        ]
    ref = f"{sync.ref.kind} {sync.ref.value}"
    return [
        {
            "kind": e.kind,
            "namespace": e.namespace,
            "name": e.name,
            "state": _EFFECT_STATE.get(e.state, FAILED),
            "message": e.message,
        }
        for e in patch_effects.check(kube, root["spec"].get("patches", []), ref, revision)
    ]


def _release(kube: Kube, config: config_module.Config) -> list[Obj]:
    """The release selection against the tags configured on the HelmReleases (their values
    merged as helm-controller merges them), and in profile mode against the config."""
    from agent.presets import alga

    assert config.alga is not None
    selection = kube.get("v1", "ConfigMap", alga.SELECTION_NAME, alga.VALUES_NAMESPACE)
    selected = (selection or {}).get("data") or {}
    values = {}
    for component in {i.component for i in alga.IMAGES if i.key in alga.SELECTION_KEYS}:
        release = kube.get("helm.toolkit.fluxcd.io/v2", "HelmRelease", component, "alga-system")
        if release is not None:
            values[component] = _helm_values(kube, release)
    fix = (
        "re-run `alga-bootstrap run` (it keeps the selection equal to alga.images)"
        if config.alga.mode == "profile"
        else "finish the update from the appliance's status page, or set the same tags in "
        "the values ConfigMaps and the release selection"
    )
    out = []
    for key, running in alga.configured_tags(values).items():
        wanted = selected.get(alga.SELECTION_KEYS[key])
        configured = config.alga.tags[key]
        if config.alga.mode == "profile" and wanted != configured:
            state, message = FAILED, f"selection {wanted}, config {configured}: {fix}"
        elif running is not None and running != wanted:
            state, message = FAILED, f"selection {wanted}, HelmRelease {running}: {fix}"
        else:
            state = READY if running is not None else PROGRESSING
            message = f"{wanted}" if running is not None else f"{wanted} (no HelmRelease yet)"
        out.append({"image": key, "state": state, "message": message})
    return out


def _helm_values(kube: Kube, release: Obj) -> Obj:
    """The values helm-controller gives the chart: each `valuesFrom` ConfigMap key merged in
    order (later wins), then `spec.values` (Flux docs, HelmRelease API, "Values references")."""
    merged: Obj = {}
    namespace = release["metadata"]["namespace"]
    for ref in release.get("spec", {}).get("valuesFrom", []):
        if ref.get("kind") != "ConfigMap":
            continue
        cm = kube.get("v1", "ConfigMap", ref["name"], namespace) or {}
        text = (cm.get("data") or {}).get(ref.get("valuesKey", "values.yaml"))
        loaded = yaml.safe_load(text) if text else None
        if isinstance(loaded, dict):
            merged = config_module.deep_merge(merged, loaded)
    return config_module.deep_merge(merged, release.get("spec", {}).get("values") or {})


def _site(kube: Kube, config: config_module.Config) -> list[Obj]:
    """The first-boot objects: present or missing, and the keys a generated secret lacks.
    Never their contents."""
    items = []
    for api, kind, ns, name in desired.site_objects(config):
        live = kube.get(api, kind, name, ns)
        gaps = desired.site_object_gaps(config, kind, ns, name, live) if live else []
        items.append(
            {
                "kind": kind,
                "namespace": ns,
                "name": name,
                "present": live is not None,
                "missingKeys": gaps,
            }
        )
    return items


def _site_ready(item: Obj) -> bool:
    return bool(item["present"] and not item["missingKeys"])


# -- output ------------------------------------------------------------------------------------

_SYMBOL = {READY: "✓", PROGRESSING: "…", FAILED: "✗", SUSPENDED: "‖"}
_COLOUR = {READY: "32", PROGRESSING: "33", FAILED: "31", SUSPENDED: "35"}


def render_text(report: Obj, colour: bool) -> str:
    def mark(state: str) -> str:
        symbol = _SYMBOL[state]
        return f"\033[{_COLOUR[state]}m{symbol}\033[0m" if colour else symbol

    lines = []
    api = report["api"]
    first_boot = report.get("lastRun") is None  # missing is expected, not a failure
    missing = PROGRESSING if first_boot else FAILED
    if api["reachable"]:
        lines.append(
            f"{mark(READY)} API          {api['endpoint']} (Kubernetes {api.get('kubernetes')})"
        )
    else:
        lines.append(f"{mark(FAILED)} API          unreachable: {api.get('error', '')}")
        return "\n".join([*lines, f"state: {report['state']}"])
    flux = report["flux"]
    installed, bundled = flux.get("installed"), flux.get("bundled")
    flux_state = (
        READY if installed and installed == bundled else (missing if not installed else PROGRESSING)
    )
    note = "" if installed == bundled else "  (a run upgrades it)" if installed else ""
    lines.append(
        f"{mark(flux_state)} Flux         installed {installed or 'no'}, bundled "
        f"{bundled or 'unreadable'}{note}"
    )
    for c in flux.get("controllers", []):
        lines.append(f"    {mark(c['state'])} {c['name']}  {c['message']}")
    source = report["source"]
    if source:
        ref = " ".join(f"{k}={v}" for k, v in source["ref"].items())
        lines.append(
            f"{mark(source['state'])} Source       GitRepository {source['namespace']}"
            f"/{source['name']}  {source['url']} {ref}"
        )
        lines.append(
            f"    revision {source['revision'] or '-'}  {source['reason']}: {source['message']}"
        )
        if source["progress"]:
            lines.append(
                f"    source-controller working for {source['progress']['age']}: "
                f"{source['progress']['message']}"
            )
    else:
        lines.append(f"{mark(missing)} Source       missing (run alga-bootstrap run)")
    lines.append("  Sync")

    def tree(node: Obj, depth: int) -> None:
        pad = "    " * depth
        after = f"  after {', '.join(node['dependsOn'])}" if node["dependsOn"] else ""
        lines.append(
            f"{pad}    {mark(node['state'])} Kustomization {node['namespace']}/"
            f"{node['name']}  {node['reason']}  {node['lastAppliedRevision']}  "
            f"{node['age']}{after}"
        )
        if node["state"] != READY and node["message"]:
            lines.append(f"{pad}        {node['message']}")
        for hr in node["helmReleases"]:
            lines.append(
                f"{pad}        {mark(hr['state'])} HelmRelease {hr['namespace']}/"
                f"{hr['name']}  {hr['reason']}  {hr['age']}"
            )
            if hr["state"] != READY and hr["message"]:
                lines.append(f"{pad}            {hr['message']}")
        for child in node["children"]:
            tree(child, depth + 1)

    for node in report["kustomizations"]:
        tree(node, 0)
    if not report["kustomizations"]:
        lines.append(f"    {mark(missing)} root Kustomization missing")
    if report["patches"]:
        lines.append("  Patches")
    for item in report["patches"]:
        lines.append(
            f"    {mark(item['state'])} {item['kind']} {item['namespace']}/{item['name']}  "
            f"{item['message']}"
        )
    if report["release"]:
        lines.append("  Release")
    for item in report["release"]:
        lines.append(f"    {mark(item['state'])} {item['image']}  {item['message']}")
    lines.append("  Site")
    for item in report["site"]:
        where = f"{item['namespace']}/" if item["namespace"] else ""
        if not item["present"]:
            problem = "  missing (alga-bootstrap run creates it)"
        elif item["missingKeys"] and item["kind"] == "ConfigMap":  # one the agent owns
            keys = ", ".join(item["missingKeys"])
            problem = f"  {keys} not as configured (alga-bootstrap run sets it again)"
        elif item["missingKeys"]:
            keys = ", ".join(item["missingKeys"])
            many = len(item["missingKeys"]) > 1
            problem = (
                f"  missing key{'s' if many else ''} {keys} (alga-bootstrap run adds "
                f"{'them' if many else 'it'}; the other keys are kept)"
            )
        else:
            problem = ""
        lines.append(
            f"    {mark(READY if _site_ready(item) else missing)} {item['kind']} "
            f"{where}{item['name']}{problem}"
        )
    last = report["lastRun"]
    if last:
        counts = record.change_counts(last)
        by_action = ", ".join(f"{n} {a}" for a, n in counts.items() if a != "changed")
        changes = f"{sum(counts.values())} changes" + (f" ({by_action})" if by_action else "")
        lines.append(
            f"  Last run     {last.get('result')} at {last.get('finishedAt')}, "
            f"{changes}, revision {last.get('revision') or '-'}"
        )
        if last.get("error"):
            lines.append(f"               {last['error']}")
    elif report["state"] == PROGRESSING:
        lines.append("  Last run     none recorded yet; a run is in progress (first boot)")
    else:
        lines.append("  Last run     none recorded")
    if report["state"] == NOT_BOOTSTRAPPED:
        lines += [
            "nothing bootstrapped yet: on a Talos node the boot service runs it",
            "  (talosctl -n <node> logs ext-alga-bootstrap); elsewhere run `alga-bootstrap run`;",
            "  follow it with `alga-bootstrap status --watch`",
        ]
    lines.append(f"state: {report['state']}")
    return "\n".join(lines)


_EXIT_CODES = {
    READY: EXIT_OK,
    PROGRESSING: EXIT_PROGRESSING,
    NOT_BOOTSTRAPPED: EXIT_NOT_BOOTSTRAPPED,
}


def main(
    config: config_module.Config,
    kubeconfig: Path | None,
    flux_manifests: Path | None,
    output: str,
    context: str | None = None,
    timeout_s: float = 5.0,
    watch: bool = False,
    colour: bool = False,
) -> int:
    """`output`: text (coloured when `colour`), json or yaml."""

    def look() -> Obj:
        return collect(config, kubeconfig, flux_manifests, context, timeout_s)

    if watch:
        return _watch(look, output, colour)
    report = look()
    if output == "text":
        print(render_text(report, colour))
    else:
        print(document(report, output))
    return _EXIT_CODES.get(report["state"], EXIT_FAILED)


def _watch(look: Callable[[], Obj], output: str, colour: bool) -> int:
    """Look again until ready or failed, or Ctrl-C (then the exit code of the last look), as
    `flux get --watch`. On a terminal the screen is redrawn; otherwise (and for JSON,
    one line each; for YAML, one document each) a new answer is printed only when something
    changed. Looks again 0.5 s
    after a change, backing off to every WATCH_POLL_MAX_S while nothing changes. An
    unreachable API is waited for: a first boot starts before it."""
    tty = output == "text" and sys.stdout.isatty()
    last: Obj = {"key": None, "report": None, "unchanged": 0}

    def done() -> bool:
        report = look()
        key = json.dumps(_without_ages(report), sort_keys=True)
        if tty or key != last["key"]:
            if output == "text":
                text = render_text(report, colour=tty and colour)
            else:
                text = document(report, output, stream=True)
            if tty:  # redraw from the top left, whatever the lines wrapped to
                sys.stdout.write("\033[H\033[2J")
            print(text if tty or output != "text" else f"{text}\n", flush=True)
        last["unchanged"] = last["unchanged"] + 1 if key == last["key"] else 0
        last["key"], last["report"] = key, report
        return report["state"] in (READY, FAILED, SUSPENDED) and report["api"]["reachable"]

    with contextlib.suppress(interrupt.Interrupted):  # Ctrl-C stops watching
        tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda finished: not finished),
            wait=lambda _: min(0.5 * 2 ** last["unchanged"], WATCH_POLL_MAX_S),
            stop=tenacity.stop_never,
            sleep=interrupt.sleep,
        )(done)
    report = last["report"]
    if report is None:
        return EXIT_FAILED
    return _EXIT_CODES.get(report["state"], EXIT_FAILED)


def _without_ages(value: Any) -> Any:
    """A report without its ages, which change every second without anything happening."""
    if isinstance(value, dict):
        return {k: _without_ages(v) for k, v in value.items() if k != "age"}
    if isinstance(value, list):
        return [_without_ages(v) for v in value]
    return value
