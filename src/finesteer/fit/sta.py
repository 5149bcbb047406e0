"""Steering Target Atoms (Wang et al., ACL 2025): steer through the SAE atoms that separate answers.

For contrast pairs (a wanted and an unwanted continuation), each example's SAE latents are averaged
over its answer tokens: ā_pos,i and ā_neg,i ∈ R^d_sae. Then, per atom,

    Δa = mean_i ā_pos,i − mean_i ā_neg,i                   (amplitude)
    Δf = #{i : ā_pos,i > 0} − #{i : ā_neg,i > 0}            (frequency; raw counts, as in the code)

Selection (the authors' `act_and_fre`, trim = 0.35): with norm(x) = sign(x)·(|x| − min|x|)/(max|x| −
min|x|), an atom is kept when norm(Δa) and norm(Δf) have the same strict sign, its |norm Δf| is at
least the value at index ⌊trim·d_sae⌋ of the sorted (descending) sign-agreeing |norm Δf|, and its
|Δa| is at least the value at the same index of sorted |Δa|. The original keeps sign-disagreeing
atoms when fewer than trim·d_sae atoms agree (the threshold becomes 0); we always require agreement,
which is what the paper describes. v = Δa_kept @ W_dec (no b_dec, as in the code), rescaled to the
norm of the CAA vector at the same layer — the mean over pairs of the answer-token-mean residual
difference, computed in the same pass — and added with multiplier λ at every position
(`steer_residual(L, v, λ, scope="all")`).

Ablations: "amplitude" (|Δa| mask only, the paper's "wo/Frequency"), "frequency" (sign-agreeing
|Δf| mask only, "wo/Amplitude"), "all" (every atom: the "SAE-AxBench" baseline, `fit_sta(mode="all")`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.data.prompts import chat_prompt
from finesteer.errors import FinesteerError
from finesteer.fit.steering import Steering
from finesteer.interventions.edit import steer_residual
from finesteer.runs import write_safetensors_atomic
from finesteer.sae.model import SparseAutoencoder
from finesteer.sae.store import site_activations

if TYPE_CHECKING:
    from finesteer.models.loading import LoadedModel

SelectionMode = Literal["sta", "amplitude", "frequency", "all"]
SELECTION_MODES: tuple[str, ...] = ("sta", "amplitude", "frequency", "all")
MODE_LABELS = {"sta": "sta", "amplitude": "sta_amplitude", "frequency": "sta_frequency", "all": "sae_all"}
"""metadata["method"] of a fit per mode (provenance; methods are named by `finesteer.methods`)."""
DEFAULT_TRIM = 0.35


class STAError(FinesteerError, ValueError):
    """STA inputs that cannot give a vector (no pairs, empty answers, no atom selected, NaN)."""


@dataclass(frozen=True)
class ContrastPair:
    """A wanted and an unwanted (prompt, completion); statistics read the completion's tokens.

    For answer triples the prompt is shared and the completions differ; for prompt → vector the
    completions (user turn + template tail) are identical and the prompts differ.
    """

    positive: tuple[str, str]
    negative: tuple[str, str]
    id: str = ""

    def __post_init__(self) -> None:
        for side, (prompt, completion) in (("positive", self.positive), ("negative", self.negative)):
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise STAError(f"pair {self.id!r}: {side} must be a (prompt, completion) pair of strings")
            if not completion.strip():
                raise STAError(f"pair {self.id!r}: {side} completion is empty (no tokens to average over)")


def answer_pairs(
    tokenizer: Any, triples: Sequence[tuple[str, str, str]], *, system: str | None = None
) -> list[ContrastPair]:
    """(question, positive answer, negative answer) triples → pairs sharing the chat-formatted prompt."""
    if not triples:
        raise STAError("no (question, positive, negative) triples")
    pairs = []
    for i, (question, positive, negative) in enumerate(triples):
        prompt = chat_prompt(tokenizer, question, system)
        pairs.append(ContrastPair((prompt, positive), (prompt, negative), str(i)))
    return pairs


@dataclass(frozen=True)
class AtomStats:
    """Per-atom statistics of contrast pairs at one SAE, plus the same-pass CAA vector.

    mean_pos/mean_neg: mean over examples of the answer-token-mean latents [d_sae]; count_pos/
    count_neg: examples whose answer-token-mean latent is > 0 [d_sae]; caa_vector: mean over pairs of
    the answer-token-mean residual difference [d_in].
    """

    mean_pos: Tensor
    mean_neg: Tensor
    count_pos: Tensor
    count_neg: Tensor
    caa_vector: Tensor
    n_pairs: int
    hook_name: str

    @property
    def delta_a(self) -> Tensor:
        return self.mean_pos - self.mean_neg

    @property
    def delta_f(self) -> Tensor:
        return self.count_pos - self.count_neg

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = ("mean_pos", "mean_neg", "count_pos", "count_neg", "caa_vector")
        meta = {"n_pairs": str(self.n_pairs), "hook_name": self.hook_name, "kind": "finesteer.atom_stats"}
        write_safetensors_atomic(path, {k: getattr(self, k) for k in names}, meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> AtomStats:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("kind") != "finesteer.atom_stats":
                raise STAError(f"{path} is not an atom statistics file")
            t = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        return cls(**t, n_pairs=int(meta["n_pairs"]), hook_name=meta["hook_name"])


def _encode(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], int]:
    """Prompt and completion tokenised separately and joined (as `finesteer.activations` does for pairs)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise STAError(f"completion {completion!r} has no tokens")
    return prompt_ids + answer_ids, len(prompt_ids)


