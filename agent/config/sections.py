"""The agent's own config sections (cluster, flux, sync, site, record, lease, talos), read
into the typed objects of `schema`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from agent import safe_yaml
from agent.config.reader import (
    CONTROL,
    DATA_KEY_HINT,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    LABEL_HINT,
    LABEL_KEY,
    LABEL_VALUE,
    SECRET_KEY,
    Section,
    duration_seconds,
)
from agent.config.schema import (
    REF_KINDS,
    ClusterConfig,
    CreateOnceConfigMap,
    FluxConfig,
    GeneratedSecret,
    GitCredentials,
    GitRef,
    LeaseConfig,
    NamespaceSpec,
    PrerequisiteManifest,
    RecordConfig,
    SecretKey,
    SiteConfig,
    SyncConfig,
    TalosConfig,
)

# GitRepository spec.timeout takes no hours (its CRD pattern in the Flux v2.9.4 bundle).
SOURCE_TIMEOUT = re.compile(r"([0-9]+(\.[0-9]+)?(ms|s|m))+")
SCP_URL = re.compile(r"(?P<user>[^@/:]+)@(?P<host>[^:/]+):(?P<path>.+)")
SHA256 = re.compile(r"[0-9a-f]{64}")
PATCH_TARGET_FIELDS = (
    "group",
    "version",
    "kind",
    "name",
    "namespace",
    "labelSelector",
    "annotationSelector",
)


def cluster(s: Section) -> ClusterConfig:
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


def flux(s: Section) -> FluxConfig:
    manifests = s.text("manifests", hint="the path of the `flux install --export` bundle")
    path = Path(manifests) if Path(manifests).is_absolute() else s.base_dir / manifests
    sha = s.text("sha256", pattern=SHA256, hint="64 lowercase hex digits (sha256sum of the bundle)")
    namespace = s.text("namespace", "flux-system", DNS_LABEL)
    s.close()
    return FluxConfig(path, sha, namespace)


def sync(s: Section) -> SyncConfig:
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
    patches = [_patch(s.item(p, f"sync.patches[{i}]")) for i, p in enumerate(s.items("patches"))]
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


def _source_timeout(s: Section) -> str:
    """GitRepository spec.timeout: the whole fetch must finish within it, or it starts over."""
    timeout = s.text(
        "sourceTimeout",
        "60s",  # Flux's default
        SOURCE_TIMEOUT,
        "use a duration in ms, s or m such as 90s or 20m (Flux takes no hours here)",
    )
    try:
        duration_seconds(timeout, positive=True)
    except ValueError as err:
        s.fail(f"{err}; for example 20m", "sourceTimeout")
    return timeout


def _sparse_checkout(s: Section, path: str) -> tuple[str, ...]:
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


def _patch(s: Section) -> dict[str, Any]:
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


def _git_url(s: Section) -> str:
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


def _refuse_secret_in_url(s: Section, url: str) -> None:
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


def _ref(s: Section) -> GitRef:
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


def _credentials(s: Section, sync_name: str, url: str) -> GitCredentials:
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


def site(s: Section) -> SiteConfig:
    namespaces = []
    for i, item in enumerate(s.items("namespaces")):
        n = s.item(item, f"site.namespaces[{i}]")
        labels = n.string_map("labels", LABEL_KEY, LABEL_VALUE, LABEL_HINT)
        namespaces.append(NamespaceSpec(n.text("name", pattern=DNS_LABEL), labels))
        n.close()
    secrets = []
    for i, item in enumerate(s.items("secrets")):
        secrets.append(_generated_secret(s.item(item, f"site.secrets[{i}]")))
    config_maps = []
    for i, item in enumerate(s.items("configMaps")):
        c = s.item(item, f"site.configMaps[{i}]")
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
        m = s.item(item, f"site.manifests[{i}]")
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


def _generated_secret(s: Section) -> GeneratedSecret:
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


def record(s: Section) -> RecordConfig:
    config = RecordConfig(
        s.text("namespace", "alga-system", DNS_LABEL),
        s.text("name", "alga-bootstrap-run", DNS_SUBDOMAIN),
    )
    s.close()
    return config


def lease(s: Section) -> LeaseConfig:
    """The Lease (in record.namespace) a run holds while it writes."""
    duration = s.number("durationSeconds", 30)
    if not 1 <= duration <= 3600:
        s.fail(f"{duration} is out of range; use 1 to 3600 seconds", "durationSeconds")
    config = LeaseConfig(s.text("name", "alga-bootstrap", DNS_SUBDOMAIN), duration)
    s.close()
    return config


def talos(s: Section) -> TalosConfig:
    """The Talos node this runs on: machined's socket, and unattended etcd bootstrap."""
    socket = s.text("socket", "/system/run/machined/machine.sock")
    if not socket.startswith("/"):
        s.fail(f"{socket!r} must be an absolute path", "socket")
    config = TalosConfig(
        socket,
        _bootstrap_etcd(s),
        duration_seconds(s.duration("bootstrapAfter", "20s", positive=False)),
    )
    s.close()
    return config


def _bootstrap_etcd(s: Section) -> bool | str:
    """false, true (one node only) or {node: HOSTNAME}: with several control-plane nodes
    exactly one may bootstrap etcd, or the cluster splits."""
    if isinstance(s.raw("bootstrapEtcd"), dict):
        choice = s.section("bootstrapEtcd")
        node = choice.text(
            "node",
            pattern=DNS_LABEL,
            hint="the short hostname (no domain, as `talosctl get hostname` shows it) of the "
            "one control-plane node that bootstraps etcd",
        )
        choice.close()
        return node
    if s.has("bootstrapEtcd") and not isinstance(s.raw("bootstrapEtcd"), bool):
        s.fail(
            "use false, true (a single-node site) or {node: HOSTNAME} (the one control-plane "
            "node that bootstraps etcd on a site with several)",
            "bootstrapEtcd",
        )
    return s.flag("bootstrapEtcd", False)
