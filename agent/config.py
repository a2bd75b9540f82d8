"""The agent's configuration: one YAML file, parsed and validated once into typed objects.

Every error is one line that names the file, the field and the fix.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agent import safe_yaml
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.presets.alga import AlgaSettings

DEFAULT_CONFIG_PATH = Path("/etc/alga-bootstrap/config.yaml")
CONFIG_ENV = "ALGA_BOOTSTRAP_CONFIG"
PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "alga-talos-single-node"  # what the image boots with no config file
TALOS_ENDPOINTS = ("https://127.0.0.1:7445", "https://127.0.0.1:6443")

# Patterns are matched whole (fullmatch), so a trailing newline never slips through.
DURATION = re.compile(r"([0-9]+(\.[0-9]+)?(ms|s|m|h))+")
# GitRepository spec.timeout takes no hours (its CRD pattern in the Flux v2.9.4 bundle).
SOURCE_TIMEOUT = re.compile(r"([0-9]+(\.[0-9]+)?(ms|s|m))+")
# Kubernetes' names, as k8s.io/apimachinery/pkg/util/validation/validation.go checks them:
# IsDNS1123Label (namespaces), IsDNS1123Subdomain (object names), IsConfigMapKey (Secret and
# ConfigMap data keys; also never ".", ".." or a "..x" prefix), IsQualifiedName (label keys)
# and IsValidLabelValue.
DNS_LABEL = re.compile(r"(?=.{1,63}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
SECRET_KEY = re.compile(r"(?=.{1,253}\Z)(?!\.\.)(?!\.\Z)[-._a-zA-Z0-9]+")
LABEL_NAME = r"(?=.{1,63}(\Z|/))[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
LABEL_KEY = re.compile(rf"({DNS_SUBDOMAIN.pattern}/)?{LABEL_NAME}")
LABEL_VALUE = re.compile(r"(?=.{0,63}\Z)(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
NAME_HINTS = {
    DNS_LABEL: "a DNS-1123 label: lowercase letters, digits and '-', at most 63 characters",
    DNS_SUBDOMAIN: "a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 "
    "characters",
}
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SCP_URL = re.compile(r"(?P<user>[^@/:]+)@(?P<host>[^:/]+):(?P<path>.+)")
SHA256 = re.compile(r"[0-9a-f]{64}")
LABEL_HINT = (
    "label keys are [prefix/]name, names and values at most 63 letters, digits, '-', '_' "
    "or '.', starting and ending with a letter or digit"
)
DATA_KEY_HINT = "data keys hold letters, digits, '-', '_' and '.' (at most 253; not '.' or '..')"
MAX_DURATION_S = (2**63 - 1) / 1e9  # Go's time.Duration, which Flux parses intervals into
REF_KINDS = ("branch", "tag", "semver", "commit", "name")
PATCH_TARGET_FIELDS = (
    "group",
    "version",
    "kind",
    "name",
    "namespace",
    "labelSelector",
    "annotationSelector",
)


@dataclass(frozen=True)
class GitRef:
    kind: str  # one of REF_KINDS
    value: str
    branch: str = ""  # with a commit: the one branch Flux fetches it from

    def as_spec(self) -> dict[str, str]:
        return (
            {"branch": self.branch, self.kind: self.value}
            if self.branch
            else {self.kind: self.value}
        )

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_spec().items())


@dataclass(frozen=True)
class GitCredentials:
    """Files whose contents become the Flux Git Secret; values are read at run time only."""

    secret_name: str
    files: dict[str, Path]  # Secret key -> file


@dataclass(frozen=True)
class SyncConfig:
    name: str
    namespace: str
    url: str
    ref: GitRef
    path: str
    source_interval: str
    source_timeout: str
    interval: str
    retry_interval: str
    timeout: str
    prune: bool
    wait: bool
    patches: tuple[dict[str, Any], ...] = ()
    credentials: GitCredentials | None = None
    sparse_checkout: tuple[str, ...] = ()  # the only folders Flux checks out and stores


@dataclass(frozen=True)
class FluxConfig:
    manifests: Path
    sha256: str
    namespace: str


@dataclass(frozen=True)
class ClusterConfig:
    credentials: str  # "kubeconfig" (a file) or "talos" (machined's admin kubeconfig)
    kubeconfig: Path | None
    endpoints: tuple[str, ...] | None  # None: the kubeconfig's server, or the Talos endpoints


@dataclass(frozen=True)
class TalosConfig:
    socket: str
    # False: never; True: a single-node site (the cluster endpoint is this node); a
    # hostname: only the control-plane node of that name bootstraps (several of them).
    bootstrap_etcd: bool | str
    bootstrap_after_s: float  # how long the API may stay down before etcd bootstrap


@dataclass(frozen=True)
class SecretKey:
    name: str
    generate_bytes: int = 0  # > 0: random bytes, hex-encoded
    file: Path | None = None


@dataclass(frozen=True)
class GeneratedSecret:
    """A Secret created once and never rotated: keys come from files or are generated."""

    namespace: str
    name: str
    keys: tuple[SecretKey, ...]


@dataclass(frozen=True)
class NamespaceSpec:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CreateOnceConfigMap:
    """Created once and never overwritten; or, with `create_once` off, kept equal to `data`
    on every run (the agent owns it)."""

    namespace: str
    name: str
    data: dict[str, str]
    create_once: bool = True


@dataclass(frozen=True)
class PrerequisiteManifest:
    """Objects applied before Flux, skipped entirely when `skip_if_exists` is found."""

    file: Path
    skip_if_exists: tuple[str, str, str, str] | None  # apiVersion, kind, namespace, name
    objects: tuple[dict[str, Any], ...] = ()  # read and checked with the config


@dataclass(frozen=True)
class SiteConfig:
    namespaces: tuple[NamespaceSpec, ...] = ()
    secrets: tuple[GeneratedSecret, ...] = ()
    config_maps: tuple[CreateOnceConfigMap, ...] = ()
    manifests: tuple[PrerequisiteManifest, ...] = ()


@dataclass(frozen=True)
class RecordConfig:
    namespace: str
    name: str


@dataclass(frozen=True)
class LeaseConfig:
    name: str
    duration_s: int


@dataclass(frozen=True)
class Config:
    source: str  # where the config came from, for messages
    cluster: ClusterConfig
    flux: FluxConfig
    sync: SyncConfig
    site: SiteConfig
    record: RecordConfig
    lease: LeaseConfig
    talos: TalosConfig
    alga: AlgaSettings | None = None  # set when the config has an `alga` section


# -- reading ---------------------------------------------------------------------------------


class _Section:
    """A mapping being read; `close()` rejects any key nobody asked for."""

    def __init__(self, data: Any, path: str, source: str, base_dir: Path) -> None:
        self.path, self.source, self.base_dir = path, source, base_dir
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail("must be a mapping")
        self.data: dict[str, Any] = data
        self.read: set[str] = set()

    def fail(self, message: str, key: str | None = None) -> NoReturn:
        where = f"{self.path}.{key}" if key and self.path else (key or self.path or "(top)")
        raise ConfigError(f"{self.source}: {where}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str) -> Any:
        self.read.add(key)
        return self.data.get(key)

    def section(self, key: str) -> _Section:
        child = f"{self.path}.{key}" if self.path else key
        return _Section(self.raw(key), child, self.source, self.base_dir)

    def text(
        self,
        key: str,
        default: str | None = None,
        pattern: re.Pattern[str] | None = None,
        hint: str = "",
    ) -> str:
        value = self.raw(key)
        if value is None:
            if default is None:
                self.fail(f"is required{hint and '; ' + hint}", key)
            return default
        if not isinstance(value, str) or not value:
            self.fail(f"must be a non-empty string, got {type(value).__name__}", key)
        if CONTROL.search(value):
            self.fail("must not hold control characters (a tab, a line break)", key)
        if pattern is not None and not pattern.fullmatch(value):
            hint = hint or NAME_HINTS.get(pattern, "")
            self.fail(f"{safe_yaml.shown(value)} is not valid{hint and '; ' + hint}", key)
        return value

    def duration(self, key: str, default: str, positive: bool = True) -> str:
        """A Go duration; Flux's intervals and timeouts must be above zero."""
        value = self.text(key, default, DURATION, "use a Go duration such as 30s, 5m or 1h")
        seconds = duration_seconds(value)
        if positive and seconds <= 0:
            self.fail(f"{value!r} must be longer than zero", key)
        if seconds > MAX_DURATION_S:
            self.fail(f"{value!r} is longer than a Go duration can hold (2562047h)", key)
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(f"must be true or false, got {value!r}", key)
        return value

    def number(self, key: str, default: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(f"must be a whole number, got {value!r}", key)
        return value

    def file(self, key: str, required: bool = True) -> Path | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.fail("is required", key)
            return None
        if not isinstance(value, str) or not value or CONTROL.search(value):
            self.fail("must be a file path", key)
        path = Path(value) if Path(value).is_absolute() else self.base_dir / value
        try:
            info = os.stat(path)
        except OSError:
            self.fail(f"file {str(path)!r} does not exist or is not a file", key)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            self.fail(f"{str(path)!r} is not a regular file", key)
        if info.st_size > safe_yaml.CONFIG_LIMIT:
            self.fail(f"{str(path)!r} is larger than 1 MiB; is it the right file?", key)
        return path

    def items(self, key: str) -> list[Any]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail("must be a list", key)
        return value

    def string_map(
        self,
        key: str,
        key_pattern: re.Pattern[str],
        value_pattern: re.Pattern[str] | None = None,
        hint: str = "",
    ) -> dict[str, str]:
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            self.fail("must be a mapping of strings to strings (quote numbers and booleans)", key)
        for k, v in value.items():
            if not key_pattern.fullmatch(k):
                self.fail(f"key {safe_yaml.shown(k)} is not valid; {hint}", key)
            if value_pattern is not None and not value_pattern.fullmatch(v):
                self.fail(f"value {safe_yaml.shown(v)} of {k!r} is not valid; {hint}", key)
        return dict(value)

    def close(self) -> None:
        unknown = sorted(map(str, set(self.data) - self.read))
        if unknown:
            known = ", ".join(sorted(self.read)) or "none"
            self.fail(f"unknown field (known fields here: {known})", unknown[0])


def _item(data: Any, path: str, parent: _Section) -> _Section:
    return _Section(data, path, parent.source, parent.base_dir)


def load(path: Path | None) -> Config:
    """Read, merge over its preset and validate a config file. `None`: the default location,
    or the packaged default preset when no file is there."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    if path is None:
        if DEFAULT_CONFIG_PATH.is_file():
            path = DEFAULT_CONFIG_PATH
        else:
            return parse({"preset": DEFAULT_PRESET}, f"preset {DEFAULT_PRESET}", PRESET_DIR)
    data = _read_yaml(path)
    if not data:  # an empty file (Talos's mount point, say) means the default
        data = {"preset": DEFAULT_PRESET}
    return parse(data, str(path), path.parent.resolve())


def _read_yaml(path: Path) -> dict[str, Any]:
    if not os.path.lexists(path):
        raise ConfigError(f"{path}: config file not found; pass --config PATH or set {CONFIG_ENV}")
    return safe_yaml.load_mapping(path)


def packaged_presets() -> dict[str, Path]:
    """The presets shipped with the agent, by name."""
    return {p.stem: p for p in PRESET_DIR.glob("*.yaml")}


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Maps merged key by key; anything else in `overlay` replaces what `base` had."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse(data: dict[str, Any], source: str, base_dir: Path) -> Config:
    preset_name = data.get("preset")
    if preset_name is not None:
        presets = packaged_presets()  # a name, never a path: `../../x` is no preset
        if not isinstance(preset_name, str) or preset_name not in presets:
            raise ConfigError(
                f"{source}: preset: unknown preset {preset_name!r}; choose one of: "
                f"{', '.join(sorted(presets))}"
            )
        preset_data = _read_yaml(presets[preset_name])
        data = deep_merge(preset_data, {k: v for k, v in data.items() if k != "preset"})
    alga_settings = None
    if "alga" in data:  # the Alga appliance's section becomes general site and sync settings
        from agent.presets import alga

        data, alga_settings = alga.expand(data, source, base_dir)
    top = _Section(data, "", source, base_dir)
    config = Config(
        source=source,
        cluster=_cluster(top.section("cluster")),
        flux=_flux(top.section("flux")),
        sync=_sync(top.section("sync")),
        site=_site(top.section("site")),
        record=_record(top.section("record")),
        lease=_lease(top.section("lease")),
        talos=_talos(top.section("talos")),
        alga=alga_settings,
    )
    top.raw("preset")
    top.close()
    return config


def _cluster(s: _Section) -> ClusterConfig:
    credentials = s.text(
        "credentials",
        "kubeconfig",
        re.compile(r"^(kubeconfig|talos)$"),
        "use kubeconfig (a file) or talos (from machined, on a Talos node)",
    )
    kubeconfig = s.raw("kubeconfig")
    if kubeconfig is not None and (
        not isinstance(kubeconfig, str) or not kubeconfig or CONTROL.search(kubeconfig)
    ):
        s.fail("must be a file path", "kubeconfig")
    endpoints = None
    if s.has("endpoints"):
        endpoints = tuple(s.items("endpoints"))
        for i, endpoint in enumerate(endpoints):
            if not isinstance(endpoint, str) or not re.fullmatch(
                r"https://[^/\s\x00-\x1f\x7f]+", endpoint
            ):
                s.fail(f"{endpoint!r} is not an https://host:port URL", f"endpoints[{i}]")
        if not endpoints:
            s.fail("must list at least one https://host:port URL", "endpoints")
    s.close()
    return ClusterConfig(credentials, Path(kubeconfig) if kubeconfig else None, endpoints)


def _flux(s: _Section) -> FluxConfig:
    manifests = s.text("manifests", hint="the path of the `flux install --export` bundle")
    path = Path(manifests) if Path(manifests).is_absolute() else s.base_dir / manifests
    sha = s.text("sha256", pattern=SHA256, hint="64 lowercase hex digits (sha256sum of the bundle)")
    namespace = s.text("namespace", "flux-system", DNS_LABEL)
    s.close()
    return FluxConfig(path, sha, namespace)


def _sync(s: _Section) -> SyncConfig:
    name = s.text("name", pattern=DNS_SUBDOMAIN, hint="a lowercase DNS name")
    namespace = s.text("namespace", "flux-system", DNS_LABEL)
    url = _git_url(s)
    ref = _ref(s.section("ref"))
    path = s.text("path", hint="the directory in the repository that Flux applies, e.g. ./deploy")
    if not path.startswith("./") and path != ".":
        s.fail(f"{path!r} must be relative to the repository root and start with ./", "path")
    if ".." in Path(path).parts:
        s.fail(f"{path!r} must not leave the repository with ..", "path")
    sparse_checkout = _sparse_checkout(s, path)
    patches = [_patch(_item(p, f"sync.patches[{i}]", s)) for i, p in enumerate(s.items("patches"))]
    credentials = (
        _credentials(s.section("credentials"), name, url) if s.has("credentials") else None
    )
    s.raw("credentials")
    config = SyncConfig(
        name=name,
        namespace=namespace,
        url=url,
        ref=ref,
        path=path,
        source_interval=s.duration("sourceInterval", "1m"),
        source_timeout=_source_timeout(s),
        interval=s.duration("interval", "10m"),
        retry_interval=s.duration("retryInterval", "1m"),
        timeout=s.duration("timeout", "5m"),
        prune=s.flag("prune", True),
        wait=s.flag("wait", False),
        patches=tuple(patches),
        credentials=credentials,
        sparse_checkout=sparse_checkout,
    )
    s.close()
    return config


def _source_timeout(s: _Section) -> str:
    """GitRepository spec.timeout: the whole fetch must finish within it, or it starts over."""
    timeout = s.text(
        "sourceTimeout",
        "60s",  # Flux's default
        SOURCE_TIMEOUT,
        "use a duration in ms, s or m such as 90s or 20m (Flux takes no hours here)",
    )
    if duration_seconds(timeout) <= 0:
        s.fail(f"{timeout!r} must be longer than zero; for example 20m", "sourceTimeout")
    return timeout


def _sparse_checkout(s: _Section, path: str) -> tuple[str, ...]:
    """GitRepository spec.sparseCheckout: folders relative to the repository root; the
    root path must lie inside one of them, or Flux would find nothing to apply."""
    folders = s.items("sparseCheckout")
    for i, folder in enumerate(folders):
        if not isinstance(folder, str) or not folder.startswith("./") or folder == "./":
            s.fail(
                f"{folder!r} must be a folder relative to the root, like ./deploy",
                f"sparseCheckout[{i}]",
            )
        if ".." in Path(folder).parts:
            s.fail(f"{folder!r} must not leave the repository with ..", f"sparseCheckout[{i}]")
    if folders and not any(inside(path, folder) for folder in folders):
        s.fail(f"{path!r} lies outside sync.sparseCheckout; add its folder there", "path")
    return tuple(folders)


def inside(path: str, folder: str) -> bool:
    """Whether a repository path (./a/b) lies in a folder (./a), by whole path parts."""
    path_parts, folder_parts = Path(path).parts, Path(folder).parts
    return path_parts[: len(folder_parts)] == folder_parts


def _patch(s: _Section) -> dict[str, Any]:
    """One Kustomization patch, as Flux's kustomize.Patch takes it (fluxcd/pkg apis/kustomize:
    Patch{patch, target}; Selector{group, version, kind, name, namespace, labelSelector,
    annotationSelector}, all strings)."""
    patch: dict[str, Any] = {"patch": s.raw("patch")}
    if not isinstance(patch["patch"], str) or not patch["patch"].strip():
        s.fail("needs `patch`, the patch as a string", "patch")
    if re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", patch["patch"]):
        s.fail("must not hold control characters", "patch")
    # Strict YAML, like every input: Flux would refuse a broken patch only after the writes,
    # and `status` reads the patches back.
    safe_yaml.documents(patch["patch"], f"{s.source}: {s.path}.patch")
    if s.has("target"):
        t = s.section("target")
        patch["target"] = {k: t.text(k) for k in PATCH_TARGET_FIELDS if t.has(k)}
        t.close()
    s.raw("target")
    s.close()
    return patch


def _git_url(s: _Section) -> str:
    """A Git URL with no secret in it: credentials go in files (sync.credentials)."""
    raw = s.raw("url")
    if isinstance(raw, str) and re.search(r"[\s\x00-\x1f\x7f]", raw):
        s.fail("must not hold whitespace or control characters", "url")
    url = s.text("url", hint="the Git repository, https://... or ssh://...")
    _refuse_secret_in_url(s, url)
    scp = SCP_URL.fullmatch(url)
    if scp and "://" not in url:
        fixed = f"ssh://{scp['user']}@{scp['host']}/{scp['path']}"
        s.fail(f"scp-style URL {url!r} is not accepted by Flux; use {fixed!r}", "url")
    if not re.match(r"(http|https|ssh)://[^/\s]+", url):
        s.fail("must start with https://, http:// or ssh://", "url")
    return url


def _refuse_secret_in_url(s: _Section, url: str) -> None:
    """A password or token in the URL would end up in the GitRepository, the run record,
    `validate` and `status`. ssh:// may name a user (ssh://git@host/...); http(s):// may not
    (a token works as a user name at GitHub and GitLab). The URL is never echoed here."""
    fix = (
        "put credentials in files named by sync.credentials (usernameFile + passwordFile or "
        "bearerTokenFile for https://, identityFile + knownHostsFile for ssh://)"
    )
    scheme, sep, rest = url.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0] if sep else ""
    userinfo = authority.rpartition("@")[0]
    if userinfo and (scheme != "ssh" or not re.fullmatch(r"[A-Za-z0-9._-]+", userinfo)):
        s.fail(f"must not carry a user name, password or token; {fix}", "url")
    if re.search(r"[?#]", url):
        s.fail(f"must not carry a query or fragment (a token hides there); {fix}", "url")


def url_without_secrets(url: str) -> str:
    """A Git URL read from the cluster (written before such URLs were refused), as the agent
    shows it: no password, no token, no query."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    user, at, host = authority.rpartition("@")
    if at and (scheme != "ssh" or ":" in user):
        authority = f"<redacted>@{host}"
    shown = f"{scheme}{sep}{authority}{slash}{path}" if sep else url
    return re.sub(r"[?#].*", "?<redacted>", shown, flags=re.DOTALL)


