"""Validation of custom objects against a CRD's openAPIV3Schema, with the real server's wording."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from kubesim import quantity

_TYPE_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def _json_type(value: Any) -> str:
    for name in ("boolean", "integer", "number", "string", "array", "object"):
        if _TYPE_CHECKS[name](value):
            return name
    return "null"


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else json.dumps(value, default=str)


def validate(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Errors, each `path: reason`, as kube-apiserver words them; empty when valid."""
    errors: list[str] = []
    # metadata is validated by the server itself, never by the CRD schema.
    body = {k: v for k, v in obj.items() if k not in ("metadata", "apiVersion", "kind")}
    props = dict(schema.get("properties", {}))
    for key in ("metadata", "apiVersion", "kind"):
        props.pop(key, None)
    _check(
        {
            **schema,
            "properties": props,
            "required": [
                r for r in schema.get("required", []) if r not in ("metadata", "apiVersion", "kind")
            ],
        },
        body,
        "",
        errors,
    )
    return errors


def _check(schema: dict[str, Any], value: Any, path: str, errors: list[str]) -> None:
    if value is None:
        if not schema.get("nullable"):
            errors.append(
                f'{path}: Invalid value: "null": {path} in body must be of type '
                f'{schema.get("type", "object")}: "null"'
            )
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str) or isinstance(value, bool):
            errors.append(
                f'{path}: Invalid value: "{_json_type(value)}": {path} in body must '
                "be of type integer,string"
            )
        return
    expected = schema.get("type")
    if expected and not _TYPE_CHECKS[expected](value):
        actual = _json_type(value)
        errors.append(
            f'{path}: Invalid value: "{actual}": {path} in body must be of type '
            f'{expected}: "{actual}"'
        )
        return
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(_show(v) for v in schema["enum"])
        errors.append(f"{path}: Unsupported value: {_show(value)}: supported values: {supported}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(
                f"{path}: Invalid value: {_show(value)}: {path} in body should match "
                f"'{schema['pattern']}'"
            )
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: Too long: may not be more than {schema['maxLength']} bytes")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(
                f"{path}: Invalid value: {_show(value)}: {path} in body should be at "
                f"least {schema['minLength']} chars long"
            )
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(
                f"{path}: Invalid value: {value}: {path} in body should be greater than "
                f"or equal to {schema['minimum']}"
            )
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(
                f"{path}: Invalid value: {value}: {path} in body should be less than "
                f"or equal to {schema['maximum']}"
            )
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{_join(path, name)}: Required value")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            if key in props:
                _check(props[key], child, _join(path, key), errors)
            elif isinstance(extra, dict):
                _check(extra, child, _join(path, key), errors)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _check(schema["items"], item, f"{path}[{index}]", errors)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_ROOT_KEYS = ("apiVersion", "kind", "metadata")


def prune(schema: dict[str, Any], obj: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Drop, in place, the fields `schema` does not know, and canonicalise the resource
    quantities it marks; the dropped fields' paths (`spec.foo`, `spec.items[0].bar`).

    Follows the CRD pruning rules (k8s.io/apiextensions-apiserver
    pkg/apiserver/schema/pruning/algorithm.go, Prune; docs "Extend the Kubernetes API with
    CustomResourceDefinitions", "Field pruning"): a field not in `properties` is dropped unless
    its object has x-kubernetes-preserve-unknown-fields or additionalProperties; apiVersion,
    kind and metadata are kept at the root and in an x-kubernetes-embedded-resource, whose
    metadata, like the root's, is pruned as an ObjectMeta (objectmeta/coerce.go). `meta` is
    the schema of ObjectMeta.
    """
    unknown: list[str] = []
    root = {k: v for k, v in schema.get("properties", {}).items() if k not in _ROOT_KEYS}
    _prune_object({**schema, "properties": root}, obj, "", unknown, meta, resource=True)
    return unknown


class BadQuantity(ValueError):
    """A resource quantity that does not parse (k8s.io/apimachinery pkg/api/resource,
    ErrFormatWrong): decoding the object fails."""

    def __init__(self) -> None:
        super().__init__(
            "quantities must match the regular expression "
            "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
        )


def _prune(schema: dict[str, Any], value: Any, path: str, unknown: list[str], meta: Any) -> Any:
    """`value` pruned (in place where it is a container) and canonicalised."""
    if schema.get("x-kubesim-quantity"):
        if isinstance(value, str) and not quantity.parses(value):
            raise BadQuantity()
        return quantity.canonical(value, milli=schema["x-kubesim-quantity"] == "ResourceList")
    if isinstance(value, dict):
        _prune_object(
            schema, value, path, unknown, meta, schema.get("x-kubernetes-embedded-resource")
        )
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            value[index] = _prune(schema["items"], item, f"{path}[{index}]", unknown, meta)
    return value


def _prune_object(
    schema: dict[str, Any],
    value: dict[str, Any],
    path: str,
    unknown: list[str],
    meta: Any,
    resource: Any,
) -> None:
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
    for key in list(value):
        child_path = _join(path, key)
        if resource and key in _ROOT_KEYS:
            if key == "metadata" and isinstance(value[key], dict):
                _prune_object(meta, value[key], child_path, unknown, meta, False)
        elif key in props:
            value[key] = _prune(props[key], value[key], child_path, unknown, meta)
        elif isinstance(extra, dict):
            value[key] = _prune(extra, value[key], child_path, unknown, meta)
        elif not keep_unknown:
            unknown.append(child_path)
            del value[key]


def apply_defaults(schema: dict[str, Any], obj: dict[str, Any]) -> None:
    """Fill in, in place, each missing property that has a `default`, in every object present
    (k8s.io/apiextensions-apiserver pkg/apiserver/schema/defaulting/algorithm.go, Default;
    docs "Extend the Kubernetes API with CustomResourceDefinitions", "Defaulting"). The
    server defaults on write and on every read from storage, so a status a write dropped comes
    back with its default (Flux's `status: {observedGeneration: -1}`)."""
    props = {k: v for k, v in schema.get("properties", {}).items() if k != "metadata"}
    _default_object({**schema, "properties": props}, obj)


def _default(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        _default_object(schema, value)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


def _default_object(schema: dict[str, Any], value: dict[str, Any]) -> None:
    props = schema.get("properties", {})
    for key, prop in props.items():
        if key not in value and "default" in prop:
            value[key] = copy.deepcopy(prop["default"])
    extra = schema.get("additionalProperties")
    for key, child in value.items():
        if key in props:
            _default(props[key], child)
        elif isinstance(extra, dict):
            _default(extra, child)
