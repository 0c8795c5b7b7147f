#!/usr/bin/env bash
# Installs what the whole test suite needs (into .venv) and runs it: ruff, mypy, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/attribution -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
# Pinned for the test environment: these builds are on the machines' disk (others are multi-GB downloads).
pip install -q "torch==2.14.1" "torchvision==0.29.1"
pip install -q -e ".[test]"
# The authors' reference implementation, the oracle of the equivalence tests. Its only declared
# dependency is an unavailable git URL, and the module itself imports nothing but torch and tqdm.
pip install -q --no-deps exclip==1.1 tqdm

# System programs the tests start: a private redis-server per test session, and Chromium for the page.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "error: the tests need ${missing[*]}; install them (Debian: apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi

ruff check .
ruff format --check .
mypy  # configured in pyproject.toml: strict on attribution/, default checks on service/, testing/, bench/ and scripts/
# Many processes share few cores in these tests (API, workers, browser); one thread each avoids thrashing.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Test processes in parallel (pytest-xdist), one per core by default (TEST_PROCESSES=1: one process).
# Each starts its own Redis, services and browsers on free ports; tests are handed out one at a time.
exec python -m pytest -n "${TEST_PROCESSES:-auto}" --dist worksteal "$@"
