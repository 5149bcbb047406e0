"""`finesteer locate overlap`: how much two head tables agree (no model is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.cli.apps import locate_app
from finesteer.cli.common import emit_json, run_command, stderr_console
from finesteer.cli.options import JsonFlag, head_names


@locate_app.command("overlap")
def overlap_command(
    first: Annotated[Path, typer.Argument(help="Scores folder (or a run folder holding one).")],
    second: Annotated[Path, typer.Argument(help="The other scores folder or run folder.")],
    k: Annotated[int, typer.Option(help="How many top heads to compare.")] = 10,
    json_out: JsonFlag = False,
) -> None:
    """How much two head tables agree: top-k Jaccard, shared heads and Spearman over all heads.

    For two methods or modes on one model, or two checkpoints of one architecture (e.g. a base and a
    fine-tuned model); tables of different shapes are refused.
    """

    def work() -> dict[str, Any]:
        from finesteer.locate.rank_stats import spearman
        from finesteer.locate.run_folder import scores_folder
        from finesteer.locate.scores import HeadScores, jaccard_top_k

        a, b = (HeadScores.load(scores_folder(p)) for p in (first, second))
        shared = sorted(set(a.top_heads(k)) & set(b.top_heads(k)))
        return {
            "first": {"path": str(first), "model": a.model_name, "method": a.method, "mode": a.mode},
            "second": {"path": str(second), "model": b.model_name, "method": b.method, "mode": b.mode},
            "k": k, "jaccard": jaccard_top_k(a, b, k), "shared": head_names(shared),
            "spearman": spearman(a.scores.flatten(), b.scores.flatten()),
            "top_first": head_names(a.top_heads(k)), "top_second": head_names(b.top_heads(k)),
        }  # fmt: skip

    result = run_command(work)
    if json_out:
        emit_json(result)
        return
    stderr_console().print(
        f"top-{k} Jaccard {result['jaccard']:.2f} ({len(result['shared'])} shared: "
        f"{', '.join(result['shared']) or 'none'}); Spearman over all heads {result['spearman']:.2f}"
    )
