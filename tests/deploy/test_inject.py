"""`sidecar inject`: the output validates like the shipped manifests, equals the base manifest's
sidecar, is idempotent, keeps everything else, and refuses what it cannot do."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.inject import (
    InjectError,
    InjectOptions,
    dump_documents,
    inject_documents,
    load_documents,
    main,
    read_policy_dir,
)
from tests.deploy.kube import (
    BASE,
    REPO,
    container,
    one,
    pod_spec,
    render,
    restricted_violations,
    validate_object,
)

VERSION = "1.29.0"

APP = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: vllm
  namespace: ml
  labels: {app: vllm}
spec:
  replicas: 2
  selector:
    matchLabels: {app: vllm}
  template:
    metadata:
      labels: {app: vllm, tier: model}
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 2000
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: vllm
          image: vllm/vllm-openai:v0.6.0
          args: ["--port", "8000"]
          ports:
            - {name: http, containerPort: 8000}
          lifecycle:
            preStop:
              exec: {command: ["sleep", "10"]}
          resources:
            requests: {cpu: "1", memory: 4Gi}
            limits: {cpu: "2", memory: 8Gi}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
---
apiVersion: v1
kind: Service
metadata: {name: vllm, namespace: ml}
spec:
  selector: {app: vllm}
  ports:
    - {name: http, port: 80, targetPort: http}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: ml}
spec:
  selector: {app: something-else}
  ports:
    - {name: http, port: 80, targetPort: 8000}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: ml}
data:
  config.yaml: |
    a: 1
    b: [x, y]
  flag: "true"
"""

JOB = """\
apiVersion: batch/v1
kind: Job
metadata: {name: batch-score}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      securityContext:
        runAsNonRoot: true
        runAsUser: 2000
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: scorer
          image: example/scorer:1
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {drop: [ALL]}
"""

STATEFULSET = """\
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: triton}
spec:
  serviceName: triton
  selector:
    matchLabels: {app: triton}
  template:
    metadata:
      labels: {app: triton}
    spec:
      containers:
        - name: triton
          image: nvcr.io/nvidia/tritonserver:24.08-py3
          ports: [{containerPort: 9000, name: http}]
"""


def inject(text: str, **options: Any) -> list[dict[str, Any]]:
    return inject_documents(load_documents(text), InjectOptions(**options)).documents


def roundtrip(text: str, **options: Any) -> str:
    return dump_documents(inject(text, **options))


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


@pytest.mark.parametrize("legacy", [False, True])
def test_injected_output_validates_and_the_pod_stays_restricted(legacy: bool) -> None:
    docs = inject(APP, legacy=legacy, retarget_services=True)
    for doc in docs:
        validate_object(doc, VERSION if not legacy else "1.27.0")
    pod = pod_spec(workloads(docs)[0])
    assert restricted_violations(pod) == []
    side = container(pod, "sidecar")
    if legacy:
        assert side in pod["containers"] and "restartPolicy" not in side
    else:
        assert side in pod["initContainers"] and side["restartPolicy"] == "Always"
    assert pod["terminationGracePeriodSeconds"] >= 45


def test_a_native_job_and_a_statefulset_are_injected() -> None:
    docs = inject(JOB + "---\n" + STATEFULSET)
    job, statefulset = docs
    for doc in docs:
        validate_object(doc, VERSION)
    assert container(pod_spec(job), "sidecar")["restartPolicy"] == "Always"
    assert restricted_violations(pod_spec(job)) == []
    side = container(pod_spec(statefulset), "sidecar")
    upstream = next(e["value"] for e in side["env"] if e["name"] == "SIDECAR_UPSTREAM_URL")
    assert upstream == "http://127.0.0.1:9000", "the model's port comes from its container"


def test_the_injected_sidecar_is_the_base_manifests_sidecar() -> None:
    rendered = one(render("base"), "Deployment", "model-server")
    bare = copy.deepcopy(rendered)
    pod = pod_spec(bare)
    pod["initContainers"] = [c for c in pod["initContainers"] if c["name"] != "sidecar"]
    if not pod["initContainers"]:
        del pod["initContainers"]
    pod["volumes"] = [v for v in pod["volumes"] if not v["name"].startswith("sidecar-")]
    if not pod["volumes"]:
        del pod["volumes"]
    image = container(pod_spec(rendered), "sidecar")["image"]
    injected, configmap = inject_documents(
        [bare],
        InjectOptions(
            image=image,
            state_claim="sidecar-state",
            policy_files=read_policy_dir(BASE / "policies"),
        ),
    ).documents
    assert injected == rendered, (
        "sidecar inject and deploy/k8s/base/deployment.yaml disagree; change both the same way"
    )
    assert configmap["data"] == one(render("base"), "ConfigMap", "sidecar-policies")["data"]


def test_the_legacy_sidecar_is_the_legacy_overlays_sidecar() -> None:
    rendered = one(render("legacy"), "Deployment", "model-server")
    expected = container(pod_spec(rendered), "sidecar")
    bare = copy.deepcopy(rendered)
    pod = pod_spec(bare)
    pod["containers"] = [c for c in pod["containers"] if c["name"] != "sidecar"]
    pod["volumes"] = [v for v in pod["volumes"] if not v["name"].startswith("sidecar-")]
    (injected,) = inject_documents(
        [bare], InjectOptions(image=expected["image"], legacy=True, state_claim="sidecar-state")
    ).documents
    assert container(pod_spec(injected), "sidecar") == expected


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"legacy": True},
        {"retarget_services": True, "state_claim": "state"},
        {"policy_files": (("default.yaml", "version: 1\n"),), "otlp_endpoint": "http://j:4318"},
    ],
)
def test_injecting_twice_changes_nothing(options: dict[str, Any]) -> None:
    once = roundtrip(APP, **options)
    twice = roundtrip(once, **options)
    assert twice == once


