"""The simulator's object store: CRUD, merge patch, server-side apply, watch events."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kubesim import builtin, fields, schema
from kubesim.resources import BUILTIN_TYPES, ResourceType, types_from_crd

Obj = dict[str, Any]
ManagerKey = tuple[str, str, str]  # (manager, operation, subresource)

CRD_GROUP, CRD_PLURAL = "apiextensions.k8s.io", "customresourcedefinitions"


@dataclass
class FieldValidation:
    """A write's `fieldValidation` directive and the warnings it collects for the answer's
    Warning headers. The server's default is Warn (k8s.io/apiserver
    pkg/endpoints/handlers/rest.go, fieldValidation; docs "Kubernetes API Concepts", "Field
    validation"); writes the simulator makes itself ignore unknown fields."""

    directive: str = "Ignore"
    warnings: list[str] = field(default_factory=list)
    merge_patch: bool = False  # the object decoded is a merge patch's result


class ApiError(Exception):
    """An error the server answers with a Status object."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        retry_after: int | None = None,
        details: Obj | None = None,
    ):
        super().__init__(message)
        self.code, self.reason, self.message, self.retry_after = code, reason, message, retry_after
        self.details = details

    def status(self) -> Obj:
        out: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
        }
        if self.reason:  # an internal error has none (apimachinery errors.NewInternalError)
            out["reason"] = self.reason
        if self.details is not None:
            out["details"] = self.details
        out["code"] = self.code
        return out


def object_details(t: ResourceType, name: str, kind: str = "") -> Obj:
    """A Status's details naming the object: its name, group (none for the core group) and
    resource, or `kind` (k8s.io/apimachinery pkg/api/errors/errors.go, NewNotFound,
    NewAlreadyExists, NewConflict: the resource; NewInvalid: the kind)."""
    out: Obj = {"name": name} if name else {}
    if t.group:
        out["group"] = t.group
    out["kind"] = kind or t.plural
    return out


def not_found(t: ResourceType, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{t.qualified} "{name}" not found', None, object_details(t, name)
    )


_CAUSES = {
    "Required value": "FieldValueRequired",
    "Invalid value": "FieldValueInvalid",
    "Unsupported value": "FieldValueNotSupported",
    "Too long": "FieldValueTooLong",
    "Forbidden": "FieldValueForbidden",
    "Duplicate value": "FieldValueDuplicate",
}


def invalid(t: ResourceType, name: str, errors: list[str], resource: bool = False) -> ApiError:
    """422 Invalid for field errors `path: what`, with one cause each
    (apimachinery pkg/api/errors/errors.go, NewInvalid; util/validation/field/errors.go)."""
    joined = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    causes = []
    for error in errors:
        field_path, _, message = error.partition(": ")
        kind = next((r for prefix, r in _CAUSES.items() if message.startswith(prefix)), "")
        if " must be of type " in message:
            kind = "FieldValueTypeInvalid"
        causes.append({"reason": kind, "message": message, "field": field_path})
    qualified = f"{t.kind}.{t.group}" if t.group else t.kind
    if resource:  # named by its resource, as the generic registry's checks name it
        qualified = t.qualified
    return ApiError(
        422,
        "Invalid",
        f'{qualified} "{name}" is invalid: {joined}',
        None,
        {**object_details(t, name, "" if resource else t.kind), "causes": causes},
    )


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec_part(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _without_volatile(obj: Obj) -> Obj:
    out = copy.deepcopy(obj)
    for key in ("managedFields", "resourceVersion", "generation"):
        out.get("metadata", {}).pop(key, None)
    return out


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_selector_matches(selector: str, obj: Obj) -> bool:
    meta = obj.get("metadata", {})
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        key, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        actual = meta.get(key.removeprefix("metadata.")) if key.startswith("metadata.") else None
        if (actual == value) == negate:
            return False
    return True


class Store:
    def __init__(self, crd_established_delay: float = 0.0) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.crd_established_delay = crd_established_delay
        self.revision = 1
        self._service_ips = 0  # the last cluster IP given out, counted from 10.96.0.0
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {}
        self.events: deque[tuple[int, str, str, str, Obj]] = deque(maxlen=20000)
        self.listeners: list[Callable[[str, ResourceType, Obj], None]] = []
        for t in BUILTIN_TYPES:
            self._register(t)
        self._seed()

    # -- types -------------------------------------------------------------------------------

    def _register(self, t: ResourceType) -> None:
        self.types[(t.group, t.version, t.plural)] = t
        self.objects.setdefault((t.group, t.plural), {})

    def find_type(self, group: str, version: str, plural: str) -> ResourceType:
        t = self.types.get((group, version, plural))
        if t is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return t

    def type_for_kind(self, api_version: str, kind: str) -> ResourceType:
        group, _, version = api_version.rpartition("/")
        for t in self.types.values():
            if t.group == group and t.version == version and t.kind == kind:
                return t
        raise ApiError(404, "NotFound", f'no matches for kind "{kind}" in version "{api_version}"')

    def group_versions(self) -> dict[str, list[ResourceType]]:
        out: dict[str, list[ResourceType]] = {}
        with self.lock:
            for t in self.types.values():
                out.setdefault(t.group_version, []).append(t)
        return out

    def _seed(self) -> None:
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            self.create(self.find_type("", "v1", "namespaces"), "", ns, "kubesim")
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": "appliance",
                "labels": {"node-role.kubernetes.io/control-plane": ""},
            },
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
        self.create(self.find_type("", "v1", "nodes"), "", node, "kubesim")

    # -- reads -------------------------------------------------------------------------------

    def _bucket(self, t: ResourceType) -> dict[tuple[str, str], Obj]:
        return self.objects[(t.group, t.plural)]

    def _present(self, t: ResourceType, obj: Obj) -> Obj:
        out = copy.deepcopy(obj)
        out["apiVersion"], out["kind"] = t.group_version, t.kind
        if t.schema is None:
            builtin.zero_fields(t.kind, out)
        return out

    def get(self, t: ResourceType, namespace: str, name: str) -> Obj:
        with self.lock:
            obj = self._bucket(t).get((namespace, name))
            if obj is None:
                raise not_found(t, name)
            return self._present(t, obj)

    def list(
        self, t: ResourceType, namespace: str, label_selector: str = "", field_selector: str = ""
    ) -> tuple[list[Obj], int]:
        with self.lock:
            items = [
                self._present(t, obj)
                for (ns, _), obj in sorted(self._bucket(t).items())
                if (not namespace or ns == namespace)
                and label_selector_matches(label_selector, obj["metadata"].get("labels", {}))
                and field_selector_matches(field_selector, obj)
            ]
            return items, self.revision

    # -- writes ------------------------------------------------------------------------------

    def _check_namespace(self, t: ResourceType, namespace: str) -> None:
        if t.namespaced and ("", namespace) not in self.objects[("", "namespaces")]:
            raise not_found(self.find_type("", "v1", "namespaces"), namespace)

    def _validate(self, t: ResourceType, obj: Obj) -> None:
        name = obj.get("metadata", {}).get("name", "")
        if not name:
            raise invalid(
                t, "", ["metadata.name: Required value: name or generateName is required"]
            )
        if t.schema is not None:
            errors = schema.validate(t.schema, obj)
            if errors:
                raise invalid(t, name, errors)

    def _commit(self, t: ResourceType, event: str, obj: Obj) -> Obj:
        if t.schema is None:
            builtin.strip_zero_fields(t.kind, obj)  # stored without: _present adds them
        self.revision += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self.revision)
        key = (meta.get("namespace", ""), meta["name"])
        if event == "DELETED":
            self._bucket(t).pop(key, None)
        else:
            self._bucket(t)[key] = obj
        presented = self._present(t, obj)
        self.events.append((self.revision, t.group, t.plural, event, presented))
        self.changed.notify_all()
        for listener in self.listeners:
            listener(event, t, presented)
        if event == "ADDED" and (t.group, t.plural) == (CRD_GROUP, CRD_PLURAL):
            self._schedule_establish(meta["name"])
        return self._present(t, obj)

    def _schedule_establish(self, name: str) -> None:
        self._accept_names(name)
        if self.crd_established_delay <= 0:
            self.establish_crd(name)
            return
        timer = threading.Timer(self.crd_established_delay, self.establish_crd, args=(name,))
        timer.daemon = True
        timer.start()

    @staticmethod
    def schema_of(t: ResourceType) -> fields.Schema:
        """The structural schema of a type: a CRD version's, or what kubesim knows of a
        built-in kind's (kubesim/builtin.py)."""
        return t.schema if t.schema is not None else builtin.SCHEMAS.get(t.kind)

    def _prune(
        self,
        t: ResourceType,
        obj: Obj,
        checks: FieldValidation,
        apply: bool = False,
        sent_meta: Obj | None = None,
    ) -> None:
        """Drop the fields the type's schema does not know and canonicalise quantities, as
        decoding does, honouring the fieldValidation directive."""
        type_schema = self.schema_of(t)
        if type_schema is None:
            return
        patched = (
            json.dumps(obj, separators=(",", ":"))
            if checks.merge_patch and checks.directive == "Strict"
            else ""
        )
        try:
            unknown = schema.prune(type_schema, obj, builtin.OBJECT_META)
        except schema.BadQuantity as err:
            gvk = f"{t.group}/{t.version}, Kind={t.kind}"
            if apply:
                # Server-side apply decodes the merged object last (k8s.io/apiserver
                # pkg/endpoints/handlers/patch.go, applyPatcher: "failed to convert new
                # object"), an internal error.
                meta = sent_meta if sent_meta is not None else obj.get("metadata", {})
                raise ApiError(
                    500,
                    "",
                    f"failed to convert new object ({meta.get('namespace', '')}/"
                    f"{meta.get('name', '')}; {gvk}) to proper version: unable to convert "
                    f"unstructured object to {gvk}: {err}",
                ) from None
            raise ApiError(
                400,
                "BadRequest",
                f'{t.kind} in version "{t.version}" cannot be handled as a {t.kind}: {err}',
            ) from None
        if not unknown:
            return
        if apply:
            # Server-side apply types the applied configuration against the schema before
            # anything else, whatever the fieldValidation directive: a field the schema does
            # not declare is an internal error (k8s.io/apiserver pkg/endpoints/handlers/
            # patch.go, applyPatcher; managedfields/internal/structuredmerge.go, Apply:
            # "failed to create typed patch object"; structured-merge-diff typed/
            # ValidationErrors.Error). The real server's list follows Go's map order, which
            # varies; kubesim lists every field, in the order sent.
            meta = sent_meta if sent_meta is not None else obj.get("metadata", {})
            errors = [
                f"{_typed_path(obj, type_schema, path)}: field not declared in schema"
                for path in unknown
            ]
            listed = errors[0] if len(errors) == 1 else "errors:\n  " + "\n  ".join(errors)
            raise ApiError(
                500,
                "",
                "failed to create typed patch object "
                f"({meta.get('namespace', '')}/{meta.get('name', '')}; "
                f"{t.group}/{t.version}, Kind={t.kind}): {listed}",
            )
        if checks.directive == "Strict":
            # The strict decoder lists every unknown field (k8s.io/apimachinery
            # pkg/runtime/serializer/json, strict decoding; runtime.NewStrictDecodingError).
            listed = ", ".join(f'unknown field "{path}"' for path in unknown)
            if patched:
                # A merge patch's result that does not decode is an invalid patch, quoted
                # whole (k8s.io/apiserver pkg/endpoints/handlers/patch.go, jsonPatcher
                # applyJSPatch: field.Invalid(field.NewPath("patch"), ...)).
                what = f"Invalid value: {json.dumps(patched)}: strict decoding error: {listed}"
                raise ApiError(
                    422,
                    "Invalid",
                    f' "" is invalid: patch: {what}',
                    None,
                    {
                        "causes": [
                            {"reason": "FieldValueInvalid", "message": what, "field": "patch"}
                        ]
                    },
                )
            raise ApiError(
                400,
                "BadRequest",
                f'{t.kind} in version "{t.version}" cannot be handled as a {t.kind}: '
                f"strict decoding error: {listed}",
            )
        if checks.directive == "Warn":
            checks.warnings.extend(f'unknown field "{path}"' for path in unknown)

    def _normalise(self, t: ResourceType, obj: Obj, checks: FieldValidation) -> None:
        """What the server does to an object it is about to store: decode (prune, canonical
        quantities), convert, default."""
        self._prune(t, obj, checks)
        if t.kind == "Secret" and "stringData" in obj:
            # stringData is write-only: merged into data, its values winning, and not stored
            # (pkg/apis/core/v1/conversion.go, Convert_v1_Secret_To_core_Secret).
            data = obj.setdefault("data", {})
            for key, value in obj.pop("stringData").items():
                data[key] = base64.b64encode(str(value).encode()).decode()
        if t.schema is None:
            builtin.set_defaults(t.kind, obj)

    @staticmethod
    def _default_custom(t: ResourceType, obj: Obj) -> None:
        if t.schema is not None:
            schema.apply_defaults(t.schema, obj)

    def create(
        self,
        t: ResourceType,
        namespace: str,
        body: Obj,
        manager: str,
        dry_run: bool = False,
        checks: FieldValidation | None = None,
        applied: Obj | None = None,
    ) -> Obj:
        """Create `body`; with `applied` (a server-side apply's configuration), that manager
        owns the fields the configuration sets, else `manager` owns every field, defaults too
        (the field manager sees the decoded, defaulted object: k8s.io/apiserver
        pkg/endpoints/handlers/create.go, fieldManager.UpdateNoErrors after decoding)."""
        with self.lock:
            obj = copy.deepcopy(body)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if t.namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            self._check_namespace(t, namespace)
            self._normalise(t, obj, checks or FieldValidation())
            self._validate(t, obj)
            if (namespace if t.namespaced else "", meta["name"]) in self._bucket(t):
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{t.qualified} "{meta["name"]}" already exists',
                    None,
                    object_details(t, meta["name"]),
                )
            if t.has_status and t.kind != "Node":
                obj.pop("status", None)
            self._default_custom(t, obj)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now())
            if _has_generation(t):
                meta["generation"] = 1
            type_schema = self.schema_of(t)
            owned = (
                {(manager, "Update", ""): fields.changed_paths(_zero(t), obj, type_schema)}
                if applied is None
                else {(manager, "Apply", ""): fields.leaf_paths(applied, type_schema)}
            )
            meta.pop("managedFields", None)
            managed = _managed_entries(owned, {}, t.group_version)
            if managed:
                meta["managedFields"] = managed
            self._on_create(t, obj)
            return self._present(t, obj) if dry_run else self._commit(t, "ADDED", obj)

    def _on_create(self, t: ResourceType, obj: Obj) -> None:
        if t.kind == "Service":
            self._allocate_cluster_ip(obj.setdefault("spec", {}))
        if t.kind == "Namespace":
            # pkg/registry/core/namespace/strategy.go, PrepareForCreate.
            obj.setdefault("status", {})["phase"] = "Active"
            finalizers = obj.setdefault("spec", {}).setdefault("finalizers", [])
            if "kubernetes" not in finalizers:
                finalizers.append("kubernetes")
        if t.kind == "PersistentVolumeClaim":
            # pkg/registry/core/persistentvolumeclaim/strategy.go, PrepareForCreate; the
            # finalizer is the StorageObjectInUseProtection admission plugin's
            # (plugin/pkg/admission/storage/storageobjectinuseprotection).
            obj["status"] = {"phase": "Pending"}
            finalizers = obj["metadata"].setdefault("finalizers", [])
            if "kubernetes.io/pvc-protection" not in finalizers:
                finalizers.append("kubernetes.io/pvc-protection")
        if t.plural == CRD_PLURAL and t.group == CRD_GROUP:
            # As the create answers: no names accepted yet, no conditions (apiextensions-
            # apiserver pkg/registry/customresourcedefinition/strategy.go, PrepareForCreate);
            # the naming and establishing controllers set them just after (_accept_names).
            obj["status"] = {
                "conditions": None,
                "acceptedNames": {"plural": "", "kind": ""},
                "storedVersions": [
                    v["name"] for v in obj["spec"].get("versions", []) if v.get("storage")
                ],
            }

    def _allocate_cluster_ip(self, spec: Obj) -> None:
        """A single-stack IPv4 cluster's allocation (pkg/registry/core/service/storage/
        alloc.go, initIPFamilyFields and allocClusterIPs): a free address from the service
        range unless headless ("None"); the families and policy that go with it."""
        if spec.get("type", "ClusterIP") == "ExternalName":
            return
        if not spec.get("clusterIP"):
            self._service_ips += 1
            n = self._service_ips
            spec["clusterIP"] = f"10.96.{n // 256}.{n % 256}"
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        if spec["clusterIP"] != "None" or spec.get("selector"):
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        else:
            spec.setdefault("ipFamilyPolicy", "RequireDualStack")
        spec.setdefault("ipFamilies", ["IPv4"])

    def update(
        self,
        t: ResourceType,
        namespace: str,
        name: str,
        body: Obj,
        manager: str,
        subresource: str = "",
        dry_run: bool = False,
        checks: FieldValidation | None = None,
        conditional: bool = False,
    ) -> Obj:
        with self.lock:
            live = self._live(t, namespace, name)
            expected = body.get("metadata", {}).get("resourceVersion")
            if not expected and t.schema is not None and conditional:
                # Custom resources allow no unconditional update (apiextensions-apiserver
                # pkg/registry/customresource/strategy.go, AllowUnconditionalUpdate false;
                # k8s.io/apiserver pkg/registry/rest/update.go, BeforeUpdate).
                raise invalid(
                    t,
                    name,
                    ["metadata.resourceVersion: Invalid value: 0: must be specified for an update"],
                    resource=True,
                )
            if expected and expected != live["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {t.qualified} "{name}": the '
                    "object has been modified; please apply your changes to the "
                    "latest version and try again",
                    None,
                    object_details(t, name),
                )
            return self._replace(
                t, live, copy.deepcopy(body), manager, "Update", subresource, dry_run, checks
            )

    def merge_patch(
        self,
        t: ResourceType,
        namespace: str,
        name: str,
        patch: Obj,
        manager: str,
        subresource: str = "",
        dry_run: bool = False,
        checks: FieldValidation | None = None,
    ) -> Obj:
        with self.lock:
            live = self._live(t, namespace, name)
            # The patched object is re-encoded from a Go map, its keys sorted, before it is
            # decoded (k8s.io/apiserver pkg/endpoints/handlers/patch.go, jsonPatcher): what
            # decoding reports comes in that order.
            new = _sorted_keys(fields.merge_patch(live, patch))
            if checks is not None:
                checks.merge_patch = True
            return self._replace(t, live, new, manager, "Update", subresource, dry_run, checks)

    def _live(self, t: ResourceType, namespace: str, name: str) -> Obj:
        self._check_namespace(t, namespace)
        obj = self._bucket(t).get((namespace if t.namespaced else "", name))
        if obj is None:
            raise not_found(t, name)
        return obj

    def _replace(
        self,
        t: ResourceType,
        live: Obj,
        new: Obj,
        manager: str,
        operation: str,
        subresource: str,
        dry_run: bool,
        checks: FieldValidation | None = None,
        entries: dict[ManagerKey, set[fields.Path]] | None = None,
    ) -> Obj:
        """Store `new` in place of `live`, keeping what the write may not change."""
        self._normalise(t, new, checks or FieldValidation())
        new["apiVersion"], new["kind"] = live.get("apiVersion"), live.get("kind")
        live_meta = live["metadata"]
        if subresource == "status":
            merged = copy.deepcopy(live)
            merged["status"] = new.get("status", {})
            new = merged
        else:
            meta = new.setdefault("metadata", {})
            for key in ("name", "namespace", "uid", "creationTimestamp", "generation"):
                if key in live_meta:
                    meta[key] = live_meta[key]
            if t.has_status:
                new["status"] = copy.deepcopy(live.get("status", {}))
                if not new["status"]:
                    new.pop("status")
            if t.kind == "Service":
                # An update that leaves them out keeps the allocated values
                # (pkg/registry/core/service/storage/storage.go, patchAllocatedValues).
                spec, old_spec = new.setdefault("spec", {}), live.get("spec", {})
                for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                    if not spec.get(key) and key in old_spec:
                        spec[key] = copy.deepcopy(old_spec[key])
        self._default_custom(t, new)
        self._validate(t, new)
        if entries is None:
            entries = _parse_managed(live_meta.get("managedFields", []))
            type_schema = self.schema_of(t)
            status = subresource == "status"
            changed = fields.changed_paths(live, new, type_schema, status)
            removed = _all_paths(live, type_schema, status) - _all_paths(new, type_schema, status)
            for key in list(entries):
                entries[key] -= changed | removed
            if changed:
                own = (manager, operation, subresource)
                entries[own] = entries.get(own, set()) | changed
        managed = _managed_entries(
            entries,
            _parse_times(live_meta.get("managedFields", [])),
            t.group_version,
            previous=_parse_managed(live_meta.get("managedFields", [])),
        )
        # None at all is no list at all (metav1.ObjectMeta: managedFields,omitempty).
        new["metadata"].pop("managedFields", None)
        if managed:
            new["metadata"]["managedFields"] = managed
        if _without_volatile(new) == _without_volatile(live) and new["metadata"].get(
            "managedFields"
        ) == live_meta.get("managedFields"):
            return self._present(t, live)
        if _spec_part(new) != _spec_part(live) and _has_generation(t):
            new["metadata"]["generation"] = live_meta.get("generation", 1) + 1
        if dry_run:
            new["metadata"]["resourceVersion"] = live_meta["resourceVersion"]
            return self._present(t, new)
        self._on_update(t, new)
        return self._commit(t, "MODIFIED", new)

    def _on_update(self, t: ResourceType, obj: Obj) -> None:
        if t.plural == CRD_PLURAL and t.group == CRD_GROUP:
            stored = obj.setdefault("status", {}).setdefault("storedVersions", [])
            for v in obj["spec"].get("versions", []):
                if v.get("storage") and v["name"] not in stored:
                    stored.append(v["name"])
            if any(
                c["type"] == "Established" and c["status"] == "True"
                for c in obj["status"].get("conditions") or []
            ):
                self._register_crd(obj)

    def apply(
        self,
        t: ResourceType,
        namespace: str,
        name: str,
        config: Obj,
        manager: str,
        force: bool,
        subresource: str = "",
        dry_run: bool = False,
        checks: FieldValidation | None = None,
    ) -> Obj:
        checks = checks or FieldValidation()
        if not manager:
            raise ApiError(
                422,
                "Invalid",
                'PatchOptions.meta.k8s.io "" is invalid: '
                "fieldManager: Required value: is required for apply patch",
                None,
                {
                    "group": "meta.k8s.io",
                    "kind": "PatchOptions",
                    "causes": [
                        {
                            "reason": "FieldValueRequired",
                            "message": "Required value: is required for apply patch",
                            "field": "fieldManager",
                        }
                    ],
                },
            )
        meta = config.get("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(
                400,
                "BadRequest",
                "the name of the object "
                f"({meta.get('name')}) does not match the name on the URL ({name})",
            )
        if config.get("kind") and config["kind"] != t.kind:
            raise ApiError(
                400,
                "BadRequest",
                # The applied configuration is decoded as the URL's kind (k8s.io/apiserver
                # pkg/endpoints/handlers/patch.go, applyPatcher: "invalid object type").
                f"invalid object type: {config.get('apiVersion', '')}, Kind={config['kind']}"
                if "/" in str(config.get("apiVersion", ""))
                else f"invalid object type: /{config.get('apiVersion', '')}, Kind={config['kind']}",
            )
        with self.lock:
            self._check_namespace(t, namespace)
            sent_meta = copy.deepcopy(config.get("metadata", {}))
            config = copy.deepcopy(config)
            config.setdefault("metadata", {}).setdefault("name", name)
            if t.namespaced:
                config["metadata"]["namespace"] = namespace
            # The values as sent decide conflicts: structured-merge-diff compares the merged
            # configuration with the live object before the result is decoded, so "1000m"
            # sent over a stored "1" is a change (merge/update.go, Updater.Apply).
            sent = copy.deepcopy(config)
            # Fields the schema does not know are not applied (nor owned).
            self._prune(t, config, checks, apply=True, sent_meta=sent_meta)
            live = self._bucket(t).get((namespace if t.namespaced else "", name))
            if live is None:
                if subresource:
                    raise not_found(t, name)
                applied = _strip_status(config, t)
                created = self.create(t, namespace, config, manager, True, checks, applied)
                return created if dry_run else self._commit(t, "ADDED", created)
            return self._apply_existing(
                t, live, config, sent, manager, force, subresource, dry_run, checks
            )

    def _apply_existing(
        self,
        t: ResourceType,
        live: Obj,
        config: Obj,
        sent: Obj,
        manager: str,
        force: bool,
        subresource: str,
        dry_run: bool,
        checks: FieldValidation,
    ) -> Obj:
        type_schema = self.schema_of(t)
        if subresource == "status":
            applied = {"status": config.get("status", {})}
            paths = fields.leaf_paths(applied, type_schema, status=True)
        else:
            applied = _strip_status(config, t)
            paths = fields.leaf_paths(applied, type_schema)
        entries = _parse_managed(live["metadata"].get("managedFields", []))
        own = (manager, "Apply", subresource)
        conflicts: list[tuple[ManagerKey, fields.Path]] = []
        parents = {path[:i] for path in paths for i in range(1, len(path))}
        for path in sorted(paths):
            if isinstance(path[-1], fields.Item) or path in parents:
                # A list item or map both managers own: its fields may conflict, not the item
                # itself (structured-merge-diff merge/update.go, Updater: conflicts are leaf
                # fields).
                continue
            live_value = fields.get_path(live, path, type_schema)
            if live_value is fields.MISSING or live_value == fields.get_path(
                sent, path, type_schema
            ):
                continue
            for key, owned in entries.items():
                if key != own and key[2] == subresource and path in owned:
                    conflicts.append((key, path))
        if conflicts and not force:
            raise _conflict_error(conflicts, t.group_version)
        for _, path in conflicts:
            for key in entries:
                if key != own:
                    entries[key].discard(path)
        base = copy.deepcopy(live)
        for path in sorted(entries.get(own, set()) - paths):
            # What the applier no longer applies goes, unless another manager owns it or (a
            # map or list item) something under it.
            if not any(
                owned_path[: len(path)] == path
                for key, owned in entries.items()
                if key != own
                for owned_path in owned
            ):
                fields.delete_path(base, path, type_schema)
        entries[own] = paths
        new = fields.merge(base, applied, type_schema)
        if subresource != "status" and t.has_status:
            new["status"] = copy.deepcopy(live.get("status", {}))
        return self._replace(t, live, new, manager, "Apply", subresource, dry_run, checks, entries)

    def delete(self, t: ResourceType, namespace: str, name: str, dry_run: bool = False) -> Obj:
        with self.lock:
            live = self._live(t, namespace, name)
            if dry_run:  # checked and answered as if, nothing removed
                return self._present(t, live)
            if t.kind == "Namespace":
                for (group, plural), bucket in self.objects.items():
                    for (ns, obj_name), _obj in list(bucket.items()):
                        if ns == name:
                            sub_t = next(
                                x
                                for x in self.types.values()
                                if (x.group, x.plural) == (group, plural)
                            )
                            self._commit(sub_t, "DELETED", copy.deepcopy(bucket[(ns, obj_name)]))
            if t.plural == CRD_PLURAL and t.group == CRD_GROUP:
                self._unregister_crd(live)
            return self._commit(t, "DELETED", copy.deepcopy(live))

    # -- CRDs --------------------------------------------------------------------------------

    def _accept_names(self, name: str) -> None:
        """The naming controller's status update just after a CRD is created: its names
        accepted (apiextensions-apiserver pkg/controller/status/naming_controller.go,
        calculateNamesAndConditions), by the server itself (manager kube-apiserver)."""
        self._set_crd_condition(
            name,
            condition("NamesAccepted", "True", "NoConflicts", "no conflicts found"),
            accept_names=True,
        )

    def establish_crd(self, name: str) -> None:
        """Mark a CRD Established and serve its types, as the real server does once ready
        (apiextensions-apiserver pkg/controller/establish/establishing_controller.go)."""
        self._set_crd_condition(
            name,
            condition(
                "Established",
                "True",
                "InitialNamesAccepted",
                "the initial names have been accepted",
            ),
            accept_names=False,
        )

    def _set_crd_condition(self, name: str, cond: Obj, *, accept_names: bool) -> None:
        """One status update of a CRD by the server's own controllers: NamesAccepted goes
        first with the accepted names copied from spec, Established last."""
        with self.lock:
            t = self.find_type(CRD_GROUP, "v1", CRD_PLURAL)
            live = self._bucket(t).get(("", name))
            if live is None:
                return
            status = copy.deepcopy(live.get("status", {}))
            conditions = [c for c in status.get("conditions") or [] if c["type"] != cond["type"]]
            if accept_names:
                status["acceptedNames"] = copy.deepcopy(live.get("spec", {}).get("names", {}))
                conditions.insert(0, cond)
            else:
                conditions.append(cond)
            status["conditions"] = conditions
            self._replace(t, live, {"status": status}, "kube-apiserver", "Update", "status", False)

    def _register_crd(self, crd: Obj) -> None:
        for t in types_from_crd(crd):
            self._register(t)

    def _unregister_crd(self, crd: Obj) -> None:
        spec = crd.get("spec", {})
        group, plural = spec.get("group", ""), spec.get("names", {}).get("plural", "")
        for key in [k for k in self.types if (k[0], k[2]) == (group, plural)]:
            del self.types[key]
        self.objects.pop((group, plural), None)

    # -- watch -------------------------------------------------------------------------------

    def watch(
        self,
        t: ResourceType,
        namespace: str,
        since: int,
        label_selector: str,
        field_selector: str,
        deadline: float,
        stopped: Callable[[], bool],
    ) -> Iterator[tuple[str, Obj]]:
        cursor = since
        while not stopped():
            batch: list[tuple[str, Obj]] = []
            with self.lock:
                for rev, group, plural, event, obj in self.events:
                    if rev <= cursor or (group, plural) != (t.group, t.plural):
                        continue
                    if namespace and obj["metadata"].get("namespace") != namespace:
                        continue
                    labels = obj["metadata"].get("labels", {})
                    if label_selector_matches(label_selector, labels) and field_selector_matches(
                        field_selector, obj
                    ):
                        batch.append((event, {**obj, "apiVersion": t.group_version}))
                cursor = self.revision
                if not batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    self.changed.wait(min(remaining, 0.5))
            yield from batch


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def _typed_path(obj: Obj, schema: fields.Schema, path: str) -> str:
    """A pruned field's path (`spec.containers[0].colour`) as structured-merge-diff writes it
    (`.spec.containers[name="app"].colour`: fieldpath/element.go, PathElement.String)."""
    out: list[str] = []
    node: Any = obj
    node_schema = schema
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        if name:
            out.append("." + name)
            node = node.get(name) if isinstance(node, dict) else None
            node_schema = fields.child(node_schema, name)
            continue
        item = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
        list_schema = node_schema
        node_schema = (list_schema or {}).get("items") if list_schema else None
        if (list_schema or {}).get("x-kubernetes-list-type") in ("map", "set"):
            out.append(fields.dotted((fields.item_element(list_schema, item),)))
        else:
            out.append(f"[{index}]")
        node = item
    return "".join(out)


