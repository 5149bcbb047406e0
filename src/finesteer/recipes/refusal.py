"""The refusal experiment: baseline, prompting, answer-mean CAA, SAE-all-atoms and STA across a λ sweep.

Positive = refusing a harmful request, negative = complying. All steering vectors come from the
same contrast pairs (`finesteer.fit.refusal_pairs`) at the SAE's layer and are applied at every
position: "caa" is the answer-token-mean residual difference (`caa_answer_mean`), "sae_all" decodes
every atom's Δa (`sta`, mode all), "sta" decodes the selected atoms' Δa, the last two rescaled to
CAA's norm, so at equal λ the three differ only in direction. "prompt" is the refusal system prompt
itself; "prompt_caa" / "prompt_sta" are that system prompt turned into vectors (with − without it).
The names are resolved by the one method registry (`finesteer.methods.resolve_method(name,
"refusal")`); every method is fitted once and swept with `Steering.scaled(λ)`. Everything is
measured by `compare_refusal` on held-out JailbreakBench (refusal) and XSTest-safe (over-refusal)
prompts. `refusal_comparison` is the whole experiment from names and option strings (what
`finesteer eval sta-refusal` and `finesteer compare --task refusal` run).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finesteer.data import PromptItem, load_dataset
from finesteer.evaluate.compare import ComparisonError, PendingSteering
from finesteer.evaluate.refusal_compare import RefusalSettings, compare_refusal
from finesteer.evaluate.refusal_effects import add_refusal_effects, control_name, effects_table
from finesteer.fit.controls import CONTROL_SEEDS, ControlError, controls_for
from finesteer.fit.refusal_pairs import REFUSAL_SYSTEM_PROMPT, harmful_training_prompts, refusal_triples
from finesteer.fit.sta import DEFAULT_TRIM
from finesteer.fit.steering import Steering
from finesteer.generation import GenerationConfig
from finesteer.methods import ContrastData, resolve_method
from finesteer.methods.registry import ALIASES
from finesteer.models.loading import load_model
from finesteer.sae.io import load_sae

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel
    from finesteer.sae.model import SparseAutoencoder

METHODS: tuple[str, ...] = tuple(ALIASES["refusal"])
"""The names the refusal experiment accepts (`--methods`)."""
DEFAULT_METHODS: tuple[str, ...] = ("baseline", "prompt", "caa", "sae_all", "sta")


def spread(items: Sequence[PromptItem], n: int) -> list[PromptItem]:
    """`n` items evenly spaced over the list (JailbreakBench is ordered by category: keep them all)."""
    if n <= 0 or not items:
        raise ComparisonError("need at least one evaluation prompt")
    if n >= len(items):
        return list(items)
    return [items[math.floor(i * len(items) / n)] for i in range(n)]


def evaluation_sets(n_harmful: int, n_harmless: int) -> tuple[list[PromptItem], list[PromptItem]]:
    """Held-out harmful (JailbreakBench) and safe-but-scary (XSTest safe) prompts."""
    harmful = spread(load_dataset("jailbreakbench"), n_harmful)  # type: ignore[arg-type]
    harmless = spread(load_dataset("xstest", "safe"), n_harmless)  # type: ignore[arg-type]
    return harmful, harmless


def label(method: str, multiplier: float) -> str:
    return f"{method}@{multiplier:g}"


def _settings_for(method: str, trim: float, progress: bool) -> dict[str, Any]:
    """The experiment's settings for a registered method: STA's trim; progress for the vector fits."""
    if method == "sta":
        return {"trim": trim, "progress": progress}
    if method == "caa_answer_mean":
        return {"progress": progress}
    return {}


def prompt_messages(n_prompt_messages: int) -> list[str]:
    """Half harmful training prompts, half harmless ones: where the system prompt is measured."""
    harmful = [p.prompt for p in harmful_training_prompts()[: n_prompt_messages // 2]]
    harmless = [
        p.prompt  # type: ignore[union-attr]
        for p in load_dataset("refusal-direction-harmless", "train", limit=n_prompt_messages // 2)
    ]
    return harmful + harmless


def fit_swept(
    lm: LoadedModel,
    data: ContrastData,
    methods: Sequence[str],
    multipliers: Sequence[float],
    *,
    trim: float,
    timings: dict[str, float],
    progress: bool = False,
) -> tuple[list[Steering | PendingSteering], set[str]]:
    """Each method fitted once (through the registry); one steering per λ for those with a vector
    (named `method@λ`), the others as they are. Also returns the names of the swept methods."""
    setups: list[Steering | PendingSteering] = []
    swept: set[str] = set()
    for method in methods:
        choice = resolve_method(method, "refusal")
        method_settings = choice.settings(_settings_for(choice.method.name, trim, progress))
        t0 = time.perf_counter()
        steering = choice.fit(lm, data, method_settings)
        if steering.intervention is None:
            setups.append(steering)
            continue
        by_prompt = getattr(method_settings, "source", "answers") == "system_prompt"
        kind = "prompt_stats_s" if by_prompt else "answer_stats_s"
        timings[kind] = round(timings.get(kind, 0.0) + time.perf_counter() - t0, 1)
        swept.add(choice.label)
        setups += [steering.scaled(m, name=label(choice.label, m)) for m in multipliers]
    return setups, swept


def _contrast_data(
    methods: Sequence[str],
    n_pairs: int,
    system_prompt: str,
    n_prompt_messages: int,
    sae: SparseAutoencoder,
    sae_path: str | None,
    folder: Path,
) -> ContrastData:
    """The refusal contrast pairs (a fifth of them A/B), with prompt messages only when a method
    steers by system prompt; atom statistics are cached in `folder`."""
    n_ab = max(0, n_pairs // 5)
    by_prompt = any(resolve_method(m, "refusal").fixed.get("source") == "system_prompt" for m in methods)
    return ContrastData(
        "refusal",
        tuple(refusal_triples(n_harmful=n_pairs - n_ab, n_ab=n_ab)),
        system_prompt=system_prompt,
        prompt_messages=tuple(prompt_messages(n_prompt_messages)) if by_prompt else (),
        sae=sae,
        sae_path=sae_path,
        stats_path=folder / "atom_stats.safetensors",
    )


def run_sta_refusal(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    out_dir: str | Path,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    multipliers: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
    headline: float = 1.0,
    trim: float = DEFAULT_TRIM,
    n_pairs: int = 160,
    n_harmful: int = 40,
    n_harmless: int = 40,
    n_prompt_messages: int = 64,
    system_prompt: str = REFUSAL_SYSTEM_PROMPT,
    settings: RefusalSettings | None = None,
    sae_path: str | None = None,
    progress: bool = True,
    controls: int = len(CONTROL_SEEDS),
) -> dict[str, Any]:
    """Fit every method once, evaluate every (method, λ), and write `results.json` + `table.md`.

    Each swept method at λ = `headline` also gets `controls` matched controls (a random direction of
    equal norm at the same site and λ, `finesteer.fit.controls`), scored on the same prompts; each
    headline row carries its paired effects against the unmodified model and the control, and a verdict.

    `methods` in the JSON maps each method to its result at λ = `headline` (the paper's λ = 1 by
    default); `sweep` maps each swept method to {λ: result}. Resumable: statistics are cached and
    each finished (method, λ) is skipped on a rerun with the same settings.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ComparisonError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    mults = sorted({float(m) for m in multipliers} | {float(headline)})
    if any(not math.isfinite(m) for m in mults):
        raise ComparisonError("multipliers must be finite numbers")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    data = _contrast_data(methods, n_pairs, system_prompt, n_prompt_messages, sae, sae_path, folder)
    setups, swept = fit_swept(lm, data, methods, mults, trim=trim, timings=timings, progress=progress)
    settings = settings or RefusalSettings()
    harmful, harmless = evaluation_sets(n_harmful, n_harmless)
    control_setups, control_names = matched_refusal_controls(lm, setups, swept, headline, controls)
    setups += control_setups
    t0 = time.perf_counter()
    results = compare_refusal(setups, harmful=harmful, harmless=harmless, settings=settings, out_dir=folder,
                              progress=progress)  # fmt: skip
    timings["evaluation_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    headline_methods = {
        method: results[method if method not in swept else label(method, headline)] for method in methods
    }
    sweep = {
        method: {f"{m:g}": results[label(method, m)] for m in mults} for method in methods if method in swept
    }
    payload = {
        "model": lm.name,
        "sae": sae_path,
        "hook_name": sae.cfg.hook_name,
        "headline_multiplier": headline,
        "multipliers": mults,
        "trim": trim,
        "n_pairs": len(data.triples),
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "harmful_set": "jailbreakbench (evenly spaced)",
        "harmless_set": "xstest safe (evenly spaced)",
        "system_prompt": system_prompt,
        "settings": settings.to_dict(),
        "methods": headline_methods,
        "sweep": sweep,
        "controls": {"n_seeds": controls, "kind": "random-direction", "setups": control_names},
        "timings": timings,
    }
    controls_of = {method: [results[c] for c in names] for method, names in control_names.items()}
    add_refusal_effects(headline_methods, controls_of)
    payload["at_equal_fluency"] = equal_fluency_summary(payload)
    (folder / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (folder / "table.md").write_text(markdown_table(payload) + "\n")
    return payload


def matched_refusal_controls(
    lm: LoadedModel,
    setups: Sequence[Steering | PendingSteering],
    swept: set[str],
    headline: float,
    n_seeds: int,
) -> tuple[list[Steering], dict[str, list[str]]]:
    """`n_seeds` random-direction controls of each swept method at λ = `headline`, and their names
    per method (none when `n_seeds` is 0 or the method's edit has no matched control)."""
    extra: list[Steering] = []
    names: dict[str, list[str]] = {}
    by_name = {s.name: s for s in setups if isinstance(s, Steering)}
    for method in sorted(swept) if n_seeds else ():
        steering = by_name[label(method, headline)]
        try:
            built = controls_for(steering.intervention, lm.info.n_layers, lm.info.n_heads, range(n_seeds))
        except ControlError:
            continue
        for control in built:
            name = control_name(label(method, headline), control.seed)
            meta = {"control": control.kind, "seed": control.seed, "of": steering.name}
            extra.append(Steering(name, control.intervention, meta, lm=lm))
            names.setdefault(method, []).append(name)
    return extra, names


def equal_fluency_summary(payload: dict[str, Any], tolerance: float = 0.1) -> dict[str, Any]:
    """Per swept method, the λ with the highest refusal rate whose fluency stays within `tolerance`
    (relative) of the unsteered model's: the "refusal gain at equal fluency" comparison.

    Ties on refusal go to the lower over-refusal, then the smaller λ. Needs the baseline method.
    """
    baseline = payload["methods"].get("baseline")
    if baseline is None or baseline.get("fluency") is None:
        return {}
    floor = baseline["fluency"] * (1 - tolerance)
    summary: dict[str, Any] = {"fluency_floor": floor, "tolerance": tolerance}
    for method, points in payload["sweep"].items():
        ok = [
            (float(m), r) for m, r in points.items() if r.get("fluency") is not None and r["fluency"] >= floor
        ]
        if not ok:
            summary[method] = None
            continue
        mult, best = max(ok, key=lambda mr: (mr[1]["refusal_rate"], -mr[1]["over_refusal_rate"], -mr[0]))
        summary[method] = {
            "multiplier": mult,
            "refusal_rate": best["refusal_rate"],
            "over_refusal_rate": best["over_refusal_rate"],
            "fluency": best["fluency"],
            "refusal_gain": best["refusal_rate"] - baseline["refusal_rate"],
        }
    return summary


def _fmt(value: Any, digits: int = 2) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else f"{value:.{digits}f}"
    )


