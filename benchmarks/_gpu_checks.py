"""Helpers of gpu_smoke.py: the cross-backend check (CPU vs the GPU, float32) and the real-shape timing.

Cross-backend: the project's invariant "results identical across backends", on each tiny model in float32
loaded twice (device cpu and the GPU; seeded, so the same weights, which is checked, not assumed).
Compared: unmodified last-position logits, logits under a head steer + a residual steer, a Ships-style
fast scan's KL scores over 8 heads, a captured residual. Tolerance: CROSS_BACKEND_TOL = 1e-3 absolute.
CPU and CUDA float32 kernels sum in different orders (blocked GEMMs, other reductions), so the two
differ by float32 rounding, ~1e-6 relative; the tiny models' logits (std-0.2 weights) are O(10), so
1e-3 leaves a wide margin, while TF32 (10-bit mantissa, ~1e-3 relative) or a real bug would not pass.
gpu_smoke turns TF32 off (matmul and cuDNN) so float32 on the GPU is true float32.

Real-shape timing: a randomly initialised model built from a real config.json (any size; the tiny
character-level tokenizer, whose ids are a subset of every real vocab), timed on the GPU: a Ships KL
scan over all heads (simple `scan` vs `fast_scan`) and greedy generation with a 4-head steer vs none.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CROSS_BACKEND_TOL = 1e-3
TEXTS = ("hello there", "a much longer prompt, padded less", "hi")
_QUERY = (
    "Explain how a language model picks its next token, why a few attention heads matter much more than "
    "the others, what changes when one of them is switched off, and how one would check that on a small "
    "example with a handful of prompts. Keep the answer short and concrete, please. "
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chat_texts(lm: Any, queries: tuple[str, ...] | list[str] = TEXTS) -> list[str]:
    from finesteer.locate.ships import format_queries

    return format_queries(lm, list(queries))


def logits(lm: Any, texts: list[str], intervention: Any = None) -> torch.Tensor:
    """All-position logits (float32, on the model's device) of left-padded texts, optionally intervened."""
    import finesteer as fs

    enc = lm.tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    ).to(lm.device)
    position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        if intervention is None:
            return lm.model(**enc, position_ids=position_ids).logits.float()
        with fs.intervene(lm, intervention):
            return lm.model(**enc, position_ids=position_ids).logits.float()


def _backend_results(lm: Any) -> dict[str, torch.Tensor]:
    """The compared computations on one backend, each as a float32 CPU tensor."""
    import finesteer as fs
    from finesteer.locate.fast_scan import fast_scan
    from finesteer.locate.scan import KLFromBase, LastLogits, scan
    from finesteer.locate.ships import ablation, all_heads

    info, layer = lm.info, min(1, lm.info.n_layers - 1)
    texts = chat_texts(lm)
    g = torch.Generator().manual_seed(0)
    steer = fs.steer_head(layer, 0, torch.randn(info.head_dim, generator=g) * 4, 1.0, scope="all")
    steer = steer + fs.steer_residual(layer, torch.randn(info.hidden_size, generator=g), 2.0)
    base = scan(lm, texts, [ablation([], "sc", 1e-5)], LastLogits(), progress=False)[0]
    candidates = [ablation([h], "sc", 1e-5) for h in all_heads(info)[:8]]
    site = f"blocks.{layer}.hook_resid_post"
    return {
        "logits": logits(lm, texts)[:, -1].cpu(),
        "steered": logits(lm, texts, steer)[:, -1].cpu(),
        "scan": fast_scan(lm, texts, candidates, KLFromBase(base), progress=False).float().cpu(),
        "capture": fs.capture(lm, texts, [site])[site].float().cpu(),
    }


