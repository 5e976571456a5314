"""The container set-up: Dockerfile, docker-compose.yml, .env.example, .dockerignore.

No Docker engine is needed. The files are read and checked against the README and the
CLI; Debian's `docker-compose` 1.29 (which CI installs) validates and resolves the compose
file; the health-check commands run for real against a server and a Redis on this
machine.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from docker.utils.build import exclude_paths

from coupon.entrypoints.cli import build_parser
from coupon.entrypoints.settings import load_settings
from harness.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"

# The original Go service's variables, plus the token and the worker count.
GO_COMPATIBLE = {
    "APP_ENV",
    "PORT",
    "DATABASE_URL",
    "REDIS_ADDRESS",
    "REDIS_PASSWORD",
    "REDIS_DB",
    "COUPON_ADMIN_TOKEN",
    "WORKERS",
}
# Read by docker-compose.yml itself, not by the service.
COMPOSE_ONLY = {"COUPON_PUBLISH_ADDRESS"}
SERVE = ["coupon", "serve"]
MIGRATE = ["coupon", "migrate"]


# --- readers ---------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage, continuation lines joined; index 0 holds what comes
    before the first FROM (global ARGs)."""
    stages: list[list[tuple[str, str]]] = [[]]
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        current = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def build_context() -> set[str]:
    """The paths `docker build .` sends, by .dockerignore as Docker reads it: the last line
    that matches a path decides, and a directory's line covers everything under it."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    return set(exclude_paths(str(ROOT), patterns, dockerfile="Dockerfile"))


def context_copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """A stage's COPY instructions from the build context: (sources, destination)."""
    found = []
    for key, rest in stage:
        if key == "COPY" and not rest.startswith("--from"):
            *sources, destination = rest.split()
            found.append((sources, destination))
    return found


def copy_from_context(context: set[str], sources: list[str], target: Path, into: bool) -> None:
    """COPY as Docker does it, from the build context alone: a directory's contents go into
    the target; a file goes to the target, or into it when it is a directory (`into`, or
    several sources)."""
    for source in sources:
        assert source in context, f"COPY {source}: not in the build context"
        if (ROOT / source).is_dir():
            for path in sorted(p for p in context if p.startswith(source + "/")):
                if (ROOT / path).is_file():
                    copied = target / Path(path).relative_to(source)
                    copied.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / path, copied)
        else:
            copied = target / Path(source).name if into or len(sources) > 1 else target
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / source, copied)


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def instruction(stage: list[tuple[str, str]], keyword: str) -> str | None:
    """The last `keyword` of a stage (the one Docker uses), or None."""
    found = [rest for key, rest in stage if key == keyword]
    return found[-1] if found else None


def exec_form(value: str) -> list[str]:
    """A JSON-array instruction; Docker silently falls back to the shell form when the
    JSON is malformed, so insist on valid JSON."""
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), value
    return parsed


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for key, rest in final_stage():
        if key == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {raw!r}"
            values[key.strip()] = value.strip()
    return values


def unescape(value: str) -> str:
    """Compose writes a literal `$` as `$$`; the container sees one `$`."""
    return value.replace("$$", "$")


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_builds_on_python_slim_in_stages() -> None:
    stages = dockerfile_stages()
    args = dict(rest.partition("=")[::2] for key, rest in stages[0] if key == "ARG")
    bases = [rest.split()[0] for stage in stages[1:] for key, rest in stage if key == "FROM"]
    assert len(bases) >= 2, "a build stage and a runtime stage"
    for base in bases:
        image = args.get(base.strip("${}"), base) if base.startswith("$") else base
        assert image.startswith("python:3.11-slim"), base


def test_dockerfile_installs_the_locked_dependencies_with_uv() -> None:
    runs = [rest for stage in dockerfile_stages() for key, rest in stage if key == "RUN"]
    syncs = [run for run in runs if "uv sync" in run]
    assert syncs, "the image installs with `uv sync`"
    for run in syncs:
        assert "--frozen" in run and "--no-dev" in run, run
    copied = " ".join(rest for stage in dockerfile_stages() for key, rest in stage if key == "COPY")
    assert "uv.lock" in copied and "pyproject.toml" in copied


