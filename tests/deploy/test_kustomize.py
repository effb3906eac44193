"""The Kubernetes manifests: every overlay renders, every object validates strictly, and the pod
is what the sidecar needs (native sidecar, probes on what `sidecar run` serves, restricted Pod
Security, the model's port unreachable, a drain that fits the grace period)."""

from __future__ import annotations

import posixpath
from typing import Any

import pytest

from tests.deploy.kube import (
    ADMIN_PATHS,
    K8S_VERSIONS,
    OVERLAYS,
    all_containers,
    container,
    env_entry,
    env_values,
    find,
    one,
    parse_seconds,
    pod_port,
    pod_spec,
    render,
    resolve_port,
    restricted_violations,
    validate_object,
)

NATIVE = ["base", "dev", "postgres", "production"]
ALL = list(OVERLAYS)
DEPLOYMENT = "model-server"


def workload(overlay: str) -> dict[str, Any]:
    return one(render(overlay), "Deployment", DEPLOYMENT)


def sidecar(overlay: str) -> dict[str, Any]:
    return container(pod_spec(workload(overlay)), "sidecar")


@pytest.mark.parametrize(
    ("overlay", "version"),
    [(o, v) for o in ALL for v in K8S_VERSIONS[o]],
)
def test_every_rendered_object_validates_strictly(overlay: str, version: str) -> None:
    objs = render(overlay)
    assert objs, f"{overlay} rendered nothing"
    for obj in objs:
        try:
            validate_object(obj, version)
        except Exception as exc:  # the validators' errors carry the path
            name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            pytest.fail(f"{overlay}: {name} does not validate against Kubernetes {version}: {exc}")


@pytest.mark.parametrize("overlay", ALL)
def test_every_pod_meets_the_restricted_pod_security_standard(overlay: str) -> None:
    for obj in render(overlay):
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            violations = restricted_violations(pod_spec(obj))
            assert violations == [], f"{overlay} {obj['metadata']['name']}: {violations}"


