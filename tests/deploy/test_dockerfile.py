"""deploy/Dockerfile read as text: targets, user, entrypoint, health check, cache volume, build inputs.

No container engine runs here, so the image cannot be built; instead the Dockerfile is parsed into
stages and each target's effective configuration is checked against the code, and the package is built
(as a wheel) from exactly the files the Dockerfile copies.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
TARGETS = ("cpu", "cuda")
# Env vars set in the image that are not service settings: Python/pip behaviour, the Hugging Face hub
# cache (read by huggingface_hub, which open_clip uses to download weights) and the NVIDIA runtime.
FOREIGN_ENV = {"PATH", "HF_HOME", "NVIDIA_DRIVER_CAPABILITIES"}
FOREIGN_ENV_PREFIXES = ("PYTHON", "PIP_")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    """Join backslash continuations and drop comments / blank lines (parser directives included)."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):  # comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return lines


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"every stage must be named: {line}"
            stages.append(Stage(name=parts[2], base=parts[0]))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM: {line}"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


def chain(stages: list[Stage], target: str) -> list[Stage]:
    """The target stage and the stages it is built FROM, root first."""
    by_name = {s.name: s for s in stages}
    out = [by_name[target]]
    while out[0].base in by_name:
        out.insert(0, by_name[out[0].base])
    return out


def last(stages: list[Stage], keyword: str) -> str | None:
    found = None
    for stage in stages:
        for kw, rest in stage.instructions:
            if kw == keyword:
                found = rest
    return found


def env_of(stages: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in stages:
        for kw, rest in stage.instructions:
            if kw == "ENV":
                for item in shlex.split(rest):
                    name, _, value = item.partition("=")
                    assert value or "=" in item, f"use ENV NAME=value, not the legacy form: {rest}"
                    env[name] = value
    return env


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_targets_are_multi_stage_and_named(parsed):
    _, stages = parsed
    names = [s.name for s in stages]
    assert len(names) == len(set(names)), f"duplicate stage names: {names}"
    for target in TARGETS:
        assert target in names, f"no `{target}` target in {names}"
        # The runtime target must not be the build stage: the venv is copied in from a build stage.
        copies = [rest for s in chain(stages, target) for kw, rest in s.instructions if kw == "COPY"]
        from_build = [c for c in copies if c.startswith("--from=")]
        assert from_build, f"{target}: no COPY --from=<build stage>"
        build_stage = from_build[-1].split()[0].removeprefix("--from=")
        assert build_stage in names and build_stage != target


@pytest.mark.parametrize("target", TARGETS)
def test_build_stage_installs_the_matching_torch(parsed, target):
    _, stages = parsed
    copies = [rest for s in chain(stages, target) for kw, rest in s.instructions if kw == "COPY"]
    build = next(c for c in copies if c.startswith("--from=")).split()[0].removeprefix("--from=")
    build_chain = chain(stages, build)
    runs = " ".join(rest for s in build_chain for kw, rest in s.instructions if kw in ("RUN", "ARG"))
    if target == "cpu":
        assert "download.pytorch.org/whl/cpu" in runs
    else:
        assert "download.pytorch.org/whl/cu" in runs and "whl/cpu" not in runs
    assert 'pip install ".[hf]"' in runs, (
        "the build stage must install the service package itself, with the Hugging Face tokenizers "
        "(the hf extra) that SigLIP-style models need"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_runtime_user_is_not_root(parsed, target):
    _, stages = parsed
    user = last(chain(stages, target), "USER")
    assert user is not None, f"{target}: no USER instruction, the image would run as root"
    name = user.split(":")[0]
    assert name not in ("root", "0"), f"{target}: runs as {user}"
    runs = " ".join(rest for s in chain(stages, target) for kw, rest in s.instructions if kw == "RUN")
    assert "useradd" in runs and name in runs, f"{target}: user {name} is never created"


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_is_the_cli_and_cmd_a_subcommand(parsed, target, cli_subcommands):
    _, stages = parsed
    entry = json.loads(last(chain(stages, target), "ENTRYPOINT"))  # exec form, so signals reach the app
    assert entry == ["exclip-service"]
    cmd = json.loads(last(chain(stages, target), "CMD"))
    assert cmd[0] in cli_subcommands, f"default command {cmd} is not one of {sorted(cli_subcommands)}"


@pytest.mark.parametrize("target", TARGETS)
def test_healthcheck_probes_the_api_health_path_on_the_exposed_port(parsed, target, api_paths, settings_cls):
    _, stages = parsed
    ch = chain(stages, target)
    health = last(ch, "HEALTHCHECK")
    assert health and "CMD" in health
    argv = json.loads(health[health.index("CMD") + 3 :].strip())
    assert argv[0] == "python", "the slim image has no curl: use python"
    probe = " ".join(argv)
    assert "/healthz" in probe and "/healthz" in api_paths
    env = env_of(ch)
    port = int(env["EXCLIP_PORT"])
    assert port == settings_cls.model_fields["port"].default
    assert last(ch, "EXPOSE") == str(port)
    assert env["EXCLIP_HOST"] == "0.0.0.0", "the API must listen on all interfaces inside a container"


@pytest.mark.parametrize("target", TARGETS)
def test_model_cache_is_a_volume_holding_both_cache_dirs(parsed, target):
    _, stages = parsed
    ch = chain(stages, target)
    volumes = json.loads(last(ch, "VOLUME"))
    env = env_of(ch)
    for var in ("EXCLIP_CACHE_DIR", "HF_HOME"):
        assert any(env[var].startswith(v.rstrip("/") + "/") for v in volumes), (
            f"{var}={env[var]} not on {volumes}"
        )
    runs = " ".join(rest for s in ch for kw, rest in s.instructions if kw == "RUN")
    assert "chown" in runs and volumes[0] in runs, "the non-root user must own the cache volume"


@pytest.mark.parametrize("target", TARGETS)
def test_image_env_names_are_settings(parsed, target, setting_env_names):
    _, stages = parsed
    for name in env_of(chain(stages, target)):
        if name in FOREIGN_ENV or name.startswith(FOREIGN_ENV_PREFIXES):
            continue
        assert name in setting_env_names, f"{target}: ENV {name} is not a setting the service reads"


def _copy_sources(stages: list[Stage]) -> set[str]:
    sources = set()
    for stage in stages:
        for kw, rest in stage.instructions:
            if kw == "COPY" and not rest.startswith("--from="):
                sources.update(rest.split()[:-1])
    return sources


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            ignored = not negate
    return ignored


def test_copied_sources_exist_and_survive_the_dockerignore(parsed):
    _, stages = parsed
    patterns = [
        p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    for src in _copy_sources(stages):
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src, patterns), f"COPY {src}: excluded by {DOCKERIGNORE.name}"
    assert _ignored(".venv", patterns) and _ignored(".git", patterns), (
        "the build context would ship .venv/.git"
    )


def test_package_builds_from_exactly_the_copied_files(parsed, tmp_path):
    """`pip install .` in the build stage sees only the COPY'd files: they must make a complete package."""
    _, stages = parsed
    context = tmp_path / "context"
    for src in _copy_sources(stages):
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, context / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy(ROOT / src, context / src)
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("exclip_service-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "service/cli.py" in names and "service/settings.py" in names and "attribution/__init__.py" in names
    assert "exclip-service = service.cli:main" in entry_points
    # The web page's assets are package data: the image serves them from the installed package.
    static = [p.relative_to(ROOT).as_posix() for p in (ROOT / "service/web/static").rglob("*") if p.is_file()]
    assert static and set(static) <= names, sorted(set(static) - names)