def test_container_runs_as_a_non_root_user() -> None:
    stage = final_stage()
    user = instruction(stage, "USER")
    assert user is not None, "the runtime stage needs a USER line"
    name = user.split(":")[0]
    assert name not in ("root", "0"), user
    keywords = [key for key, _ in stage]
    assert keywords.index("USER") < keywords.index("CMD"), "USER before the command"
    if name.isdigit():
        # The numeric id has a passwd entry (logs and tools show a name, not a number).
        created = [rest for key, rest in stage if key == "RUN" and "useradd" in rest]
        assert created and f"--uid {name}" in created[0]


def test_dockerfile_command_is_the_readmes_coupon_serve_on_all_interfaces() -> None:
    stage = final_stage()
    entrypoint = instruction(stage, "ENTRYPOINT")
    cmd = instruction(stage, "CMD")
    assert cmd is not None
    command = (exec_form(entrypoint) if entrypoint else []) + exec_form(cmd)
    assert command == SERVE
    # `coupon serve` reads HOST, PORT and WORKERS; HOST=0.0.0.0 makes it reachable from
    # outside the container while `-e HOST=...` (or PORT, WORKERS) still overrides it.
    env = dockerfile_env()
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == "8000" and instruction(stage, "EXPOSE") == "8000"
    assert "/app/.venv/bin" in env["PATH"]


def test_the_commands_exist_as_the_readme_documents_them() -> None:
    readme = README.read_text()
    assert "coupon serve" in readme and "coupon migrate" in readme
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["coupon"] == "coupon.entrypoints.cli:main"
    parser = build_parser()
    assert parser.parse_args(SERVE[1:]).command == "serve"
    assert parser.parse_args(MIGRATE[1:]).command == "migrate"


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    ignored = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for path in (".git", ".venv", "node_modules", ".env", "**/__pycache__"):
        assert path in ignored, path
    # ...but not what the image is built from.
    for path in ("src", "pyproject.toml", "uv.lock", "README.md"):
        assert path not in ignored, path


# --- docker-compose.yml (static) -------------------------------------------------------


def test_every_path_the_dockerfile_copies_is_in_the_build_context() -> None:
    # A COPY of a path .dockerignore leaves out fails the build ("not found").
    context = build_context()
    copies = [srcs for stage in dockerfile_stages() for srcs, _ in context_copies(stage)]
    sources = [source for srcs in copies for source in srcs]
    assert "tools/build_feistel.py" in sources
    for source in sources:
        files = [p for p in context if (p == source or p.startswith(source + "/"))]
        assert any((ROOT / p).is_file() for p in files), f"COPY {source}: not in the build context"
    for left_out in (".env", ".git", ".venv", "loadtest", "tests", "bench", "harness"):
        assert not [p for p in context if p == left_out or p.startswith(left_out + "/")], left_out
    assert not [p for p in context if p.endswith(".so")], "a host build of the C network"


