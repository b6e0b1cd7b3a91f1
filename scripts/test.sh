#!/usr/bin/env bash
# Install moesim with its test extras and run the whole test suite (the README's test command).
# On a machine without a GPU, the pinned CPU build of PyTorch goes in first so that nothing pulls
# a multi-GB CUDA build. pytest exit status 5 (no tests collected) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python3 -m pip install -q torch==2.13.0
fi
python3 -m pip install -q -e '.[test,real,capture,sweep]'
set +e
# Two workers (CI has 2 cores); tests sharing an expensive fixture stay on one worker (tests/conftest.py).
python3 -m pytest -n 2 --dist loadgroup "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
