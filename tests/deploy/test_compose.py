"""docker-compose.yml: valid against the Compose Specification's JSON Schema, and wired the way
the README says (demo model behind the sidecar, policy mounted, traces to Jaeger v2, Prometheus
scraping the admin port, nothing published beyond loopback)."""

from __future__ import annotations

import posixpath
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.kube import REPO, require_tool

COMPOSE = REPO / "docker-compose.yml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose()["services"][name]
    return svc


def test_the_compose_file_validates_against_the_compose_spec_schema() -> None:
    try:
        import check_jsonschema  # noqa: F401  (ships the compose-spec schema)
    except ImportError:
        require_tool("check-jsonschema (the `test` extra)", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_services_are_the_model_the_sidecar_jaeger_v2_and_prometheus() -> None:
    services = compose()["services"]
    assert set(services) == {"model", "sidecar", "jaeger", "prometheus"}
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"


def test_the_model_is_the_demo_model_reachable_only_on_the_compose_network() -> None:
    model = service("model")
    entry = model["entrypoint"]
    assert entry[:2] == ["sidecar", "demo-model"]
    assert entry[entry.index("--host") + 1] == "0.0.0.0"
    assert "ports" not in model, "the model's port must not be published"
    assert model["healthcheck"]["test"][0] == "CMD"


def test_the_sidecar_fronts_the_model_with_the_policy_mounted() -> None:
    sidecar = service("sidecar")
    env = sidecar["environment"]
    model_entry = service("model")["entrypoint"]
    model_port = int(model_entry[model_entry.index("--port") + 1])
    upstream = urlsplit(env["SIDECAR_UPSTREAM_URL"])
    assert (upstream.hostname, upstream.port) == ("model", model_port)
    assert sidecar["depends_on"]["model"]["condition"] == "service_healthy"
    policy_dir = posixpath.dirname(env["SIDECAR_POLICY"])
    mounts = {v.split(":")[1]: v.split(":") for v in sidecar["volumes"]}
    assert mounts[policy_dir][0] == "./policies" and mounts[policy_dir][2] == "ro"
    assert (REPO / "policies" / posixpath.basename(env["SIDECAR_POLICY"])).is_file()
    assert env["SIDECAR_STATE_DIR"] in mounts, "state on a volume, not in the container"


def test_traces_go_to_jaeger_over_otlp_http() -> None:
    env = service("sidecar")["environment"]
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (endpoint.hostname, endpoint.port) == ("jaeger", 4318)
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert "127.0.0.1:16686:16686" in service("jaeger")["ports"]


def test_prometheus_scrapes_the_sidecar_admin_port_and_loads_the_alerts() -> None:
    prometheus = service("prometheus")
    binds = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"] if v.startswith("./")}
    config_path = REPO / binds["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text())
    for container_path, host_path in binds.items():
        assert (REPO / host_path).is_file(), f"{host_path} (mounted at {container_path})"
    assert set(config["rule_files"]) <= set(binds), "every rule file is mounted"
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    sidecar = service("sidecar")
    admin_ports = {p.split(":")[-1] for p in sidecar["ports"]}
    assert host == "sidecar" and port in admin_ports and port == "8701"


@pytest.mark.parametrize("name", ["model", "sidecar", "jaeger", "prometheus"])
def test_every_service_is_hardened(name: str) -> None:
    svc = service(name)
    assert svc.get("read_only") is True
    assert svc.get("cap_drop") == ["ALL"]
    assert "no-new-privileges:true" in svc.get("security_opt", [])
    for port in svc.get("ports", []):
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_the_sidecar_is_given_time_to_drain() -> None:
    sidecar = service("sidecar")
    grace = sidecar["environment"]["SIDECAR_DRAIN_GRACE"]
    assert grace.endswith("s")
    stop = sidecar["stop_grace_period"]
    assert stop.endswith("s") and int(stop[:-1]) > int(grace[:-1])
    for token in ("SIDECAR_ADMIN_TOKEN", "SIDECAR_REVIEWER_TOKEN", "SIDECAR_APP_TOKEN"):
        assert sidecar["environment"][token] == f"${{{token}:-}}", "tokens from the shell only"