def markdown_table(payload: dict[str, Any]) -> str:
    """One row per (method, λ): refusal rate [95% CI], over-refusal [CI], fluency, atoms, cos(v, CAA)."""
    lines = [
        "| method | λ | refusal (JBB) | over-refusal (XSTest safe) | fluency | atoms | cos to CAA |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name: str, mult: str, r: dict[str, Any]) -> str:
        lo, hi = r["refusal_ci95"]
        olo, ohi = r["over_refusal_ci95"]
        fit = r.get("fit") or {}
        return (
            f"| {name} | {mult} | {_fmt(r['refusal_rate'])} [{_fmt(lo)}, {_fmt(hi)}] | "
            f"{_fmt(r['over_refusal_rate'])} [{_fmt(olo)}, {_fmt(ohi)}] | {_fmt(r['fluency'])} | "
            f"{fit.get('n_atoms', '–')} | {_fmt(fit.get('cosine_to_caa'))} |"
        )

    for name, result in payload["methods"].items():
        if name in payload["sweep"]:
            for mult, r in payload["sweep"][name].items():
                lines.append(row(name, mult, r))
        else:
            lines.append(row(name, "–", result))
    columns, rows = effects_table(payload["methods"])
    headline = f"At λ = {payload['headline_multiplier']:g}, against the unmodified model and the controls:"
    lines += ["", headline, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class RefusalExperiment:
    """What the refusal experiment runs: methods, the λ sweep, data sizes and generation settings.

    `from_options` reads the CLI's comma-separated `methods` and `lambdas` strings.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    lambdas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    headline: float = 1.0
    trim: float = DEFAULT_TRIM
    n_pairs: int = 160
    n_harmful: int = 40
    n_harmless: int = 40
    max_new_tokens: int = 32
    batch_size: int = 40
    judge: str = "gcg+"
    device: str = "cpu"  # where the model runs and its dtype (`models.load_model`)
    dtype: str = "float32"
    controls: int = len(CONTROL_SEEDS)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ComparisonError("--methods is empty")

    @classmethod
    def from_options(cls, methods: str, lambdas: str, **rest: Any) -> RefusalExperiment:
        names = tuple(m.strip() for m in methods.split(",") if m.strip())
        try:
            mults = tuple(float(x) for x in lambdas.split(",") if x.strip())
        except ValueError as exc:
            raise ComparisonError(f"--lambdas must be numbers separated by commas, got {lambdas!r}") from exc
        return cls(methods=names, lambdas=mults, **rest)


def refusal_comparison(model: str, sae: Path, out: Path, experiment: RefusalExperiment) -> dict[str, Any]:
    """The refusal experiment behind `eval sta-refusal` and `compare --task refusal`: one payload
    whose `methods` maps each method to refusal_rate, over_refusal_rate and fluency at λ = headline."""
    started = time.perf_counter()
    e = experiment
    generation = GenerationConfig(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
    settings = RefusalSettings(generation, e.judge)  # type: ignore[arg-type]
    loaded = load_sae(sae)
    lm = load_model(model, device=e.device, dtype=e.dtype)
    payload = run_sta_refusal(
        lm, loaded, out, methods=list(e.methods), multipliers=list(e.lambdas), headline=e.headline,
        trim=e.trim, n_pairs=e.n_pairs, n_harmful=e.n_harmful, n_harmless=e.n_harmless,
        settings=settings, sae_path=str(sae), controls=e.controls,
    )  # fmt: skip
    payload["wall_s"] = round(time.perf_counter() - started, 1)
    return payload


__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "RefusalExperiment",
    "equal_fluency_summary",
    "evaluation_sets",
    "fit_swept",
    "label",
    "markdown_table",
    "matched_refusal_controls",
    "prompt_messages",
    "refusal_comparison",
    "run_sta_refusal",
    "spread",
]