@pytest.mark.parametrize("overlay", ALL)
def test_the_sidecar_is_locked_down_and_sized(overlay: str) -> None:
    pod = pod_spec(workload(overlay))
    side = container(pod, "sidecar")
    sc = side["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    for c in all_containers(pod):
        resources = c.get("resources") or {}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind) or {}), (
                f"{overlay}: container {c['name']} needs cpu and memory {kind}"
            )
        assert (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is True
    assert pod.get("automountServiceAccountToken") is False
    # Writable places are volumes: the state directory and /tmp.
    mounts = {m["mountPath"]: m for m in side["volumeMounts"]}
    assert env_values(side)["SIDECAR_STATE_DIR"] in mounts
    assert "/tmp" in mounts


@pytest.mark.parametrize("overlay", NATIVE)
def test_native_overlays_run_the_sidecar_as_a_native_sidecar(overlay: str) -> None:
    pod = pod_spec(workload(overlay))
    init = [c for c in pod.get("initContainers") or [] if c["name"] == "sidecar"]
    assert len(init) == 1 and init[0]["restartPolicy"] == "Always"
    assert "sidecar" not in [c["name"] for c in pod["containers"]]
    assert init[0]["startupProbe"], "a native sidecar's startup probe gates the model's start"


def test_the_legacy_overlay_runs_the_sidecar_as_a_plain_container() -> None:
    pod = pod_spec(workload("legacy"))
    assert "initContainers" not in pod
    names = [c["name"] for c in pod["containers"]]
    assert sorted(names) == ["model", "sidecar"]
    assert "restartPolicy" not in container(pod, "sidecar")
    # Both get SIGTERM together: the sidecar keeps accepting a little while.
    assert parse_seconds(env_values(container(pod, "sidecar"))["SIDECAR_DRAIN_DELAY"]) > 0


@pytest.mark.parametrize("overlay", ALL)
def test_probes_hit_what_sidecar_run_serves_on_its_admin_port(overlay: str) -> None:
    side = sidecar(overlay)
    env = env_values(side)
    admin_port = int(env["SIDECAR_ADMIN_PORT"])
    assert env["SIDECAR_ADMIN_HOST"] == "0.0.0.0", "kubelet probes come from outside the pod"
    assert env["SIDECAR_HOST"] == "0.0.0.0", "the Service reaches the proxy from outside the pod"
    expected = {
        "startupProbe": ADMIN_PATHS["liveness"],
        "livenessProbe": ADMIN_PATHS["liveness"],
        "readinessProbe": ADMIN_PATHS["readiness"],
    }
    for probe, path in expected.items():
        get = side[probe]["httpGet"]
        assert get["path"] == path, f"{probe} asks {get['path']}"
        assert resolve_port(side, get["port"]) == admin_port, f"{probe} is not on the admin port"
        assert get.get("scheme", "HTTP") == "HTTP"


@pytest.mark.parametrize("overlay", ALL)
def test_the_service_sends_callers_to_the_sidecar_proxy_only(overlay: str) -> None:
    objs = render(overlay)
    pod = pod_spec(workload(overlay))
    proxy_port = int(env_values(container(pod, "sidecar"))["SIDECAR_PORT"])
    service = one(objs, "Service", DEPLOYMENT)
    labels = workload(overlay)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        owner, number = pod_port(pod, port["targetPort"])
        assert owner["name"] == "sidecar" and number == proxy_port, (
            f"Service port {port['name']} targets {owner['name']}:{number}, not the proxy"
        )


@pytest.mark.parametrize("overlay", ALL)
def test_the_network_policy_admits_nothing_to_the_model_port(overlay: str) -> None:
    objs = render(overlay)
    pod = pod_spec(workload(overlay))
    labels = workload(overlay)["spec"]["template"]["metadata"]["labels"]
    policy = one(objs, "NetworkPolicy", DEPLOYMENT)
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in spec["policyTypes"]
    admitted = set()
    for rule in spec["ingress"]:
        assert rule.get("ports"), "a rule without ports would admit every port"
        for port in rule["ports"]:
            owner, number = pod_port(pod, port["port"])
            admitted.add((owner["name"], number))
    model_ports = {p["containerPort"] for p in container(pod, "model").get("ports") or []}
    assert model_ports, "the model declares its port"
    assert not {n for owner, n in admitted if owner == "model"}
    assert {owner for owner, _ in admitted} == {"sidecar"}


@pytest.mark.parametrize("overlay", ALL)
def test_policies_are_a_directory_mount_of_a_stable_configmap(overlay: str) -> None:
    objs = render(overlay)
    pod = pod_spec(workload(overlay))
    side = container(pod, "sidecar")
    policy_path = env_values(side)["SIDECAR_POLICY"]
    directory, filename = posixpath.split(policy_path)
    mounts = [m for m in side["volumeMounts"] if m["mountPath"] == directory]
    assert len(mounts) == 1, f"nothing mounted at {directory}"
    mount = mounts[0]
    assert "subPath" not in mount and "subPathExpr" not in mount, (
        "subPath pins the file: ConfigMap updates would never reach the sidecar"
    )
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm_name = volume["configMap"]["name"]
    assert cm_name == "sidecar-policies", "no hash suffix: the name must stay stable across edits"
    configmap = one(objs, "ConfigMap", cm_name)
    items = volume["configMap"].get("items")
    paths = (
        {item["path"]: item["key"] for item in items}
        if items
        else {k: k for k in configmap["data"]}
    )
    assert filename in paths and paths[filename] in configmap["data"], f"{filename} not mounted"
    assert sorted(paths.values()) == sorted(configmap["data"]), "every key is mounted"


@pytest.mark.parametrize("overlay", ALL)
def test_shutdown_fits_in_the_grace_period(overlay: str) -> None:
    pod = pod_spec(workload(overlay))
    env = env_values(container(pod, "sidecar"))
    drain = parse_seconds(env["SIDECAR_DRAIN_DELAY"]) + parse_seconds(env["SIDECAR_DRAIN_GRACE"])
    model = container(pod, "model")
    pre_stop = model["lifecycle"]["preStop"]
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", "the model's preStop sleeps while endpoints are removed"
    sleep = float(command[1])
    assert sleep >= 5
    grace = pod["terminationGracePeriodSeconds"]
    if overlay == "legacy":
        # Together: the model's preStop runs while the sidecar drains.
        assert grace >= max(sleep, drain) + 5
        assert sleep > parse_seconds(env["SIDECAR_DRAIN_DELAY"])
    else:
        # Native: the sidecar is stopped after the model, so the phases add up.
        assert grace > sleep + drain, (
            f"terminationGracePeriodSeconds {grace} <= preStop {sleep} + drain {drain}"
        )
    assert drain < grace


def test_one_replica_keeps_its_review_queue_on_a_volume() -> None:
    objs = render("base")
    deployment = one(objs, "Deployment", DEPLOYMENT)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "RWO volume: no overlap"
    pod = pod_spec(deployment)
    state_dir = env_values(container(pod, "sidecar"))["SIDECAR_STATE_DIR"]
    mount = next(
        m for m in container(pod, "sidecar")["volumeMounts"] if m["mountPath"] == state_dir
    )
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = one(objs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert (
        pod["securityContext"]["fsGroup"]
        == container(pod, "sidecar")["securityContext"]["runAsGroup"]
    ), "the sidecar's group must own the volume"


def test_postgres_runs_several_replicas_on_a_shared_queue_from_a_secret() -> None:
    objs = render("postgres")
    deployment = one(objs, "Deployment", DEPLOYMENT)
    assert deployment["spec"]["replicas"] > 1
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert find(objs, "PersistentVolumeClaim") == []
    pod = pod_spec(deployment)
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    entry = env_entry(container(pod, "sidecar"), "SIDECAR_DATABASE_URL")
    assert entry is not None and "value" not in entry, "the URL holds a password: a Secret"
    ref = entry["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "sidecar-database" and ref["key"] == "url"
    assert ref.get("optional") is not True, "without the database, do not start a private queue"


@pytest.mark.parametrize("overlay", ALL)
def test_the_disruption_budget_covers_the_pods_without_blocking_drains(overlay: str) -> None:
    objs = render(overlay)
    deployment = one(objs, "Deployment", DEPLOYMENT)
    pdb = one(objs, "PodDisruptionBudget", DEPLOYMENT)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    replicas = deployment["spec"]["replicas"]
    if "maxUnavailable" in pdb["spec"]:
        assert 1 <= pdb["spec"]["maxUnavailable"] < max(replicas, 2)
    else:
        assert pdb["spec"]["minAvailable"] < replicas


@pytest.mark.parametrize("overlay", ALL)
def test_tokens_come_from_a_secret_never_from_the_manifest(overlay: str) -> None:
    side = sidecar(overlay)
    for name in ("SIDECAR_ADMIN_TOKEN", "SIDECAR_REVIEWER_TOKEN", "SIDECAR_APP_TOKEN"):
        entry = env_entry(side, name)
        assert entry is not None and "value" not in entry
        assert entry["valueFrom"]["secretKeyRef"]["name"] == "sidecar-tokens"
    assert find(render(overlay), "Secret") == [], "no Secret is shipped with the manifests"


def test_the_dev_overlay_sends_traces_to_jaeger_v2_in_a_restricted_namespace() -> None:
    objs = render("dev")
    namespace = one(objs, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"]
    jaeger = one(objs, "Deployment", "jaeger")
    image = container(pod_spec(jaeger), "jaeger")["image"]
    assert image.startswith("jaegertracing/jaeger:2."), image
    endpoint = env_values(sidecar("dev"))["OTEL_EXPORTER_OTLP_ENDPOINT"]
    service = one(objs, "Service", "jaeger")
    host_port = endpoint.removeprefix("http://")
    host, port = host_port.split(":")
    assert host == service["metadata"]["name"]
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert int(port) in ports and ports[int(port)]["name"] == "otlp-http"
    assert env_values(sidecar("dev"))["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"


@pytest.mark.parametrize("overlay", ["base", "dev", "legacy"])
def test_overlays_for_bare_clusters_need_no_crds(overlay: str) -> None:
    kinds = {(o["apiVersion"], o["kind"]) for o in render(overlay)}
    assert not {k for k in kinds if "monitoring.coreos.com" in k[0]}


@pytest.mark.parametrize("overlay", ["production", "postgres"])
def test_monitored_overlays_scrape_the_admin_port(overlay: str) -> None:
    objs = render(overlay)
    pod = pod_spec(workload(overlay))
    admin_port = int(env_values(container(pod, "sidecar"))["SIDECAR_ADMIN_PORT"])
    monitor = one(objs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s for s in find(objs, "Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert len(services) == 1, "the ServiceMonitor selects exactly the metrics Service"
    metrics_service = services[0]
    ports = {p["name"]: p for p in metrics_service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == ADMIN_PATHS["metrics"]
        target = ports[endpoint["port"]]["targetPort"]
        owner, number = pod_port(pod, target)
        assert owner["name"] == "sidecar" and number == admin_port
    one(objs, "PrometheusRule")
    dashboard = one(objs, "ConfigMap", "sidecar-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_the_manifests_and_inject_run_this_release_of_the_image() -> None:
    from sidecar import __version__
    from sidecar.inject import DEFAULT_IMAGE

    for overlay in ALL:
        for c in all_containers(pod_spec(workload(overlay))):
            assert c["image"] == f"ai-resilience-sidecar:{__version__}", (
                f"{overlay}: {c['name']} runs {c['image']}; set images[].newTag in "
                "deploy/k8s/base/kustomization.yaml to the release"
            )
    assert DEFAULT_IMAGE == f"ai-resilience-sidecar:{__version__}"
