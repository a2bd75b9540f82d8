"""The agent's configuration: one YAML file, parsed and validated once into typed objects.

`schema` holds the objects, `reader` the field reader and its checks, `sections` the agent's
own sections, `loader` the file, the presets and the sections presets own. Every error is one
line that names the file, the field and the fix.
"""

from agent.config.loader import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_PRESET,
    PRESET_DIR,
    deep_merge,
    load,
    parse,
    register_section,
)
from agent.config.reader import Section, duration_seconds
from agent.config.schema import (
    TALOS_ENDPOINTS,
    AlgaSettings,
    ClusterConfig,
    Config,
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
from agent.config.sections import inside, url_without_secrets

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_PRESET",
    "PRESET_DIR",
    "TALOS_ENDPOINTS",
    "AlgaSettings",
    "ClusterConfig",
    "Config",
    "CreateOnceConfigMap",
    "FluxConfig",
    "GeneratedSecret",
    "GitCredentials",
    "GitRef",
    "LeaseConfig",
    "NamespaceSpec",
    "PrerequisiteManifest",
    "RecordConfig",
    "SecretKey",
    "Section",
    "SiteConfig",
    "SyncConfig",
    "TalosConfig",
    "deep_merge",
    "duration_seconds",
    "inside",
    "load",
    "parse",
    "register_section",
    "url_without_secrets",
]
