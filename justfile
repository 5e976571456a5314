# coupon — first-come-first-served coupon issuance service.
# `just serve` serves; `just test` runs every test. Each sets itself up.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := ".venv/bin/python"

# List the recipes.
default:
    @just --list

# Create .venv and install the project with its development tools (idempotent).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    if command -v uv >/dev/null; then uv=(uv); else
        python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv>=0.5"
        uv=(python3 -m uv)
    fi
    "${uv[@]}" sync --frozen --quiet
    .venv/bin/python tools/build_feistel.py

# Serve the API on PORT (8000), creating the database and schema when missing.
serve *ARGS: setup
    {{python}} -m coupon serve {{ARGS}}

# Serve with the in-memory backend: no PostgreSQL or Redis needed (one process).
demo *ARGS: setup
    {{python}} -m coupon serve --in-memory {{ARGS}}

# Create the database when missing and apply migrations.
migrate: setup
    {{python}} -m coupon migrate

# Lint: ruff, formatting, mypy --strict, buf lint of the proto, and buf breaking against
# the released API (proto/released.binpb): fields and RPCs may be added, never renamed,
# renumbered or removed.
[doc('Lint: ruff, formatting, mypy --strict, buf lint, and buf breaking against the released API.')]
lint: setup
    .venv/bin/ruff check src loadtest harness tests tools bench
    .venv/bin/ruff format --check src loadtest harness tests tools bench
    .venv/bin/mypy
    just buf lint
    just buf breaking --against proto/released.binpb

# After a release: record the current proto as the API that `just lint` keeps compatible.
release-api:
    just buf build -o proto/released.binpb

# Run every test (lint first). Local PostgreSQL/Redis are used when reachable,
# testcontainers otherwise. Extra arguments go to pytest.
[doc('Run every test, lint first (local PostgreSQL/Redis when reachable, else testcontainers); extra arguments go to pytest.')]
test *ARGS: lint test-deps
    #!/usr/bin/env bash
    set -euo pipefail
    eval "$({{python}} -m tools.test_services)"
    exec {{python}} -m pytest {{ARGS}}

# Install what the tests need beyond Python (npm packages; chromium, docker-compose and faketime on Debian).
test-deps:
    tools/test-deps.sh

# Run buf (installed from npm into node_modules on first use), e.g. `just buf lint`.
buf *ARGS:
    @[ -x node_modules/.bin/buf ] || npm ci --silent --no-audit --no-fund
    node_modules/.bin/buf {{ARGS}}

# Regenerate the protobuf and Connect code from proto/.
gen: setup
    {{python}} -m tools.gen

# Run the load-test and verification tool against a running server (docs/loadtest.md).
loadtest *ARGS: setup
    {{python}} -m coupon loadtest {{ARGS}}

# Measure IssueCoupon against two no-op ceilings and under overload, verify the invariants,
# print the table (docs/performance.md; `just bench --quick` to try it, `--help` for options).
[doc('Measure IssueCoupon against two no-op ceilings and under overload (`--quick` to try it, `--help` for options).')]
bench *ARGS: setup
    {{python}} -m bench {{ARGS}}

# CPU per issued coupon of the working tree (or --against-ref OTHER) against REV, both
# servers measured at once on one core so the VM's drift moves both alike (docs/performance.md).
[doc('CPU per issued coupon of the working tree against REV, both servers measured at once on one core.')]
bench-side *ARGS: setup
    {{python}} -m bench.side {{ARGS}}

# Settings from .env (see .env.example); uses `docker compose`, else `docker-compose`,
# once the Docker engine answers (tools/compose.sh).
# Build and start the Docker stack: api (after `coupon migrate`), PostgreSQL, Redis.
up *ARGS:
    @tools/compose.sh up -d --build {{ARGS}}

# `just down -v` also deletes the database volume.
# Stop and remove the Docker stack's containers.
down *ARGS:
    @tools/compose.sh down {{ARGS}}

# Two instances on a throwaway 3-master Redis Cluster: burst, kill a master, verify, tear down.
cluster-demo *ARGS: setup
    {{python}} -m tools.cluster_demo {{ARGS}}

# At scale: sell out a 1,000,000-coupon campaign (RSS, I1-I4, every page),
# GetCampaign paging with 10,000,000 coupon rows, and ExportCoupons of a 10,000,000-coupon
# campaign (bench/scale/; `--help` for options).
[doc('At scale: a 1,000,000-coupon sell-out, GetCampaign and ExportCoupons over 10,000,000 rows (`--help`).')]
bench-scale *ARGS: setup
    {{python}} -m bench.scale {{ARGS}}