def test_everything_else_is_preserved() -> None:
    original = load_documents(APP)
    docs = inject(APP)
    assert docs[1:] == original[1:], "Services and ConfigMaps are untouched without retargeting"
    before, after = original[0], docs[0]
    pod_before, pod_after = pod_spec(before), pod_spec(after)
    assert pod_after["containers"] == pod_before["containers"]
    assert pod_after["securityContext"] == pod_before["securityContext"]
    assert {k: v for k, v in after.items() if k != "spec"} == {
        k: v for k, v in before.items() if k != "spec"
    }
    assert (
        after["spec"]["replicas"] == 2 and after["spec"]["selector"] == before["spec"]["selector"]
    )
    # Multi-line strings stay readable block scalars.
    assert "config.yaml: |\n" in dump_documents(docs)


def test_retargeting_points_only_the_selecting_service_at_the_sidecar() -> None:
    docs = inject(APP, retarget_services=True)
    vllm, other = docs[1], docs[2]
    assert vllm["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "sidecar-http"}]
    assert other["spec"]["ports"][0]["targetPort"] == 8000, "selects other pods: untouched"
    elsewhere = APP.replace("metadata: {name: vllm, namespace: ml}", "metadata: {name: vllm}")
    assert inject(elsewhere, retarget_services=True)[1]["spec"]["ports"][0]["targetPort"] == "http"


def test_policy_dir_writes_the_configmap_and_mounts_folders_in_place() -> None:
    files = read_policy_dir(REPO / "policies")
    docs = inject(APP, policy_files=files)
    configmap = docs[-1]
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["namespace"] == "ml"
    assert configmap["metadata"]["name"] == "sidecar-policies"
    validate_object(configmap, VERSION)
    pod = pod_spec(docs[0])
    volume = next(v for v in pod["volumes"] if v["name"] == "sidecar-policies")
    items = {i["path"]: i["key"] for i in volume["configMap"]["items"]}
    for rel, content in files:
        assert configmap["data"][items[rel]] == content
    assert any("/" in path for path in items), "schemas/ keeps its folder"


def test_a_state_claim_makes_the_volume_writable_for_the_sidecar() -> None:
    docs = inject(STATEFULSET, state_claim="triton-sidecar-state")
    pod = pod_spec(docs[0])
    volume = next(v for v in pod["volumes"] if v["name"] == "sidecar-state")
    assert volume["persistentVolumeClaim"] == {"claimName": "triton-sidecar-state"}
    assert pod["securityContext"]["fsGroup"] == 10001


def test_a_list_is_injected_item_by_item() -> None:
    items = [d for d in load_documents(APP) if d is not None]
    listing = {"apiVersion": "v1", "kind": "List", "items": items}
    (out,) = inject_documents([listing], InjectOptions()).documents
    assert container(pod_spec(out["items"][0]), "sidecar")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a}]}\n",
            "kind Pod is not supported",
        ),
        (
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec: {}\n",
            "kind DaemonSet is not supported",
        ),
        (
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec: {}\n",
            "kind CronJob is not supported",
        ),
        (
            "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: old}\nspec: {}\n",
            "apiVersion 'extensions/v1beta1' is not supported",
        ),
        ("just: a mapping\n", "not a Kubernetes object"),
        ("- a\n- list\n", "not a Kubernetes object"),
    ],
)
def test_unsupported_input_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(InjectError, match=message):
        inject(text)


def test_a_legacy_sidecar_in_a_job_is_refused() -> None:
    with pytest.raises(InjectError, match="never complete"):
        inject(JOB, legacy=True)


def test_switching_modes_on_an_injected_workload_is_refused() -> None:
    native = roundtrip(APP)
    with pytest.raises(InjectError, match="already has the sidecar as a native sidecar"):
        inject(native, legacy=True)
    legacy = roundtrip(APP, legacy=True)
    with pytest.raises(InjectError, match="already has the sidecar as a plain container"):
        inject(legacy)


def test_port_and_network_conflicts_are_refused() -> None:
    taken = APP.replace("containerPort: 8000", "containerPort: 8701")
    with pytest.raises(InjectError, match="port 8701"):
        inject(taken)
    host = APP.replace(
        "      securityContext:\n        runAsNonRoot",
        "      hostNetwork: true\n      securityContext:\n        runAsNonRoot",
        1,
    )
    with pytest.raises(InjectError, match="hostNetwork"):
        inject(host)


def test_the_command_line_reads_stdin_and_writes_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(APP))
    assert main(["--retarget-services", "--image", "registry.example/sidecar:1"]) == 0
    out, err = capsys.readouterr()
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert container(pod_spec(docs[0]), "sidecar")["image"] == "registry.example/sidecar:1"
    assert "sidecar injected (native)" in err and "emptyDir" in err


def test_the_command_line_writes_a_file_and_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(APP)
    target = tmp_path / "out.yaml"
    assert main([str(source), "-o", str(target), "--policy-dir", str(REPO / "policies")]) == 0
    assert (
        main(
            [
                str(target),
                "-o",
                str(tmp_path / "again.yaml"),
                "--policy-dir",
                str(REPO / "policies"),
            ]
        )
        == 0
    )
    assert (tmp_path / "again.yaml").read_text() == target.read_text()
    capsys.readouterr()
    bad = tmp_path / "pod.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}\n")
    out_path = tmp_path / "never.yaml"
    assert main([str(bad), "-o", str(out_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and not out_path.exists()
    assert "sidecar inject: document 1 (Pod p): kind Pod is not supported" in err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert main([str(source), "--policy-dir", str(REPO / "policies"), "--policy", "nope.yaml"]) == 2