def _ref(s: _Section) -> GitRef:
    given = [k for k in REF_KINDS if s.has(k)]
    for key in REF_KINDS:
        s.raw(key)
    s.close()
    for key in given:
        s.text(key)  # a non-empty string without control characters
    # Flux fetches a commit from one branch when both are given (fluxcd/pkg
    # git/gogit/clone.go, cloneCommit); any other pair would be silently overruled.
    with_branch = sorted(given) == ["branch", "commit"]
    if len(given) != 1 and not with_branch:
        s.fail("set exactly one of branch, tag, semver, commit, name (or branch with commit)")
    kind = "commit" if with_branch else given[0]
    value = s.text(kind)
    if kind == "commit" and not re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", value):
        s.fail(f"{value!r} is not a full commit SHA (40 hex digits)", kind)
    return GitRef(kind, value, s.data["branch"] if with_branch else "")


def _credentials(s: _Section, sync_name: str, url: str) -> GitCredentials:
    secret_name = s.text("secretName", f"{sync_name}-git", DNS_SUBDOMAIN)
    keys = {
        "identityFile": "identity",
        "knownHostsFile": "known_hosts",
        "passwordFile": "password",
        "usernameFile": "username",
        "bearerTokenFile": "bearerToken",
        "caFile": "ca.crt",
        "certFile": "tls.crt",
        "keyFile": "tls.key",
    }
    files: dict[str, Path] = {}
    for field_name, secret_key in keys.items():
        path = s.file(field_name, required=False)
        if path is not None:
            files[secret_key] = path
    s.close()
    ssh = url.startswith("ssh://")
    if ssh and not {"identity", "known_hosts"} <= files.keys():
        s.fail("an ssh:// URL needs identityFile and knownHostsFile")
    if not ssh and "identity" in files:
        s.fail(
            "identityFile is for ssh:// URLs; use usernameFile and passwordFile, or "
            "bearerTokenFile, for https://",
            "identityFile",
        )
    if "username" in files and "password" not in files:
        s.fail("usernameFile needs passwordFile", "usernameFile")
    if "password" in files and not ssh and "username" not in files:
        s.fail("passwordFile needs usernameFile for https:// URLs", "passwordFile")
    if ("tls.crt" in files) != ("tls.key" in files):
        s.fail("certFile and keyFile go together", "certFile")
    if not files:
        s.fail("name at least one credentials file, or remove credentials")
    return GitCredentials(secret_name, files)


