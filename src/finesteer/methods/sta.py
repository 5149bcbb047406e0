"""Answer-statistics methods through an SAE: STA (and its ablations) and the answer-mean CAA baseline.

Both fit on (question, wanted answer, unwanted answer) triples: a behaviour's A/B train items as
open answers (question stem, matching option text, other option text; the STA paper's layout), or
the triples of `ContrastData` (the refusal experiment). `source="system_prompt"` measures the
contrast data's system prompt instead (with − without it, over `prompt_messages`): the
"prompt → vector" variants. Statistics are cached on the data, so methods sharing them (STA in
several modes, the answer-mean CAA) measure them once.

* `sta` (`mode`: "sta" = amplitude and frequency, "amplitude", "frequency", "all" = every atom,
  the SAE-AxBench baseline): atoms' Δa decoded, rescaled to the CAA vector's norm.
* `select="output"` (`sta_output`): STA's atoms kept only when their decoder direction raises the
  first-token refusal log-probability (or, with `direction`, points along a refusal direction),
  the top `output_keep` of them by contribution Δa_j·s_j (`finesteer.fit.sta_output`); the
  gradient is measured on the first `output_prompts` training questions (never evaluation ones).
* `caa_answer_mean`: the STA paper's CAA baseline, the answer-token-mean residual difference at the
  SAE's layer, all positions (not `caa`, which reads the answer letter and sweeps layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from safetensors.torch import load_file
from torch import Tensor

from finesteer.fit.prompt_vector import prompt_vector_metadata, system_prompt_stats
from finesteer.fit.sta import (
    DEFAULT_TRIM,
    AtomStats,
    SelectionMode,
    answer_pairs,
    atom_statistics,
    fit_caa_from_stats,
    fit_from_stats,
    fit_sta,
)
from finesteer.fit.sta_output import (
    DEFAULT_KEEP,
    direction_atom_scores,
    output_atom_scores,
    output_selection_metadata,
    refusal_metric_gradient,
    select_output,
)
from finesteer.fit.steering import Steering
from finesteer.methods.base import MethodSettings
from finesteer.methods.caa import save_fitted
from finesteer.methods.data import BehaviourData, ContrastData, contrast_triples
from finesteer.methods.errors import MethodError
from finesteer.runs import cache_root
from finesteer.sae.io import load_sae

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel
    from finesteer.sae.model import SparseAutoencoder

Source = Literal["answers", "system_prompt"]
SOURCES: tuple[str, ...] = ("answers", "system_prompt")
Select = Literal["input", "output"]
SELECTS: tuple[str, ...] = ("input", "output")


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


def _check_source(method: str, source: str, data: BehaviourData | ContrastData) -> None:
    if source not in SOURCES:
        raise MethodError(f"{method}: unknown source {source!r}; choose {', '.join(SOURCES)}")
    if source == "system_prompt" and not (
        isinstance(data, ContrastData) and data.system_prompt and data.prompt_messages
    ):
        raise MethodError(
            f"{method}: source 'system_prompt' needs contrast data with a system prompt and messages"
        )


def _sae(
    lm: LoadedModel, data: BehaviourData | ContrastData, sae: str | None
) -> tuple[SparseAutoencoder, str | None]:
    """The SAE (and its path for provenance): the `sae` setting, the data's SAE, or the cached one."""
    if sae is None and isinstance(data, ContrastData) and data.sae is not None:
        return data.sae, data.sae_path
    path = Path(sae).expanduser() if sae else cached_sae_for(lm.name)
    return load_sae(path), str(path)


def _answer_stats(
    lm: LoadedModel, sae: SparseAutoencoder, data: ContrastData, batch_size: int, progress: bool
) -> AtomStats:
    """The contrast data's answer statistics: in memory, from `stats_path`, or measured (and cached)."""
    key = f"answers:{sae.cfg.hook_name}:{batch_size}"
    if key not in data.cache:
        path = data.stats_path
        if path is not None and path.exists():
            data.cache[key] = AtomStats.load(path)
        else:
            pairs = answer_pairs(lm.tokenizer, list(data.triples))
            data.cache[key] = atom_statistics(lm, sae, pairs, batch_size=batch_size, progress=progress)
            if path is not None:
                data.cache[key].save(path)
    return data.cache[key]


