"""GPU smoke test: load on CUDA in each dtype, check the intervention invariants there, time a forward.

    python benchmarks/gpu_smoke.py                              # tiny-llama, tiny-gemma3; bf16, fp16, fp32
    python benchmarks/gpu_smoke.py --model smollm2-135m-instruct --device-map auto --json

On a machine without CUDA it prints why it skipped and exits 0, so CI and laptops can run it as is.
Checks per model × dtype (each a row; `ok` false names what failed):
- α = 0 is a no-op (logits bit-identical), and a real edit changes them;
- per-row = solo: a batch with a different intervention per row equals each row run alone;
- head add = W_O column add (the head's o_proj slice times θ, added after attention);
- a Ships-style head scan (8 heads, KL from the unablated model): fast scan = simple scan;
- capture of a residual site returns finite float32 on the CPU; steered greedy generation runs;
- with --device-map auto: the model is placed by accelerate (all GPUs) and the same checks run.
Tolerances scale with the dtype: float32 1e-3, bfloat16 0.25, float16 0.05 (absolute, on logits).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}


def _logits(lm: Any, texts: list[str], intervention: Any = None) -> torch.Tensor:
    import finesteer as fs

    enc = lm.tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    enc = enc.to(lm.device)
    position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        if intervention is None:
            return lm.model(**enc, position_ids=position_ids).logits.float()
        with fs.intervene(lm, intervention):
            return lm.model(**enc, position_ids=position_ids).logits.float()


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
        "dtype": str(lm.dtype).removeprefix("torch."),
        "placement": describe_placement(lm),
        "load_s": round(time.perf_counter() - started, 2),
    }
    tol, failed = TOLERANCE[dtype], []
    texts = [
        lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
        )
        for t in ("hello there", "a much longer prompt, padded less", "hi")
    ]
    g = torch.Generator().manual_seed(0)
    info, layer = lm.info, min(1, lm.info.n_layers - 1)
    base = _logits(lm, texts)
    head_vec = torch.randn(info.head_dim, generator=g) * 4
    zero = fs.steer_head(layer, 0, head_vec, 0.0, scope="all") + fs.steer_residual(
        layer, torch.randn(info.hidden_size, generator=g), 0.0
    )
    if not torch.equal(_logits(lm, texts, zero), base):
        failed.append("alpha0")
    steered = _logits(lm, texts, fs.steer_head(layer, 0, head_vec, 1.0, scope="all"))
    row["change_by_edit"] = float((steered - base).abs().max())
    rows = [
        fs.steer_head(layer, 0, head_vec, 1.0, scope="all"),
        fs.ablate_head(layer, info.n_heads - 1, "zero"),
        fs.steer_residual(layer, torch.randn(info.hidden_size, generator=g), 2.0),
    ]
    batched = _logits(lm, texts, Intervention.per_row(rows))
    mask = lm.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")[
        "attention_mask"
    ].bool()
    per_row = max(
        float((batched[i][mask[i].to(batched.device)] - _logits(lm, [t], iv)[0]).abs().max())
        for i, (t, iv) in enumerate(zip(texts, rows, strict=True))
    )
    row["per_row_max_diff"] = per_row
    if per_row > tol:
        failed.append("per_row")
    o_proj = lm.adapter.attn_part(lm.model, layer, lm.adapter.o_proj)
    d = info.head_dim
    via_wo = o_proj.weight[:, :d].detach().float().cpu() @ head_vec
    wo = _logits(lm, texts, Intervention((Edit(Site(layer, "attn_out"), Add(via_wo)),)))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="Model(s) (default: tiny-llama and tiny-gemma3).")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--device-map", default=None, help="e.g. auto: let accelerate place the model.")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: skipped, no CUDA GPU on this machine (torch.cuda.is_available() is False)")
        return 0
    rows = [
        check(model, dtype, args.device, args.device_map)
        for model in args.model or ["tiny-llama", "tiny-gemma3"]
        for dtype in args.dtypes.split(",")
    ]
    header = f"GPU: {torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}, torch {torch.__version__}"
    if args.json:
        print(json.dumps({"gpu": header, "rows": rows}, indent=1))
    else:
        print(header)
        for row in rows:
            print(json.dumps(row))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
