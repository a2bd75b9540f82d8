"""What kube-apiserver knows of its built-in kinds, as far as the simulator models it: the fields
it keeps (unknown ones are dropped), where it holds resource quantities, how server-side apply
merges its lists, and the defaults it fills in.

Schemas use the CRD dialect (properties, items, x-kubernetes-list-type and -list-map-keys,
x-kubernetes-map-type, x-kubernetes-preserve-unknown-fields) plus `x-kubesim-quantity` on a
value held as a resource.Quantity. They follow the Go types and their `+listType`,
`+listMapKey`, `+mapType` and `+structType` tags in k8s.io/api (core/v1/types.go,
apps/v1/types.go, ...). Where a struct is not spelled out here it is open
(x-kubernetes-preserve-unknown-fields): nothing under it is dropped or merged by key, so the
simulator never loses a field the real server would keep.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

# A struct kubesim does not spell out: kept whole, its keys are fields (kubesim/fields.py).
OPEN: Schema = {
    "type": "object",
    "x-kubernetes-preserve-unknown-fields": True,
    "x-kubesim-struct": True,
}
QUANTITY: Schema = {"x-kubesim-quantity": True}
ATOMIC_MAP: Schema = {"type": "object", "x-kubernetes-map-type": "atomic", **OPEN}
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
# A core/v1 ResourceList: its quantities are rounded up to milli-units (quantity.canonical).
QUANTITY_MAP: Schema = {
    "type": "object",
    "additionalProperties": {"x-kubesim-quantity": "ResourceList"},
}
ATOMIC_LIST: Schema = {"type": "array", "x-kubernetes-list-type": "atomic"}


def _obj(**properties: Schema) -> Schema:
    return {"type": "object", "properties": properties}


def _map_list(item: Schema, *keys: str) -> Schema:
    return {
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": list(keys),
    }


def _set() -> Schema:
    return {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}


def _open(*names: str) -> dict[str, Schema]:
    return dict.fromkeys(names, OPEN)


# k8s.io/apimachinery pkg/apis/meta/v1/types.go, ObjectMeta (ownerReferences: +listType=map,
# +listMapKey=uid; finalizers: +listType=set).
OBJECT_META = _obj(
    name={},
    generateName={},
    namespace={},
    selfLink={},
    uid={},
    resourceVersion={},
    generation={},
    creationTimestamp={},
    deletionTimestamp={},
    deletionGracePeriodSeconds={},
    labels=STRING_MAP,
    annotations=STRING_MAP,
    ownerReferences=_map_list(OPEN, "uid"),
    finalizers=_set(),
    managedFields=ATOMIC_LIST,
)

# core/v1 EnvVarSource: fieldRef (ObjectFieldSelector), resourceFieldRef (ResourceFieldSelector,
# whose divisor is a Quantity), configMapKeyRef and secretKeyRef are all +structType=atomic.
ENV_SOURCE = _obj(
    fieldRef=ATOMIC_MAP,
    resourceFieldRef={
        "type": "object",
        "x-kubernetes-map-type": "atomic",
        "properties": {"containerName": {}, "resource": {}, "divisor": QUANTITY},
    },
    configMapKeyRef=ATOMIC_MAP,
    secretKeyRef=ATOMIC_MAP,
    fileKeyRef=ATOMIC_MAP,
)

# core/v1 ResourceRequirements: limits and requests are ResourceLists (maps of Quantity);
# claims +listType=map +listMapKey=name.
RESOURCES = _obj(limits=QUANTITY_MAP, requests=QUANTITY_MAP, claims=_map_list(OPEN, "name"))

# core/v1 Container. ports: +listType=map +listMapKey=containerPort +listMapKey=protocol
# (protocol has a default, TCP, which completes the key); env: +listType=map +listMapKey=name;
# volumeMounts: +listType=map +listMapKey=mountPath; volumeDevices: +listMapKey=devicePath;
# command, args, envFrom, resizePolicy: atomic.
CONTAINER = _obj(
    name={},
    image={},
    command=ATOMIC_LIST,
    args=ATOMIC_LIST,
    workingDir={},
    ports=_map_list(
        _obj(name={}, hostPort={}, containerPort={}, protocol={"default": "TCP"}, hostIP={}),
        "containerPort",
        "protocol",
    ),
    envFrom=ATOMIC_LIST,
    env=_map_list(_obj(name={}, value={}, valueFrom=ENV_SOURCE), "name"),
    resources=RESOURCES,
    resizePolicy=ATOMIC_LIST,
    restartPolicy={},
    volumeMounts=_map_list(OPEN, "mountPath"),
    volumeDevices=_map_list(OPEN, "devicePath"),
    **_open("livenessProbe", "readinessProbe", "startupProbe", "lifecycle", "securityContext"),
    terminationMessagePath={},
    terminationMessagePolicy={},
    imagePullPolicy={},
    stdin={},
    stdinOnce={},
    tty={},
    restartPolicyRules=ATOMIC_LIST,
    targetContainerName={},
)

# core/v1 PersistentVolumeClaimSpec (resources: VolumeResourceRequirements).
PVC_SPEC = _obj(
    accessModes=ATOMIC_LIST,
    selector=ATOMIC_MAP,
    resources=_obj(limits=QUANTITY_MAP, requests=QUANTITY_MAP),
    volumeName={},
    storageClassName={},
    volumeMode={},
    **_open("dataSource", "dataSourceRef"),
    volumeAttributesClassName={},
)

# core/v1 Volume: one source each; emptyDir.sizeLimit is a Quantity.
VOLUME = {
    "type": "object",
    "properties": {
        "name": {},
        "emptyDir": _obj(medium={}, sizeLimit=QUANTITY),
        "ephemeral": _obj(volumeClaimTemplate=_obj(metadata=OPEN, spec=PVC_SPEC)),
    },
    "x-kubernetes-preserve-unknown-fields": True,
    "x-kubesim-struct": True,
}

# core/v1 PodSpec. volumes, containers, initContainers, ephemeralContainers,
# imagePullSecrets, hostAliases (ip), topologySpreadConstraints (topologyKey,
# whenUnsatisfiable), resourceClaims, schedulingGates: +listType=map; nodeSelector
# +mapType=atomic; tolerations, readinessGates atomic; overhead and resources hold quantities.
POD_SPEC = _obj(
    volumes=_map_list(VOLUME, "name"),
    initContainers=_map_list(CONTAINER, "name"),
    containers=_map_list(CONTAINER, "name"),
    ephemeralContainers=_map_list(CONTAINER, "name"),
    restartPolicy={},
    terminationGracePeriodSeconds={},
    activeDeadlineSeconds={},
    dnsPolicy={},
    nodeSelector=ATOMIC_MAP,
    serviceAccountName={},
    serviceAccount={},
    automountServiceAccountToken={},
    nodeName={},
    hostNetwork={},
    hostPID={},
    hostIPC={},
    shareProcessNamespace={},
    **_open("securityContext", "affinity", "dnsConfig", "os"),
    imagePullSecrets=_map_list(OPEN, "name"),
    hostname={},
    subdomain={},
    schedulerName={},
    tolerations=ATOMIC_LIST,
    hostAliases=_map_list(OPEN, "ip"),
    priorityClassName={},
    priority={},
    readinessGates=ATOMIC_LIST,
    runtimeClassName={},
    enableServiceLinks={},
    preemptionPolicy={},
    overhead=QUANTITY_MAP,
    topologySpreadConstraints=_map_list(OPEN, "topologyKey", "whenUnsatisfiable"),
    setHostnameAsFQDN={},
    hostUsers={},
    schedulingGates=_map_list(OPEN, "name"),
    resourceClaims=_map_list(OPEN, "name"),
    resources=RESOURCES,
    hostnameOverride={},
)

POD_TEMPLATE = _obj(metadata=OBJECT_META, spec=POD_SPEC)
# rbac/v1 RoleRef: +structType=atomic, owned and replaced whole.
ROLE_REF = {
    "type": "object",
    "x-kubernetes-map-type": "atomic",
    **_obj(apiGroup={}, kind={}, name={}),
}

# apps/v1 DeploymentSpec (selector: LabelSelector, +structType=atomic).
DEPLOYMENT_SPEC = _obj(
    replicas={},
    selector=ATOMIC_MAP,
    template=POD_TEMPLATE,
    strategy=OPEN,
    minReadySeconds={},
    revisionHistoryLimit={},
    paused={},
    progressDeadlineSeconds={},
)

# core/v1 ServiceSpec: ports +listType=map +listMapKey=port +listMapKey=protocol;
# selector +mapType=atomic; clusterIPs, ipFamilies atomic.
SERVICE_SPEC = {
    "type": "object",
    "properties": {
        "ports": _map_list(
            _obj(
                name={},
                protocol={"default": "TCP"},
                appProtocol={},
                port={},
                targetPort={},
                nodePort={},
            ),
            "port",
            "protocol",
        ),
        "selector": ATOMIC_MAP,
        "clusterIPs": ATOMIC_LIST,
        "ipFamilies": ATOMIC_LIST,
        "externalIPs": ATOMIC_LIST,
        "loadBalancerSourceRanges": ATOMIC_LIST,
    },
    "x-kubernetes-preserve-unknown-fields": True,
    "x-kubesim-struct": True,
}


def _kind(**top: Schema) -> Schema:
    return _obj(apiVersion={}, kind={}, metadata=OBJECT_META, **top)


# Per kind: the top-level fields of each Go type, and deeper structure where modelled.
SCHEMAS: dict[str, Schema] = {
    "Namespace": _kind(spec=OPEN, status=OPEN),
    "ConfigMap": _kind(data=STRING_MAP, binaryData=STRING_MAP, immutable={}),
    "Secret": _kind(data=STRING_MAP, stringData=STRING_MAP, type={}, immutable={}),
    "ServiceAccount": _kind(
        secrets=_map_list(OPEN, "name"),
        imagePullSecrets=ATOMIC_LIST,
        automountServiceAccountToken={},
    ),
    "Service": _kind(spec=SERVICE_SPEC, status=OPEN),
    "Event": OPEN,
    "Node": _kind(spec=OPEN, status=OPEN),
    # core/v1 ResourceQuotaSpec: scopes +listType=atomic, scopeSelector +structType=atomic.
    "ResourceQuota": _kind(
        spec=_obj(hard=QUANTITY_MAP, scopes=ATOMIC_LIST, scopeSelector=ATOMIC_MAP),
        status=_obj(hard=QUANTITY_MAP, used=QUANTITY_MAP),
    ),
    "PersistentVolumeClaim": _kind(spec=PVC_SPEC, status=OPEN),
    "Deployment": _kind(spec=DEPLOYMENT_SPEC, status=OPEN),
    "ClusterRole": _kind(rules=ATOMIC_LIST, aggregationRule=OPEN),
    "Role": _kind(rules=ATOMIC_LIST),
    "ClusterRoleBinding": _kind(subjects=ATOMIC_LIST, roleRef=ROLE_REF),
    "RoleBinding": _kind(subjects=ATOMIC_LIST, roleRef=ROLE_REF),
    # networking/v1 NetworkPolicySpec: podSelector a LabelSelector (+structType=atomic);
    # ingress, egress, policyTypes +listType=atomic.
    "NetworkPolicy": _kind(
        spec=_obj(
            podSelector=ATOMIC_MAP,
            ingress=ATOMIC_LIST,
            egress=ATOMIC_LIST,
            policyTypes=ATOMIC_LIST,
        )
    ),
    "StorageClass": _kind(
        provisioner={},
        parameters=STRING_MAP,
        reclaimPolicy={},
        mountOptions=ATOMIC_LIST,
        allowVolumeExpansion={},
        volumeBindingMode={},
        allowedTopologies=ATOMIC_LIST,
    ),
    "Lease": _kind(spec=OPEN),
    # apiextensions/v1 CustomResourceDefinitionStatus: conditions +listType=map
    # +listMapKey=type; acceptedNames' shortNames and categories, storedVersions atomic.
    "CustomResourceDefinition": _kind(
        spec=OPEN,
        status=_obj(
            conditions=_map_list(OPEN, "type"),
            acceptedNames=_obj(
                plural={},
                singular={},
                shortNames=ATOMIC_LIST,
                kind={},
                listKind={},
                categories=ATOMIC_LIST,
            ),
            storedVersions=ATOMIC_LIST,
        ),
    ),
}

# The maps and lists each kind's Go zero value holds (struct fields, which are never omitted,
# and slices without omitempty, null): what a create is compared with when its manager's fields
# are worked out (kubesim/fields.py, changed_paths). Kinds not listed have none.
ZERO: dict[str, dict[str, Any]] = {
    "Namespace": {"spec": {}, "status": {}},
    "Service": {"spec": {}, "status": {"loadBalancer": {}}},
    "ResourceQuota": {"spec": {}, "status": {}},
    "PersistentVolumeClaim": {"spec": {"resources": {}}, "status": {}},
    "Deployment": {
        "spec": {
            "selector": None,
            "template": {"metadata": {}, "spec": {"containers": None}},
            "strategy": {},
        },
        "status": {},
    },
    "ClusterRole": {"rules": None},
    "Role": {"rules": None},
    "ClusterRoleBinding": {"roleRef": {}},
    "RoleBinding": {"roleRef": {}},
    "NetworkPolicy": {"spec": {"podSelector": {}}},
    "Lease": {"spec": {}},
    "Node": {"spec": {}, "status": {"daemonEndpoints": {"kubeletEndpoint": {}}, "nodeInfo": {}}},
    "CustomResourceDefinition": {
        "spec": {"names": {}, "versions": None},
        "status": {"acceptedNames": {}, "conditions": None, "storedVersions": None},
    },
}

# The kinds whose registry strategy keeps metadata.generation (PrepareForCreate sets it to 1,
# PrepareForUpdate adds one when the spec changes: pkg/registry/apps/deployment/strategy.go,
# pkg/registry/networking/networkpolicy/strategy.go, apiextensions-apiserver
# pkg/registry/customresourcedefinition/strategy.go); custom resources have it too
# (apiextensions-apiserver pkg/registry/customresource/strategy.go). The others never do.
GENERATION_KINDS = {"Deployment", "NetworkPolicy", "CustomResourceDefinition"}


def zero_fields(kind: str, obj: dict[str, Any]) -> None:
    """What the real server writes out for a field it holds as a Go struct (never omitted,
    even with `omitempty`, when empty): `status: {}` of a Deployment or ResourceQuota that no
    controller has written, a Service's `status.loadBalancer: {}`."""
    if kind in ("Deployment", "ResourceQuota", "Service"):
        status = obj.get("status")
        if not isinstance(status, dict):
            status = obj["status"] = {}
        if kind == "Service":
            status.setdefault("loadBalancer", {})