def _prompt_stats(lm: LoadedModel, sae: SparseAutoencoder, data: ContrastData, batch_size: int) -> AtomStats:
    key = f"system_prompt:{sae.cfg.hook_name}:{batch_size}"
    if key not in data.cache:
        assert data.system_prompt is not None
        data.cache[key] = system_prompt_stats(
            lm, sae, data.system_prompt, list(data.prompt_messages), batch_size=batch_size
        )
    return data.cache[key]


@dataclass(frozen=True)
class STASettings(MethodSettings):
    """`sae` folder (default: the data's SAE, else the one cached for the model), atom-selection
    `mode`, `trim`, multiplier λ, batch size, and `source` (answers, or the system prompt);
    `select` "output" filters the atoms by output-side scores (`output_keep`, `output_prompts`, and
    `direction`: a safetensors file with a "direction" tensor to score against instead)."""

    method = "sta"
    sae: str | None = None
    mode: SelectionMode = "sta"
    trim: float = DEFAULT_TRIM
    multiplier: float = 1.0
    batch_size: int = 8
    source: Source = "answers"
    progress: bool = False
    select: Select = "input"
    output_keep: float = DEFAULT_KEEP
    output_prompts: int = 32
    direction: str | None = None


def _output_mask(
    lm: LoadedModel, sae: SparseAutoencoder, stats: AtomStats, questions: list[str], s: STASettings
) -> tuple[Tensor, dict[str, Any]]:
    """STA's atoms filtered by their output-side scores (refusal-logit gradient or a direction file)."""
    if s.select not in SELECTS:
        raise MethodError(f"sta: unknown select {s.select!r}; choose {', '.join(SELECTS)}")
    if s.mode != "sta":
        raise MethodError("sta: select 'output' filters the amplitude-and-frequency atoms; use mode 'sta'")
    if s.direction is not None:
        scores = direction_atom_scores(sae, load_file(str(Path(s.direction).expanduser()))["direction"])
        how = f"refusal direction {s.direction}"
    else:
        if s.output_prompts < 1 or not questions:
            raise MethodError("sta: select 'output' needs output_prompts ≥ 1 training questions")
        unique = list(dict.fromkeys(questions))[: s.output_prompts]
        gradient = refusal_metric_gradient(lm, sae, unique, batch_size=s.batch_size)
        scores = output_atom_scores(sae, gradient)
        how = f"first-token refusal log-probability gradient on {len(unique)} training questions"
    mask = select_output(stats.delta_a, stats.delta_f, scores, trim=s.trim, keep=s.output_keep)
    meta = {"select": "output", "output_scores": how, "output_keep": s.output_keep}
    return mask, {**meta, **output_selection_metadata(stats.delta_a, scores, mask)}


def _fit_stats(
    lm: LoadedModel, sae: SparseAutoencoder, stats: AtomStats, questions: list[str], s: STASettings,
    sae_path: str | None = None,
) -> Steering:  # fmt: skip
    """`fit_from_stats` with the input-side (STA's) or output-side selection of `s.select`."""
    if s.select == "input":
        return fit_from_stats(
            stats, sae, mode=s.mode, trim=s.trim, multiplier=s.multiplier, sae_path=sae_path
        )
    mask, meta = _output_mask(lm, sae, stats, questions, s)
    fitted = fit_from_stats(
        stats, sae, mode=s.mode, trim=s.trim, multiplier=s.multiplier, sae_path=sae_path, mask=mask
    )
    return Steering(fitted.name, fitted.intervention, {**fitted.metadata, **meta, "method": "sta_output"})


