"""The Dockerfile, without building it (no Docker daemon here): hadolint, what each stage
does, that it agrees with the Kubernetes manifests, and its HEALTHCHECK command run against
real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack import processes as p
from devstack.processes import RedisServer
from extauthz.settings import Settings
from tests.conftest import Server, start_server
from tests.helpers import eventually
from tests.integration.test_manifests import MANIFESTS, Document, containers, makefile_image

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BASE_IMAGE = "python:3.11-slim-bookworm"
COMPILERS = ("gcc", "g++", "clang", "build-essential", "cc ")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        form: list[str] = json.loads(self.args)
        return form


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, comments dropped and continued lines joined."""
    found: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        found.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def stages() -> list[list[Instruction]]:
    """Each stage's instructions, its FROM first."""
    found: list[list[Instruction]] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "FROM":
            found.append([])
        assert found, "an instruction before the first FROM"
        found[-1].append(instruction)
    return found


def final_stage() -> list[Instruction]:
    return stages()[-1]


def the_last(stage: list[Instruction], keyword: str) -> Instruction:
    matching = [i for i in stage if i.keyword == keyword]
    assert matching, f"no {keyword}"
    return matching[-1]


def env(stage: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for pair in instruction.args.split():
                name, _, value = pair.partition("=")
                values[name] = value
    return values


def image_user() -> tuple[int, int]:
    user, _, group = the_last(final_stage(), "USER").args.partition(":")
    assert user.isdigit() and group.isdigit(), "a numeric USER, for runAsNonRoot"
    return int(user), int(group)


def healthcheck_command() -> list[str]:
    options, _, command = the_last(final_stage(), "HEALTHCHECK").args.partition("CMD ")
    assert options.startswith("--")
    form: list[str] = json.loads(command)
    return form


# ---------------------------------------------------------------- the file itself


@pytest.mark.unit
def test_instructions_joins_continued_lines_and_drops_comments() -> None:
    text = 'FROM a AS b\n# note\nRUN x \\\n    # inside\n    && y\nCMD ["serve"]\n'
    assert instructions(text) == [
        Instruction("FROM", "a AS b"),
        Instruction("RUN", "x && y"),
        Instruction("CMD", '["serve"]'),
    ]


@pytest.mark.unit
def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [p.executable("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.mark.unit
def test_the_image_is_built_in_two_stages_on_one_pinned_slim_base() -> None:
    builder, final = stages()
    assert builder[0].args == f"{BASE_IMAGE} AS builder"
    assert final[0].args == BASE_IMAGE
    # the final stage takes the virtualenv from the builder and nothing else
    copies = [i.args for i in final if i.keyword in {"COPY", "ADD"}]
    assert copies == ["--from=builder /opt/venv /opt/venv"]


@pytest.mark.unit
def test_the_builder_compiles_the_protos_and_installs_the_project_not_editable() -> None:
    builder = stages()[0]
    runs = " ".join(i.args for i in builder if i.keyword == "RUN")
    assert "grpc_tools.protoc" in runs
    assert "pip install --no-cache-dir ." in runs
    assert "--editable" not in runs
    assert " -e " not in runs
    assert env(builder)["PATH"].startswith("/opt/venv/bin:")


@pytest.mark.unit
def test_the_final_stage_has_no_compiler_and_installs_nothing() -> None:
    text = " ".join(i.args for i in final_stage() if i.keyword == "RUN")
    for word in COMPILERS:
        assert word not in text
    assert "apt-get" not in text
    assert "pip " not in text


@pytest.mark.unit
def test_the_final_stage_runs_as_a_numeric_non_root_user() -> None:
    user, group = image_user()
    assert user != 0
    assert group != 0
    # USER comes after every RUN: nothing runs as root once it is set
    keywords = [i.keyword for i in final_stage()]
    assert "RUN" not in keywords[keywords.index("USER") :]


@pytest.mark.unit
def test_the_entrypoint_is_extauthz_and_the_default_command_serves() -> None:
    final = final_stage()
    assert the_last(final, "ENTRYPOINT").exec_form() == ["extauthz"]
    assert the_last(final, "CMD").exec_form() == ["serve"]
    assert env(final)["PATH"].startswith("/opt/venv/bin:")


@pytest.mark.unit
def test_the_image_exposes_the_servers_default_ports() -> None:
    defaults = Settings.from_env({})
    exposed = the_last(final_stage(), "EXPOSE").args.split()
    assert exposed == [str(defaults.grpc_port), str(defaults.http_port)]


@pytest.mark.unit
def test_dockerignore_keeps_out_the_virtualenv_git_and_local_stubs() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", ".run", "bench", "tests", "**/__pycache__"} <= patterns
    assert {"keys/v1/*_pb2*.py", "keys/v1/*_pb2*.pyi"} <= patterns
    # what the builder copies must not be ignored
    for needed in ("pyproject.toml", "README.md", "protos", "extauthz", "keys", "ledger"):
        assert needed not in patterns


# ---------------------------------------------------------------- with the manifests


def image_containers() -> Iterator[tuple[str, Document]]:
    image = makefile_image()
    for where, doc in MANIFESTS:
        if doc["kind"] == "Deployment":
            for container in containers(doc):
                if container["image"] == image:
                    yield f"{where}:{container['name']}", container


@pytest.mark.unit
def test_the_manifests_run_the_image_as_its_own_user() -> None:
    user, group = image_user()
    found = list(image_containers())
    assert found
    for where, container in found:
        context = container["securityContext"]
        assert context.get("runAsUser", user) == user, where
        assert context.get("runAsGroup", group) == group, where


@pytest.mark.unit
def test_the_journal_is_where_the_manifests_mount_it_and_the_user_may_write() -> None:
    final = final_stage()
    journal = env(final)["EXTAUTHZ_JOURNAL_DIR"]
    user, group = image_user()
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert f"mkdir -p {journal}" in runs
    assert f"chown -R {user}:{group} {Path(journal).parent}" in runs
    servers = [(w, c) for w, c in image_containers() if c.get("command") == ["extauthz", "serve"]]
    assert len(servers) == 2
    for where, container in servers:
        settings = {e["name"]: e.get("value") for e in container["env"]}
        assert settings["EXTAUTHZ_JOURNAL_DIR"] == journal, where
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert journal in mounts, where


# ---------------------------------------------------------------- the HEALTHCHECK, run


def run_healthcheck(grpc_port: int) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, with this virtualenv's python for the image's."""
    command = healthcheck_command()
    assert command[0] == "python"  # /opt/venv/bin/python, first on the image's PATH
    return subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, "EXTAUTHZ_GRPC_PORT": str(grpc_port)},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


@pytest.mark.unit
def test_healthcheck_asks_grpc_health_on_the_grpc_port() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "HealthStub" in command[2]
    assert "EXTAUTHZ_GRPC_PORT" in command[2]


@pytest.mark.integration
def test_healthcheck_passes_against_a_serving_server(server: Server) -> None:
    result = run_healthcheck(server.grpc_port)
    assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_healthcheck_fails_while_redis_is_unreachable(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    server = start_server(redis.url, tmp_path)
    try:
        assert run_healthcheck(server.grpc_port).returncode == 0
        redis.stop()
        assert eventually(lambda: run_healthcheck(server.grpc_port).returncode == 1)
    finally:
        server.process.stop()
        redis.stop()


@pytest.mark.integration
def test_healthcheck_fails_when_nothing_listens() -> None:
    result = run_healthcheck(p.free_port())
    assert result.returncode == 1
    assert "StatusCode.UNAVAILABLE" in result.stderr
