"""The refusal-vs-cost frontier: every named intervention as a point (or a curve over strength) with
y = refusal behaviour on held-out harmful prompts and x = cost on harmless ones, each with n and an
interval.

* y: the refusal rate (goal "induce": steering towards refusal) or the attack success rate = share of
  replies the keyword judge does not count as refusals (goal "remove": ablations), on held-out harmful
  prompts, greedy; Wilson interval, and the paired change against the unmodified model (McNemar).
* x: next-token KL(p_base ‖ p_intervened) on harmless prompts (mean, bootstrap interval, paired
  with the prompts), the over-refusal rate on XSTest-safe prompts (Wilson) and, when MC items are
  given, multiple-choice accuracy by log-likelihood (Wilson).

An entry is a named `Steering` (a method at λ, a head ablation, a directional ablation from
elsewhere, a system prompt) or a `PendingSteering` built only when its point has not been measured.
Entries belong to a series (one curve; `strength` orders it) and are a "method", a "control"
(random heads or directions of the same size, grouped per size over seeds) or the "baseline".
Each point is one job of `finesteer.runs.run_jobs` stored as `points/<id>.json`: a rerun skips
finished points, and a point made with other prompts, settings or intervention is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finesteer.data.items import ABItem, PromptItem
from finesteer.data.prompts import chat_prompt
from finesteer.evaluate.compare import ComparisonError, PendingSteering, built, digest
from finesteer.evaluate.frontier_share import add_shares
from finesteer.evaluate.frontier_verdicts import add_point_verdicts
from finesteer.evaluate.harness import run_generations
from finesteer.evaluate.helpfulness import mc_accuracy
from finesteer.evaluate.kl import next_token_kl_between
from finesteer.evaluate.refusal_compare import RefusalSettings
from finesteer.evaluate.stats import mean_estimate, paired_effect, rate_estimate, seed_spread
from finesteer.fit.steering import Steering
from finesteer.locate.refusal_proxy import first_token_refusal
from finesteer.models.loading import LoadedModel
from finesteer.runs.lock import FolderLock
from finesteer.runs.records import JsonFileRecords, Record
from finesteer.runs.runner import Job, run_jobs

Goal = Literal["induce", "remove"]
GOALS: tuple[str, ...] = ("induce", "remove")
Kind = Literal["baseline", "method", "control"]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FrontierPrompts:
    """Held-out harmful prompts (y), XSTest-safe prompts (over-refusal), harmless user prompts for the
    KL, and optional multiple-choice items (accuracy)."""

    harmful: tuple[PromptItem, ...]
    harmless: tuple[PromptItem, ...]
    kl_prompts: tuple[str, ...]
    mc_items: tuple[ABItem, ...] = ()

    def __post_init__(self) -> None:
        if not self.harmful or not self.harmless or not self.kl_prompts:
            raise ComparisonError(
                "the frontier needs harmful, XSTest-safe and KL prompts (none may be empty)"
            )

    def digest(self) -> str:
        return digest(
            [
                [(i.id, i.prompt) for i in self.harmful],
                [(i.id, i.prompt) for i in self.harmless],
                list(self.kl_prompts),
                [i.id for i in self.mc_items],
            ]
        )


@dataclass(frozen=True)
class FrontierSettings:
    """The goal (what y is), decoding and keyword judge, the interval level and bootstrap seed."""

    goal: Goal = "induce"
    refusal: RefusalSettings = field(default_factory=RefusalSettings)
    kl_batch_size: int = 8
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.goal not in GOALS:
            raise ComparisonError(f"unknown frontier goal {self.goal!r}; choose {', '.join(GOALS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"goal": self.goal, "refusal": self.refusal.to_dict(), "confidence": self.confidence}


@dataclass(frozen=True)
class FrontierEntry:
    """One point to measure: the steering (or a builder of it), its series, strength and kind."""

    series: str
    strength: float
    steering: Steering | PendingSteering
    kind: Kind = "method"
    size: int | None = None
    seed: int | None = None

    @property
    def id(self) -> str:
        return self.steering.name


def _refused(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    return [1.0 if row["verdicts"]["refusal"]["label"] == "refusal" else 0.0 for row in rows]


def measure_point(
    lm: LoadedModel,
    steering: Steering,
    prompts: FrontierPrompts,
    settings: FrontierSettings,
    folder: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Per-item outcomes of one intervention: refused (harmful, harmless), KL per prompt, MC correct."""
    judge = settings.refusal.make_judge()
    model = steering.model(lm)
    outcomes: dict[str, Any] = {}
    for kind, items in (("harmful", prompts.harmful), ("harmless", prompts.harmless)):
        rows = run_generations(
            model,
            items,
            folder / "generations" / f"{steering.name}.{kind}.jsonl" if folder is not None else None,
            format_fn=lambda text: chat_prompt(model.tokenizer, text, system=steering.system_prompt),
            config=settings.refusal.generation,
            intervention=steering.intervention,
            judges={"refusal": judge},
            progress=progress,
        )
        outcomes[f"refused_{kind}"] = _refused(rows)
        outcomes[f"examples_{kind}"] = [row["response"][:160] for row in rows[:2]]
    texts = [chat_prompt(model.tokenizer, i.prompt, system=steering.system_prompt) for i in prompts.harmful]
    outcomes["p_refusal_first_token"] = first_token_refusal(
        model, texts, steering.intervention, batch_size=settings.kl_batch_size
    )
    outcomes["kl"] = next_token_kl_between(
        lm, steering, list(prompts.kl_prompts), batch_size=settings.kl_batch_size
    )
    if prompts.mc_items:
        mc = mc_accuracy(
            model,
            prompts.mc_items,
            system=steering.system_prompt,
            intervention=steering.intervention,
            batch_size=settings.kl_batch_size,
        )
        outcomes["mc_correct"] = [1.0 if row["correct"] else 0.0 for row in mc.per_item]
    return outcomes


