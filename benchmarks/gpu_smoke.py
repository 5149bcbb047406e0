"""GPU smoke test: load on CUDA in each dtype, check the intervention invariants there, time a forward.

    python benchmarks/gpu_smoke.py           # tiny llama, qwen2 (GQA), mistral, gemma3; bf16, fp16, fp32
    python benchmarks/gpu_smoke.py --model smollm2-135m-instruct --device-map auto --json
    python benchmarks/gpu_smoke.py --timing-only --shape-of qwen0.5b/config.json --dtypes bfloat16,float32

On a machine without CUDA it prints why it skipped and exits 0, so CI and laptops can run it as is
(`--device cpu --allow-cpu` runs every check on the CPU instead: a dry run of the script itself).
Checks per model × dtype (each a row; `ok` false names what failed):
- α = 0 is a no-op (logits bit-identical), and a real edit changes them;
- per-row = solo: a batch with a different intervention per row equals each row run alone;
- head add = W_O column add (the head's o_proj slice times θ, added after attention);
- a Ships-style head scan (8 heads, KL from the unablated model): fast scan = simple scan;
- capture of a residual site returns finite float32 on the CPU; steered greedy generation runs;
- with --device-map auto: the model is placed by accelerate (all GPUs) and the same checks run.
Tolerances scale with the dtype: float32 1e-3, bfloat16 0.25, float16 0.05 (absolute, on logits).
Per model one more row, "cross_backend": the same float32 computations on the CPU and the GPU agree
within 1e-3 (`cpu_vs_device`, see _gpu_checks.py; TF32 is turned off so float32 is float32).
`--shape-of CONFIG_JSON` (repeatable) adds "timings": a random model of that real shape, per dtype, with
a Ships KL scan over all heads (simple vs fast) and steered vs plain greedy generation (_gpu_checks.py).
A row that raises is recorded (`error`) and the run goes on. `--json`: one JSON object on stdout
{"gpu", "rows", "timings"}, progress on stderr. Exit 1 when any row or timing failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside it, also when imported
from _gpu_checks import chat_texts, cross_backend, guarded, log, logits, shape_timing

TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}
MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma3")


def check(model: str, dtype: str, device: str, device_map: str | None) -> dict[str, Any]:
    import finesteer as fs
    from finesteer.interventions import Add, Edit, Intervention
    from finesteer.locate.fast_scan import fast_scan
    from finesteer.locate.scan import KLFromBase, LastLogits, scan
    from finesteer.locate.ships import ablation
    from finesteer.models import load_model
    from finesteer.models.loading import describe_placement
    from finesteer.sites import Site

    started = time.perf_counter()
    lm = load_model(model, device=device, dtype=dtype, device_map=device_map)
    row: dict[str, Any] = {
        "model": model,
        "check": "invariants",
        "dtype": str(lm.dtype).removeprefix("torch."),
        "placement": describe_placement(lm),
        "load_s": round(time.perf_counter() - started, 2),
    }
    tol, failed = TOLERANCE[dtype], []
    texts = chat_texts(lm)
    g = torch.Generator().manual_seed(0)
    info, layer = lm.info, min(1, lm.info.n_layers - 1)
    base = logits(lm, texts)
    head_vec = torch.randn(info.head_dim, generator=g) * 4
    zero = fs.steer_head(layer, 0, head_vec, 0.0, scope="all") + fs.steer_residual(
        layer, torch.randn(info.hidden_size, generator=g), 0.0
    )
    if not torch.equal(logits(lm, texts, zero), base):
        failed.append("alpha0")
    steered = logits(lm, texts, fs.steer_head(layer, 0, head_vec, 1.0, scope="all"))
    row["change_by_edit"] = float((steered - base).abs().max())
    rows = [
        fs.steer_head(layer, 0, head_vec, 1.0, scope="all"),
        fs.ablate_head(layer, info.n_heads - 1, "zero"),
        fs.steer_residual(layer, torch.randn(info.hidden_size, generator=g), 2.0),
    ]
    batched = logits(lm, texts, Intervention.per_row(rows))
    mask = lm.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")[
        "attention_mask"
    ].bool()
    per_row = max(
        float((batched[i][mask[i].to(batched.device)] - logits(lm, [t], iv)[0]).abs().max())
        for i, (t, iv) in enumerate(zip(texts, rows, strict=True))
    )
    row["per_row_max_diff"] = per_row
    if per_row > tol:
        failed.append("per_row")
    o_proj = lm.adapter.attn_part(lm.model, layer, lm.adapter.o_proj)
    d = info.head_dim
    via_wo = o_proj.weight[:, :d].detach().float().cpu() @ head_vec
    wo = logits(lm, texts, Intervention((Edit(Site(layer, "attn_out"), Add(via_wo)),)))
    row["head_add_max_diff"] = float((wo - steered).abs().max())
    if row["head_add_max_diff"] > tol:
        failed.append("head_add")
    heads = [(lay, h) for lay in range(info.n_layers) for h in range(info.n_heads)][:8]
    base_logits = scan(lm, texts, [ablation([], "sc", 1e-5)], LastLogits(), progress=False)[0]
    candidates = [ablation([h], "sc", 1e-5) for h in heads]
    simple = scan(lm, texts, candidates, KLFromBase(base_logits), progress=False)
    fast = fast_scan(lm, texts, candidates, KLFromBase(base_logits), progress=False)
    row["scan_fast_vs_simple"] = float((simple.float().cpu() - fast.float().cpu()).abs().max())
    if row["scan_fast_vs_simple"] > tol or not torch.isfinite(fast.float()).all():
        failed.append("scan")
    acts = fs.capture(lm, texts, [f"blocks.{layer}.hook_resid_post"])[f"blocks.{layer}.hook_resid_post"]
    if acts.dtype != torch.float32 or acts.device.type != "cpu" or not torch.isfinite(acts).all():
        failed.append("capture")
    out = fs.generate(lm, texts[:1], max_new_tokens=8, intervention=rows[0])
    if not isinstance(out[0], str):
        failed.append("generate")
    enc = lm.tokenizer(texts * 8, return_tensors="pt", padding=True).to(lm.device)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        lm.model(**enc)
        sync()
        started = time.perf_counter()
        for _ in range(5):
            lm.model(**enc)
        sync()
    row["forward_ms_batch24"] = round((time.perf_counter() - started) / 5 * 1000, 2)
    row["ok"] = not failed
    row["failed"] = failed
    return row


def _header(device: str) -> str:
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if torch.device(device).type != "cuda":
        return f"CPU dry run ({device}), {versions}"
    return f"{torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}, {versions}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help=f"Model(s) (default: {', '.join(MODELS)}).")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--device-map", default=None, help="e.g. auto: let accelerate place the model.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object {gpu, rows, timings}.")
    parser.add_argument("--no-cross-backend", action="store_true", help="Skip the CPU-vs-GPU rows.")
    parser.add_argument(
        "--shape-of",
        action="append",
        default=[],
        metavar="CONFIG_JSON",
        help="Time a random model of this config.json (file or folder; repeatable), in each of --dtypes.",
    )
    parser.add_argument("--timing-only", action="store_true", help="Only the --shape-of timings.")
    parser.add_argument("--prompts", type=int, default=16, help="Timing prompts (~100–280 tokens each).")
    parser.add_argument(
        "--tokens", type=int, default=32, help="New tokens per prompt in the generation timing."
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="Timed runs per method (median), after a warm-up."
    )
    parser.add_argument("--scan-batch", type=int, default=16, help="Prompts per forward in the timed scans.")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape-build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if unknown := [d for d in dtypes if d not in TOLERANCE]:
        parser.error(f"unknown dtype(s) {unknown}; choose from {', '.join(TOLERANCE)}")
    if torch.device(args.device).type == "cpu" and not args.allow_cpu:
        parser.error("--device cpu is a dry run of this script: add --allow-cpu")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        message = "gpu_smoke: skipped, no CUDA GPU on this machine (torch.cuda.is_available() is False)"
        print(
            json.dumps({"gpu": None, "skipped": message, "rows": [], "timings": []}) if args.json else message
        )
        return 0
    # true float32 on the GPU: the cross-backend tolerance and the float32 timings assume no TF32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    header = _header(args.device)
    log(header)
    rows: list[dict[str, Any]] = []
    for model in [] if args.timing_only else args.model or list(MODELS):
        for dtype in dtypes:
            base = {"model": model, "check": "invariants", "dtype": dtype}
            rows.append(guarded(base, check, model, dtype, args.device, args.device_map))
        if not args.no_cross_backend:
            base = {"model": model, "check": "cross_backend", "dtype": "float32"}
            rows.append(guarded(base, cross_backend, model, args.device))
    timings: list[dict[str, Any]] = []
    for config in args.shape_of:
        for dtype in dtypes:
            base = {"config": config, "check": "timing", "dtype": dtype}  # filled as it goes
            settings = {"prompts": args.prompts, "tokens": args.tokens, "repeats": args.repeats}
            timings.append(
                guarded(
                    base,
                    shape_timing,
                    config,
                    dtype,
                    args.device,
                    row=base,
                    **settings,
                    batch_size=args.scan_batch,
                    tolerance=TOLERANCE[dtype],
                    build_only=args.shape_build_only,
                )
            )
    tf32 = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    if args.json:
        print(json.dumps({"gpu": header, "tf32": tf32, "rows": rows, "timings": timings}, indent=1))
    else:
        print(header)
        for row in [*rows, *timings]:
            print(json.dumps(row))
    return 0 if all(row["ok"] for row in [*rows, *timings]) else 1


if __name__ == "__main__":
    sys.exit(main())