def _site(s: _Section) -> SiteConfig:
    namespaces = []
    for i, item in enumerate(s.items("namespaces")):
        n = _item(item, f"site.namespaces[{i}]", s)
        labels = n.string_map("labels", LABEL_KEY, LABEL_VALUE, LABEL_HINT)
        namespaces.append(NamespaceSpec(n.text("name", pattern=DNS_LABEL), labels))
        n.close()
    secrets = []
    for i, item in enumerate(s.items("secrets")):
        secrets.append(_generated_secret(_item(item, f"site.secrets[{i}]", s)))
    config_maps = []
    for i, item in enumerate(s.items("configMaps")):
        c = _item(item, f"site.configMaps[{i}]", s)
        config_maps.append(
            CreateOnceConfigMap(
                c.text("namespace", pattern=DNS_LABEL),
                c.text("name", pattern=DNS_SUBDOMAIN),
                c.string_map("data", SECRET_KEY, hint=DATA_KEY_HINT),
                c.flag("createOnce", True),
            )
        )
        c.close()
    manifests = []
    manifest_bytes = 0
    for i, item in enumerate(s.items("manifests")):
        m = _item(item, f"site.manifests[{i}]", s)
        file = m.file("file")
        assert file is not None
        manifest_bytes += file.stat().st_size
        if manifest_bytes > safe_yaml.MANIFEST_LIMIT:
            m.fail("the site manifests together are larger than 2 MiB", "file")
        objects = safe_yaml.load_objects(file, f"{s.source}: site.manifests[{i}].file")
        skip = None
        if m.has("skipIfExists"):
            k = m.section("skipIfExists")
            skip = (
                k.text("apiVersion", pattern=safe_yaml.API_VERSION),
                k.text("kind", pattern=safe_yaml.KIND),
                k.text("namespace", "", DNS_LABEL) if k.has("namespace") else "",
                k.text("name", pattern=safe_yaml.OBJECT_NAME, hint="an object name"),
            )
            k.close()
        m.raw("skipIfExists")
        m.close()
        manifests.append(PrerequisiteManifest(file, skip, objects))
    s.close()
    return SiteConfig(tuple(namespaces), tuple(secrets), tuple(config_maps), tuple(manifests))


