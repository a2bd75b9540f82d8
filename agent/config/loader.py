"""Finding the config file and expanding it: a packaged preset under the file's own fields,
then each preset-owned section (such as `alga`) through the preset that registered it.

Presets plug in here (`register_section`); the loader finds them by importing every module
of `agent.presets` and never names one.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import log, safe_yaml
from agent.config import sections
from agent.config.reader import Section
from agent.config.schema import Config
from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/alga-bootstrap/config.yaml")
CONFIG_ENV = "ALGA_BOOTSTRAP_CONFIG"
_log = log.get("config")
PRESET_DIR = Path(__file__).parent.parent / "presets"
DEFAULT_PRESET = "alga-talos-single-node"  # what the image boots with no config file

# Expands a preset-owned section (read through the given Section) and the rest of the config
# into general settings; returns the new config data and the settings the section leaves for
# the agent, which become the Config field of the section's name.
SectionExpander = Callable[[Section, dict[str, Any]], tuple[dict[str, Any], Any]]
_expanders: dict[str, SectionExpander] = {}


def register_section(name: str, expand: SectionExpander) -> None:
    """Called by a preset module when imported: it owns the top-level section `name`."""
    _expanders[name] = expand


def _expanders_found() -> dict[str, SectionExpander]:
    import agent.presets  # the package only: its modules are found, not named

    for module in pkgutil.iter_modules(agent.presets.__path__):
        importlib.import_module(f"agent.presets.{module.name}")
    return _expanders


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
    settings: dict[str, Any] = {}
    for name, expand in _expanders_found().items():
        if name in data:
            rest = {k: v for k, v in data.items() if k != name}
            data, settings[name] = expand(Section(data[name], name, source, base_dir), rest)
    top = Section(data, "", source, base_dir)
    config = Config(
        source=source,
        cluster=sections.cluster(top.section("cluster")),
        flux=sections.flux(top.section("flux")),
        sync=sections.sync(top.section("sync")),
        site=sections.site(top.section("site")),
        record=sections.record(top.section("record")),
        lease=sections.lease(top.section("lease")),
        talos=sections.talos(top.section("talos")),
        **settings,
    )
    top.raw("preset")
    top.close()
    _log.debug(
        "config read", source=source, preset=preset_name, expanded=",".join(sorted(settings))
    )
    return config
