#!/usr/bin/env bash
# `just up` and `just down`: docker compose (the v2 plugin, else docker-compose v1) with the
# given arguments, once the Docker engine answers. Compose needs the engine, and without it
# docker-compose v1 prints a Python traceback of a hundred lines: this says so in one. Run
# from the directory of docker-compose.yml (as `just` does); makes .env when missing.
#
#   tools/compose.sh up -d --build      tools/compose.sh down -v
set -euo pipefail

command=${1:?usage: tools/compose.sh COMMAND [ARGS...]}

fail() {
    echo "just $command: $*" >&2
    exit 1
}

engine_down() {
    fail "the Docker engine is not reachable ($1); docker compose needs a running engine:" \
        "start it (sudo systemctl start docker, or open Docker Desktop) and try again"
}

if command -v docker >/dev/null 2>&1; then
    # Asks the engine itself, wherever DOCKER_HOST or the current docker context points.
    if ! error=$(docker version --format '{{.Server.Version}}' 2>&1 >/dev/null); then
        engine_down "${error##*$'\n'}"
    fi
elif command -v docker-compose >/dev/null 2>&1; then
    # No docker CLI to ask: the engine's default socket, or DOCKER_HOST's, must exist.
    host=${DOCKER_HOST:-unix:///var/run/docker.sock}
    if [[ $host == unix://* && ! -S ${host#unix://} ]]; then
        engine_down "no socket at ${host#unix://}"
    fi
else
    fail "Docker is not installed; it needs Docker Engine with compose" \
        "(https://docs.docker.com/engine/install/)"
fi

# The api service reads .env (env_file in docker-compose.yml), which compose requires to
# exist: without one, start from .env.example, every setting at its default.
if [[ -f docker-compose.yml && ! -e .env ]]; then
    printf '%s\n' "$(<.env.example)" >.env
    echo "just $command: no .env: copied .env.example to .env (every setting at its default)" >&2
fi

if docker compose version >/dev/null 2>&1; then
    exec docker compose "$@"
elif command -v docker-compose >/dev/null 2>&1; then
    exec docker-compose "$@"
fi
fail "docker compose is not installed (the compose plugin, or docker-compose)"
