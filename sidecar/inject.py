"""`sidecar inject`: add the resilience sidecar to Kubernetes workloads.

Reads Kubernetes YAML (a file or stdin, any number of documents) and writes it back with the
sidecar added to the pod template of every Deployment, StatefulSet and Job: as a native sidecar
(an init container with `restartPolicy: Always`, Kubernetes >= 1.29) by default, or with
`--legacy` as a plain second container. The policy ConfigMap is mounted as a directory (never
`subPath`, so hot reload sees ConfigMap updates), the state and tmp volumes are added, the pod's
termination grace period is raised to fit the sidecar's drain, and with `--retarget-services` the
Services that select an injected workload send their model port to the sidecar instead. With
`--policy-dir` the policy ConfigMap itself is written too, from a folder like the repository's
`policies/`: a ConfigMap is flat, so `schemas/x.json` becomes the key `schemas.x.json` and the
volume's `items` put it back at `schemas/x.json`, where the policies refer to it.

Injecting twice changes nothing. Documents of other kinds pass through unchanged (comments are
not kept: the output is re-serialised). Workload kinds it cannot handle (Pod, DaemonSet,
CronJob, ...) are errors, and so is `--legacy` for a Job, whose plain sidecar container would keep
it from ever completing. On any error nothing is written.

The container added here is the one in deploy/k8s/base; tests/deploy keeps the two equal.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import yaml

from sidecar import __version__

__all__ = [
    "InjectError",
    "InjectOptions",
    "InjectResult",
    "add_arguments",
    "inject_documents",
    "main",
    "policy_key",
    "read_policy_dir",
    "run",
    "sidecar_container",
]

CONTAINER_NAME = "sidecar"
PROXY_PORT = 8700
ADMIN_PORT = 8701
PROXY_PORT_NAME = "sidecar-http"
ADMIN_PORT_NAME = "sidecar-admin"
POLICY_DIR = "/etc/sidecar/policies"
STATE_DIR = "/var/lib/sidecar"
SIDECAR_UID = 10001
DEFAULT_MODEL_PORT = 8080
DRAIN_GRACE_SECONDS = 20
#: The model's preStop sleep in the base manifest, plus the drain grace, plus the model's own
#: shutdown time: what terminationGracePeriodSeconds must cover.
TERMINATION_GRACE_SECONDS = 45
POLICY_VOLUME = "sidecar-policies"
STATE_VOLUME = "sidecar-state"
TMP_VOLUME = "sidecar-tmp"
DEFAULT_IMAGE = f"ai-resilience-sidecar:{__version__}"

#: kind -> apiVersions whose pod template lives at spec.template.spec.
_SUPPORTED: dict[str, frozenset[str]] = {
    "Deployment": frozenset({"apps/v1"}),
    "StatefulSet": frozenset({"apps/v1"}),
    "Job": frozenset({"batch/v1"}),
}
#: Kinds that carry pods but are not supported, each with what to do instead.
_UNSUPPORTED: dict[str, str] = {
    "Pod": "wrap it in a Deployment or Job, or add the sidecar by hand (see deploy/k8s/base)",
    "DaemonSet": "a node-local model server needs a hand-written sidecar (see deploy/k8s/base)",
    "ReplicaSet": "manage it through a Deployment and inject that",
    "ReplicationController": "migrate it to a Deployment and inject that",
    "CronJob": "inject the Job it runs, or add the sidecar to jobTemplate by hand",
    "PodTemplate": "add the sidecar by hand (see deploy/k8s/base)",
}
_LIST_KINDS = frozenset({"List"})
_KEY = re.compile(r"[-._a-zA-Z0-9]+")


class InjectError(Exception):
    """The input cannot be injected; the message says which document and why."""


@dataclass(frozen=True)
class InjectOptions:
    """What to inject and how; the defaults produce the base manifest's sidecar."""

    image: str = DEFAULT_IMAGE
    legacy: bool = False
    policy_configmap: str = POLICY_VOLUME
    policy_file: str = "default.yaml"
    model_port: int | None = None
    state_claim: str | None = None
    tokens_secret: str = "sidecar-tokens"
    otlp_endpoint: str | None = None
    retarget_services: bool = False
    #: (relative path, content) of every policy file, from `--policy-dir`: the volume lists
    #: them as items and a ConfigMap with them is written. Empty: mount the whole ConfigMap.
    policy_files: tuple[tuple[str, str], ...] = ()


