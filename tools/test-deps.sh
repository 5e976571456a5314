#!/usr/bin/env bash
# What the tests need beyond the Python environment, installed when missing:
#   * npm packages from package-lock.json (buf, and the Node clients the protocol tests use);
#   * on Debian, as root: chromium (browser tests), docker-compose (validates
#     docker-compose.yml without a Docker engine) and faketime (runs `coupon campaigns`
#     under a clock that is not the service's).
# Each install runs only when its tool is missing, so a second `just test` installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x node_modules/.bin/buf ] || ! npm ls --silent >/dev/null 2>&1; then
    npm ci --silent --no-audit --no-fund
fi

debian=()
command -v chromium >/dev/null || debian+=(chromium)
# Coupon codes are Hangul: without a Korean font the example page's screenshot shows boxes.
[ -d /usr/share/fonts/truetype/nanum ] || debian+=(fonts-nanum)
command -v docker-compose >/dev/null || debian+=(docker-compose)
command -v faketime >/dev/null || debian+=(faketime)
if [ ${#debian[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing ${debian[*]} (apt-get) ..." >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq "${debian[@]}" >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq "${debian[@]}" >/dev/null; }
    else
        echo "not installed: ${debian[*]} (needs root and apt-get); the tests that need them are skipped" >&2
    fi
fi

# gcc builds bench/openloop.c, the bench's open-loop generator, which a test runs.
if ! command -v gcc >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing gcc (apt-get) ..." >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null 2>&1 \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null; }
    else
        echo "not installed: gcc (needs root and apt-get); the generator's test is skipped" >&2
    fi
fi
