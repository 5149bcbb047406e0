#!/usr/bin/env bash
# One-shot GPU check of finesteer, run from the repo root on a CUDA machine without internet:
#     bash benchmarks/gpu_run.sh          # carries .whl (wheels) and .gpu (a real config.json)
# Steps (each under a timeout, which add up to 8 min; expected ~3-4 min on one H200; a failed step is
# reported and the next still runs): install the carried wheels, print versions and the GPU, gpu_smoke
# (tiny models: invariants + CPU-vs-GPU), the real-shape timing (random Qwen2.5-0.5B shape: Ships scan
# simple vs fast, steered vs plain generation), two test files. Results land in $OUT (default ./gpu_out).
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
note() { echo "== $1: rc=$2"; [ "$2" -eq 0 ] || status=1; }

# (a) the carried wheels (pydantic & co.; torch, transformers, ... are on the image)
timeout 45 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
note "pip install" $?

# (b) versions and the device
timeout 45 python3 -c 'import finesteer, torch; print(torch.__version__, torch.cuda.get_device_name(0))'
note "import" $?

# (c) the smoke: JSON on stdout to gpu_smoke.json, progress (stderr) shown and kept in gpu_smoke.log
timeout --kill-after=10 120 python3 benchmarks/gpu_smoke.py --json 2>&1 >"$OUT/gpu_smoke.json" |
    tee "$OUT/gpu_smoke.log"
note "gpu_smoke" $?

# (d) real-shape timing: 16 prompts (~100-280 tokens), all 336 heads, 16 x 32 generated tokens
timeout --kill-after=10 170 python3 benchmarks/gpu_smoke.py --json --timing-only \
    --shape-of .gpu/qwen0.5b-config.json --dtypes bfloat16,float32 --prompts 16 --tokens 32 --repeats 1 \
    2>&1 >"$OUT/gpu_shape.json" | tee "$OUT/gpu_shape.log"
note "shape timing" $?

# (e) two test files on this image (CPU-side; proves the suite runs here)
if timeout 20 python3 -c 'import pytest' 2>/dev/null; then
    timeout --kill-after=10 60 python3 -m pytest -q -x tests/test_devices.py tests/test_interventions.py \
        -p no:cacheprovider >"$OUT/pytest.log" 2>&1
    rc=$?
    tail -n 5 "$OUT/pytest.log"
    note "pytest" $rc
else
    echo "pytest is not installed on this image" | tee "$OUT/pytest.log"
fi

# summary: one line per row (the full rows are in the JSON files)
timeout 20 python3 - "$OUT" <<'EOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
for name in ("gpu_smoke.json", "gpu_shape.json"):
    try:
        data = json.loads((out / name).read_text())
    except (OSError, ValueError) as exc:
        print(f"{name}: unreadable ({exc})")
        continue
    print(f"{name}: {data.get('gpu')} tf32={data.get('tf32')}")
    for row in data.get("rows", []) + data.get("timings", []):
        keys = ("cpu_vs_device", "per_row_max_diff", "head_add_max_diff", "scan_fast_vs_simple",
                "simple_scan_s", "fast_scan_s", "fast_speedup", "gen_plain_tok_s", "gen_steered_tok_s",
                "gen_steered_over_plain", "error")
        extra = {k: row[k] for k in keys if k in row}
        print(" ", row.get("model", row.get("config")), row.get("check"), row.get("dtype"),
              "ok" if row.get("ok") else f"FAILED {row.get('failed')}", json.dumps(extra))
EOF
echo "== overall: $([ $status -eq 0 ] && echo ok || echo FAILED) (files in $OUT: $(ls "$OUT" | tr '\n' ' '))"
exit $status