def cross_backend(model: str, device: str) -> dict[str, Any]:
    """Row: max |CPU − device| of each computation for `model` in float32; fails above CROSS_BACKEND_TOL."""
    from finesteer.models import load_model

    cpu = load_model(model, device="cpu", dtype="float32")
    dev = load_model(model, device=device, dtype="float32")
    row: dict[str, Any] = {
        "model": model,
        "check": "cross_backend",
        "dtype": "float32",
        "device": str(dev.device),
    }
    pairs = zip(cpu.model.state_dict().items(), dev.model.state_dict().items(), strict=True)
    differ = [k for (k, a), (_, b) in pairs if not torch.equal(a, b.detach().cpu())]
    if differ:
        raise AssertionError(f"the CPU and {device} copies have different weights: {differ[:3]}")
    on_cpu, on_dev = _backend_results(cpu), _backend_results(dev)
    row["cpu_vs_device"] = {k: float((on_cpu[k] - on_dev[k]).abs().max()) for k in on_cpu}
    row["tolerance"] = CROSS_BACKEND_TOL
    failed = [k for k, v in row["cpu_vs_device"].items() if not v <= CROSS_BACKEND_TOL]
    row["ok"], row["failed"] = not failed, ["cross_backend"] if failed else []
    if failed:
        row["over_tolerance"] = failed
    return row