class STA:
    """Steering Target Atoms (Wang et al., ACL 2025); `mode="all"` is the SAE-AxBench baseline."""

    name: ClassVar[str] = "sta"
    description: ClassVar[str] = "Steering Target Atoms (SAE); mode all = every atom's Δa, CAA norm"
    Settings: ClassVar[type[MethodSettings]] = STASettings

    def fit(
        self,
        lm: LoadedModel,
        data: BehaviourData | ContrastData,
        settings: STASettings | None = None,
        run_dir: Path | None = None,
    ) -> Steering:
        s = STASettings.parse(settings)
        _check_source(self.name, s.source, data)
        sae, sae_path = _sae(lm, data, s.sae)
        if s.source == "system_prompt":
            assert isinstance(data, ContrastData) and data.system_prompt is not None
            stats = _prompt_stats(lm, sae, data, s.batch_size)
            # as `prompt_vectors` always did: no SAE path in the provenance
            fitted = _fit_stats(lm, sae, stats, list(data.prompt_messages), s)
            meta = {**fitted.metadata, **prompt_vector_metadata(data.system_prompt, stats)}
            return Steering(fitted.name, fitted.intervention, meta, lm=lm)
        if isinstance(data, ContrastData):
            stats = _answer_stats(lm, sae, data, s.batch_size, s.progress)
            questions = [triple[0] for triple in data.triples]
            return _fit_stats(lm, sae, stats, questions, s, sae_path).bound(lm)
        if s.select == "output":
            triples = contrast_triples(data)
            pairs = answer_pairs(lm.tokenizer, triples)
            stats = atom_statistics(lm, sae, pairs, batch_size=s.batch_size, progress=s.progress)
            fitted = _fit_stats(lm, sae, stats, [t[0] for t in triples], s, sae_path)
            fitted.metadata["pairs"] = f"{data.behaviour} train A/B items as open answers"
            return save_fitted(fitted.bound(lm), run_dir)
        fitted = fit_sta(
            lm,
            sae,
            answer_pairs(lm.tokenizer, contrast_triples(data)),
            mode=s.mode,
            trim=s.trim,
            multiplier=s.multiplier,
            batch_size=s.batch_size,
            run_dir=run_dir,
            sae_path=sae_path,
            progress=s.progress,
        )
        fitted.metadata["pairs"] = f"{data.behaviour} train A/B items as open answers"
        return save_fitted(fitted.bound(lm), run_dir)


@dataclass(frozen=True)
class CAAAnswerMeanSettings(MethodSettings):
    """`sae` (whose layer and site the vector is added at), multiplier λ, batch size, source."""

    method = "caa_answer_mean"
    sae: str | None = None
    multiplier: float = 1.0
    batch_size: int = 8
    source: Source = "answers"
    progress: bool = False


class CAAAnswerMean:
    """The STA paper's CAA baseline: answer-token-mean residual difference, all positions."""

    name: ClassVar[str] = "caa_answer_mean"
    description: ClassVar[str] = "answer-token-mean residual difference at the SAE's layer, all positions"
    Settings: ClassVar[type[MethodSettings]] = CAAAnswerMeanSettings

    def fit(
        self,
        lm: LoadedModel,
        data: BehaviourData | ContrastData,
        settings: CAAAnswerMeanSettings | None = None,
        run_dir: Path | None = None,
    ) -> Steering:
        s = CAAAnswerMeanSettings.parse(settings)
        _check_source(self.name, s.source, data)
        sae, _ = _sae(lm, data, s.sae)
        if isinstance(data, ContrastData):
            if s.source == "system_prompt":
                assert data.system_prompt is not None
                stats = _prompt_stats(lm, sae, data, s.batch_size)
                fitted = fit_caa_from_stats(stats, sae, multiplier=s.multiplier)
                meta = {**fitted.metadata, **prompt_vector_metadata(data.system_prompt, stats)}
                return Steering(fitted.name, fitted.intervention, meta, lm=lm)
            stats = _answer_stats(lm, sae, data, s.batch_size, s.progress)
        else:
            pairs = answer_pairs(lm.tokenizer, contrast_triples(data))
            stats = atom_statistics(lm, sae, pairs, batch_size=s.batch_size, progress=s.progress)
        return save_fitted(fit_caa_from_stats(stats, sae, multiplier=s.multiplier).bound(lm), run_dir)


__all__ = [
    "SELECTS",
    "SOURCES",
    "STA",
    "CAAAnswerMean",
    "CAAAnswerMeanSettings",
    "STASettings",
    "cached_sae_for",
]
