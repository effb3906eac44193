#!/usr/bin/env bash
# Copy policies/ (the policy files and the files they refer to, e.g. schemas/*.json) into
# deploy/k8s/base/policies/, because kustomize cannot read files above the base, and list every
# file in the base's configMapGenerator and in the policy volume's `items`.
#
# A ConfigMap is flat, so a file in a folder gets a key with the folder joined by a dot
# (schemas/x.json -> key schemas.x.json) and the volume's items put it back at schemas/x.json,
# where the policies refer to it. Run this after adding, changing or removing anything in
# policies/; tests/deploy/test_policies_sync.py fails until you do.
set -euo pipefail
cd "$(dirname "$0")/../.."

python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3

"$python" - <<'PY'
import re
import shutil
from pathlib import Path

src = Path("policies")
dst = Path("deploy/k8s/base/policies")
kustomization = Path("deploy/k8s/base/kustomization.yaml")
deployment = Path("deploy/k8s/base/deployment.yaml")

files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
keys = {path: path.replace("/", ".") for path in files}
for path, key in keys.items():
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", key):
        raise SystemExit(f"policies/{path}: {key!r} is not a valid ConfigMap key")
if len(set(keys.values())) != len(keys):
    raise SystemExit("two files in policies/ map to the same ConfigMap key")

if dst.exists():
    shutil.rmtree(dst)
for path in files:
    (dst / path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / path, dst / path)


def replace_block(file: Path, pattern: str, body: str) -> None:
    text = file.read_text()
    regex = re.compile(pattern, re.MULTILINE)
    if not regex.search(text):
        raise SystemExit(f"{file}: the list to update was not found ({pattern})")
    file.write_text(regex.sub(lambda m: m.group(1) + body, text, count=1))


replace_block(
    kustomization,
    r"(  - name: sidecar-policies\n    files:\n)((?:      - .*\n)+)",
    "".join(
        f"      - policies/{p}\n" if keys[p] == p else f"      - {keys[p]}=policies/{p}\n"
        for p in files
    ),
)
replace_block(
    deployment,
    r"(            name: sidecar-policies\n(?:            #.*\n)*            items:\n)"
    r"((?:              - .*\n)+)",
    "".join(f"              - {{key: {keys[p]}, path: {p}}}\n" for p in files),
)
print(f"synced {len(files)} files: {', '.join(files)}")
PY
