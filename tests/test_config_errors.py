"""A corpus of bad configs: each gets exit 2, one line naming the field and the fix, and
not a single request to the cluster."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubesim import KubeSim
from tests.conftest import basic_config, fast_run_args, run_agent


def with_(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """basic_config() with one field set (value None removes it)."""
    data = copy.deepcopy(base or basic_config())
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return data


ALGA = {"preset": "alga-talos-single-node", "flux": basic_config()["flux"]}

CORPUS: list[tuple[str, Any, str]] = [
    ("yaml-syntax", "sync: [unclosed", "invalid YAML at line"),
    ("not-a-mapping", "- a\n- b\n", "must hold a YAML mapping, not list"),
    ("unknown-top-key", with_("sinc", {}), "sinc: unknown field"),
    ("unknown-sync-key", with_("sync.brnach", "main"), "sync.brnach: unknown field"),
    ("missing-url", with_("sync.url", None), "sync.url: is required"),
    (
        "scp-url",
        with_("sync.url", "git@github.com:org/repo.git"),
        "use 'ssh://git@github.com/org/repo.git'",
    ),
    ("ftp-url", with_("sync.url", "ftp://host/repo"), "must start with https://"),
    (
        "two-refs",
        with_("sync.ref", {"branch": "main", "tag": "v1"}),
        "sync.ref: set exactly one of branch, tag",
    ),
    ("no-ref", with_("sync.ref", {}), "sync.ref: set exactly one of"),
    ("short-commit", with_("sync.ref", {"commit": "abc123"}), "not a full commit SHA"),
    ("absolute-path", with_("sync.path", "/clusters/x"), "sync.path: '/clusters/x' must be"),
    ("escaping-path", with_("sync.path", "./a/../../b"), "must not leave the repository"),
    (
        "bad-interval",
        with_("sync.interval", "5 minutes"),
        "sync.interval: '5 minutes' is not valid; use a Go duration",
    ),
    (
        "source-timeout-in-hours",
        with_("sync.sourceTimeout", "1h"),
        "sync.sourceTimeout: '1h' is not valid; use a duration in ms, s or m",
    ),
    ("source-timeout-zero", with_("sync.sourceTimeout", "0s"), "must be longer than zero"),
    (
        "sparse-checkout-not-relative",
        with_("sync.sparseCheckout", ["clusters"]),
        "sync.sparseCheckout[0]: 'clusters' must be a folder relative to the root",
    ),
    (
        "path-outside-sparse-checkout",
        with_("sync.sparseCheckout", ["./charts"]),
        "sync.path: './clusters/appliance' lies outside sync.sparseCheckout",
    ),
    (
        "commit-with-tag",
        with_("sync.ref", {"tag": "v1", "commit": "a" * 40}),
        "(or branch with commit)",
    ),
    ("prune-not-bool", with_("sync.prune", "yes"), "sync.prune: must be true or false"),
    ("uppercase-name", with_("sync.name", "Appliance"), "sync.name: 'Appliance' is not valid"),
    ("short-sha", with_("flux.sha256", "abc"), "flux.sha256: 'abc' is not valid"),
    (
        "missing-bundle",
        with_("flux.manifests", "/nonexistent/gotk.yaml"),
        "cannot read the Flux bundle",
    ),
    (
        "http-endpoint",
        with_("cluster.endpoints", ["http://127.0.0.1:6443"]),
        "cluster.endpoints[0]: 'http://127.0.0.1:6443' is not an https://host:port URL",
    ),
    (
        "ssh-without-known-hosts",
        with_(
            "sync.credentials", {"identityFile": "id"}, with_("sync.url", "ssh://git@host/org/repo")
        ),
        "an ssh:// URL needs identityFile and knownHostsFile",
    ),
    (
        "missing-credentials-file",
        with_("sync.credentials", {"bearerTokenFile": "nope"}),
        "sync.credentials.bearerTokenFile: file",
    ),
    (
        "secret-generate-and-file",
        with_(
            "site.secrets",
            [{"namespace": "a", "name": "b", "keys": {"k": {"generate": {}, "file": "id"}}}],
        ),
        "site.secrets[0].keys.k: set exactly one of generate",
    ),
    (
        "secret-too-short",
        with_(
            "site.secrets",
            [{"namespace": "a", "name": "b", "keys": {"k": {"generate": {"bytes": 4}}}}],
        ),
        "4 bytes is out of range",
    ),
    ("unknown-preset", {"preset": "nope"}, "preset: unknown preset 'nope'"),
    ("patch-not-mapping", with_("sync.patches", ["op: add"]), "sync.patches[0]"),
    (
        "label-not-string",
        with_("site.namespaces", [{"name": "x", "labels": {"a": 1}}]),
        "site.namespaces[0].labels: must be a mapping of strings",
    ),
    ("bad-record-namespace", with_("record.namespace", "Alga_System"), "record.namespace"),
    (
        "alga-latest-tag",
        with_("alga.images", {"algaCore": "latest"}, ALGA),
        "alga.images.algaCore: 'latest' is refused",
    ),
    (
        "alga-bad-url",
        with_("alga.appUrl", "psa.example.com", ALGA),
        "alga.appUrl: 'psa.example.com' is not a site URL",
    ),
    ("alga-base-without-values", with_("alga.mode", "base", ALGA), "alga.valuesDir"),
    ("alga-unknown-mode", with_("alga.mode", "kustomize", ALGA), "alga.mode: 'kustomize'"),
    # The preset reads its section with the config's own reader: the same paths and fixes.
    (
        "alga-unknown-field",
        with_("alga.mood", "calm", ALGA),
        "alga.mood: unknown field (known fields here: appUrl, host, images, mode, release,",
    ),
    (
        "alga-secrets-unknown-field",
        with_("alga.secrets", {"tokenFile": "id"}, ALGA),
        "alga.secrets.tokenFile: unknown field (known fields here: authKeyFile, statusTokenFile)",
    ),
    (
        "alga-secret-file-missing",
        with_("alga.secrets", {"authKeyFile": "no-such-file"}, ALGA),
        "alga.secrets.authKeyFile: file ",
    ),
    (
        "alga-release-empty-version",
        with_("alga.release.version", "", ALGA),
        "alga.release.version: must be a non-empty string",
    ),
]


@pytest.mark.parametrize(("name", "config", "message"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_config_is_rejected_before_touching_the_cluster(
    kubesim: KubeSim, tmp_path: Path, name: str, config: Any, message: str
) -> None:
    (tmp_path / "id").write_text("key")
    path = tmp_path / "config.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    result = run_agent(*fast_run_args(path, kubesim.kubeconfig_path))
    assert result.code == 2, result.output
    lines = result.messages()  # besides the run's log, if it started
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert kubesim.requests == []


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 20