@torch.no_grad()
def answer_means(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    inputs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    chunk: int = 64,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per input: the mean over completion tokens of the SAE latents [N, d_sae] and of the residual [N, d_in].

    Latents are encoded token by token and then averaged (the paper's order: encode, then mean).
    The forward stops right after the SAE's site.
    """
    site = sae.cfg.site
    if site.is_head:
        raise STAError(f"STA needs a residual-stream SAE; {site} is a per-head site")
    site.validate(lm.info)
    if site.width(lm.info) != sae.cfg.d_in:
        raise STAError(f"SAE d_in={sae.cfg.d_in} but {site} of {lm.name} has width {site.width(lm.info)}")
    latents, resid = [], []
    for start in tqdm(range(0, len(inputs), chunk), desc="atom stats", disable=not progress, unit="chunk"):
        encoded = [_encode(lm.tokenizer, p, c) for p, c in inputs[start : start + chunk]]
        acts = site_activations(
            lm, [e[0] for e in encoded], site, [e[1] for e in encoded], batch_size=batch_size
        )
        for act in acts:
            latents.append(sae.encode(act).mean(0).float())
            resid.append(act.mean(0))
    lat, res = torch.stack(latents), torch.stack(resid)
    if not (torch.isfinite(lat).all() and torch.isfinite(res).all()):
        raise STAError("non-finite activations or SAE latents")
    return lat, res


def atom_statistics(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    pairs: Sequence[ContrastPair],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> AtomStats:
    """Δa / Δf ingredients and the CAA vector for `pairs` at the SAE's site (one pass per side)."""
    if not pairs:
        raise STAError("no contrast pairs")
    pos_lat, pos_res = answer_means(
        lm, sae, [p.positive for p in pairs], batch_size=batch_size, progress=progress
    )
    neg_lat, neg_res = answer_means(
        lm, sae, [p.negative for p in pairs], batch_size=batch_size, progress=progress
    )
    return stats_from_means(pos_lat, neg_lat, pos_res, neg_res, sae.cfg.hook_name)


def stats_from_means(
    pos_latents: Tensor, neg_latents: Tensor, pos_resid: Tensor, neg_resid: Tensor, hook_name: str = ""
) -> AtomStats:
    """AtomStats from per-example answer-token means (rows are examples; pos row i pairs with neg row i)."""
    if pos_latents.shape != neg_latents.shape or pos_latents.dim() != 2 or len(pos_latents) == 0:
        raise STAError(
            f"need matching [N>0, d_sae] latents, got {tuple(pos_latents.shape)} / {tuple(neg_latents.shape)}"
        )
    return AtomStats(
        mean_pos=pos_latents.double().mean(0).float(),
        mean_neg=neg_latents.double().mean(0).float(),
        count_pos=(pos_latents > 0).sum(0).float(),
        count_neg=(neg_latents > 0).sum(0).float(),
        caa_vector=(pos_resid.double().mean(0) - neg_resid.double().mean(0)).float(),
        n_pairs=len(pos_latents),
        hook_name=hook_name,
    )


def signed_minmax(x: Tensor) -> Tensor:
    """sign(x)·(|x| − min|x|)/(max|x| − min|x|): the authors' normalisation (0 where all |x| are equal)."""
    magnitude = x.abs().double()
    low, high = magnitude.min(), magnitude.max()
    if high == low:
        return torch.zeros_like(x, dtype=torch.float64)
    return torch.sign(x).double() * (magnitude - low) / (high - low)


def select_atoms(
    delta_a: Tensor, delta_f: Tensor, trim: float = DEFAULT_TRIM, mode: SelectionMode = "sta"
) -> Tensor:
    """Boolean mask [d_sae] of the atoms to steer with (see the module doc for the rule)."""
    if mode not in SELECTION_MODES:
        raise STAError(f"unknown selection mode {mode!r}; choose {', '.join(SELECTION_MODES)}")
    if delta_a.shape != delta_f.shape or delta_a.dim() != 1:
        raise STAError(
            f"Δa and Δf must be matching 1-D tensors, got {tuple(delta_a.shape)}, {tuple(delta_f.shape)}"
        )
    if not 0 < trim <= 1:
        raise STAError(f"trim must be in (0, 1], got {trim}")
    if not (torch.isfinite(delta_a).all() and torch.isfinite(delta_f).all()):
        raise STAError("Δa or Δf contains NaN or inf")
    if mode == "all":
        return torch.ones_like(delta_a, dtype=torch.bool)
    index = min(int(trim * len(delta_a)), len(delta_a) - 1)
    norm_a, norm_f = signed_minmax(delta_a), signed_minmax(delta_f.float())
    agree = ((norm_a > 0) & (norm_f > 0)) | ((norm_a < 0) & (norm_f < 0))
    score = torch.where(agree, norm_f.abs(), torch.zeros_like(norm_f))
    threshold_f = score.sort(descending=True).values[index]
    freq_mask = agree & (score >= threshold_f)
    magnitude = delta_a.abs()
    threshold_a = magnitude.sort(descending=True).values[index]
    act_mask = (magnitude >= threshold_a) & (magnitude > 0)
    if mode == "frequency":
        return freq_mask
    if mode == "amplitude":
        return act_mask
    return freq_mask & act_mask


def atom_vector(
    sae: SparseAutoencoder, delta_a: Tensor, mask: Tensor, target_norm: float | None = None
) -> Tensor:
    """v = (Δa·mask) @ W_dec in the model's activation space, rescaled to `target_norm` if given."""
    if not bool(mask.any()):
        raise STAError("no atom selected: lower trim, or use more / more contrastive pairs")
    with torch.no_grad():
        vector = ((delta_a * mask).to(sae.W_dec.dtype) @ sae.W_dec / sae.cfg.scale).float()
    norm = float(vector.norm())
    if not norm > 0:
        raise STAError("the selected atoms decode to a zero vector")
    if target_norm is None:
        return vector
    if not target_norm > 0:
        raise STAError(f"target norm must be positive, got {target_norm} (is the CAA vector zero?)")
    return vector * (target_norm / norm)


def top_atoms(stats: AtomStats, mask: Tensor, n: int = 20) -> list[dict[str, float | int]]:
    """The kept atoms with the largest |Δa|, for provenance and inspection."""
    delta_a, delta_f = stats.delta_a, stats.delta_f
    kept = mask.nonzero().flatten()
    order = kept[delta_a[kept].abs().argsort(descending=True)][:n]
    return [{"atom": int(i), "delta_a": float(delta_a[i]), "delta_f": float(delta_f[i])} for i in order]


def fit_from_stats(
    stats: AtomStats,
    sae: SparseAutoencoder,
    *,
    mode: SelectionMode = "sta",
    trim: float = DEFAULT_TRIM,
    multiplier: float = 1.0,
    sae_path: str | None = None,
    mask: Tensor | None = None,
) -> Steering:
    """The STA (or ablation) intervention: v norm-matched to the CAA vector, added at all positions.
    A given `mask` replaces `mode`'s selection (output-side selection: `finesteer.fit.sta_output`)."""
    if stats.hook_name and sae.cfg.hook_name and stats.hook_name != sae.cfg.hook_name:
        raise STAError(f"statistics were taken at {stats.hook_name} but the SAE reads {sae.cfg.hook_name}")
    site = sae.cfg.site
    mask = select_atoms(stats.delta_a, stats.delta_f, trim, mode) if mask is None else mask
    caa_norm = float(stats.caa_vector.norm())
    raw = atom_vector(sae, stats.delta_a, mask)
    vector = atom_vector(sae, stats.delta_a, mask, caa_norm)
    cosine = float(torch.nn.functional.cosine_similarity(raw, stats.caa_vector, dim=0))
    name = MODE_LABELS[mode]
    metadata: dict[str, Any] = {
        "method": name,
        "selection": mode,
        "layer": site.layer,
        "hook_name": site.name,
        "multiplier": float(multiplier),
        "trim": trim,
        "scope": "all",
        "n_atoms": int(mask.sum()),
        "d_sae": sae.cfg.d_sae,
        "n_pairs": stats.n_pairs,
        "caa_norm": caa_norm,
        "raw_vector_norm": float(raw.norm()),
        "cosine_to_caa": cosine,
        "top_atoms": top_atoms(stats, mask),
        "sae": sae_path,
    }
    intervention = steer_residual(site.layer, vector, multiplier, scope="all", component=site.component)
    return Steering(name, intervention, metadata)


def fit_caa_from_stats(
    stats: AtomStats, sae: SparseAutoencoder, *, multiplier: float = 1.0
) -> Steering:
    """The STA paper's CAA baseline: the answer-token-mean residual difference at the SAE's layer, all
    positions, multiplier λ (same norm and scope as STA, so only the direction differs)."""
    site = sae.cfg.site
    if not float(stats.caa_vector.norm()) > 0:
        raise STAError("the CAA vector is zero: positive and negative answers give identical activations")
    intervention = steer_residual(
        site.layer, stats.caa_vector, multiplier, scope="all", component=site.component
    )
    metadata = {
        "method": "caa",
        "variant": "answer-token mean difference (STA paper baseline), all positions",
        "layer": site.layer,
        "hook_name": site.name,
        "multiplier": float(multiplier),
        "vector_norm": float(stats.caa_vector.norm()),
        "n_pairs": stats.n_pairs,
        "scope": "all",
    }
    return Steering("caa", intervention, metadata)


def fit_sta(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    pairs: Sequence[ContrastPair],
    *,
    trim: float = DEFAULT_TRIM,
    multiplier: float = 1.0,
    mode: SelectionMode = "sta",
    batch_size: int = 8,
    run_dir: str | Path | None = None,
    sae_path: str | None = None,
    progress: bool = True,
) -> Steering:
    """Atom statistics on `pairs`, atom selection and the CAA-norm-matched vector at the SAE's site.

    Writes `atom_stats.safetensors` and `sta.json` to `run_dir` when given (re-fit other modes or
    trims from the stats with `fit_from_stats` without re-running the model).
    """
    started = time.perf_counter()
    stats = atom_statistics(lm, sae, pairs, batch_size=batch_size, progress=progress)
    fitted = fit_from_stats(stats, sae, mode=mode, trim=trim, multiplier=multiplier, sae_path=sae_path)
    fitted.metadata["fit_seconds"] = round(time.perf_counter() - started, 2)
    if run_dir is not None:
        folder = Path(run_dir)
        stats.save(folder / "atom_stats.safetensors")
        (folder / "sta.json").write_text(json.dumps(fitted.metadata, indent=2) + "\n")
    return fitted


__all__ = [
    "DEFAULT_TRIM", "MODE_LABELS", "SELECTION_MODES", "AtomStats", "ContrastPair", "STAError", "answer_means",
    "answer_pairs", "atom_statistics", "atom_vector", "fit_caa_from_stats", "fit_from_stats", "fit_sta",
    "select_atoms", "signed_minmax", "stats_from_means", "top_atoms",
]  # fmt: skip