def _generated_secret(s: _Section) -> GeneratedSecret:
    namespace = s.text("namespace", pattern=DNS_LABEL)
    name = s.text("name", pattern=DNS_SUBDOMAIN)
    keys_section = s.section("keys")
    keys = []
    for key in keys_section.data:
        if not isinstance(key, str) or not SECRET_KEY.fullmatch(key):
            keys_section.fail(f"key {safe_yaml.shown(key)} is not valid; {DATA_KEY_HINT}")
        spec = keys_section.section(key)
        has_generate, has_file = spec.has("generate"), spec.has("file")
        if has_generate == has_file:
            spec.fail("set exactly one of generate (random bytes) or file")
        if has_generate:
            gen = spec.section("generate")
            size = gen.number("bytes", 32)
            gen.text("encoding", "hex", re.compile(r"^hex$"), "only hex is supported")
            gen.close()
            if not 16 <= size <= 512:
                spec.fail(f"{size} bytes is out of range; use 16 to 512", "generate.bytes")
            keys.append(SecretKey(key, generate_bytes=size))
        else:
            keys.append(SecretKey(key, file=spec.file("file")))
        spec.raw("generate")
        spec.close()
    keys_section.close()
    if not keys:
        s.fail("needs at least one key", "keys")
    s.close()
    return GeneratedSecret(namespace, name, tuple(keys))


