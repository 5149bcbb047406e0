#!/usr/bin/env bash
# Issue 16, the model-size check: on qwen2.5-coder-1.5b-instruct (about 3x slower than 0.5B), the
# refusal direction (last 2 post-instruction positions), the refusal-logit head ranking, and the
# frontier of directional ablation vs its top-3 / top-8 heads vs random heads (2 seeds), generated
# ASR on 60 held-out JailbreakBench prompts. Every step is skipped when its output exists.
#   bash docs/results/scripts/refusal_frontier_qwen1.5b.sh [OUT]
set -euo pipefail
M=qwen2.5-coder-1.5b-instruct
R=${1:-runs/frontier-qwen1.5b}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$R"
step() { echo "[$(date +%T)] $*" >&2; }
[ -f "$R/direction.json" ] || { step "refusal direction";
  finesteer locate refusal-direction "$M" --n-train 32 --n-val 8 --positions 2 --shortlist 3 --batch-size 8 \
    --out "$R/direction" --json > "$R/direction.json"; }
[ -f "$R/refusal-logit/scores.safetensors" ] || { step "refusal-logit ranking";
  finesteer locate attribution "$M" --data refusal-direction-harmful --split train --limit 32 \
    --metric refusal --mode sc --top-n 8 --out "$R/refusal-logit" --json > "$R/refusal-logit.json"; }
step "frontier"
finesteer frontier "$M" --goal remove --methods '' --direction "$R/direction" --ranking "$R/refusal-logit" \
  --ks 3,8 --seeds 0,1 --mode sc --n-harmful 60 --n-harmless 20 --n-kl 20 --max-new-tokens 24 --batch-size 20 \
  --judge gcg+ --out "$R/frontier" --json > "$R/frontier-result.json"
step "done"
