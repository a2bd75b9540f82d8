"""Step 7: record what the run did, in a ConfigMap (no secret values), and read the last one.

The record is written only when something changed, so a re-run on a converged cluster
makes no writes at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from agent import __version__, desired, log
from agent.bundle import FluxBundle
from agent.config import Config
from agent.kube import Kube
from agent.step import StepReport

_log = log.get("record")
Obj = dict[str, Any]
VOLATILE = ("startedAt", "finishedAt", "durationSeconds")


def inputs_digest(config: Config, bundle: FluxBundle) -> str:
    """Everything that decides the desired state: config, bundle, agent version, and the
    digests (never the contents) of the files the config names."""
    files: list[Path] = []
    if config.sync.credentials:
        files += config.sync.credentials.files.values()
    files += [k.file for s in config.site.secrets for k in s.keys if k.file]
    files += [m.file for m in config.site.manifests]
    file_digests = {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()
    }
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "source"}
    blob = json.dumps(
        [__version__, bundle.sha256, settings, file_digests], default=str, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def load(kube: Kube, config: Config) -> Obj | None:
    live = kube.get("v1", "ConfigMap", config.record.name, config.record.namespace)
    try:
        record: Obj = json.loads((live or {}).get("data", {}).get("run.json", ""))
    except ValueError:
        return None
    return record


def build(
    config: Config,
    bundle: FluxBundle,
    digest: str,
    started: str,
    finished: str,
    duration: float,
    steps: list[StepReport],
    revision: str | None,
) -> Obj:
    """The record of a run, from its step reports. Each step lists what it wrote (in a
    dry run nothing is recorded), structured: action, kind, namespace, name, field paths."""
    sync = config.sync
    error = next((s.error for s in steps if s.error is not None), None)
    return {
        "agentVersion": __version__,
        "fluxVersion": bundle.version,
        "fluxBundleSha256": bundle.sha256,
        "sync": {
            "name": sync.name,
            "namespace": sync.namespace,
            "url": sync.url,
            "ref": sync.ref.as_spec(),
            "path": sync.path,
        },
        "revision": revision,
        "result": "failed" if error else "succeeded",
        "error": error,
        "startedAt": started,
        "finishedAt": finished,
        "durationSeconds": round(duration, 2),
        "steps": [
            {
                "name": s.name,
                "outcome": s.outcome,
                "changes": [c.as_record() for c in s.changes.writes],
                "note": s.error or s.note,
            }
            for s in steps
        ],
        "inputsDigest": digest,
    }


def change_counts(record: Obj) -> dict[str, int]:
    """How many objects each action touched. A record of the previous release lists its
    changes as lines of text, without a structured action: those count as "changed"."""
    counts: dict[str, int] = {}
    for step in record.get("steps", []):
        for change in step.get("changes", []):
            action = change.get("action", "changed") if isinstance(change, dict) else "changed"
            counts[action] = counts.get(action, 0) + 1
    return counts


def _essence(record: Obj | None) -> Obj:
    """A record without its timing; unchanged steps count the same however they were found."""
    if record is None:
        return {}
    out = {k: v for k, v in record.items() if k not in VOLATILE and k != "steps"}
    out["failedStep"] = next(
        (s["name"] for s in record.get("steps", []) if s["outcome"] == "failed"), None
    )
    return out


def save(kube: Kube, config: Config, record: Obj, previous: Obj | None, changed: bool) -> bool:
    """Write the record unless the run changed nothing and found what the last one found
    (read again: another run may have recorded the same result meanwhile)."""
    if not changed and (
        _essence(record) == _essence(previous) or _essence(record) == _essence(load(kube, config))
    ):
        return False
    body = json.dumps(record, indent=2, sort_keys=True)
    # Its namespace exists: the run's Lease lives there and creates it before any write.
    kube.apply(desired.run_record(config.record.namespace, config.record.name, body))
    _log.info(
        "run recorded",
        configmap=f"{config.record.namespace}/{config.record.name}",
        result=record["result"],
    )
    return True
