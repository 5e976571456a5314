# coupon: the Connect API served by uvicorn, in a slim image that runs as a non-root user.
#
#   docker build -t coupon .
#   docker run --rm -e DATABASE_URL=... -e REDIS_ADDRESS=... coupon coupon migrate
#   docker run --rm -p 8000:8000 -e DATABASE_URL=... -e REDIS_ADDRESS=... coupon
#
# The default command is `coupon serve`; HOST (0.0.0.0 here), PORT and WORKERS come from
# the environment like every other setting (see docs/operations.md, Configuration).
# docker-compose.yml runs `coupon migrate` once before the API starts.
#
# Plain Dockerfile syntax (no BuildKit-only features), so the classic builder that
# docker-compose 1.x uses builds it too.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: resolve nothing, install exactly what uv.lock says, into /app/.venv -----------
# The service alone: --no-dev leaves out the dev group, and with it the load tool
# (coupon-loadtest, the workspace member in loadtest/, which the build context excludes).
FROM ${PYTHON_IMAGE} AS build

ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
# A C compiler, in this stage only, for the code cipher's network (tools/build_feistel.py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /src
# Dependencies first: this layer is reused until pyproject.toml or uv.lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
# Then the project itself, as a regular (non-editable) install: the runtime image needs
# only the virtual environment, not the sources.
# The code cipher's C network is built into src/ first, so the install carries it.
COPY src ./src
COPY tools/build_feistel.py ./tools/build_feistel.py
RUN python tools/build_feistel.py src && uv sync --frozen --no-dev --no-editable

# --- runtime ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

RUN groupadd --system --gid 10001 coupon \
    && useradd --system --uid 10001 --gid coupon --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin coupon

COPY --from=build /app/.venv /app/.venv

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    WORKERS=1

# Read-only for the service; it writes only to /tmp (Prometheus multi-process files).
WORKDIR /app
USER 10001:10001
EXPOSE 8000

# Ready means PostgreSQL and Redis answer (GET /readyz); no curl in a slim image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % (os.environ.get('PORT') or 8000), timeout=4)"]

# SIGTERM: uvicorn stops accepting, in-flight issues commit, then it exits (up to 30 s).
STOPSIGNAL SIGTERM
CMD ["coupon", "serve"]