def _conflict_error(conflicts: list[tuple[ManagerKey, fields.Path]], api_version: str) -> ApiError:
    """409 for an apply's conflicts, worded as k8s.io/apimachinery
    pkg/util/managedfields/internal/conflict.go (NewConflictError, getConflictMessage,
    printManager) words them: one cause per field, grouped by manager when several."""

    def printed(key: ManagerKey) -> str:
        manager, operation, subresource = key
        out = json.dumps(manager)
        if subresource:
            out += f" with subresource {json.dumps(subresource)}"
        return f"{out} using {api_version}" if operation == "Update" else out

    # In the order structured-merge-diff iterates a field set: at each level the fields that
    # end there (sorted) before those that go deeper (fieldpath/set.go, Set.Iterate).
    def order(item: tuple[ManagerKey, fields.Path]) -> tuple[Any, ...]:
        key, path = item
        levels = tuple(
            (0 if i == len(path) - 1 else 1, isinstance(e, fields.Item), str(e))
            for i, e in enumerate(path)
        )
        return (printed(key), levels)

    conflicts = sorted(conflicts, key=order)
    causes = [
        {
            "reason": "FieldManagerConflict",
            "message": f"conflict with {printed(key)}",
            "field": fields.dotted(path),
        }
        for key, path in conflicts
    ]
    if len(conflicts) == 1:
        key, path = conflicts[0]
        message = (
            f"Apply failed with 1 conflict: conflict with {printed(key)}: {fields.dotted(path)}"
        )
    else:
        lines = []
        for key in sorted({key for key, _ in conflicts}, key=printed):
            lines.append(f"conflicts with {printed(key)}:")
            lines += [f"- {fields.dotted(p)}" for k, p in conflicts if k == key]
        message = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
    return ApiError(409, "Conflict", message, None, {"causes": causes})


