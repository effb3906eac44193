"""Run the pod of the rendered base manifest on loopback, exactly as written, and send a request
through it.

The model and the sidecar are started with the `command`, `args` and `env` of their containers in
`kubectl kustomize deploy/k8s/base`. Only what cannot exist outside a pod is translated, each by
one rule: `sidecar` is this checkout's `python -m sidecar`; 0.0.0.0 becomes 127.0.0.1; each
containerPort becomes a free loopback port (in arguments, env values and URLs); each volume mount
becomes a temporary folder, the policy ConfigMap's filled from the rendered ConfigMap through the
volume's items, exactly as the kubelet would; a secretKeyRef marked optional is left unset, as it
is in a cluster without that Secret. Anything else in the manifest (fieldRef, a required Secret,
a new kind of volume) fails the test, so the manifest cannot drift from what runs here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.kube import REPO, container, one, pod_port, pod_spec, render
from tests.deploy.test_monitoring import METRICS
from tests.support.processes import RunningProcess, sidecar_cmd, start_process

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Pod:
    """The rendered pod's names and numbers, mapped to this machine."""

    def __init__(self, tmp_path: Path) -> None:
        objs = render("base")
        self.objs = objs
        self.deployment = one(objs, "Deployment", "model-server")
        self.spec = pod_spec(self.deployment)
        self.ports: dict[int, int] = {}
        for c in [*(self.spec.get("initContainers") or []), *self.spec["containers"]]:
            for p in c.get("ports") or []:
                self.ports[p["containerPort"]] = free_port()
        self.volumes: dict[str, Path] = {}
        for volume in self.spec["volumes"]:
            path = tmp_path / "volumes" / volume["name"]
            path.mkdir(parents=True)
            if "configMap" in volume:
                configmap = one(objs, "ConfigMap", volume["configMap"]["name"])
                items = volume["configMap"].get("items") or [
                    {"key": k, "path": k} for k in configmap["data"]
                ]
                for item in items:
                    target = path / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(configmap["data"][item["key"]])
            elif not ({"emptyDir", "persistentVolumeClaim"} & set(volume)):
                pytest.fail(f"volume {volume['name']}: no local translation for {volume}")
            self.volumes[volume["name"]] = path

    def mounts(self, c: dict[str, Any]) -> dict[str, Path]:
        return {m["mountPath"]: self.volumes[m["name"]] for m in c.get("volumeMounts") or []}

    def translate(self, c: dict[str, Any], value: str) -> str:
        """One string of the manifest, as it must read on this machine."""
        if value == "0.0.0.0":
            return "127.0.0.1"
        if value.isdigit() and int(value) in self.ports:
            return str(self.ports[int(value)])
        for mount_path, local in sorted(self.mounts(c).items(), key=lambda kv: -len(kv[0])):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(local) + value[len(mount_path) :]

        def url_port(m: re.Match[str]) -> str:
            port = int(m.group(2))
            return f"{m.group(1)}:{self.ports.get(port, port)}"

        return re.sub(r"(//(?:127\.0\.0\.1|localhost))\:(\d+)", url_port, value)

    def argv(self, c: dict[str, Any]) -> list[str]:
        command = [*(c.get("command") or []), *(c.get("args") or [])]
        assert command and command[0] == "sidecar", f"{c['name']}: runs {command}"
        return sidecar_cmd(*[self.translate(c, a) for a in command[1:]])

    def env(self, c: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for entry in c.get("env") or []:
            if "value" in entry:
                env[entry["name"]] = self.translate(c, str(entry["value"]))
                continue
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if ref and ref.get("optional") is True:
                continue  # no such Secret here, as in a fresh cluster
            pytest.fail(f"{c['name']}: no local translation for env {entry}")
        return env

    def local_port(self, c: dict[str, Any], port: int | str) -> int:
        return self.ports[pod_port(self.spec, port)[1]]


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def clean_environment() -> dict[str, str]:
    """Blank out SIDECAR_* and OTEL_* from the test's own environment: only the manifest counts
    (SIDECAR_LOG_FORMAT stays: the test helpers read JSON log lines)."""
    return {
        k: ""
        for k in os.environ
        if k.startswith(("SIDECAR_", "OTEL_")) and k != "SIDECAR_LOG_FORMAT"
    }


def test_the_manifests_pod_serves_a_request_through_the_sidecar(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    model = container(pod.spec, "model")
    side = container(pod.spec, "sidecar")
    model_rp: RunningProcess | None = None
    side_rp: RunningProcess | None = None
    try:
        # Native sidecar order: the sidecar starts first and passes its startup probe ...
        side_env = {**clean_environment(), **pod.env(side)}
        side_rp = start_process(pod.argv(side), env=side_env, cwd=str(tmp_path))
        assert side_rp.ready["proxy"].endswith(f":{pod.local_port(side, 'sidecar-http')}")
        for probe in ("startupProbe", "livenessProbe"):
            check = side[probe]["httpGet"]
            status, _ = get(pod.local_port(side, check["port"]), check["path"])
            assert status == 200, f"sidecar {probe} {check['path']} answered {status}"

        # ... then the model starts.
        model_rp = start_process(pod.argv(model), env={**clean_environment(), **pod.env(model)})
        for probe in ("readinessProbe", "livenessProbe"):
            check = model[probe]["httpGet"]
            status, _ = get(pod.local_port(model, check["port"]), check["path"])
            assert status == 200, f"model {probe} {check['path']} answered {status}"
        check = side["readinessProbe"]["httpGet"]
        status, _ = get(pod.local_port(side, check["port"]), check["path"])
        assert status == 200, f"sidecar readiness {check['path']} answered {status}"

        # A caller goes through the Service's target port, which is the sidecar's proxy.
        service = one(pod.objs, "Service", "model-server")
        proxy = pod.local_port(side, service["spec"]["ports"][0]["targetPort"])
        request = urllib.request.Request(
            f"http://127.0.0.1:{proxy}/v1/chat/completions",
            data=json.dumps(
                {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
            ).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            body = json.loads(response.read())
            assert body["object"] == "chat.completion"
            assert response.headers.get("x-sidecar-outcome") == "ok"

        # Prometheus finds, on the port and path the ServiceMonitor scrapes, every metric the
        # alert rules and the dashboard use.
        status, text = get(pod.local_port(side, "sidecar-admin"), "/metrics")
        assert status == 200
        families = {f.name for f in text_string_to_metric_families(text.decode())}
        wanted = {name.removesuffix("_total") for name in METRICS}
        assert wanted <= families, f"not exported: {sorted(wanted - families)}"

        # The image's HEALTHCHECK script agrees.
        health = subprocess.run(
            [sys.executable, str(REPO / "deploy" / "docker" / "healthcheck.py")],
            env={**os.environ, "SIDECAR_ADMIN_PORT": str(pod.local_port(side, "sidecar-admin"))},
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert health.returncode == 0, health.stderr

        # Shutdown as the kubelet does it: the model first, then the sidecar, which drains and
        # exits 0 well inside terminationGracePeriodSeconds.
        assert model_rp.stop() is not None
        side_rp.signal(signal.SIGTERM)
        grace = pod.spec["terminationGracePeriodSeconds"]
        assert side_rp.proc.wait(timeout=grace) == 0
    finally:
        for rp in (model_rp, side_rp):
            if rp is not None:
                rp.stop()
