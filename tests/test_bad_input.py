"""A malformed-input corpus: every class of bad config, bundle and manifest is refused by
`validate` and by `run` before the first request, with one line naming the field or file,
exit 2, no traceback, within a few seconds (reading is bounded in size and time)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import cli
from agent import config as config_module
from agent.errors import ConfigError
from kubesim import KubeSim
from tests.conftest import BUNDLE, agent_env, basic_config, fast_run_args, run_agent

BOUND_S = 10  # a refusal is quick: no cluster, no retries, bounded reads


@dataclass
class Case:
    """`make(tmp)` writes what the case needs and returns the config (a dict, written as
    YAML, or a path) and any extra CLI arguments; `says` must be in the one error line."""

    name: str
    make: Callable[[Path], tuple[Any, list[str]]]
    says: str
    unsaid: str = ""  # must not appear anywhere in the output (a secret, a huge value)


def config_case(name: str, data: Any, says: str, unsaid: str = "") -> Case:
    return Case(name, lambda tmp: (data, []), says, unsaid)


def with_(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """basic_config() with one field set."""
    data = copy.deepcopy(base or basic_config())
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


def raw_config(name: str, content: str | bytes, says: str) -> Case:
    """A config file written byte for byte."""

    def make(tmp: Path) -> tuple[Any, list[str]]:
        path = tmp / "config.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path, []

    return Case(name, make, says)


def basic_yaml(extra: str = "") -> str:
    return yaml.safe_dump(basic_config()) + extra


def special_config(name: str, kind: str, says: str) -> Case:
    """A config path that is not a regular file."""

    def make(tmp: Path) -> tuple[Any, list[str]]:
        path = tmp / "config.yaml"
        if kind == "fifo":
            os.mkfifo(path)  # reading would block forever: no writer ever comes
        elif kind == "directory":
            path.mkdir()
        else:
            return Path("/dev/zero"), []  # a device that never ends
        return path, []

    return Case(name, make, says)


def bundle_case(name: str, content: str, says: str) -> Case:
    """A Flux bundle pinned by its own sha256, so only its content is wrong."""

    def make(tmp: Path) -> tuple[Any, list[str]]:
        path = tmp / "bundle.yaml"
        path.write_text(content)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        return with_("flux", {"manifests": str(path), "sha256": sha}), []

    return Case(name, make, says)


def manifest_case(name: str, content: str | bytes, says: str, **entry: Any) -> Case:
    """A site manifest (site.manifests[0].file) with bad content."""

    def make(tmp: Path) -> tuple[Any, list[str]]:
        path = tmp / "storage.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return with_("site.manifests", [{"file": str(path), **entry}]), []

    return Case(name, make, says)


def fifo_manifest(tmp: Path) -> tuple[Any, list[str]]:
    os.mkfifo(tmp / "storage.yaml")
    return with_("site.manifests", [{"file": str(tmp / "storage.yaml")}]), []


def fifo_bundle(tmp: Path) -> tuple[Any, list[str]]:
    os.mkfifo(tmp / "bundle.yaml")
    return basic_config(), ["--flux-manifests", str(tmp / "bundle.yaml")]


def huge_manifests(tmp: Path) -> tuple[Any, list[str]]:
    """Three files under 1 MiB each, over the 2 MiB all manifests may hold together."""
    files = []
    for i in range(3):
        (tmp / f"m{i}.yaml").write_text(OBJ + "#" * (900 * 1024))
        files.append({"file": str(tmp / f"m{i}.yaml")})
    return with_("site.manifests", files), []


def bundle_with(extra: str) -> str:
    return BUNDLE.read_text() + "---\n" + extra


OBJ = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: default}\n"
UNKNOWN_KIND = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w, namespace: a}\n"
ALGA = {"preset": "alga-talos-single-node", "flux": basic_config()["flux"]}
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9)
)
SECRET = "hunter2secret"

CORPUS: list[Case] = [
    # -- 2. a secret in the Git URL ---------------------------------------------------------
    config_case(
        "url-password",
        with_("sync.url", f"https://user:{SECRET}@git.example/org/repo.git"),
        "sync.url: must not carry a user name, password or token",
        unsaid=SECRET,
    ),
    config_case(
        "url-token-as-user",
        with_("sync.url", f"https://{SECRET}@github.com/org/repo.git"),
        "sync.credentials",
        unsaid=SECRET,
    ),
    config_case(
        "url-private-token",
        with_("sync.url", f"https://gitlab.example/org/repo.git?private_token={SECRET}"),
        "sync.url: must not carry a query",
        unsaid=SECRET,
    ),
    config_case(
        "url-fragment",
        with_("sync.url", f"https://git.example/org/repo.git#{SECRET}"),
        "sync.url: must not carry a query or fragment",
        unsaid=SECRET,
    ),
    config_case(
        "url-ssh-password",
        with_("sync.url", f"ssh://git:{SECRET}@git.example/org/repo.git"),
        "sync.url: must not carry a user name, password or token",
        unsaid=SECRET,
    ),
    config_case(
        "url-http-password",
        with_("sync.url", f"http://u:{SECRET}@git.example/org/repo.git"),
        "passwordFile",
        unsaid=SECRET,
    ),
    config_case(
        "url-encoded-password",
        with_("sync.url", f"ssh://git%3A{SECRET}@git.example/org/repo.git"),
        "sync.url",
        unsaid=SECRET,
    ),
    config_case(
        "url-bad-scheme-with-password",
        with_("sync.url", f"ftp://u:{SECRET}@git.example/repo"),
        "sync.url",
        unsaid=SECRET,
    ),
    # -- 4a. bundles and site manifests -----------------------------------------------------
    bundle_case(
        "bundle-unknown-kind",
        bundle_with(UNKNOWN_KIND),
        "document 33: kind Widget (example.com/v1) is neither",
    ),
    bundle_case("bundle-not-yaml", "kind: [unclosed\n", "bundle.yaml: invalid YAML at line"),
    bundle_case("bundle-not-mapping", bundle_with("- a\n- b\n"), "document 33 is not a Kubernetes"),
    bundle_case(
        "bundle-no-name",
        bundle_with("apiVersion: v1\nkind: Namespace\nmetadata: {labels: {a: b}}\n"),
        "document 33: metadata.name None is missing",
    ),
    bundle_case(
        "bundle-duplicate-key",
        bundle_with("apiVersion: v1\nkind: Namespace\nkind: Secret\nmetadata: {name: a}\n"),
        "duplicate key 'kind'",
    ),
    bundle_case(
        "bundle-namespaced-without-namespace",
        bundle_with("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n"),
        "Service a needs metadata.namespace",
    ),
    Case("bundle-fifo", fifo_bundle, "bundle.yaml: is a FIFO"),
    bundle_case("bundle-huge", bundle_with("#" + "x" * (2 * 1024 * 1024)), "larger than 2 MiB"),
    manifest_case(
        "manifest-unknown-kind",
        UNKNOWN_KIND,
        "site.manifests[0].file: ",
    ),
    manifest_case(
        "manifest-unknown-kind-names-it",
        OBJ + "---\n" + UNKNOWN_KIND,
        "storage.yaml: document 2: kind Widget (example.com/v1)",
    ),
    manifest_case("manifest-not-yaml", "a: b: c\n", "site.manifests[0].file: "),
    manifest_case("manifest-binary", b"\x00\x01\x02\x03", "is not a text file"),
    manifest_case("manifest-not-mapping", "just a string\n", "document 1 is not a Kubernetes"),
    manifest_case(
        "manifest-no-kind",
        "apiVersion: v1\nmetadata: {name: a}\n",
        "document 1: kind None is missing",
    ),
    manifest_case(
        "manifest-bad-namespace",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: Not_A_Label}\n",
        "metadata.namespace 'Not_A_Label'",
    ),
    manifest_case(
        "manifest-name-with-slash",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a/b, namespace: x}\n",
        "metadata.name 'a/b'",
    ),
    manifest_case(
        "manifest-alias-bomb", "apiVersion: v1\nkind: ConfigMap\n" + BOMB, "anchors and aliases"
    ),
    manifest_case(
        "marker-unknown-kind",
        OBJ,
        "site.manifests[0].skipIfExists: kind Widget",
        skipIfExists={"apiVersion": "example.com/v1", "kind": "Widget", "name": "w"},
    ),
    Case("manifest-fifo", fifo_manifest, "site.manifests[0].file: "),
    Case("manifests-huge-together", huge_manifests, "site.manifests[2].file: the site manifests"),
    # -- 4b. URLs, durations, names ---------------------------------------------------------
    config_case(
        "url-control-character",
        with_("sync.url", "https://git.example/org/re\x01po.git"),
        "sync.url: must not hold whitespace or control characters",
    ),
    config_case(
        "url-space", with_("sync.url", "https://git.example/org/my repo.git"), "sync.url: must"
    ),
    config_case(
        "url-trailing-newline", with_("sync.url", "https://git.example/org/repo.git\n"), "sync.url"
    ),
    config_case(
        "endpoint-control-character",
        with_("cluster.endpoints", ["https://127.0.0.1:6443\x7f"]),
        "cluster.endpoints[0]",
    ),
    config_case(
        "app-url-tab", with_("alga.appUrl", "https://psa.exam\tple.com", ALGA), "alga.appUrl"
    ),
    config_case("interval-zero", with_("sync.interval", "0s"), "sync.interval: '0s' must be"),
    config_case(
        "source-interval-zero", with_("sync.sourceInterval", "0m"), "sync.sourceInterval: '0m'"
    ),
    config_case("timeout-zero", with_("sync.timeout", "0ms"), "sync.timeout: '0ms' must be"),
    config_case("retry-negative", with_("sync.retryInterval", "-1m"), "sync.retryInterval"),
    config_case("interval-overflow", with_("sync.interval", "99999999h"), "sync.interval"),
    config_case("lease-zero", with_("lease.durationSeconds", 0), "lease.durationSeconds: 0"),
    config_case("lease-negative", with_("lease.durationSeconds", -30), "lease.durationSeconds"),
    config_case("name-underscore", with_("sync.name", "my_app"), "sync.name: 'my_app'"),
    config_case("name-trailing-newline", with_("record.name", "run\n"), "record.name"),
    config_case(
        "name-too-long", with_("sync.name", "a" * 254), "sync.name: 'aaaa", unsaid="a" * 254
    ),
    config_case(
        "namespace-too-long",
        with_("sync.namespace", "a" * 64),
        "sync.namespace: 'aaaa",
    ),
    config_case(
        "namespace-dot",
        with_("site.namespaces", [{"name": "a.b"}]),
        "site.namespaces[0].name: 'a.b' is not valid; a DNS-1123 label",
    ),
    config_case(
        "secret-key-dotdot",
        with_("site.secrets", [{"namespace": "a", "name": "b", "keys": {"..": {"generate": {}}}}]),
        "site.secrets[0].keys: key '..' is not valid",
    ),
    config_case(
        "secret-key-slash",
        with_("site.secrets", [{"namespace": "a", "name": "b", "keys": {"a/b": {"generate": {}}}}]),
        "site.secrets[0].keys: key 'a/b'",
    ),
    config_case(
        "configmap-key-space",
        with_("site.configMaps", [{"namespace": "a", "name": "b", "data": {"a b": "1"}}]),
        "site.configMaps[0].data: key 'a b'",
    ),
    config_case(
        "label-value-too-long",
        with_("site.namespaces", [{"name": "a", "labels": {"k": "v" * 64}}]),
        "site.namespaces[0].labels: value",
    ),
    config_case(
        "secret-name-uppercase",
        with_("sync.credentials", {"secretName": "Git", "bearerTokenFile": "id"}),
        "sync.credentials.secretName: 'Git'",
    ),
    # -- 4c. the config file itself ---------------------------------------------------------
    raw_config("config-binary", b"\x00\x00\x00\x01ELF", "config.yaml: is not a text file"),
    raw_config("config-latin1", "sync:\n  name: caf\xe9\n".encode("latin-1"), "is not UTF-8"),
    special_config("config-fifo", "fifo", "config.yaml: is a FIFO"),
    special_config("config-directory", "directory", "config.yaml: is a directory"),
    special_config("config-device", "device", "/dev/zero: is a device"),
    raw_config("config-huge", basic_yaml("#" + "x" * (2 * 1024 * 1024)), "larger than 1 MiB"),
    raw_config("config-nested-5000", "a: " + "[" * 5000 + "]" * 5000, "invalid YAML"),
    raw_config(
        "config-nested-200",
        basic_yaml("deep: " + "[" * 200 + "]" * 200 + "\n"),
        "nested deeper than 64",
    ),
    raw_config("config-alias-bomb", basic_yaml(BOMB), "anchors and aliases"),
    raw_config("config-recursive-alias", basic_yaml("loop: &l [*l]\n"), "anchors and aliases"),
    raw_config(
        "config-merge-key",
        basic_yaml("record: {<<: {namespace: x}}\n"),
        "merge keys (<<) are not accepted",
    ),
    raw_config(
        "config-duplicate-top-key",
        basic_yaml("sync: {}\n"),
        "duplicate key 'sync' (first at line",
    ),
    raw_config(
        "config-duplicate-nested-key",
        basic_yaml().replace("  name: appliance\n", "  name: appliance\n  name: other\n"),
        "duplicate key 'name'",
    ),
    raw_config("config-two-documents", basic_yaml("---\na: 1\n"), "holds 2 YAML documents"),
    raw_config(
        "config-huge-integer",
        basic_yaml("lease: {durationSeconds: 9" + "9" * 5000 + "}"),
        "invalid YAML",
    ),
    raw_config("config-bad-date", basic_yaml("x: 2024-02-31\n"), "invalid YAML"),
    raw_config("config-complex-key", basic_yaml("? [a]\n: b\n"), "a mapping key must be"),
    config_case(
        "patch-not-yaml", with_("sync.patches", [{"patch": "a: [b"}]), "sync.patches[0].patch: "
    ),
    config_case(
        "patch-alias-bomb",
        with_("sync.patches", [{"patch": BOMB}]),
        "sync.patches[0].patch: invalid YAML at line 1: anchors and aliases",
    ),
    config_case("type-sync-list", with_("sync", ["a"]), "sync: must be a mapping"),
    config_case("type-url-number", with_("sync.url", 42), "sync.url: must be a non-empty string"),
    config_case("type-ref-list", with_("sync.ref", {"branch": ["main"]}), "sync.ref.branch"),
    config_case("type-prune-string", with_("sync.prune", "yes"), "sync.prune"),
    config_case("type-lease-float", with_("lease.durationSeconds", 1.5), "lease.durationSeconds"),
    config_case(
        "type-bytes-bool",
        with_(
            "site.secrets",
            [{"namespace": "a", "name": "b", "keys": {"k": {"generate": {"bytes": True}}}}],
        ),
        "generate.bytes",
    ),
    config_case(
        "type-patch-target",
        with_("sync.patches", [{"patch": "x", "target": "all"}]),
        "sync.patches[0].target",
    ),
    config_case(
        "type-alga-tag-number",
        with_("alga.images", {"algaCore": 1.5}, ALGA),
        "alga.images.algaCore",
    ),
    config_case("type-alga-site-list", with_("site", ["x"], ALGA), "site: must be a mapping"),
    config_case("type-alga-mode-list", with_("alga.mode", ["base"], ALGA), "alga.mode"),
    config_case(
        "type-alga-secret-file",
        with_("alga.secrets", {"authKeyFile": 7}, ALGA),
        "alga.secrets.authKeyFile",
    ),
    config_case(
        "type-endpoints-string", with_("cluster.endpoints", "https://a:1"), "cluster.endpoints"
    ),
    # -- 4d. presets by name only -----------------------------------------------------------
    config_case("preset-path", {"preset": "../../x"}, "preset: unknown preset '../../x'"),
    config_case(
        "preset-absolute-path",
        {"preset": str(config_module.PRESET_DIR / "alga-talos-single-node")},
        "preset: unknown preset",
    ),
    config_case("preset-number", {"preset": 7}, "preset: unknown preset 7"),
]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeSim]:
    """One simulator for the whole corpus: it must never see a request."""
    sim = KubeSim(kubeconfig_out=tmp_path_factory.mktemp("kubesim") / "kubeconfig").start()
    yield sim
    sim.stop()


def write_case(case: Case, tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "id").write_text("key")
    config, extra = case.make(tmp)
    if isinstance(config, Path):
        return config, extra
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, extra


class Overran(BaseException):  # not an Exception: the CLI's catch-all must not take it
    pass


def agent_in_process(args: list[str]) -> tuple[int, str, str, float]:
    """The CLI in this process (the corpus is large; a subprocess costs seconds on a busy
    machine), with an alarm so that a read that blocks fails the test instead of hanging it.
    The signal handlers the CLI installs are put back after."""
    out, err = io.StringIO(), io.StringIO()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}

    def overran(_signum: int, _frame: Any) -> None:
        raise Overran

    signal.signal(signal.SIGALRM, overran)
    signal.alarm(BOUND_S)
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(args)
            except SystemExit as end:  # usage errors end in argparse
                code = int(end.code or 0)
    except Overran:
        pytest.fail(f"still running after {BOUND_S}s")
    finally:
        signal.alarm(0)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    return code, out.getvalue(), err.getvalue(), time.monotonic() - started


def check_refusal(case: Case, code: int, stdout: str, stderr: str, sim: KubeSim) -> None:
    lines = [line for line in stderr.splitlines() if not line.startswith("{")]  # not the log
    assert code == 2, stdout + stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("alga-bootstrap: error: "), lines[0]
    assert case.says in lines[0], lines[0]
    assert "Traceback" not in stdout + stderr
    if case.unsaid:
        assert case.unsaid not in stdout + stderr
    assert sim.requests == []


def command_args(command: str, config: Path, extra: list[str], sim: KubeSim) -> list[str]:
    args = [command, "--config", str(config), *extra]
    if command == "run":
        args += [
            "--kubeconfig",
            str(sim.kubeconfig_path),
            "--timeout",
            "20s",
            "--log-format",
            "json",
        ]
    return args


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_bad_input_is_refused_before_the_first_request(
    sim: KubeSim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case, command: str
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv(config_module.CONFIG_ENV, raising=False)
    config, extra = write_case(case, tmp_path)
    code, stdout, stderr, elapsed = agent_in_process(command_args(command, config, extra, sim))
    check_refusal(case, code, stdout, stderr, sim)
    assert elapsed < BOUND_S


# The same through the real command line, for the classes that could hang or crash a process.
END_TO_END = [
    c
    for c in CORPUS
    if c.name
    in (
        "config-fifo",
        "manifest-fifo",
        "bundle-fifo",
        "config-device",
        "config-alias-bomb",
        "config-nested-5000",
        "url-password",
        "bundle-unknown-kind",
    )
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", END_TO_END, ids=[c.name for c in END_TO_END])
def test_bad_input_is_refused_by_the_command(
    sim: KubeSim, tmp_path: Path, case: Case, command: str
) -> None:
    config, extra = write_case(case, tmp_path)
    started = time.monotonic()
    result = run_agent(*command_args(command, config, extra, sim), timeout=30)
    check_refusal(case, result.code, result.stdout, result.stderr, sim)
    assert time.monotonic() - started < BOUND_S * 2  # interpreter start on a busy machine


def test_status_refuses_a_secret_in_the_url(sim: KubeSim, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(with_("sync.url", f"https://u:{SECRET}@git.example/r.git")))
    result = run_agent("status", "--config", str(config), "--kubeconfig", str(sim.kubeconfig_path))
    assert result.code == 2, result.output
    assert "sync.url" in result.stderr
    assert SECRET not in result.output
    assert sim.requests == []


@pytest.mark.parametrize(
    "url",
    ["ssh://git@git.example/org/repo.git", "ssh://git.example:2222/org/repo.git"],
)
def test_an_ssh_user_without_password_is_valid(tmp_path: Path, url: str) -> None:
    (tmp_path / "id").write_text("key")
    (tmp_path / "known_hosts").write_text("git.example ssh-ed25519 AAAA")
    data = with_("sync.url", url)
    data["sync"]["credentials"] = {"identityFile": "id", "knownHostsFile": "known_hosts"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    result = run_agent("validate", "--config", str(config), env=agent_env())
    assert result.code == 0, result.output
    assert url in result.stdout


def test_a_manifest_of_a_bundle_kind_is_valid(tmp_path: Path) -> None:
    """Kinds come from the built-in table and the bundle's CRDs: a GitRepository is fine."""
    manifest = tmp_path / "extra.yaml"
    manifest.write_text(
        "apiVersion: source.toolkit.fluxcd.io/v1\nkind: GitRepository\n"
        "metadata: {name: extra, namespace: flux-system}\n"
        "spec: {url: 'https://git.example/x.git', interval: 1m}\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(with_("site.manifests", [{"file": str(manifest)}])))
    result = run_agent("validate", "--config", str(config))
    assert result.code == 0, result.output


def test_anchors_are_refused_even_when_small(tmp_path: Path) -> None:
    """One rule for all: no aliases at all, so no expansion to bound."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(basic_config()) + "x: &a 1\ny: *a\n")
    with pytest.raises(ConfigError, match="anchors and aliases"):
        config_module.load(path)


def test_the_corpus_covers_every_class() -> None:
    names = " ".join(c.name for c in CORPUS)
    for needed in (
        "url-password", "url-private-token", "url-ssh-password", "bundle-unknown-kind",
        "bundle-not-yaml", "manifest-unknown-kind", "manifest-not-yaml", "manifest-no-kind",
        "url-control-character", "interval-zero", "lease-zero", "name-underscore",
        "secret-key-dotdot", "config-binary", "config-latin1", "config-fifo", "config-device",
        "config-huge", "config-nested-5000", "config-alias-bomb", "config-duplicate-top-key",
        "type-", "preset-path",
    ):  # fmt: skip
        assert needed in names
    assert len(CORPUS) >= 60
    assert len(END_TO_END) == 8


def test_a_secret_in_a_live_url_is_never_shown(
    kubesim: KubeSim, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    """A GitRepository written before such URLs were refused: status and the exit-3 refusal
    show it without the password."""
    config = write_config(basic_config())
    assert run_agent(*fast_run_args(config, kubesim.kubeconfig_path)).code == 0
    live = f"https://u:{SECRET}@git.example/org/appliance.git?private_token={SECRET}"
    patch = ["patch", "gitrepository", "appliance", "--type=merge", "-p"]
    patched = subprocess.run(
        ["kubectl", "-n", "flux-system", *patch, json.dumps({"spec": {"url": live}})],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": str(kubesim.kubeconfig_path)},
        timeout=60,
    )
    assert patched.returncode == 0, patched.stderr
    for output in ("text", "json"):
        shown = run_agent(
            "status", "--config", str(config), "--kubeconfig", str(kubesim.kubeconfig_path),
            "-o", output,
        )  # fmt: skip
        assert "https://<redacted>@git.example/org/appliance.git?<redacted>" in shown.stdout
        assert SECRET not in shown.output
    refused = run_agent(*fast_run_args(config, kubesim.kubeconfig_path))
    assert refused.code == 3, refused.output
    assert "syncs https://<redacted>@git.example" in refused.stderr
    assert SECRET not in refused.output


def full_config(tmp: Path) -> dict[str, Any]:
    """A config setting every field, with the files it names."""
    (tmp / "f").write_text("x")
    (tmp / "m.yaml").write_text(OBJ)
    data = basic_config()
    data["cluster"] = {"credentials": "kubeconfig", "kubeconfig": "f", "endpoints": ["https://a:1"]}
    data["flux"]["namespace"] = "flux-system"
    data["sync"].update(
        namespace="flux-system",
        sourceInterval="1m",
        interval="1m",
        retryInterval="1m",
        timeout="1m",
        prune=True,
        wait=False,
        patches=[{"patch": "x", "target": {"kind": "A", "name": "b"}}],
        credentials={"secretName": "s", "usernameFile": "f", "passwordFile": "f", "caFile": "f"},
    )
    secret_keys = {"k": {"generate": {"bytes": 32, "encoding": "hex"}}, "j": {"file": "f"}}
    marker = {"apiVersion": "v1", "kind": "ConfigMap", "namespace": "default", "name": "a"}
    data["site"] = {
        "namespaces": [{"name": "a", "labels": {"k": "v"}}],
        "secrets": [{"namespace": "a", "name": "b", "keys": secret_keys}],
        "configMaps": [{"namespace": "a", "name": "c", "data": {"a": "b"}}],
        "manifests": [{"file": "m.yaml", "skipIfExists": marker}],
    }
    data["record"] = {"namespace": "a", "name": "r"}
    data["lease"] = {"name": "l", "durationSeconds": 30}
    data["talos"] = {"socket": "/s", "bootstrapEtcd": False, "bootstrapAfter": "20s"}
    return data


def full_alga_config() -> dict[str, Any]:
    tags = dict.fromkeys(("algaCore", "workflowWorker", "emailService", "temporalWorker"), "a")
    release = {"version": "1", "channel": "c", "appVersion": "1", "branch": "b"}
    return {
        **ALGA,
        "alga": {
            "mode": "profile",
            "appUrl": "https://a.example",
            "host": "a.example",
            "release": release,
            "images": {**tags, "bootstrapWait": "a"},
            "storage": True,
            "secrets": {"statusTokenFile": "f", "authKeyFile": "f"},
        },
    }


def field_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from field_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from field_paths(value, (*prefix, index))


WRONG_VALUES: list[Any] = [1, -1, 0, 1.5, True, [], [1], {}, {"x": 1}, "x", "", "\x01", "a\n"]


def test_every_field_refuses_a_wrong_type_cleanly(tmp_path: Path) -> None:
    """Every field of a full config, and of the alga section, set to values of every type:
    the config loads or is refused with a ConfigError, never another exception, and a value
    of another type than the field's is always refused."""
    path = tmp_path / "config.yaml"
    tried = 0
    for base in (full_config(tmp_path), full_alga_config()):
        path.write_text(yaml.safe_dump(base))
        config_module.load(path)  # the base itself is valid
        for field in field_paths(base):
            for wrong in WRONG_VALUES:
                data = copy.deepcopy(base)
                node = data
                for key in field[:-1]:
                    node = node[key]
                original, node[field[-1]] = node[field[-1]], wrong
                path.write_text(yaml.safe_dump(data))
                tried += 1
                try:
                    config_module.load(path)
                except ConfigError:
                    continue
                assert type(wrong) is type(original), f"{field} accepted {wrong!r}"
    assert tried > 1000


@pytest.mark.parametrize("timeout", ["0s", "-5m", "9" * 400 + "h"])
def test_a_timeout_of_zero_or_beyond_go_is_a_usage_error(sim: KubeSim, timeout: str) -> None:
    config = str(config_module.PRESET_DIR / "alga-talos-single-node.yaml")
    args = ["run", "--config", config, "--kubeconfig", str(sim.kubeconfig_path)]
    code, stdout, stderr, _ = agent_in_process([*args, f"--timeout={timeout}"])
    assert code == 2, stdout + stderr
    assert stderr.count("\n") == 1 and "argument --timeout" in stderr, stderr
    assert sim.requests == []
