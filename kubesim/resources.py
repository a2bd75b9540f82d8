"""The resource types the simulator serves, and the discovery documents kubectl reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    has_status: bool = False
    schema: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    printer_columns: tuple[dict[str, Any], ...] = field(default=(), compare=False, hash=False)

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def qualified(self) -> str:
        """`plural.group`, as the real server names a resource in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


def _t(
    group: str,
    version: str,
    plural: str,
    kind: str,
    namespaced: bool,
    *short: str,
    status: bool = False,
) -> ResourceType:
    return ResourceType(group, version, plural, kind, namespaced, tuple(short), status)


BUILTIN_TYPES: list[ResourceType] = [
    _t("", "v1", "namespaces", "Namespace", False, "ns", status=True),
    _t("", "v1", "configmaps", "ConfigMap", True, "cm"),
    _t("", "v1", "secrets", "Secret", True),
    _t("", "v1", "serviceaccounts", "ServiceAccount", True, "sa"),
    _t("", "v1", "services", "Service", True, "svc", status=True),
    _t("", "v1", "events", "Event", True, "ev"),
    _t("", "v1", "nodes", "Node", False, "no", status=True),
    _t("", "v1", "resourcequotas", "ResourceQuota", True, "quota", status=True),
    _t("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, "pvc", status=True),
    _t("apps", "v1", "deployments", "Deployment", True, "deploy", status=True),
    _t("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    _t("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    _t("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    _t("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    _t("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, "netpol"),
    _t("storage.k8s.io", "v1", "storageclasses", "StorageClass", False, "sc"),
    _t("coordination.k8s.io", "v1", "leases", "Lease", True),
    _t(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        "crd",
        "crds",
        status=True,
    ),
]


def types_from_crd(crd: dict[str, Any]) -> list[ResourceType]:
    """One type per served version of a CustomResourceDefinition."""
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    out = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        out.append(
            ResourceType(
                group=spec.get("group", ""),
                version=version["name"],
                plural=names.get("plural", ""),
                kind=names.get("kind", ""),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=tuple(names.get("shortNames", [])),
                has_status="status" in (version.get("subresources") or {}),
                schema=schema,
                printer_columns=tuple(version.get("additionalPrinterColumns", [])),
            )
        )
    return out


def api_resource_list(group_version: str, types: list[ResourceType]) -> dict[str, Any]:
    resources: list[dict[str, Any]] = []
    for t in types:
        resources.append(
            {
                "name": t.plural,
                "singularName": t.singular,
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": VERBS,
                "shortNames": list(t.short_names),
            }
        )
        if t.has_status:
            resources.append(
                {
                    "name": f"{t.plural}/status",
                    "singularName": "",
                    "namespaced": t.namespaced,
                    "kind": t.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def api_group_list(types: list[ResourceType]) -> dict[str, Any]:
    versions: dict[str, list[str]] = {}
    for t in types:
        if t.group and t.version not in versions.setdefault(t.group, []):
            versions[t.group].append(t.version)
    groups = []
    for group, vs in versions.items():
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in vs]
        groups.append({"name": group, "versions": entries, "preferredVersion": entries[0]})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