def _zero(t: ResourceType) -> Obj:
    """The object a create is compared with for its manager's fields: the Go type's zero
    value (k8s.io/apiserver pkg/endpoints/handlers/create.go: scope.Creater.New), a custom
    resource's being empty."""
    return copy.deepcopy(builtin.ZERO.get(t.kind, {})) if t.schema is None else {}


def _all_paths(obj: Obj, schema: fields.Schema, status: bool) -> set[fields.Path]:
    return fields.leaf_paths(obj, schema, status) | fields.node_paths(obj, schema, status)


def _has_generation(t: ResourceType) -> bool:
    return t.schema is not None or t.kind in builtin.GENERATION_KINDS


def _strip_status(config: Obj, t: ResourceType) -> Obj:
    return {k: v for k, v in config.items() if not (k == "status" and t.has_status)}


def condition(kind: str, status: str, reason: str, message: str) -> Obj:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now(),
    }


def _parse_managed(entries: list[Obj]) -> dict[ManagerKey, set[fields.Path]]:
    out: dict[ManagerKey, set[fields.Path]] = {}
    for entry in entries:
        key = (entry.get("manager", ""), entry.get("operation", ""), entry.get("subresource", ""))
        out[key] = fields.from_fields_v1(entry.get("fieldsV1", {}))
    return out


def _parse_times(entries: list[Obj]) -> dict[ManagerKey, str]:
    return {
        (e.get("manager", ""), e.get("operation", ""), e.get("subresource", "")): e.get("time", "")
        for e in entries
    }


def _managed_entries(
    entries: dict[ManagerKey, set[fields.Path]],
    times: dict[ManagerKey, str],
    api_version: str,
    previous: dict[ManagerKey, set[fields.Path]] | None = None,
) -> list[Obj]:
    out = []
    for key, paths in entries.items():
        if not paths:
            continue
        manager, operation, subresource = key
        unchanged = previous is not None and previous.get(key) == paths and key in times
        entry: Obj = {
            "manager": manager,
            "operation": operation,
            "apiVersion": api_version,
            "time": times[key] if unchanged else now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": fields.to_fields_v1(paths),
        }
        if subresource:
            entry["subresource"] = subresource
        out.append(entry)
    return out