@dataclass
class InjectResult:
    documents: list[Any]
    #: Human-readable notes about what was done or should be checked (written to stderr).
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Workload:
    """An injected (or already injected) pod template, for matching Services to it."""

    namespace: str | None
    labels: dict[str, Any]
    model_port: int
    model_port_names: frozenset[str]


# --- the container --------------------------------------------------------------------------


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {
        "name": name,
        "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}},
    }


def _probe(path: str, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": ADMIN_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def sidecar_container(
    options: InjectOptions, *, model_port: int, service_name: str
) -> dict[str, Any]:
    """The sidecar container spec: restricted security context, probes on the admin port."""
    env = [
        _env("SIDECAR_POLICY", f"{POLICY_DIR}/{options.policy_file}"),
        _env("SIDECAR_UPSTREAM_URL", f"http://127.0.0.1:{model_port}"),
        _env("SIDECAR_HOST", "0.0.0.0"),
        _env("SIDECAR_PORT", str(PROXY_PORT)),
        _env("SIDECAR_ADMIN_HOST", "0.0.0.0"),
        _env("SIDECAR_ADMIN_PORT", str(ADMIN_PORT)),
        _env("SIDECAR_STATE_DIR", STATE_DIR),
        _env("SIDECAR_LOG_FORMAT", "json"),
        # Native: the sidecar is stopped after the model, nothing new arrives, drain at once.
        # Legacy: both stop together, so keep accepting while the endpoint removal spreads.
        _env("SIDECAR_DRAIN_DELAY", "5s" if options.legacy else "0s"),
        _env("SIDECAR_DRAIN_GRACE", f"{DRAIN_GRACE_SECONDS}s"),
        _env("OTEL_SERVICE_NAME", f"{service_name}-sidecar"),
        _secret_env("SIDECAR_ADMIN_TOKEN", options.tokens_secret, "admin-token"),
        _secret_env("SIDECAR_REVIEWER_TOKEN", options.tokens_secret, "reviewer-token"),
        _secret_env("SIDECAR_APP_TOKEN", options.tokens_secret, "app-token"),
    ]
    if options.otlp_endpoint:
        env.append(_env("OTEL_EXPORTER_OTLP_ENDPOINT", options.otlp_endpoint))
    container: dict[str, Any] = {"name": CONTAINER_NAME, "image": options.image}
    container["imagePullPolicy"] = "IfNotPresent"
    if not options.legacy:
        container["restartPolicy"] = "Always"
    container |= {
        "command": ["sidecar", "run"],
        "env": env,
        "ports": [
            {"name": PROXY_PORT_NAME, "containerPort": PROXY_PORT, "protocol": "TCP"},
            {"name": ADMIN_PORT_NAME, "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        # The startup probe gates the model's start (native), so it must not depend on the
        # model: /healthz does not; /readyz says a policy is loaded and the sidecar not draining.
        "startupProbe": _probe("/healthz", period=1, timeout=2, failures=30),
        "readinessProbe": _probe("/readyz", period=5, timeout=2, failures=2),
        "livenessProbe": _probe("/healthz", period=10, timeout=3, failures=3),
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": True},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
    }
    return container


def policy_key(path: str) -> str:
    """The ConfigMap key of a policy file: its relative path with folders joined by dots."""
    return path.replace("/", ".")


def read_policy_dir(directory: Path) -> tuple[tuple[str, str], ...]:
    """(relative path, content) of every file under `directory`, sorted; checked as keys."""
    if not directory.is_dir():
        raise InjectError(f"--policy-dir {directory}: not a directory")
    files: list[tuple[str, str]] = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        key = policy_key(rel)
        if not _KEY.fullmatch(key) or len(key) > 253:
            raise InjectError(f"{path}: {key!r} is not a valid ConfigMap key")
        try:
            files.append((rel, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise InjectError(f"{path}: cannot read it as UTF-8 text: {exc}") from None
    if len({policy_key(rel) for rel, _ in files}) != len(files):
        raise InjectError(f"--policy-dir {directory}: two files map to the same ConfigMap key")
    if not files:
        raise InjectError(f"--policy-dir {directory}: no files")
    return tuple(files)


def _policy_volume(options: InjectOptions) -> dict[str, Any]:
    source: dict[str, Any] = {"name": options.policy_configmap}
    if options.policy_files:
        source["items"] = [{"key": policy_key(rel), "path": rel} for rel, _ in options.policy_files]
    return {"name": POLICY_VOLUME, "configMap": source}


def _volumes(options: InjectOptions) -> list[dict[str, Any]]:
    state: dict[str, Any] = {"name": STATE_VOLUME}
    if options.state_claim:
        state["persistentVolumeClaim"] = {"claimName": options.state_claim}
    else:
        state["emptyDir"] = {"sizeLimit": "256Mi"}
    return [
        _policy_volume(options),
        state,
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}},
    ]


# --- walking the documents ------------------------------------------------------------------


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InjectError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(parent: dict[str, Any], key: str, where: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectError(f"{where}.{key}: expected a list, got {type(value).__name__}")
    return value


def _describe(doc: dict[str, Any], index: int) -> str:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name", "<unnamed>") if meta else "<unnamed>"
    return f"document {index + 1} ({doc.get('kind')} {name})"


def _iter_objects(docs: list[Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every Kubernetes object with its document index, looking inside `kind: List`."""
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
            raise InjectError(f"document {index + 1}: not a Kubernetes object (no `kind`)")
        if doc["kind"] in _LIST_KINDS:
            for item in _list(doc, "items", f"document {index + 1}"):
                if not isinstance(item, dict) or not isinstance(item.get("kind"), str):
                    raise InjectError(f"document {index + 1}: a List item has no `kind`")
                yield index, item
        else:
            yield index, doc


def _port_number(container: dict[str, Any], name_or_number: Any) -> int | None:
    if isinstance(name_or_number, int):
        return name_or_number
    for port in container.get("ports") or []:
        if isinstance(port, dict) and port.get("name") == name_or_number:
            number = port.get("containerPort")
            return number if isinstance(number, int) else None
    return None


def _model_port(
    containers: list[Any], options: InjectOptions, where: str
) -> tuple[int, frozenset[str]]:
    """The model's port: `--model-port`, else the first TCP port of the first container."""
    port = options.model_port
    if port is None:
        for container in containers:
            for spec in _mapping(container, where).get("ports") or []:
                if isinstance(spec, dict) and spec.get("protocol", "TCP") == "TCP":
                    number = spec.get("containerPort")
                    if isinstance(number, int):
                        port = number
                        break
            if port is not None:
                break
    if port is None:
        port = DEFAULT_MODEL_PORT
    names = frozenset(
        str(spec["name"])
        for container in containers
        for spec in (container.get("ports") or [])
        if isinstance(spec, dict) and spec.get("containerPort") == port and spec.get("name")
    )
    return port, names


def _existing_sidecar(
    init: list[Any], containers: list[Any], legacy: bool, where: str
) -> dict[str, Any] | None:
    """The sidecar already in this pod, if any; an error if it is there in the other mode."""
    native = [c for c in init if isinstance(c, dict) and c.get("name") == CONTAINER_NAME]
    plain = [c for c in containers if isinstance(c, dict) and c.get("name") == CONTAINER_NAME]
    if native and plain:
        raise InjectError(f"{where}: has a container named {CONTAINER_NAME!r} twice")
    if native:
        if legacy:
            raise InjectError(
                f"{where}: already has the sidecar as a native sidecar (init container); "
                "remove it before injecting with --legacy"
            )
        if native[0].get("restartPolicy") != "Always":
            raise InjectError(
                f"{where}: has an init container named {CONTAINER_NAME!r} that is not a native "
                "sidecar (restartPolicy: Always); rename or remove it"
            )
        return native[0]
    if plain:
        if not legacy:
            raise InjectError(
                f"{where}: already has the sidecar as a plain container (legacy); remove it "
                "before injecting a native sidecar, or pass --legacy"
            )
        return plain[0]
    return None


def _upstream_port_of(sidecar: dict[str, Any]) -> int | None:
    for entry in sidecar.get("env") or []:
        if isinstance(entry, dict) and entry.get("name") == "SIDECAR_UPSTREAM_URL":
            try:
                return urlsplit(str(entry.get("value", ""))).port
            except ValueError:
                return None
    return None


def _check_conflicts(pod: dict[str, Any], where: str) -> None:
    if pod.get("hostNetwork"):
        raise InjectError(
            f"{where}: uses hostNetwork; the sidecar would listen on the node's interfaces. "
            "Not supported"
        )
    taken_ports = {PROXY_PORT, ADMIN_PORT}
    taken_names = {PROXY_PORT_NAME, ADMIN_PORT_NAME}
    for key in ("initContainers", "containers"):
        for container in _list(pod, key, where):
            cname = _mapping(container, f"{where}.{key}").get("name")
            for port in container.get("ports") or []:
                if not isinstance(port, dict):
                    continue
                if port.get("containerPort") in taken_ports or port.get("name") in taken_names:
                    raise InjectError(
                        f"{where}: container {cname!r} uses port {port.get('containerPort')} "
                        f"({port.get('name')}), which the sidecar needs "
                        f"({PROXY_PORT_NAME} {PROXY_PORT}, {ADMIN_PORT_NAME} {ADMIN_PORT})"
                    )
    wanted = {POLICY_VOLUME, STATE_VOLUME, TMP_VOLUME}
    for volume in _list(pod, "volumes", where):
        if isinstance(volume, dict) and volume.get("name") in wanted:
            raise InjectError(
                f"{where}: already has a volume named {volume.get('name')!r}, which the sidecar "
                "needs; rename it"
            )


def _inject_workload(
    obj: dict[str, Any], index: int, options: InjectOptions, notes: list[str]
) -> _Workload:
    where = _describe(obj, index)
    kind = obj["kind"]
    if obj.get("apiVersion") not in _SUPPORTED[kind]:
        raise InjectError(
            f"{where}: apiVersion {obj.get('apiVersion')!r} is not supported for {kind} "
            f"(use {', '.join(sorted(_SUPPORTED[kind]))})"
        )
    if kind == "Job" and options.legacy:
        raise InjectError(
            f"{where}: --legacy cannot be used for a Job: a plain sidecar container never exits, "
            "so the Job would never complete. Use the native sidecar (Kubernetes >= 1.29)"
        )
    spec = _mapping(obj.get("spec"), f"{where}.spec")
    template = _mapping(spec.get("template"), f"{where}.spec.template")
    pod = _mapping(template.get("spec"), f"{where}.spec.template.spec")
    meta = template.get("metadata") or {}
    labels = _mapping(meta.get("labels") or {}, f"{where}.spec.template.metadata.labels")
    namespace = (obj.get("metadata") or {}).get("namespace")
    init = _list(pod, "initContainers", where)
    containers = _list(pod, "containers", where)
    if not containers:
        raise InjectError(f"{where}: the pod template has no containers")

    existing = _existing_sidecar(init, containers, options.legacy, where)
    if existing is not None:
        app = [c for c in containers if c is not existing]
        port = _upstream_port_of(existing) or _model_port(app, options, where)[0]
        names = frozenset(
            str(p["name"])
            for c in app
            for p in (c.get("ports") or [])
            if isinstance(p, dict) and p.get("containerPort") == port and p.get("name")
        )
        if options.policy_files:
            for volume in _list(pod, "volumes", where):
                if isinstance(volume, dict) and volume.get("name") == POLICY_VOLUME:
                    volume.update(_policy_volume(options))
        notes.append(f"{where}: already has the sidecar; left unchanged")
        return _Workload(namespace, labels, port, names)

    _check_conflicts(pod, where)
    port, names = _model_port(containers, options, where)
    name = str((obj.get("metadata") or {}).get("name") or "model")
    container = sidecar_container(options, model_port=port, service_name=name)
    if options.legacy:
        pod["containers"] = [*containers, container]
    else:
        pod["initContainers"] = [*init, container]
    pod["volumes"] = [*_list(pod, "volumes", where), *_volumes(options)]

    grace = pod.get("terminationGracePeriodSeconds")
    if not isinstance(grace, int) or grace < TERMINATION_GRACE_SECONDS:
        pod["terminationGracePeriodSeconds"] = TERMINATION_GRACE_SECONDS
    if options.state_claim:
        security = pod.setdefault("securityContext", {})
        if isinstance(security, dict) and "fsGroup" not in security:
            # The sidecar (UID 10001) must be able to write to the claim.
            security["fsGroup"] = SIDECAR_UID
    else:
        notes.append(
            f"{where}: the sidecar's state is on an emptyDir; queued reviews are lost when the "
            "pod goes. Pass --state-claim NAME, or use SIDECAR_DATABASE_URL for a shared queue"
        )
    for c in containers:
        if not ((c.get("lifecycle") or {}).get("preStop")):
            notes.append(
                f"{where}: container {c.get('name')!r} has no preStop hook; a short sleep there "
                "lets the endpoint be removed before the model stops (see deploy/k8s/base)"
            )
    notes.append(f"{where}: sidecar injected ({'legacy' if options.legacy else 'native'})")
    return _Workload(namespace, labels, port, names)


def _retarget(
    service: dict[str, Any], index: int, workloads: list[_Workload], notes: list[str]
) -> None:
    where = _describe(service, index)
    spec = service.get("spec")
    if not isinstance(spec, dict):
        return
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not selector:
        return
    namespace = (service.get("metadata") or {}).get("namespace")
    for workload in workloads:
        if workload.namespace != namespace:
            continue
        if any(workload.labels.get(k) != v for k, v in selector.items()):
            continue
        for port in spec.get("ports") or []:
            if not isinstance(port, dict):
                continue
            target = port.get("targetPort", port.get("port"))
            if target == workload.model_port or target in workload.model_port_names:
                port["targetPort"] = PROXY_PORT_NAME
                notes.append(
                    f"{where}: port {port.get('name') or port.get('port')} now targets "
                    f"{PROXY_PORT_NAME} (was {target})"
                )


def inject_documents(docs: list[Any], options: InjectOptions) -> InjectResult:
    """Inject into every supported workload in `docs` (modified in place and returned)."""
    notes: list[str] = []
    workloads: list[_Workload] = []
    services: list[tuple[int, dict[str, Any]]] = []
    for index, obj in _iter_objects(docs):
        kind = obj["kind"]
        if kind in _SUPPORTED:
            workloads.append(_inject_workload(obj, index, options, notes))
        elif kind in _UNSUPPORTED:
            raise InjectError(
                f"{_describe(obj, index)}: kind {kind} is not supported (supported: "
                f"{', '.join(_SUPPORTED)}); {_UNSUPPORTED[kind]}"
            )
        elif kind == "Service" and obj.get("apiVersion") == "v1":
            services.append((index, obj))
    if not workloads:
        notes.append("no Deployment, StatefulSet or Job found; nothing injected")
    if options.retarget_services:
        for index, service in services:
            _retarget(service, index, workloads, notes)
    out = [d for d in docs if d is not None]
    if options.policy_files:
        out += _policy_configmaps(docs, workloads, options, notes)
    return InjectResult(out, notes)


def _policy_configmaps(
    docs: list[Any], workloads: list[_Workload], options: InjectOptions, notes: list[str]
) -> list[dict[str, Any]]:
    """Fill the policy ConfigMap in each namespace with workloads; return the ones to add."""
    data = {policy_key(rel): content for rel, content in options.policy_files}
    existing: dict[str | None, dict[str, Any]] = {}
    for _, obj in _iter_objects(docs):
        meta = obj.get("metadata") or {}
        if obj["kind"] == "ConfigMap" and meta.get("name") == options.policy_configmap:
            existing[meta.get("namespace")] = obj
    added: list[dict[str, Any]] = []
    for namespace in dict.fromkeys(w.namespace for w in workloads):
        configmap = existing.get(namespace)
        if configmap is None:
            metadata: dict[str, Any] = {"name": options.policy_configmap}
            if namespace is not None:
                metadata["namespace"] = namespace
            metadata["labels"] = {"app.kubernetes.io/part-of": "ai-resilience-sidecar"}
            configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}
            added.append(configmap)
            existing[namespace] = configmap
        configmap["data"] = dict(data)
        configmap.pop("binaryData", None)
        notes.append(
            f"ConfigMap {options.policy_configmap}"
            f"{f' in {namespace}' if namespace else ''}: {len(data)} policy files"
        )
    return added


# --- YAML in and out ------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks (ConfigMap data stays readable)."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def load_documents(stream: TextIO | str) -> list[Any]:
    try:
        return list(yaml.safe_load_all(stream))
    except yaml.YAMLError as exc:
        raise InjectError(f"invalid YAML: {exc}") from None


def dump_documents(docs: Sequence[Any]) -> str:
    return yaml.dump_all(
        docs,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=2**31 - 1,
        explicit_start=len(docs) > 1,
    )


# --- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `sidecar inject` arguments."""
    parser.description = (
        "Add the resilience sidecar to the Deployments, StatefulSets and Jobs in Kubernetes "
        "YAML. Idempotent; other documents pass through (comments are not kept)."
    )
    parser.add_argument(
        "file", nargs="?", default="-", help="Kubernetes YAML to read (default: stdin)"
    )
    parser.add_argument("-o", "--output", help="write here instead of stdout")
    parser.add_argument(
        "--legacy",
        action="store_true",
        help="add a plain second container instead of a native sidecar (clusters < 1.29)",
    )
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"default {DEFAULT_IMAGE}")
    parser.add_argument(
        "--policy-configmap",
        default=POLICY_VOLUME,
        help=f"ConfigMap with the policy files, mounted at {POLICY_DIR} (default %(default)s)",
    )
    parser.add_argument(
        "--policy", default="default.yaml", help="policy file name in it (default %(default)s)"
    )
    parser.add_argument(
        "--policy-dir",
        metavar="DIR",
        help="also write the policy ConfigMap from this folder (e.g. policies/) and mount "
        "every file in it, folders included",
    )
    parser.add_argument(
        "--model-port",
        type=int,
        help="the model's port on loopback (default: the first container's first TCP port, "
        f"else {DEFAULT_MODEL_PORT})",
    )
    parser.add_argument(
        "--state-claim",
        metavar="PVC",
        help="PersistentVolumeClaim for the sidecar's state (default: an emptyDir, which loses "
        "queued reviews when the pod goes)",
    )
    parser.add_argument(
        "--tokens-secret",
        default="sidecar-tokens",
        help="Secret with admin-token, reviewer-token, app-token (optional; default %(default)s)",
    )
    parser.add_argument("--otlp-endpoint", help="set OTEL_EXPORTER_OTLP_ENDPOINT for traces")
    parser.add_argument(
        "--retarget-services",
        action="store_true",
        help="point Services that select an injected workload at the sidecar's port instead of "
        "the model's",
    )


def _options(args: argparse.Namespace) -> InjectOptions:
    files = read_policy_dir(Path(args.policy_dir)) if args.policy_dir else ()
    if files and args.policy not in {rel for rel, _ in files}:
        raise InjectError(f"--policy {args.policy}: not in --policy-dir {args.policy_dir}")
    return InjectOptions(
        image=args.image,
        legacy=args.legacy,
        policy_configmap=args.policy_configmap,
        policy_file=args.policy,
        model_port=args.model_port,
        state_claim=args.state_claim,
        tokens_secret=args.tokens_secret,
        otlp_endpoint=args.otlp_endpoint,
        retarget_services=args.retarget_services,
        policy_files=files,
    )


def run(args: argparse.Namespace) -> int:
    """Run `sidecar inject`: 0 on success, 2 when the input cannot be injected."""
    try:
        options = _options(args)
        if args.file == "-":
            docs = load_documents(sys.stdin)
        else:
            with Path(args.file).open(encoding="utf-8") as fh:
                docs = load_documents(fh)
        result = inject_documents(docs, options)
    except (InjectError, OSError) as exc:
        print(f"sidecar inject: {exc}", file=sys.stderr)
        return 2
    text = dump_documents(result.documents)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    for note in result.notes:
        print(f"sidecar inject: {note}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (`python -m sidecar.inject`), the same as `sidecar inject`."""
    parser = argparse.ArgumentParser(prog="sidecar inject")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
