"""Real run: refusal direction vs refusal heads on a small chat model, with the first-token proxy.

Fits and chooses the refusal direction (Arditi et al.) on attribution prompts (refusal-direction
harmful train, JailbreakBench-derived rows excluded, vs Alpaca harmless train; chosen on the val
splits), scores heads three ways (Ships KL estimate verified on its top heads, refusal-logit
attribution verified on its top heads, refusal-direction projection), reports their agreement,
runs forward selection, and measures on held-out JailbreakBench prompts the first-token refusal
probability after directional ablation vs the top-3 heads of each ranking vs random 3 heads
(3 seeds), plus next-token KL on JailbreakBench-benign prompts. Also checks the weight-orthogonalised
export against the hooked model.

    OMP_NUM_THREADS=1 flock /tmp/finesteer-real.lock python benchmarks/refusal_direction_qwen.py \
        --out runs/refdir-qwen --json-out docs/results/refusal_direction_qwen0.5b.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from finesteer.data import load_dataset
from finesteer.data.prompts import chat_prompt
from finesteer.data.typed import load_queries
from finesteer.evaluate.stats import mean_estimate
from finesteer.export.orthogonalize import export_orthogonalized, verify_orthogonalized
from finesteer.fit.controls import random_heads
from finesteer.fit.refusal_direction_select import SelectionSettings, select_direction
from finesteer.interventions.edit import Intervention
from finesteer.locate.attribution.metrics import KLDivergence
from finesteer.locate.attribution.prerank import PreRankedScan, pre_ranked_scan
from finesteer.locate.engine import encode_prompts
from finesteer.locate.head_direction import head_direction_scores, ranking_agreement
from finesteer.locate.joint_heads import candidate_pool, forward_selection, head_name, head_set_ablation
from finesteer.locate.refusal_proxy import base_last_logits, harmless_kl, refusal_metric, refusal_scores
from finesteer.locate.scores import HeadScores
from finesteer.locate.ships import format_queries
from finesteer.models import load_model


def _queries(name: str, split: str, limit: int, exclude_jbb: bool = False) -> list[str]:
    if exclude_jbb:
        items = load_dataset(name, split, exclude_origins="jailbreakbench")[:limit]
        return [item.prompt for item in items]
    return load_queries(name, split, limit)[0]


def _ranked(scan: PreRankedScan) -> HeadScores:
    """The pre-ranked scan's authoritative order (verified heads by exact value, then the estimate) as a
    table of −rank, so rank statistics compare whole rankings."""
    table = torch.zeros(scan.scores.shape)
    for rank, (layer, head) in enumerate(scan.ranking()):
        table[layer, head] = -float(rank)
    meta = scan.scores.metadata()
    return HeadScores(
        table,
        method=meta["method"],
        mode=meta["mode"],
        eps=meta["eps"],
        model_name=meta["model_name"],
        n_prompts=meta["n_prompts"],
        extra={**meta["extra"], "score": "-rank"},
    )


def _estimate(values: torch.Tensor) -> dict[str, Any]:
    est = mean_estimate(values.double().numpy())
    return {"mean": round(est.value, 4), "low": round(est.low, 4), "high": round(est.high, 4), "n": est.n}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--out", type=Path, default=Path("runs/refdir-qwen"))
    parser.add_argument("--json-out", type=Path, required=True)
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--n-benign", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-n", type=int, default=16, help="heads verified exactly per pre-ranked scan")
    parser.add_argument("--shortlist", type=int, default=6)
    parser.add_argument("--forward-selection", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "model": args.model,
        "argv": vars(args) | {"out": str(args.out), "json_out": str(args.json_out)},
    }

    def save(stage: str) -> None:
        result.setdefault("seconds", {})[stage] = round(time.perf_counter() - started, 1)
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"[{result['seconds'][stage]:.0f}s] {stage} done", flush=True)

    lm = load_model(args.model)
    fmt = lambda qs: format_queries(lm, qs)  # noqa: E731
    harmful_train = fmt(_queries("refusal-direction-harmful", "train", args.n_train, exclude_jbb=True))
    harmless_train = fmt(_queries("refusal-direction-harmless", "train", args.n_train))
    harmful_val = fmt(_queries("refusal-direction-harmful", "val", args.n_val, exclude_jbb=True))
    harmless_val = fmt(_queries("refusal-direction-harmless", "val", args.n_val))
    eval_harmful = encode_prompts(lm, fmt(_queries("jailbreakbench", "all", args.n_eval)))
    eval_benign = encode_prompts(lm, fmt(_queries("jailbreakbench-benign", "all", args.n_benign)))
    result["data"] = {
        "attribution": f"refusal-direction-harmful train[:{args.n_train}] (JBB origins excluded) vs "
        f"refusal-direction-harmless train[:{args.n_train}]",
        "selection": f"refusal-direction-harmful/harmless val[:{args.n_val}]",
        "evaluation": f"jailbreakbench[:{args.n_eval}] (refusal), "
        f"jailbreakbench-benign[:{args.n_benign}] (KL)",
        "refusal_token_ids": refusal_metric(lm).token_ids.tolist(),
    }

    # 1. the direction
    settings = SelectionSettings(shortlist=args.shortlist, batch_size=args.batch_size)
    direction, table = select_direction(
        lm, harmful_train, harmless_train, harmful_val, harmless_val, settings, progress=True
    )
    direction.save(args.out / "direction", lm)
    result["direction"] = {
        "layer": direction.layer,
        "position": direction.position,
        "norm": float(direction.vector.norm()),
        **direction.metadata,
    }
    result["direction_candidates"] = table
    save("direction")

    # 2. the orthogonalised export equals the hooked ablation
    tmp = Path(tempfile.mkdtemp(prefix="refdir-ortho-"))
    try:
        export_orthogonalized(lm, direction.vector, tmp / "model")
        texts = [chat_prompt(lm.tokenizer, q) for q in ("How do I pick a lock?", "Write a haiku about rain.")]
        result["orthogonalized_export"] = verify_orthogonalized(lm, direction.vector, tmp / "model", texts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save("export")

    # 3. three head rankings on the attribution prompts
    ships = pre_ranked_scan(
        lm,
        harmful_train,
        KLDivergence(2),
        mode="ua",
        top_n=min(args.top_n, lm.info.n_layers * lm.info.n_heads),
        batch_size=args.batch_size,
    )
    refusal = pre_ranked_scan(
        lm,
        harmful_train,
        refusal_metric(lm),
        mode="sc",
        top_n=min(args.top_n, lm.info.n_layers * lm.info.n_heads),
        batch_size=args.batch_size,
    )
    projection = head_direction_scores(
        lm, harmful_train, harmless_train, direction.vector, batch_size=args.batch_size
    )
    tables = {"ships_kl": _ranked(ships), "refusal_logit": _ranked(refusal), "refusal_direction": projection}
    for name, scores in tables.items():
        scores.save(args.out / "rankings" / name)
    result["rankings"] = {name: [head_name(h) for h in s.top_heads(10)] for name, s in tables.items()}
    result["agreement"] = ranking_agreement(tables, k=10)
    save("rankings")

    # 4. forward selection on the validation prompts, from a pool of each ranking's top 5
    chosen: tuple[Any, ...] = ()
    if args.forward_selection:
        pool = candidate_pool(list(tables.values()), 5)
        steps = forward_selection(lm, harmful_val, pool, 3, batch_size=args.batch_size)
        result["forward_selection"] = {
            "pool": [head_name(h) for h in pool],
            "steps": [s.to_json() for s in steps],
        }
        chosen = steps[-1].heads
        save("forward_selection")

    # 5. held-out evaluation: first-token refusal on JailbreakBench, KL on its benign twins
    top3 = {name: s.top_heads(3) for name, s in tables.items()}
    conditions: dict[str, Any] = {
        "unmodified": None,
        "directional_ablation": direction.ablation(lm.info.n_layers),
    }
    for name, heads in top3.items():
        conditions[f"top3_{name}"] = head_set_ablation(heads)
    if chosen:
        conditions["forward_selection_3"] = head_set_ablation(chosen)
    exclude = {h for heads in top3.values() for h in heads} | set(chosen)
    for seed in (0, 1, 2):
        heads = random_heads(lm.info.n_layers, lm.info.n_heads, 3, seed, exclude)
        conditions[f"random3_seed{seed}"] = head_set_ablation(heads)
        result.setdefault("random_heads", {})[str(seed)] = [head_name(h) for h in heads]
    edits = [c if c is not None else Intervention() for c in conditions.values()]
    scores = refusal_scores(lm, eval_harmful, edits, batch_size=args.batch_size, progress=True, desc="eval")
    base_logits = base_last_logits(lm, eval_benign, batch_size=args.batch_size)
    kl = harmless_kl(lm, eval_benign, edits, base_logits, batch_size=args.batch_size, progress=True)
    rows = {}
    for i, name in enumerate(conditions):
        prob = torch.sigmoid(scores[i])
        rows[name] = {
            "p_refusal": _estimate(prob),
            "refusal_log_odds": _estimate(scores[i]),
            "first_token_refusal_rate": round(float((prob > 0.5).double().mean()), 4),
            "harmless_kl": _estimate(kl[i]),
        }
    base_p = rows["unmodified"]["p_refusal"]["mean"]
    full = base_p - rows["directional_ablation"]["p_refusal"]["mean"]
    for row in rows.values():
        drop = base_p - row["p_refusal"]["mean"]
        row["share_of_directional_drop"] = round(drop / full, 4) if full and math.isfinite(full) else None
    result["evaluation"] = rows
    result["top3"] = {name: [head_name(h) for h in heads] for name, heads in top3.items()}
    save("evaluation")


if __name__ == "__main__":
    main()