def strip_zero_fields(kind: str, obj: dict[str, Any]) -> None:
    """The inverse of zero_fields, for what is stored."""
    if kind in ("Deployment", "ResourceQuota", "Service"):
        status = obj.get("status")
        if isinstance(status, dict) and status.get("loadBalancer") == {} and kind == "Service":
            del status["loadBalancer"]
        if status == {}:
            del obj["status"]


# -- defaults ---------------------------------------------------------------------------------


def set_defaults(kind: str, obj: dict[str, Any]) -> None:
    """Fill in what the server's defaulting functions would (pkg/apis/<group>/v1/defaults.go)."""
    if kind == "Deployment":
        _deployment(obj.setdefault("spec", {}))
    elif kind == "Service":
        _service(obj.setdefault("spec", {}))
    elif kind == "Namespace":
        # core/v1 defaults.go, SetDefaults_Namespace.
        labels = obj.setdefault("metadata", {}).setdefault("labels", {})
        labels["kubernetes.io/metadata.name"] = obj["metadata"].get("name", "")
    elif kind == "Secret":
        obj.setdefault("type", "Opaque")  # core/v1 defaults.go, SetDefaults_Secret
    elif kind == "CustomResourceDefinition":
        _crd(obj.setdefault("spec", {}))
    elif kind == "PersistentVolumeClaim":
        # core/v1 defaults.go, SetDefaults_PersistentVolumeClaimSpec
        obj.setdefault("spec", {}).setdefault("volumeMode", "Filesystem")


