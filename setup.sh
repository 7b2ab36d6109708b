#!/usr/bin/env bash
# One command from a fresh machine to a working checkout: .venv with the pinned dependencies.
# Debian packages: none needed (soundfile's wheel carries libsndfile; torch's wheels carry their libraries).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "distmeta needs Python >= 3.10"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --upgrade --quiet "pip>=23.2"
# requirements.lock pins every transitive dependency to the versions CI tests.
.venv/bin/python -m pip install --progress-bar off -c requirements.lock -e ".[test]"
.venv/bin/python -c "import distmeta, torch, ray, s3prl, mlflow; print('distmeta ready: torch', torch.__version__, '| ray', ray.__version__)"
