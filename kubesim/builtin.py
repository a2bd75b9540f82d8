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

OPEN: Schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
QUANTITY: Schema = {"x-kubesim-quantity": True}
ATOMIC_MAP: Schema = {"type": "object", "x-kubernetes-map-type": "atomic", **OPEN}
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY_MAP: Schema = {"type": "object", "additionalProperties": QUANTITY}
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
    env=_map_list(_obj(name={}, value={}, valueFrom=OPEN), "name"),
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
ROLE_REF = _obj(apiGroup={}, kind={}, name={})

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
    "ResourceQuota": _kind(
        spec={
            "type": "object",
            "properties": {"hard": QUANTITY_MAP},
            "x-kubernetes-preserve-unknown-fields": True,
        },
        status=_obj(hard=QUANTITY_MAP, used=QUANTITY_MAP),
    ),
    "PersistentVolumeClaim": _kind(spec=PVC_SPEC, status=OPEN),
    "Deployment": _kind(spec=DEPLOYMENT_SPEC, status=OPEN),
    "ClusterRole": _kind(rules=ATOMIC_LIST, aggregationRule=OPEN),
    "Role": _kind(rules=ATOMIC_LIST),
    # rbac/v1 RoleRef has no +structType=atomic: its fields are owned one by one.
    "ClusterRoleBinding": _kind(subjects=ATOMIC_LIST, roleRef=ROLE_REF),
    "RoleBinding": _kind(subjects=ATOMIC_LIST, roleRef=ROLE_REF),
    "NetworkPolicy": _kind(spec=OPEN),
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
    "CustomResourceDefinition": _kind(spec=OPEN, status=OPEN),
}


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
    elif kind == "PersistentVolumeClaim":
        # core/v1 defaults.go, SetDefaults_PersistentVolumeClaimSpec
        obj.setdefault("spec", {}).setdefault("volumeMode", "Filesystem")


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
