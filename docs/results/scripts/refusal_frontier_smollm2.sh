#!/usr/bin/env bash
# Issue 16, refusal induction on SmolLM2-135M-Instruct: an SAE at layer 12, then the frontier of STA
# (amplitude/frequency and output-scored atoms), CAA, SAE-all, HSI-style head steering and prompting,
# swept over λ, with random-direction controls at λ = 1, compared at equal over-refusal (XSTest safe).
#   bash docs/results/scripts/refusal_frontier_smollm2.sh [OUT]
set -euo pipefail
M=smollm2-135m-instruct
R=${1:-runs/frontier-smollm2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$R"
step() { echo "[$(date +%T)] $*" >&2; }
[ -f "$R/sae/cfg.json" ] || { step "SAE";
  finesteer sae train "$M" --layer 12 --width 1152 --k 32 --tokens 30000 --epochs 4 --out "$R/sae" --json \
    > "$R/sae.json"; }
step "frontier"
finesteer frontier "$M" --sae "$R/sae" --methods baseline,prompt,caa,sae_all,sta,sta_output \
  --lambdas 0.25,0.5,0.75,1,1.5 --direction-controls-at 1 --head-steer-k 8 --head-steer-alpha 8 \
  --n-harmful 50 --n-harmless 50 --n-kl 30 --max-new-tokens 32 --batch-size 25 --judge gcg+ \
  --out "$R/frontier" --json > "$R/frontier-result.json"
step "done"
