#!/usr/bin/env bash
# Issue 14's re-run of the six-method A/B comparison with the default checks (both option orders,
# 3 matched-control seeds, intervals, verdicts), as four processes side by side on a 2-core machine:
# each part writes its own folder, then the parts' finished methods are copied into one folder and
# `finesteer compare` resumes them all there (nothing is evaluated twice; the verdicts are then
# Holm-adjusted over all six methods).
#   bash docs/results/scripts/compare_split.sh MODEL DATA OUT          (both halves, then the merge)
#   bash docs/results/scripts/compare_split.sh MODEL DATA OUT a|b|c|d|merge (one step)
set -euo pipefail
M=$1; D=$2; R=$3; WHAT=${4:-all}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ARGS=(--data "$D" --train-limit 80 --val-limit 32 --open-ended-limit 20 --max-new-tokens 64
      --ab-max-new-tokens 24 --harmless-limit 16 --judge none)
LORA=(--settings '{"lora": {"max_steps": 30}}')
step() { echo "[$(date +%T)] $*" >&2; }
mkdir -p "$R"
part_a() { finesteer compare "$M" "${ARGS[@]}" --methods baseline,prompt,caa --out "$R/part-a" --json \
  > "$R/part-a.json" 2> "$R/part-a.log"; }
part_b() { finesteer compare "$M" "${ARGS[@]}" "${LORA[@]}" --methods lora --out "$R/part-b" --json \
  > "$R/part-b.json" 2> "$R/part-b.log"; }
part_c() { finesteer compare "$M" "${ARGS[@]}" --methods hsi --out "$R/part-c" --json \
  > "$R/part-c.json" 2> "$R/part-c.log"; }
part_d() { finesteer compare "$M" "${ARGS[@]}" --methods iti --out "$R/part-d" --json \
  > "$R/part-d.json" 2> "$R/part-d.log"; }
case $WHAT in
  a) part_a; exit ;;
  b) part_b; exit ;;
  c) part_c; exit ;;
  d) part_d; exit ;;
  all) step "parts"; part_a & part_b & part_c & part_d & wait ;;
  merge) ;;
  *) echo "unknown step $WHAT" >&2; exit 2 ;;
esac
step "merge"
mkdir -p "$R/all"
for part in a b c d; do
  [ -d "$R/part-$part" ] || continue
  cp -rn "$R/part-$part"/. "$R/all/" 2>/dev/null || true
  cp "$R/part-$part"/methods/*.json "$R/all/methods/"
done
rm -f "$R/all/results.json" "$R/all"/*.lock
finesteer compare "$M" "${ARGS[@]}" "${LORA[@]}" --methods baseline,prompt,caa,iti,lora,hsi --out "$R/all" --json \
  > "$R/result.json" 2> "$R/all.log"
step "done"