def test_the_build_stage_installs_a_working_service_from_the_build_context(
    tmp_path: Path,
) -> None:
    """The image's build stage, rehearsed without Docker: its COPYs take only what the
    build context holds, its RUNs that install (uv sync, the C network's build) run as
    written, and the virtual environment they make serves the service with the C
    network and without the load tool. (The base image's pip and apt-get steps are
    left to Docker.)"""
    build = dockerfile_stages()[1]
    context = build_context()
    workdir = tmp_path / "src"
    for sources, destination in context_copies(build):
        copy_from_context(context, sources, workdir / destination, destination.endswith("/"))
    env = {**os.environ}
    for key, rest in build:
        if key == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    venv = tmp_path / "venv"
    env.update(UV_PROJECT_ENVIRONMENT=str(venv), UV_PYTHON=sys.executable)
    env.pop("UV_NO_CACHE", None)  # the machine's cache, not PyPI, for the same locked wheels
    env.pop("VIRTUAL_ENV", None)
    uv = shutil.which("uv")
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), *([str(Path(uv).parent)] if uv else []), env["PATH"]]
    )
    installs = [rest for key, rest in build if key == "RUN" and ("uv sync" in rest)]
    assert installs, "the build stage installs with uv sync"
    for written in installs:
        command = written if uv else written.replace("uv sync", f"{sys.executable} -m uv sync")
        done = subprocess.run(
            ["sh", "-c", command],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"RUN {command}\n{done.stdout}\n{done.stderr}"

    probe = (
        "import importlib.util, coupon.domain._feistel, coupon.domain.codes as c\n"
        "assert importlib.util.find_spec('coupon_loadtest') is None\n"
        "print(c.__file__)"
    )
    done = subprocess.run(
        [venv / "bin" / "python", "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(venv)), "installed, not linked to the sources"
    for command in (SERVE, MIGRATE):
        helped = subprocess.run(
            [venv / "bin" / command[0], *command[1:], "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert helped.returncode == 0, helped.stderr


def test_compose_has_the_api_its_migration_postgres_and_redis() -> None:
    found = services()
    assert set(found) == {"api", "migrate", "postgres", "redis"}
    assert found["postgres"]["image"] == "postgres:16"
    assert found["redis"]["image"] == "redis:7"
    redis_command = " ".join(found["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_command


def test_compose_runs_the_readmes_commands_from_the_dockerfiles_image() -> None:
    found = services()
    api, migrate = found["api"], found["migrate"]
    assert api["command"] == SERVE
    assert migrate["command"] == MIGRATE
    assert api["build"] == migrate["build"] == "."
    assert api["image"] == migrate["image"], "one image for both"
    assert exec_form(instruction(final_stage(), "CMD") or "") == api["command"]
    assert migrate.get("restart") == "no", "migrate runs once"


def test_api_starts_only_after_the_migration_succeeded_and_the_stores_are_healthy() -> None:
    found = services()
    assert found["api"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert found["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}


def test_every_service_has_a_health_check() -> None:
    found = services()
    one_shot = {
        name
        for service in found.values()
        for name, dep in service.get("depends_on", {}).items()
        if dep.get("condition") == "service_completed_successfully"
    }
    assert one_shot == {"migrate"}
    for name, service in found.items():
        check = service.get("healthcheck")
        assert isinstance(check, dict), f"{name} has no healthcheck"
        if name in one_shot:
            # A job that exits: health does not apply, and the image's /readyz check is
            # switched off explicitly rather than inherited.
            assert check == {"disable": True}, name
            continue
        test = check["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
        assert check["interval"] and check["timeout"] and check["retries"], name


def test_api_health_check_is_the_images_curl_free_readyz_check() -> None:
    test = services()["api"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and "/readyz" in test[3]
    assert "curl" not in " ".join(test)
    healthcheck = instruction(final_stage(), "HEALTHCHECK")
    assert healthcheck is not None
    image_check = exec_form(healthcheck[healthcheck.index("CMD ") + 4 :])
    assert image_check == test[1:], "the Dockerfile and compose run the same check"


def test_env_example_lists_the_go_compatible_variables_and_the_api_gets_each() -> None:
    example = env_example()
    assert set(example) >= GO_COMPATIBLE
    operations = OPERATIONS.read_text()
    environment = services()["api"]["environment"]
    for name in example:
        assert f"`{name}`" in operations, f"{name} is not in docs/operations.md"
        if name in COMPOSE_ONLY:
            assert any("${" + name in port for port in services()["api"]["ports"]), name
            continue
        assert name in environment, f"the api service does not get {name}"
        # Passed through from .env / the environment, not hard-coded.
        assert str(environment[name]).startswith("${" + name), (name, environment[name])
    assert environment["HOST"] == "0.0.0.0"


def test_env_example_is_also_a_working_env_file_for_coupon_serve() -> None:
    """Empty values mean the defaults, so a copy of .env.example works on the machine too."""
    settings = load_settings({}, dotenv=ENV_EXAMPLE)
    assert settings.app_env == "development" and settings.port == 8000
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/coupon"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


# --- docker-compose (the tool) ---------------------------------------------------------

DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose is not installed (`just test` installs Debian's when run as root); "
    "it validates docker-compose.yml without a Docker engine",
)


def run_compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """docker-compose on a copy of the compose file next to `env_file`, its .env: the
    variables of this shell and the project's own .env stay out of it."""
    assert DOCKER_COMPOSE is not None
    assert env_file.name == ".env", "the api service's env_file"
    compose_file = env_file.parent / COMPOSE.name
    compose_file.write_text(COMPOSE.read_text())
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": str(env_file.parent)}
    return subprocess.run(
        [DOCKER_COMPOSE, "-f", str(compose_file), "--env-file", str(env_file), *args],
        env=clean,
        cwd=env_file.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def resolved(env_file: Path) -> dict[str, Any]:
    done = run_compose(env_file, "config")
    assert done.returncode == 0, done.stderr
    loaded = yaml.safe_load(done.stdout)
    assert isinstance(loaded, dict)
    return loaded


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port; compose writes
    one with an address as `address:published:target/tcp`, one without as a mapping."""
    ports: list[tuple[str, int, int]] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
        else:
            address, host, target = str(port).removesuffix("/tcp").rsplit(":", 2)
            ports.append((address, int(host), int(target)))
    return ports


@needs_compose
@pytest.mark.parametrize("env_file", ["empty", ".env.example"])
def test_docker_compose_config_is_valid(tmp_path: Path, env_file: str) -> None:
    source = tmp_path / ".env"
    source.write_text("" if env_file == "empty" else ENV_EXAMPLE.read_text())
    done = run_compose(source, "config", "-q")
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr


@needs_compose
def test_resolved_compose_environment_is_accepted_by_the_service(tmp_path: Path) -> None:
    source = tmp_path / ".env"
    source.write_text(ENV_EXAMPLE.read_text())
    api = resolved(source)["services"]["api"]
    env = {k: str(v) for k, v in api["environment"].items()}
    settings = load_settings(env, dotenv=None)
    assert settings.host == "0.0.0.0" and settings.port == 8000 and settings.workers == 1
    assert settings.database_url == "postgresql://coupon:coupon@postgres:5432/coupon"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.admin_token == "" and not settings.production
    assert published(api) == [("127.0.0.1", 8000, 8000)]
    migrate = resolved(source)["services"]["migrate"]
    assert (
        load_settings(
            {k: str(v) for k, v in migrate["environment"].items()}, dotenv=None
        ).database_url
        == settings.database_url
    )


@needs_compose
def test_values_from_env_reach_the_api_and_redis(tmp_path: Path) -> None:
    source = tmp_path / ".env"
    source.write_text(
        "APP_ENV=production\nPORT=9000\nWORKERS=4\nCOUPON_ADMIN_TOKEN=s3cret-s3cret-s3cret\n"
        "REDIS_PASSWORD=p@ss\nREDIS_DB=2\n"
        "DATABASE_URL=postgresql://app:pw@db.internal:5432/coupons\n"
    )
    config = resolved(source)["services"]
    env = {k: str(v) for k, v in config["api"]["environment"].items()}
    settings = load_settings(env, dotenv=None)
    assert settings.production and settings.admin_token == "s3cret-s3cret-s3cret"
    assert settings.port == 9000 and settings.workers == 4
    assert settings.redis_url == "redis://:p%40ss@redis:6379/2"
    assert settings.database_url == "postgresql://app:pw@db.internal:5432/coupons"
    assert published(config["api"]) == [("127.0.0.1", 9000, 9000)]
    assert config["redis"]["environment"]["REDIS_PASSWORD"] == "p@ss"


@needs_compose
def test_every_setting_in_env_reaches_the_api_and_the_containers_own_win(
    tmp_path: Path,
) -> None:
    """`.env` is read whole (env_file), not only the variables the compose file names;
    what must differ inside the containers still wins over it."""
    source = tmp_path / ".env"
    source.write_text(
        ENV_EXAMPLE.read_text() + "COUPON_CORS_ORIGINS=https://shop.example.com\n"
        "COUPON_REDIS_PREFIX=shop\n"
        "COUPON_DB_POOL_SIZE=16\n"
        "COUPON_KEEPALIVE_SECONDS=30\n"
        "REDIS_URL=redis://cache.internal:6380/1\n"
        "HOST=127.0.0.1\n"
    )
    api = resolved(source)["services"]["api"]
    settings = load_settings({k: str(v) for k, v in api["environment"].items()}, dotenv=None)
    assert settings.cors_origins == ("https://shop.example.com",)
    assert settings.redis_prefix == "shop"
    assert settings.db_pool_size == 16 and settings.keepalive_seconds == 30
    assert settings.redis_url == "redis://cache.internal:6380/1"
    assert settings.host == "0.0.0.0"
    assert settings.database_url == "postgresql://coupon:coupon@postgres:5432/coupon"


@needs_compose
@pytest.mark.parametrize(
    ("dotenv", "where"),
    [
        ("", ("127.0.0.1", 8000, 8000)),
        ("PORT=9000\nCOUPON_PUBLISH_ADDRESS=\n", ("127.0.0.1", 9000, 9000)),
        ("COUPON_PUBLISH_ADDRESS=0.0.0.0\n", ("0.0.0.0", 8000, 8000)),
        ("COUPON_PUBLISH_ADDRESS=192.168.1.5\n", ("192.168.1.5", 8000, 8000)),
    ],
)
def test_the_api_is_published_on_loopback_unless_told_otherwise(
    tmp_path: Path, dotenv: str, where: tuple[str, int, int]
) -> None:
    """As `coupon serve` listens: the admin RPCs are open in development, without a token."""
    source = tmp_path / ".env"
    source.write_text(dotenv)
    assert published(resolved(source)["services"]["api"]) == [where]


# --- the health checks and the Redis command, run for real -----------------------------


def run_check(test: list[str], env: dict[str, str]) -> int:
    kind, *command = test
    if kind == "CMD-SHELL":
        command = ["sh", "-c", unescape(command[0])]
    elif command[0] == "python":
        command = [sys.executable, *command[1:]]
    return subprocess.run(
        command, env={"PATH": os.environ.get("PATH", ""), **env}, timeout=20, check=False
    ).returncode


@pytest.mark.e2e
def test_api_health_check_passes_when_ready_and_fails_when_down() -> None:
    test = services()["api"]["healthcheck"]["test"]
    server = ServerProcess(env={}, in_memory=True)
    try:
        server.wait_ready()
        assert run_check(test, {"PORT": str(server.port)}) == 0
    finally:
        server.stop()
    assert run_check(test, {"PORT": str(server.port)}) != 0


REDIS_SERVER = shutil.which("redis-server")


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
@pytest.mark.parametrize("password", ["", "pa ss$word"])
def test_redis_command_and_health_check(tmp_path: Path, password: str) -> None:
    """The compose file's redis command and health check, with the same shell, against a
    redis-server on a free loopback port (no persistence, in a scratch directory)."""
    redis = services()["redis"]
    port = free_port()
    script = unescape(redis["command"][2]).replace(
        "redis-server",
        f"redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no "
        f"--dir {shlex.quote(str(tmp_path))}",
        1,
    )
    env = {"PATH": os.environ.get("PATH", ""), "REDIS_PASSWORD": password}
    process = subprocess.Popen(
        [*redis["command"][:2], script], env=env, cwd=tmp_path, start_new_session=True
    )
    check = redis["healthcheck"]["test"]
    check = [check[0], unescape(check[1]).replace("redis-cli", f"redis-cli -p {port}")]
    try:
        deadline = time.monotonic() + 10
        while run_check(check, {"REDIS_PASSWORD": password}) != 0:
            assert process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis never became healthy"
            time.sleep(0.05)
        cli = ["redis-cli", "-p", str(port)]
        cli_env = {**env, "REDISCLI_AUTH": password} if password else env
        policy = subprocess.run(
            [*cli, "config", "get", "maxmemory-policy"],
            env=cli_env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert policy == ["maxmemory-policy", "noeviction"]
        if password:
            # The password is really required, and a wrong one fails the health check.
            anonymous = subprocess.run(
                [*cli, "ping"], env=env, capture_output=True, text=True, check=False
            )
            assert "NOAUTH" in anonymous.stdout + anonymous.stderr
            assert run_check(check, {"REDIS_PASSWORD": "wrong"}) != 0
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
