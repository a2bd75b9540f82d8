"""The simulator's object store: CRUD, merge patch, server-side apply, watch events."""

from __future__ import annotations

import base64
import copy
import datetime as dt
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


class ApiError(Exception):
    """An error the server answers with a Status object."""

    def __init__(self, code: int, reason: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.retry_after = code, reason, message, retry_after

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


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
        return out

    def get(self, t: ResourceType, namespace: str, name: str) -> Obj:
        with self.lock:
            obj = self._bucket(t).get((namespace, name))
            if obj is None:
                raise ApiError(404, "NotFound", f'{t.qualified} "{name}" not found')
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
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')

    def _validate(self, t: ResourceType, obj: Obj) -> None:
        name = obj.get("metadata", {}).get("name", "")
        if not name:
            raise ApiError(422, "Invalid", f'{t.kind} "" is invalid: metadata.name: Required value')
        if t.schema is not None:
            errors = schema.validate(t.schema, obj)
            if errors:
                joined = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
                raise ApiError(422, "Invalid", f'{t.kind}.{t.group} "{name}" is invalid: {joined}')

    def _commit(self, t: ResourceType, event: str, obj: Obj) -> Obj:
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
        self, t: ResourceType, obj: Obj, checks: FieldValidation, apply: bool = False
    ) -> None:
        """Drop the fields the type's schema does not know and canonicalise quantities, as
        decoding does, honouring the fieldValidation directive."""
        type_schema = self.schema_of(t)
        if type_schema is None:
            return
        unknown = schema.prune(type_schema, obj, builtin.OBJECT_META)
        if not unknown:
            return
        if checks.directive == "Strict" and apply:
            # Server-side apply types the applied configuration against the schema
            # (k8s.io/apiserver pkg/endpoints/handlers/fieldmanager, structuredmerge Apply:
            # ObjectToTyped), which fails on the first field it does not declare.
            meta = obj.get("metadata", {})
            raise ApiError(
                400,
                "BadRequest",
                "failed to create typed patch object "
                f"({meta.get('namespace', '')}/{meta.get('name', '')}; "
                f"{t.group}/{t.version}, Kind={t.kind}): "
                f".{unknown[0]}: field not declared in schema",
            )
        if checks.directive == "Strict":
            # The strict decoder lists every unknown field (k8s.io/apimachinery
            # pkg/runtime/serializer/json, strict decoding; runtime.NewStrictDecodingError).
            listed = ", ".join(f'unknown field "{path}"' for path in unknown)
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
                    409, "AlreadyExists", f'{t.qualified} "{meta["name"]}" already exists'
                )
            if t.has_status and t.kind != "Node":
                obj.pop("status", None)
            self._default_custom(t, obj)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
            owned = (
                {(manager, "Update", ""): fields.leaf_paths(obj, self.schema_of(t))}
                if applied is None
                else {(manager, "Apply", ""): fields.leaf_paths(applied, self.schema_of(t))}
            )
            meta["managedFields"] = _managed_entries(owned, {}, t.group_version)
            self._on_create(t, obj)
            return self._present(t, obj) if dry_run else self._commit(t, "ADDED", obj)

    def _on_create(self, t: ResourceType, obj: Obj) -> None:
        if t.kind == "Namespace":
            # pkg/registry/core/namespace/strategy.go, PrepareForCreate.
            obj.setdefault("status", {})["phase"] = "Active"
            finalizers = obj.setdefault("spec", {}).setdefault("finalizers", [])
            if "kubernetes" not in finalizers:
                finalizers.append("kubernetes")
        if t.plural == CRD_PLURAL and t.group == CRD_GROUP:
            obj["status"] = {
                "acceptedNames": obj.get("spec", {}).get("names", {}),
                "storedVersions": [
                    v["name"] for v in obj["spec"].get("versions", []) if v.get("storage")
                ],
                "conditions": [
                    condition("NamesAccepted", "True", "NoConflicts", "no conflicts found")
                ],
            }

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
    ) -> Obj:
        with self.lock:
            live = self._live(t, namespace, name)
            expected = body.get("metadata", {}).get("resourceVersion")
            if expected and expected != live["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {t.qualified} "{name}": the '
                    "object has been modified; please apply your changes to the "
                    "latest version and try again",
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
            new = fields.merge_patch(live, patch)
            return self._replace(t, live, new, manager, "Update", subresource, dry_run, checks)

    def _live(self, t: ResourceType, namespace: str, name: str) -> Obj:
        self._check_namespace(t, namespace)
        obj = self._bucket(t).get((namespace if t.namespaced else "", name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{t.qualified} "{name}" not found')
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
        self._default_custom(t, new)
        self._validate(t, new)
        if entries is None:
            entries = _parse_managed(live_meta.get("managedFields", []))
            type_schema = self.schema_of(t)
            changed = fields.changed_paths(live, new, type_schema)
            removed = fields.leaf_paths(live, type_schema) - fields.leaf_paths(new, type_schema)
            for key in list(entries):
                entries[key] -= changed | removed
            if changed:
                own = (manager, operation, subresource)
                entries[own] = entries.get(own, set()) | changed
        new["metadata"]["managedFields"] = _managed_entries(
            entries,
            _parse_times(live_meta.get("managedFields", [])),
            t.group_version,
            previous=_parse_managed(live_meta.get("managedFields", [])),
        )
        if _without_volatile(new) == _without_volatile(live) and new["metadata"][
            "managedFields"
        ] == live_meta.get("managedFields"):
            return self._present(t, live)
        if _spec_part(new) != _spec_part(live):
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
                for c in obj["status"].get("conditions", [])
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
                f"the kind of the object ({config['kind']}) "
                f"does not match the kind on the URL ({t.kind})",
            )
        with self.lock:
            self._check_namespace(t, namespace)
            config = copy.deepcopy(config)
            config.setdefault("metadata", {}).setdefault("name", name)
            if t.namespaced:
                config["metadata"]["namespace"] = namespace
            # Fields the schema does not know are not applied (nor owned).
            self._prune(t, config, checks, apply=True)
            live = self._bucket(t).get((namespace if t.namespaced else "", name))
            if live is None:
                if subresource:
                    raise ApiError(404, "NotFound", f'{t.qualified} "{name}" not found')
                applied = _strip_status(config, t)
                created = self.create(t, namespace, config, manager, True, checks, applied)
                return created if dry_run else self._commit(t, "ADDED", created)
            return self._apply_existing(
                t, live, config, manager, force, subresource, dry_run, checks
            )

    def _apply_existing(
        self,
        t: ResourceType,
        live: Obj,
        config: Obj,
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
        conflicts: list[tuple[str, fields.Path]] = []
        for path in sorted(paths):
            if isinstance(path[-1], fields.Item):
                # A list item both managers own: its fields may conflict, not the item itself
                # (structured-merge-diff merge/update.go, Updater: conflicts are leaf fields).
                continue
            live_value = fields.get_path(live, path, type_schema)
            if live_value is fields.MISSING or live_value == fields.get_path(
                applied, path, type_schema
            ):
                continue
            for key, owned in entries.items():
                if key != own and key[2] == subresource and path in owned:
                    conflicts.append((key[0], path))
        if conflicts and not force:
            listed = "; ".join(f'conflict with "{m}": {fields.dotted(p)}' for m, p in conflicts)
            count = "1 conflict" if len(conflicts) == 1 else f"{len(conflicts)} conflicts"
            raise ApiError(409, "Conflict", f"Apply failed with {count}: {listed}")
        for _, path in conflicts:
            for key in entries:
                if key != own:
                    entries[key].discard(path)
        base = copy.deepcopy(live)
        for path in sorted(entries.get(own, set()) - paths):
            if not any(path in owned for key, owned in entries.items() if key != own):
                fields.delete_path(base, path, type_schema)
        entries[own] = paths
        new = fields.merge(base, applied, type_schema)
        if subresource != "status" and t.has_status:
            new["status"] = copy.deepcopy(live.get("status", {}))
        return self._replace(t, live, new, manager, "Apply", subresource, dry_run, checks, entries)

    def delete(self, t: ResourceType, namespace: str, name: str) -> Obj:
        with self.lock:
            live = self._live(t, namespace, name)
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

    def establish_crd(self, name: str) -> None:
        """Mark a CRD Established and serve its types, as the real server does once ready."""
        with self.lock:
            t = self.find_type(CRD_GROUP, "v1", CRD_PLURAL)
            live = self._bucket(t).get(("", name))
            if live is None:
                return
            status = copy.deepcopy(live.get("status", {}))
            conditions = [c for c in status.get("conditions", []) if c["type"] != "Established"]
            conditions.append(
                condition(
                    "Established",
                    "True",
                    "InitialNamesAccepted",
                    "the initial names have been accepted",
                )
            )
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