def _record(s: _Section) -> RecordConfig:
    record = RecordConfig(
        s.text("namespace", "alga-system", DNS_LABEL),
        s.text("name", "alga-bootstrap-run", DNS_SUBDOMAIN),
    )
    s.close()
    return record


def _lease(s: _Section) -> LeaseConfig:
    """The Lease (in record.namespace) a run holds while it writes."""
    duration = s.number("durationSeconds", 30)
    if not 1 <= duration <= 3600:
        s.fail(f"{duration} is out of range; use 1 to 3600 seconds", "durationSeconds")
    lease = LeaseConfig(s.text("name", "alga-bootstrap", DNS_SUBDOMAIN), duration)
    s.close()
    return lease


DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def duration_seconds(text: str) -> float:
    """Seconds in a Go-style duration such as 90s, 1m30s or 2h; ValueError otherwise."""
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration such as 90s, 30m or 1h")
    return sum(float(n) * DURATION_UNITS[u] for n, u in parts)


def _talos(s: _Section) -> TalosConfig:
    """The Talos node this runs on: machined's socket, and unattended etcd bootstrap."""
    socket = s.text("socket", "/system/run/machined/machine.sock")
    if not socket.startswith("/"):
        s.fail(f"{socket!r} must be an absolute path", "socket")
    talos = TalosConfig(
        socket,
        _bootstrap_etcd(s),
        duration_seconds(s.duration("bootstrapAfter", "20s", positive=False)),
    )
    s.close()
    return talos


def _bootstrap_etcd(talos: _Section) -> bool | str:
    """false, true (one node only) or {node: HOSTNAME}: with several control-plane nodes
    exactly one may bootstrap etcd, or the cluster splits."""
    if isinstance(talos.raw("bootstrapEtcd"), dict):
        choice = talos.section("bootstrapEtcd")
        node = choice.text(
            "node",
            pattern=DNS_LABEL,
            hint="the short hostname (no domain, as `talosctl get hostname` shows it) of the "
            "one control-plane node that bootstraps etcd",
        )
        choice.close()
        return node
    if talos.has("bootstrapEtcd") and not isinstance(talos.raw("bootstrapEtcd"), bool):
        talos.fail(
            "use false, true (a single-node site) or {node: HOSTNAME} (the one control-plane "
            "node that bootstraps etcd on a site with several)",
            "bootstrapEtcd",
        )
    return talos.flag("bootstrapEtcd", False)
