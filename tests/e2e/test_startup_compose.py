"""`just up` / `just down` (tools/compose.sh) without a reachable Docker engine: one line
that says so, and a non-zero exit, instead of docker-compose v1's Python traceback.

Stand-in `docker` and `docker-compose` commands on PATH play the engine's part: what they
print and exit with is what the real ones do when the engine is down or up.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "compose.sh"
ENGINE_DOWN = (
    "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
    "Is the docker daemon running?"
)


def command(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def docker_cli(directory: Path, *, engine_up: bool, calls: Path) -> None:
    """`docker` as the real CLI answers: `version` asks the engine; `compose ...` runs."""
    version = "echo 27.3.1; exit 0" if engine_up else f'echo "{ENGINE_DOWN}" >&2; exit 1'
    command(
        directory,
        "docker",
        f'echo "docker $*" >> "{calls}"\n'
        f'if [ "$1" = version ]; then {version}; fi\n'
        'if [ "$1 $2" = "compose version" ]; then echo "Docker Compose version v2.29.7"; fi\n'
        "exit 0\n",
    )


def run(
    args: list[str], path: str, tmp_path: Path, cwd: Path = ROOT, **env: str
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER")}
    return subprocess.run(
        args,
        env={**clean, "PATH": path, "HOME": str(tmp_path), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """The whole PATH of the script: bash, and the stand-ins a test puts there."""
    directory = tmp_path / "bin"
    directory.mkdir()
    bash = shutil.which("bash")
    assert bash is not None
    (directory / "bash").symlink_to(bash)
    return directory


@pytest.mark.parametrize("compose_command", [["up", "-d", "--build"], ["down", "-v"]])
def test_without_the_engine_compose_says_so_in_one_line(
    tmp_path: Path, bin_dir: Path, compose_command: list[str]
) -> None:
    calls = tmp_path / "calls"
    docker_cli(bin_dir, engine_up=False, calls=calls)
    done = run([str(SCRIPT), *compose_command], str(bin_dir), tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"just {compose_command[0]}: the Docker engine is not reachable")
    assert ENGINE_DOWN in lines[0] and "start it" in lines[0]
    assert calls.read_text().splitlines() == ["docker version --format {{.Server.Version}}"]


def test_with_docker_compose_v1_alone_a_missing_engine_socket_is_reported(
    tmp_path: Path, bin_dir: Path
) -> None:
    calls = tmp_path / "calls"
    command(bin_dir, "docker-compose", f'echo "docker-compose $*" >> "{calls}"\n')
    done = run(
        [str(SCRIPT), "up", "-d", "--build"],
        str(bin_dir),
        tmp_path,
        DOCKER_HOST=f"unix://{tmp_path}/docker.sock",
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"just up: the Docker engine is not reachable (no socket at {tmp_path}/docker.sock); "
        "docker compose needs a running engine: start it (sudo systemctl start docker, or "
        "open Docker Desktop) and try again"
    )
    assert not calls.exists(), "docker-compose ran without an engine"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's compose files, where the script may make a .env."""
    directory = tmp_path / "project"
    directory.mkdir()
    for name in ("docker-compose.yml", ".env.example"):
        shutil.copy(ROOT / name, directory / name)
    return directory


def test_with_the_engine_up_compose_runs_with_the_arguments(
    tmp_path: Path, bin_dir: Path, project: Path
) -> None:
    calls = tmp_path / "calls"
    docker_cli(bin_dir, engine_up=True, calls=calls)
    (project / ".env").write_text("PORT=9000\n")
    done = run([str(SCRIPT), "up", "-d", "--build"], str(bin_dir), tmp_path, cwd=project)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert calls.read_text().splitlines()[-1] == "docker compose up -d --build"
    assert (project / ".env").read_text() == "PORT=9000\n", "the user's .env is left alone"


@pytest.mark.parametrize("compose_command", [["up", "-d", "--build"], ["down"]])
def test_without_a_dotenv_compose_starts_from_the_example(
    tmp_path: Path, bin_dir: Path, project: Path, compose_command: list[str]
) -> None:
    """The api service reads .env (env_file), which compose requires: a project without one
    gets a copy of .env.example, every setting at its default, and is told so."""
    calls = tmp_path / "calls"
    docker_cli(bin_dir, engine_up=True, calls=calls)
    done = run([str(SCRIPT), *compose_command], str(bin_dir), tmp_path, cwd=project)
    assert done.returncode == 0, done.stderr
    assert (project / ".env").read_text() == (project / ".env.example").read_text()
    assert done.stderr == (
        f"just {compose_command[0]}: no .env: copied .env.example to .env "
        "(every setting at its default)\n"
    )
    assert calls.read_text().splitlines()[-1] == f"docker compose {' '.join(compose_command)}"


def test_without_docker_at_all_it_says_what_to_install(tmp_path: Path, bin_dir: Path) -> None:
    done = run([str(SCRIPT), "up"], str(bin_dir), tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("just up: Docker is not installed")


JUST = shutil.which("just")


@pytest.mark.skipif(JUST is None, reason="just is not installed")
def test_just_up_without_the_engine_fails_in_one_line_of_its_own(
    tmp_path: Path, bin_dir: Path
) -> None:
    assert JUST is not None
    docker_cli(bin_dir, engine_up=False, calls=tmp_path / "calls")
    done = run([JUST, "up"], str(bin_dir), tmp_path)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if not line.startswith("error: recipe")]
    assert ours == [
        f"just up: the Docker engine is not reachable ({ENGINE_DOWN}); docker compose needs a "
        "running engine: start it (sudo systemctl start docker, or open Docker Desktop) and "
        "try again"
    ], done.stderr
