#!/usr/bin/env bash
# The README's quick-start walkthrough, run for real on the embedded SmolLM2-135M:
# study → dashboard (headless Chromium screenshot) → report → apply (checkpoint reloaded in plain
# transformers, recipe checked against the plan). Regenerates benchmarks/walkthrough/ (PNGs,
# summary.md, dashboard.png) and benchmarks/walkthrough.md (the commands' output). Work files go
# to runs/walkthrough/ (not committed).
#
#   bash benchmarks/walkthrough.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=runs/walkthrough
OUT=benchmarks/walkthrough
LOG=benchmarks/walkthrough.md
STORE="sqlite:///$WORK/s.db"
rm -rf "$WORK" "$OUT"
mkdir -p "$WORK" "$OUT"
started=$(date +%s)
{
  echo "# Quick-start walkthrough, run for real (benchmarks/walkthrough.sh)"
  echo
  echo "$(date -u +%Y-%m-%d), $(nproc) CPU cores, load average at the start $(cut -d' ' -f1 /proc/loadavg)."
  echo "Every block below is the command and its output, as printed (progress bars off)."
} > "$LOG"

step() {  # step TITLE CMD...: run, tee the output into the log
  local title=$1; shift
  echo "== $title"
  { echo; echo "## $title"; echo; echo '```'; echo "\$ $*"; } >> "$LOG"
  "$@" 2>&1 | tee -a "$LOG"
  echo '```' >> "$LOG"
}

step "1. Search" sparsealloc --quiet study run --name s60 --storage "$STORE" --model smollm2-135m \
  --target-sparsity 0.6 --trials 30 --calib-samples 8 --calib-seq-len 128 --export "$WORK/s60"

step "1b. Search KV bits too: proxy × KV bytes with NSGA-III" sparsealloc --quiet study run --name s60kv \
  --storage "$STORE" --model smollm2-135m --target-sparsity 0.6 --space layerwise,kv --objectives hidden,kv_bytes \
  --sampler nsga3 --population-size 8 --trials 24 --calib-samples 8 --calib-seq-len 128 --validate-top 3 \
  --export "$WORK/s60kv"

# 2. Watch: the dashboard on the store, rendered by headless Chromium
PORT=8093
sparsealloc dashboard --storage "$STORE" --port "$PORT" > "$WORK/dashboard.log" 2>&1 &
DASH=$!
trap 'kill $DASH 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/api/studies" > /dev/null && break; sleep 0.5; done
STUDY_ID=$(curl -sf "http://127.0.0.1:$PORT/api/studies" | python3 -c "import json,sys; print([s['study_id'] for s in json.load(sys.stdin)['study_summaries'] if s['study_name']=='s60'][0])")
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --user-data-dir="$WORK/chromium" --virtual-time-budget=15000 --window-size=1280,1000 \
  --screenshot="$OUT/dashboard.png" "http://127.0.0.1:$PORT/dashboard/studies/$STUDY_ID" > /dev/null 2>&1
kill $DASH
{ echo; echo "## 2. Watch"; echo; echo "\`sparsealloc dashboard --storage $STORE --port $PORT\`, page"
  echo "\`/dashboard/studies/$STUDY_ID\` captured by headless Chromium: [dashboard.png](walkthrough/dashboard.png)"; } >> "$LOG"

step "3. Report" sparsealloc --quiet report s60 --storage "$STORE" --out "$WORK/report"
cp "$WORK"/report/*.png "$WORK"/report/summary.md "$OUT"/
step "3b. Report the KV study" sparsealloc --quiet report s60kv --storage "$STORE" --out "$WORK/report-kv"
for f in "$WORK"/report-kv/*.png; do cp "$f" "$OUT/kv-$(basename "$f")"; done
cp "$WORK"/report-kv/summary.md "$OUT"/kv-summary.md

step "4. Apply" sparsealloc --quiet apply --plan "$WORK/s60/best.json" --model smollm2-135m --save "$WORK/ckpt"

step "5. Check the checkpoint and the recipe" env HF_HUB_DISABLE_PROGRESS_BARS=1 python3 - "$WORK" <<'PY'
import sys
from pathlib import Path

import yaml
from transformers import AutoModelForCausalLM

from sparsealloc.core import AllocationPlan
from sparsealloc.storage.recipes import recipe_sparsity

work = Path(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(work / "ckpt")  # plain transformers loads it
recipe = yaml.safe_load((work / "ckpt" / "recipe.yaml").read_text())
per_layer = recipe_sparsity(recipe)  # module FQN -> ratio (the recipe lists one ratio per target)
plan = AllocationPlan.load(work / "ckpt" / "plan.json").expand(list(per_layer))
assert per_layer == plan, "recipe and plan differ"
modules = dict(model.named_modules())
worst = max(abs(float((modules[n].weight == 0).float().mean()) - r) for n, r in per_layer.items())
mean = sum(float((modules[n].weight == 0).float().mean()) * modules[n].weight.numel() for n in per_layer) / sum(
    modules[n].weight.numel() for n in per_layer)
print(f"reloaded {type(model).__name__} with plain transformers; recipe entries {len(per_layer)}, all equal to "
      f"the plan's; zeros per Linear vs planned ratio: max |difference| {worst:.4f}; mean sparsity {mean:.4f}")
PY
echo >> "$LOG"
echo "Whole walkthrough: $(( $(date +%s) - started )) s." >> "$LOG"
echo "wrote $LOG and $OUT/"
