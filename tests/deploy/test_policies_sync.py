"""The policies kustomize ships are the repository's policies, mounted where they refer to each
other, and every one of them loads."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import yaml

from tests.deploy.kube import BASE, REPO, container, one, pod_spec, render

POLICIES = REPO / "policies"
COPY = BASE / "policies"
RESYNC = (
    "Re-sync with deploy/k8s/sync-policies.sh (copies policies/ to deploy/k8s/base/policies/ and "
    "rewrites the file list in deploy/k8s/base/kustomization.yaml and the volume items in "
    "deploy/k8s/base/deployment.yaml)."
)


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def key(path: str) -> str:
    return path.replace("/", ".")


def test_the_base_copy_of_the_policies_is_identical_to_policies() -> None:
    source, copy = tree(POLICIES), tree(COPY)
    missing = sorted(set(source) - set(copy))
    extra = sorted(set(copy) - set(source))
    differ = [
        p
        for p in sorted(set(source) & set(copy))
        if not filecmp.cmp(POLICIES / p, COPY / p, shallow=False)
    ]
    assert not (missing or extra or differ), (
        f"deploy/k8s/base/policies/ is out of sync with policies/: missing {missing}, "
        f"extra {extra}, different {differ}. {RESYNC}"
    )


def test_the_kustomization_and_the_volume_list_every_policy_file() -> None:
    files = tree(POLICIES)
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    generator = next(
        g for g in kustomization["configMapGenerator"] if g["name"] == "sidecar-policies"
    )
    expected = [f"policies/{p}" if key(p) == p else f"{key(p)}=policies/{p}" for p in files]
    assert sorted(generator["files"]) == sorted(expected), f"configMapGenerator files. {RESYNC}"
    deployment = yaml.safe_load((BASE / "deployment.yaml").read_text())
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "sidecar-policies")
    items = sorted((i["key"], i["path"]) for i in volume["configMap"]["items"])
    assert items == sorted((key(p), p) for p in files), f"volume items. {RESYNC}"


def materialise_policy_volume(tmp_path: Path) -> Path:
    """The policy directory exactly as the pod sees it, from the rendered ConfigMap and items."""
    objs = render("base")
    pod = pod_spec(one(objs, "Deployment", "model-server"))
    volume = next(v for v in pod["volumes"] if v["name"] == "sidecar-policies")
    configmap = one(objs, "ConfigMap", volume["configMap"]["name"])
    target = tmp_path / "policies"
    for item in volume["configMap"]["items"]:
        path = target / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(configmap["data"][item["key"]])
    return target


def test_the_mounted_files_are_the_policies_byte_for_byte(tmp_path: Path) -> None:
    mounted = materialise_policy_volume(tmp_path)
    assert tree(mounted) == tree(POLICIES)
    for p in tree(POLICIES):
        assert (mounted / p).read_bytes() == (POLICIES / p).read_bytes(), p


def test_every_policy_loads_from_the_mounted_directory(tmp_path: Path) -> None:
    loader = pytest.importorskip("sidecar.policy.loader")
    mounted = materialise_policy_volume(tmp_path)
    side = container(pod_spec(one(render("base"), "Deployment", "model-server")), "sidecar")
    policies = sorted(p for p in mounted.iterdir() if p.suffix in (".yaml", ".yml"))
    assert policies, "no policy files mounted"
    for path in policies:
        try:
            loader.load_policy(path)
        except loader.PolicyError as exc:
            pytest.fail(f"{path.name} does not load where the pod mounts it: {exc}")
    default = next(e["value"] for e in side["env"] if e["name"] == "SIDECAR_POLICY")
    assert Path(default).name in {p.name for p in policies}
