#!/usr/bin/env bash
# Installs the service (into .venv) and starts it: API plus an embedded worker unless REDIS_URL is set.
# Extra arguments go to `exclip-service serve`, e.g. `bash scripts/serve.sh --pretrained none`.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
pip install -q -e .
exec exclip-service serve "$@"
