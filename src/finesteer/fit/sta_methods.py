"""`sta` and `sae_all` as methods of the comparison registry (`finesteer compare --methods …,sae_all,sta`).

The registry hands every method the behaviour's A/B training items; STA needs open answers, so each
item becomes a triple (question without its choices, the matching option's text, the other option's
text) — the STA paper's (question, safe answer, unsafe answer) layout. Settings: `sae` (an SAE folder;
default: the only SAE trained for this model under the finesteer cache), `trim`, `multiplier` (λ),
`batch_size`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finesteer.data.items import ab_triples
from finesteer.fit.sta import DEFAULT_TRIM, SelectionMode, answer_pairs, fit_sta
from finesteer.methods import BehaviourData, MethodError
from finesteer.runs import cache_root

if TYPE_CHECKING:
    from finesteer.evaluate.compare import SteeringSetup
    from finesteer.models.loading import LoadedModel

SETTINGS: frozenset[str] = frozenset({"sae", "trim", "multiplier", "batch_size"})


def cached_sae_for(model_name: str) -> Path:
    """The one SAE folder under `<cache>/saes/<model>/`; an error naming the choices otherwise."""
    root = cache_root() / "saes" / model_name
    found = sorted(p.parent for p in root.glob("*/*/cfg.json")) if root.exists() else []
    if len(found) != 1:
        listing = ", ".join(str(p) for p in found) or "none"
        raise MethodError(
            f"STA needs an SAE: pass settings {{'sae': FOLDER}} (SAEs cached for {model_name}: {listing}; "
            f"train one with `finesteer sae train {model_name} --layer L`)"
        )
    return found[0]


def _method(
    mode: SelectionMode,
    lm: LoadedModel,
    data: BehaviourData,
    settings: Mapping[str, Any],
    run_dir: Path | None,
) -> SteeringSetup:
    from finesteer.evaluate.compare import SteeringSetup
    from finesteer.sae import load_sae

    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise MethodError(
            f"STA methods do not take setting(s) {unknown}; they accept {', '.join(sorted(SETTINGS))}"
        )
    path = Path(settings["sae"]).expanduser() if settings.get("sae") else cached_sae_for(lm.name)
    sae = load_sae(path)
    fitted = fit_sta(
        lm,
        sae,
        answer_pairs(lm.tokenizer, ab_triples(data.train)),
        mode=mode,
        trim=float(settings.get("trim", DEFAULT_TRIM)),
        multiplier=float(settings.get("multiplier", 1.0)),
        batch_size=int(settings.get("batch_size", 8)),
        run_dir=run_dir,
        sae_path=str(path),
        progress=False,
    )
    fitted.metadata["pairs"] = f"{data.behaviour} train A/B items as open answers"
    if run_dir is not None:
        fitted.save(run_dir / "artifact", lm)
    return SteeringSetup(fitted.name, lm, intervention=fitted.intervention, metadata=dict(fitted.metadata))


def sta_method(
    lm: LoadedModel, data: BehaviourData, settings: Mapping[str, Any], run_dir: Path | None
) -> SteeringSetup:
    """Steering Target Atoms (settings: sae, trim, multiplier, batch_size)."""
    return _method("sta", lm, data, settings, run_dir)


def sae_all_method(
    lm: LoadedModel, data: BehaviourData, settings: Mapping[str, Any], run_dir: Path | None
) -> SteeringSetup:
    """Every atom's Δa decoded, CAA-norm (SAE-AxBench; settings as for sta)."""
    return _method("all", lm, data, settings, run_dir)


__all__ = ["SETTINGS", "cached_sae_for", "sae_all_method", "sta_method"]
