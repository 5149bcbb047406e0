#!/usr/bin/env bash
# Issue 16 on one model: the refusal direction, three head rankings, forward selection, and the
# frontier (generated ASR on held-out JailbreakBench, harmless KL, XSTest over-refusal) of
# directional ablation vs top-k heads of every ranking vs random heads. Every step resumes or is
# skipped when its output exists.
#   bash docs/results/scripts/refusal_frontier_qwen.sh [MODEL] [OUT] [N_HARMFUL] [KS]
set -euo pipefail
M=${1:-qwen2.5-coder-0.5b-instruct}
R=${2:-runs/frontier-qwen0.5b}
N=${3:-100}
KS=${4:-3,8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$R"
step() { echo "[$(date +%T)] $*" >&2; }
if [ ! -f "$R/direction/run.json" ] && [ ! -f "$R/direction/result.json" ]; then
  step "refusal direction"
  finesteer locate refusal-direction "$M" --n-train 32 --n-val 8 --shortlist 4 --batch-size 16 \
    --out "$R/direction" --json > "$R/direction.json"
fi
[ -f "$R/refusal-logit/scores.safetensors" ] || { step "refusal-logit ranking";
  finesteer locate attribution "$M" --data refusal-direction-harmful --split train --limit 32 \
    --metric refusal --mode sc --top-n 8 --out "$R/refusal-logit" --json > "$R/refusal-logit.json"; }
[ -f "$R/ships-kl/scores.safetensors" ] || { step "Ships KL ranking";
  finesteer locate attribution "$M" --data refusal-direction-harmful --split train --limit 32 \
    --metric kl --mode ua --top-n 8 --out "$R/ships-kl" --json > "$R/ships-kl.json"; }
[ -f "$R/head-direction/scores.safetensors" ] || { step "refusal-direction head ranking";
  finesteer locate head-direction "$M" --direction "$R/direction" --limit 32 \
    --compare "$R/refusal-logit,$R/ships-kl" --out "$R/head-direction" --json > "$R/head-direction.json"; }
[ -f "$R/joint/result.json" ] || { step "forward selection (+ search)";
  finesteer locate joint "$M" --pool-from "$R/refusal-logit,$R/ships-kl,$R/head-direction" --per-table 4 \
    --k 8 --split val --limit 16 --search --n-trials 30 --max-heads 3 --out "$R/joint" --json > "$R/joint.json"; }
step "frontier"
# the ranking whose top-k get the random controls comes first; Ships KL and the direction score only at k = 3
top() { python -c "from pathlib import Path; from finesteer.locate.run_folder import ranking_from_folder as r; \
print(','.join(f'{a}.{b}' for a, b in r(Path('$1'), $2)))"; }
finesteer frontier "$M" --goal remove --methods '' --direction "$R/direction" \
  --heads "refusal-logit=$(top "$R/refusal-logit" 8)" --heads "ships-kl=$(top "$R/ships-kl" 3)" \
  --heads "head-direction=$(top "$R/head-direction" 3)" --ranking "$R/joint" \
  --ks "$KS" --mode sc --n-harmful "$N" --n-harmless 30 --n-kl 30 --max-new-tokens 32 --batch-size 25 \
  --judge gcg+ --out "$R/frontier" --json > "$R/frontier-result.json"
step "done"