def timing_queries(n: int) -> list[str]:
    """n requests of 80–260 characters (the tiny tokenizer is per character: ~100–280 tokens with the
    chat template), deterministic."""
    text = _QUERY * 2
    return [text[(7 * i) % 60 :][: 80 + (180 * i) // max(n - 1, 1)].strip() for i in range(n)]


def build_shape_model(config_path: str, dtype: str, device: str) -> Any:
    """A seeded random model of a real config.json (a file or its folder), with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from finesteer.models.loading import resolve_device, resolve_dtype, wrap_model
    from finesteer.models.tiny import tiny_tokenizer

    path = Path(config_path)
    raw = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    target = resolve_device(device)
    torch.manual_seed(0)
    with target:  # initialised where it runs (fast for 0.5B+ on a GPU)
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype=resolve_dtype(dtype))
    tokenizer = tiny_tokenizer()
    # every greedy run makes exactly the asked tokens (a random model may hit EOS early)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return wrap_model(model, tokenizer, f"shape:{path.name}", fingerprint=f"random-seed0:{path}")


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float]:
    """fn's last result and the median wall seconds of `repeats` runs, synchronised around each."""
    seconds, out = [], None
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        out = fn()
        sync(device)
        seconds.append(time.perf_counter() - started)
    return out, statistics.median(seconds)


def _section(row: dict[str, Any], name: str, fn: Callable[[], None]) -> None:
    """Run one part of a timing row; an exception marks the part failed (with its text), the row goes on."""
    try:
        fn()
    except Exception as exc:  # recorded: one GPU run should report every part it can
        row["failed"].append(name)
        row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:1000]
        log(f"  {name}: {row[f'{name}_error']}")


def shape_timing(
    config_path: str,
    dtype: str,
    device: str,
    *,
    row: dict[str, Any],
    prompts: int = 16,
    tokens: int = 32,
    repeats: int = 1,
    batch_size: int = 16,
    tolerance: float = 1e-3,
    build_only: bool = False,
) -> dict[str, Any]:
    """Fill `row` (so a failure keeps what was measured): a Ships KL scan over all heads, simple vs fast,
    and greedy generation with a 4-head steer vs none."""
    from bench_steered_generation import _vectors, steered_heads

    import finesteer as fs
    from finesteer.interventions import Intervention
    from finesteer.locate.engine import encode_prompts
    from finesteer.locate.fast_scan import fast_scan
    from finesteer.locate.scan import KLFromBase, LastLogits, scan
    from finesteer.locate.ships import ablation, all_heads

    started = time.perf_counter()
    lm = build_shape_model(config_path, dtype, device)
    dev, info = lm.device, lm.info
    sync(dev)
    row.update(
        device=str(dev),
        attn=getattr(lm.model.config, "_attn_implementation", None),
        shape=f"{info.n_layers} layers × {info.n_heads} heads ({info.n_kv_heads} kv), head_dim "
        f"{info.head_dim}, hidden {info.hidden_size}, vocab {info.vocab_size}",
        params_m=round(sum(p.numel() for p in lm.model.parameters()) / 1e6, 1),
        build_s=round(time.perf_counter() - started, 2),
        failed=[],
    )
    texts = chat_texts(lm, timing_queries(1 if build_only else prompts))
    encoded = encode_prompts(lm, texts)
    lengths = [len(ids) for ids in encoded.ids]
    row["prompts"], row["prompt_tokens"] = len(texts), f"{min(lengths)}–{max(lengths)}"

    def base_run() -> torch.Tensor:
        return scan(lm, encoded, [ablation([], "sc")], LastLogits(), batch_size=batch_size, progress=False)

    base, seconds = _timed(base_run, dev, 1)
    row["base_s"] = round(seconds, 3)
    if not torch.isfinite(base).all():
        row["failed"].append("forward")
    candidates = [ablation([h], "sc") for h in all_heads(info)]
    results: dict[str, torch.Tensor] = {}

    def time_scan(name: str, engine: Callable[..., torch.Tensor]) -> None:
        log(f"  {row['dtype']}: {name} scan of {len(candidates)} heads …")
        kl = KLFromBase(base[0])
        engine(lm, encoded, candidates[:2], kl, batch_size=batch_size, progress=False)  # warm-up
        run = lambda: engine(lm, encoded, candidates, kl, batch_size=batch_size, progress=False)  # noqa: E731
        results[name], seconds = _timed(run, dev, repeats)
        row[f"{name}_scan_s"] = round(seconds, 3)

    steer = Intervention()
    for layer, head, vector in _vectors(lm, 8.0):
        steer = steer + fs.steer_head(layer, head, vector, 1.0, scope="last")

    def time_generation(name: str, intervention: Any) -> None:
        log(f"  {row['dtype']}: {name} generation, {len(texts)} × {tokens} tokens …")
        run = lambda: fs.generate(  # noqa: E731
            lm, texts, max_new_tokens=tokens, batch_size=len(texts), intervention=intervention
        )
        run()  # warm-up
        _, seconds = _timed(run, dev, repeats)
        row[f"gen_{name}_s"] = round(seconds, 3)
        row[f"gen_{name}_tok_s"] = round(len(texts) * tokens / seconds, 1)

    if build_only:
        return _finish(row, dev)
    row["heads_scanned"] = len(candidates)
    _section(row, "simple_scan", lambda: time_scan("simple", scan))
    _section(row, "fast_scan", lambda: time_scan("fast", fast_scan))
    if len(results) == 2:
        row["fast_speedup"] = round(row["simple_scan_s"] / row["fast_scan_s"], 2)
        row["scan_fast_vs_simple"] = float((results["fast"].float() - results["simple"].float()).abs().max())
        row["max_kl"] = float(results["simple"].float().max())
        if not row["scan_fast_vs_simple"] <= tolerance or not torch.isfinite(results["fast"]).all():
            row["failed"].append("scan")
    row["steered_heads"] = [f"{layer}.{head}" for layer, head in steered_heads(lm)]

    def steer_effect() -> None:  # the steer acts (scope last): how far it moves the next-token logits
        change = logits(lm, texts[:2], steer) - logits(lm, texts[:2])
        row["steer_logit_change"] = float(change[:, -1].abs().max())

    _section(row, "steer", steer_effect)
    lm.model.generation_config.min_new_tokens = tokens  # exactly `tokens` new tokens in every run
    _section(row, "gen_plain", lambda: time_generation("plain", None))
    _section(row, "gen_steered", lambda: time_generation("steered", steer))
    if "gen_plain_tok_s" in row and "gen_steered_tok_s" in row:
        row["gen_steered_over_plain"] = round(row["gen_steered_tok_s"] / row["gen_plain_tok_s"], 3)
    return _finish(row, dev)


def _finish(row: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    row["ok"] = not row["failed"]
    return row


def guarded(
    base: dict[str, Any], fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any
) -> dict[str, Any]:
    """fn's row, or on an exception `base` marked failed with the exception's text; progress to stderr."""
    import traceback

    label, started = " ".join(str(v) for v in base.values()), time.perf_counter()
    log(f"{label} …")
    try:
        row = fn(*args, **kwargs)
    except Exception as exc:  # one row's failure is recorded, the run goes on
        tb = traceback.format_exc().strip().splitlines()
        row = {**copy.deepcopy(base), "ok": False}
        row["failed"] = [*row.get("failed", []), "error"]
        row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        row["traceback"] = tb[-6:]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    status = "ok" if row["ok"] else f"FAILED {row['failed']} {row.get('error', '')}"
    log(f"{label}: {status} ({time.perf_counter() - started:.1f} s)")
    if not row["ok"] or row.get("check") == "timing":  # kept in the log even if the run is cut short
        log(json.dumps({k: v for k, v in row.items() if k != "traceback"}))
    return row