def _crd(spec: dict[str, Any]) -> None:
    # apiextensions-apiserver pkg/apis/apiextensions/v1/defaults.go,
    # SetDefaults_CustomResourceDefinitionSpec: singular and listKind from kind, conversion
    # None.
    names = spec.get("names")
    if isinstance(names, dict) and names.get("kind"):
        if not names.get("singular"):
            names["singular"] = str(names["kind"]).lower()
        if not names.get("listKind"):
            names["listKind"] = f"{names['kind']}List"
    if spec.get("conversion") is None:
        spec["conversion"] = {"strategy": "None"}


def _deployment(spec: dict[str, Any]) -> None:
    # apps/v1 defaults.go, SetDefaults_Deployment.
    spec.setdefault("replicas", 1)
    strategy = spec.setdefault("strategy", {})
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        rolling = strategy.setdefault("rollingUpdate", {})
        rolling.setdefault("maxUnavailable", "25%")
        rolling.setdefault("maxSurge", "25%")
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    template = spec.get("template")
    if isinstance(template, dict):
        _pod_spec(template.setdefault("spec", {}))


def _pod_spec(spec: dict[str, Any]) -> None:
    # core/v1 defaults.go, SetDefaults_PodSpec.
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    # core/v1 conversion.go, Convert_core_PodSpec_To_v1_PodSpec: the deprecated
    # serviceAccount field is written with serviceAccountName's value.
    if spec.get("serviceAccountName"):
        spec["serviceAccount"] = spec["serviceAccountName"]
    for volume in spec.get("volumes") or []:
        _volume(volume)
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or []:
            _container(container)