def run_frontier(
    lm: LoadedModel,
    entries: Sequence[FrontierEntry],
    prompts: FrontierPrompts,
    settings: FrontierSettings | None = None,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
    on_point: Callable[[str, Record, bool], None] | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Measure every entry (resumable per point under `out_dir/points/`) and assemble the table; with
    `reference` (a point id), each point's share of that point's change of y."""
    settings = settings or FrontierSettings()
    ids = [e.id for e in entries]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ComparisonError(f"frontier point names must be unique; repeated: {', '.join(repeated)}")
    shared = {"version": FORMAT_VERSION, "prompts": prompts.digest(), "settings": settings.to_dict()}
    folder = Path(out_dir) if out_dir is not None else None
    store = JsonFileRecords(folder / "points") if folder is not None else None

    def job(entry: FrontierEntry) -> Job:
        pending = dict(entry.steering.key) if isinstance(entry.steering, PendingSteering) else None

        def run() -> Record:
            steering = built(entry.steering)
            outcomes = measure_point(lm, steering, prompts, settings, folder, progress)
            return {
                "shared": shared,
                "pending_key": pending,
                "identity": steering.identity(lm),
                "metadata": steering.metadata,
                "outcomes": outcomes,
            }

        def check(saved: Record) -> None:
            same = digest(saved.get("shared")) == digest(shared)
            same = same and digest(saved.get("pending_key")) == digest(pending)
            if isinstance(entry.steering, Steering):
                same = same and saved.get("identity") == entry.steering.identity(lm)
            if not same:
                raise ComparisonError(
                    f"frontier point {entry.id!r} in {folder} was measured with other prompts, settings or "
                    "intervention; use another --out folder or delete points/<id>.json"
                )

        return Job(entry.id, run, check)

    with FolderLock(folder) if folder is not None else nullcontext():
        records = run_jobs(
            [job(e) for e in entries],
            store,
            on_done=on_point,
            progress=progress,
            desc="frontier",
            unit="point",
        )
    return assemble(entries, records, settings, reference)


def _y(outcomes: Mapping[str, Any], goal: str) -> list[float]:
    refused = outcomes["refused_harmful"]
    return list(refused) if goal == "induce" else [1.0 - r for r in refused]


def point_row(
    entry: FrontierEntry, record: Record, settings: FrontierSettings, baseline: Record | None
) -> dict[str, Any]:
    """One table row: y, KL, over-refusal and MC accuracy with n and intervals; Δy vs the baseline."""
    o, c = record["outcomes"], settings.confidence
    y = _y(o, settings.goal)
    row: dict[str, Any] = {
        "id": entry.id,
        "series": entry.series,
        "strength": entry.strength,
        "kind": entry.kind,
        "size": entry.size,
        "seed": entry.seed,
        "y": rate_estimate(int(sum(y)), len(y), c).to_dict(),
        "kl": mean_estimate(o["kl"], c, seed=settings.seed).to_dict(),
        "over_refusal": rate_estimate(
            int(sum(o["refused_harmless"])), len(o["refused_harmless"]), c
        ).to_dict(),
        "mc_accuracy": None,
        "p_refusal_first_token": None,
        "examples": {"harmful": o["examples_harmful"], "harmless": o["examples_harmless"]},
        "metadata": {k: v for k, v in record.get("metadata", {}).items() if k != "top_atoms"},
    }
    if "p_refusal_first_token" in o:  # points measured before this field existed lack it
        first = mean_estimate(o["p_refusal_first_token"], c, seed=settings.seed)
        row["p_refusal_first_token"] = first.to_dict()
    if "mc_correct" in o:
        row["mc_accuracy"] = rate_estimate(int(sum(o["mc_correct"])), len(o["mc_correct"]), c).to_dict()
    if baseline is not None and entry.kind != "baseline":
        base = baseline["outcomes"]
        row["y_effect"] = paired_effect(
            y, _y(base, settings.goal), confidence=c, seed=settings.seed
        ).to_dict()
        row["over_refusal_effect"] = paired_effect(
            o["refused_harmless"], base["refused_harmless"], confidence=c, seed=settings.seed
        ).to_dict()
    return row


def assemble(
    entries: Sequence[FrontierEntry],
    records: Mapping[str, Record],
    settings: FrontierSettings,
    reference: str | None = None,
) -> dict[str, Any]:
    """The frontier table: `points` (one row per entry, each method point with its verdict against its
    controls or the unmodified model), `controls` (per control series and size, the spread of y and
    KL over seeds) and the y label."""
    base_ids = [e.id for e in entries if e.kind == "baseline"]
    baseline = records.get(base_ids[0]) if base_ids else None
    rows = [point_row(e, records[e.id], settings, baseline) for e in entries]
    y = {e.id: _y(records[e.id]["outcomes"], settings.goal) for e in entries}
    if reference is not None and base_ids and reference in records:
        add_shares(rows, y, base_ids[0], reference, confidence=settings.confidence, seed=settings.seed)
    base_id = base_ids[0] if base_ids else None
    add_point_verdicts(rows, y, base_id, confidence=settings.confidence, seed=settings.seed)
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        if row["kind"] == "control":
            groups.setdefault((row["series"], row["strength"]), []).append(row)
    controls = [
        {
            "series": s,
            "strength": k,
            "n_seeds": len(g),
            "y": seed_spread([r["y"]["value"] for r in g]),
            "kl": seed_spread([r["kl"]["value"] for r in g]),
            "over_refusal": seed_spread([r["over_refusal"]["value"] for r in g]),
        }
        for (s, k), g in groups.items()
    ]
    y_label = "refusal rate (harmful)" if settings.goal == "induce" else "attack success rate (harmful)"
    return {
        "goal": settings.goal,
        "y_label": y_label,
        "settings": settings.to_dict(),
        "points": rows,
        "controls": controls,
        "reference": reference if reference in records else None,
    }


__all__ = [
    "GOALS",
    "FrontierEntry",
    "FrontierPrompts",
    "FrontierSettings",
    "assemble",
    "measure_point",
    "point_row",
    "run_frontier",
]
