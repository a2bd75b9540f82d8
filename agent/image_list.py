"""`alga-bootstrap images`: every container image a fully offline first boot pulls (Flux,
storage, the application), for the Talos image cache (`talosctl images cache-create
--images=-`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from agent import bundle as flux_bundle
from agent.config import Config


def _images_in(node: Any) -> Iterator[str]:
    """`image` fields anywhere in an object, including manifests embedded in ConfigMaps
    (the local-path provisioner's helper pod)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from _images_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from _images_in(item)
    elif isinstance(node, str) and "image:" in node:
        try:
            embedded = list(yaml.safe_load_all(node))
        except yaml.YAMLError:
            return
        yield from _images_in(embedded)


def first_boot_images(config: Config) -> list[str]:
    bundle = flux_bundle.load(config.flux.manifests, config.flux.sha256)
    found: list[str] = list(bundle.images())
    for manifest in config.site.manifests:
        for obj in manifest.objects:
            found += _images_in(obj)
    if config.alga is not None:
        from agent.presets import alga

        found += alga.image_refs(config.alga.tags)
    return list(dict.fromkeys(found))  # first-seen order, no repeats