def _volume(volume: dict[str, Any]) -> None:
    # SetDefaults_Volume (no source: emptyDir), SetDefaults_SecretVolumeSource and
    # SetDefaults_ConfigMapVolumeSource (defaultMode 0644).
    if set(volume) <= {"name"}:
        volume["emptyDir"] = {}
    for source in ("secret", "configMap"):
        if isinstance(volume.get(source), dict):
            volume[source].setdefault("defaultMode", 0o644)


def _container(container: dict[str, Any]) -> None:
    # SetDefaults_Container: Always when parsers.ParseImageName finds the tag `latest`, or
    # neither tag nor digest; an empty image gets IfNotPresent.
    image = str(container.get("image", ""))
    if "imagePullPolicy" not in container:
        name, _, digest = image.partition("@")
        last = name.rpartition("/")[2]
        tag = last.partition(":")[2]
        always = bool(image) and (tag == "latest" or (not tag and not digest))
        container["imagePullPolicy"] = "Always" if always else "IfNotPresent"
    # ResourceRequirements is a struct, never omitted: `resources: {}`.
    container.setdefault("resources", {})
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    for port in container.get("ports") or []:
        # SetDefaults_ContainerPort. No hostPort in a pod template: SetDefaults_PodSpec
        # copies it from containerPort with hostNetwork only under the feature gate
        # DefaultHostNetworkHostPortsInPodTemplates, off since 1.28 (SetDefaults_Pod still
        # does it for Pods, which kubesim does not serve).
        port.setdefault("protocol", "TCP")
    for env in container.get("env") or []:
        field_ref = (env.get("valueFrom") or {}).get("fieldRef")
        if isinstance(field_ref, dict):
            field_ref.setdefault("apiVersion", "v1")  # SetDefaults_ObjectFieldSelector
        resource_ref = (env.get("valueFrom") or {}).get("resourceFieldRef")
        if isinstance(resource_ref, dict):
            # ResourceFieldSelector.divisor is a resource.Quantity, not a pointer: written
            # out as "0" when unset.
            resource_ref.setdefault("divisor", "0")
    for probe_key in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container.get(probe_key)
        if isinstance(probe, dict):
            # SetDefaults_Probe, SetDefaults_HTTPGetAction.
            for key, value in (
                ("timeoutSeconds", 1),
                ("periodSeconds", 10),
                ("successThreshold", 1),
                ("failureThreshold", 3),
            ):
                probe.setdefault(key, value)
            if isinstance(probe.get("httpGet"), dict):
                probe["httpGet"].setdefault("path", "/")
                probe["httpGet"].setdefault("scheme", "HTTP")


def _service(spec: dict[str, Any]) -> None:
    # core/v1 defaults.go, SetDefaults_Service (cluster IP allocation is not modelled).
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("type", "ClusterIP")
    if spec["type"] in ("ClusterIP", "NodePort", "LoadBalancer"):
        spec.setdefault("internalTrafficPolicy", "Cluster")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        if port.get("targetPort") in (None, 0, ""):
            port["targetPort"] = port.get("port")
