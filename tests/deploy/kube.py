"""Helpers for the deployment tests: render kustomize overlays, validate objects, read pod specs.

Rendering needs `kubectl` (its built-in kustomize renders offline). Without it the tests skip,
except in CI (`CI` set), where a missing tool is a failure: CI must prove the manifests.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = {
    "base": BASE,
    "dev": K8S / "overlays" / "dev",
    "legacy": K8S / "overlays" / "legacy",
    "postgres": K8S / "overlays" / "postgres",
    "production": K8S / "overlays" / "production",
}
SCHEMAS = Path(__file__).resolve().parent / "schemas"

#: Kubernetes versions each overlay is validated against: the oldest it supports (native sidecars
#: are on by default from 1.29; the legacy overlay is for older clusters) and a current one.
K8S_VERSIONS = {
    "base": ("1.29.0", "1.33.0"),
    "dev": ("1.29.0", "1.33.0"),
    "postgres": ("1.29.0", "1.33.0"),
    "production": ("1.29.0", "1.33.0"),
    "legacy": ("1.27.0", "1.33.0"),
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMAS / "prometheusrule-monitoring-v1.json",
}

#: What `sidecar run` serves on its admin listener (sidecar/server/admin.py).
ADMIN_PATHS = {"liveness": "/healthz", "readiness": "/readyz", "metrics": "/metrics"}


def require_tool(name: str, path: str | None) -> str:
    """The tool's path; skip without it, or fail in CI where the check must run."""
    if path:
        return path
    message = f"{name} is not installed"
    if os.environ.get("CI"):
        pytest.fail(f"{message}, and CI must run this check")
    pytest.skip(message)


def kubectl() -> str:
    return require_tool("kubectl (renders the kustomize overlays)", shutil.which("kubectl"))


@functools.cache
def _render(directory: str) -> str:
    proc = subprocess.run(
        [kubectl(), "kustomize", directory],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return proc.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    """The rendered objects of an overlay (a fresh copy each call: tests may modify it)."""
    text = _render(str(OVERLAYS[overlay]))
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o
        for o in objs
        if o.get("kind") == kind and (name is None or o["metadata"].get("name") == name)
    ]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def all_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers") or []
    yield from pod.get("containers") or []


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in all_containers(pod) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}, found {len(found)}"
    return found[0]


def env_values(c: dict[str, Any]) -> dict[str, str]:
    """Plain `value` entries of a container's env (valueFrom entries are left out)."""
    return {e["name"]: e["value"] for e in c.get("env") or [] if "value" in e}


def env_entry(c: dict[str, Any], name: str) -> dict[str, Any] | None:
    for e in c.get("env") or []:
        if e["name"] == name:
            entry: dict[str, Any] = e
            return entry
    return None


def resolve_port(c: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number, or a name of one of the container's ports)."""
    if isinstance(port, int):
        return port
    for p in c.get("ports") or []:
        if p.get("name") == port:
            number: int = p["containerPort"]
            return number
    raise AssertionError(f"container {c['name']!r} has no port named {port!r}")


def pod_port(pod: dict[str, Any], port: int | str) -> tuple[dict[str, Any], int]:
    """The container that owns a (named or numbered) port in the pod, and the number."""
    for c in all_containers(pod):
        for p in c.get("ports") or []:
            if port in (p.get("name"), p.get("containerPort")):
                return c, p["containerPort"]
    raise AssertionError(f"no container in the pod declares port {port!r}")


def parse_seconds(text: str) -> float:
    """`20s`, `500ms`, `1m` (the sidecar's duration format) in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    raise AssertionError(f"not a duration: {text!r}")


def validate_object(obj: dict[str, Any], k8s_version: str) -> None:
    """Strict schema validation: built-in kinds with kubernetes-validate, CRDs with ours."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        import jsonschema

        schema = json.loads(CRD_SCHEMAS[key].read_text())
        jsonschema.Draft202012Validator(schema).validate(obj)
        return
    try:
        import kubernetes_validate
    except ImportError:
        require_tool("kubernetes-validate (the `test` extra)", None)
        raise
    kubernetes_validate.validate(obj, k8s_version, strict=True)


# --- Pod Security Standards, restricted profile (v1.29+) ----------------------------------

_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every way `pod` breaks the restricted Pod Security Standard (empty: it complies).

    The rules of https://kubernetes.io/docs/concepts/security/pod-security-standards/, baseline
    and restricted, as the admission controller applies them to a pod spec.
    """
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key} is true")
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']!r} has a type not allowed: {sorted(kinds)}")
    for s in psc.get("sysctls") or []:
        if s.get("name") not in _SAFE_SYSCTLS:
            out.append(f"unsafe sysctl {s.get('name')}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser is 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"pod seccompProfile is {pod_seccomp}")
    pod_selinux = psc.get("seLinuxOptions") or {}
    if pod_selinux.get("user") or pod_selinux.get("role"):
        out.append("pod seLinuxOptions sets user or role")
    for c in all_containers(pod):
        name = c["name"]
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        run_as_non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if run_as_non_root is not True:
            out.append(f"{name}: runAsNonRoot is not true (container or pod)")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is {seccomp} (container or pod)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {caps.get('add')}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount {sc.get('procMount')}")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("user") or selinux.get("role"):
            out.append(f"{name}: seLinuxOptions sets user or role")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(f"{name}: hostPort {p['hostPort']}")
    return out
