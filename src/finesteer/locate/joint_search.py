"""A resumable search over head sets and ablation strength that co-minimises refusal and harmless KL.

Heretic (an automatic search that trades refusals against KL on harmless prompts) works on whole
directions; this is the head-level version. Each trial picks k ≤ `max_heads` heads from a candidate
pool (slots `head_0 … head_{max-1}`, the first k used, duplicates merged) and a strength in
[`min_strength`, 1], ablates them together (`joint_heads.head_set_ablation`) and reports two
objectives, both minimised: the mean first-token refusal log-odds on harmful prompts and the mean
next-token KL(p_base ‖ p_ablated) on harmless prompts. The sampler is Optuna's multi-objective TPE
(optional extra `finesteer[search]`); the study lives in `search.db` (SQLite) in the run folder, so
a killed or extended search continues where it stopped: trials already completed are kept and
never re-run, and a set sampled twice reuses its first values. The settings, model and prompts are
recorded in the study and a resume with other ones is refused. Output: every trial and the Pareto
front (the trials no other trial beats on both objectives).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from finesteer.errors import FinesteerError, check_count
from finesteer.locate.engine import EncodedPrompts
from finesteer.locate.joint_heads import head_name, head_set_ablation
from finesteer.locate.refusal_proxy import harmless_kl, refusal_scores
from finesteer.locate.ships import ablation_method
from finesteer.models.loading import LoadedModel
from finesteer.sites import Head, check_heads

STUDY_FILE = "search.db"
STUDY_NAME = "joint-heads"


class SearchError(FinesteerError, ValueError):
    """A search that cannot start or resume (Optuna missing, other settings than the stored study)."""


@dataclass(frozen=True)
class SearchSettings:
    """Trials to reach (in total, across resumes), head-set size bound, strength range, sampler seed."""

    n_trials: int = 40
    max_heads: int = 3
    min_strength: float = 0.5
    mode: str = "sc"
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_count(self.n_trials, "n_trials")
        check_count(self.max_heads, "max_heads")
        check_count(self.batch_size, "batch_size")
        ablation_method(self.mode)
        if not 0.0 < self.min_strength <= 1.0:
            raise SearchError(f"min_strength must be in (0, 1], got {self.min_strength}")


def load_optuna() -> Any:
    """Optuna, imported only when a search runs; a clear error when the extra is not installed."""
    try:
        import optuna
    except ImportError as err:
        raise SearchError("the head-set search needs Optuna: pip install 'finesteer[search]'") from err
    return optuna


def _fingerprint(
    lm: LoadedModel,
    harmful: EncodedPrompts,
    harmless: EncodedPrompts,
    pool: Sequence[Head],
    settings: SearchSettings,
) -> dict[str, Any]:
    """What a resume must share with the stored study (n_trials may grow, so it is left out)."""
    fixed = {k: v for k, v in asdict(settings).items() if k != "n_trials"}
    prompts = hashlib.sha256(f"{harmful.texts_hash}|{harmless.texts_hash}".encode()).hexdigest()[:16]
    return {
        "model": lm.fingerprint or lm.name,
        "prompts": prompts,
        "pool": [head_name(h) for h in pool],
        **fixed,
    }


def search_head_sets(
    lm: LoadedModel,
    harmful: EncodedPrompts,
    harmless: EncodedPrompts,
    base_logits: Tensor,
    pool: Sequence[Head],
    folder: str | Path,
    settings: SearchSettings = SearchSettings(),
    *,
    resume: bool = True,
) -> dict[str, Any]:
    """Run (or, with `resume`, continue) the study in `folder` until it holds `n_trials` completed trials."""
    optuna = load_optuna()
    pool = check_heads(list(pool), lm.info.n_layers, lm.info.n_heads)
    if len(pool) < 1:
        raise SearchError("the candidate pool is empty")
    folder = Path(folder)
    check_new_or_resuming(folder, resume)
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(folder / STUDY_FILE).resolve()}")
    with warnings.catch_warnings():  # multivariate TPE is marked experimental; it models the slots jointly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        load_if_exists=True,
        directions=["minimize", "minimize"],
        sampler=sampler,
    )
    expected = json.loads(json.dumps(_fingerprint(lm, harmful, harmless, pool, settings)))
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", expected)
    elif stored != expected:
        changed = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        raise SearchError(
            f"{folder / STUDY_FILE} was searched with other {', '.join(changed)}; "
            "choose another output folder or delete it to start over"
        )
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    seen = {(tuple(t.user_attrs["heads"]), t.user_attrs["strength"]): tuple(t.values) for t in done}
    names = [head_name(h) for h in pool]

    def objective(trial: Any) -> tuple[float, float]:
        k = trial.suggest_int("k", 1, min(settings.max_heads, len(pool)))
        slots = [trial.suggest_categorical(f"head_{i}", names) for i in range(settings.max_heads)]
        picked = sorted(dict.fromkeys(slots[:k]), key=names.index)
        strength = round(trial.suggest_float("strength", settings.min_strength, 1.0), 4)
        trial.set_user_attr("heads", picked)
        trial.set_user_attr("strength", strength)
        key = (tuple(picked), strength)
        if key not in seen:
            edit = head_set_ablation([pool[names.index(n)] for n in picked], settings.mode, strength)
            refusal = float(refusal_scores(lm, harmful, [edit], batch_size=settings.batch_size).mean())
            kl = float(harmless_kl(lm, harmless, [edit], base_logits, batch_size=settings.batch_size).mean())
            seen[key] = (refusal, kl)
        else:
            trial.set_user_attr("reused", True)
        return seen[key]

    new = max(0, settings.n_trials - len(done))
    if new:
        study.optimize(objective, n_trials=new)
    return search_result(study, new)


def check_new_or_resuming(folder: Path, resume: bool) -> None:
    """Refuse to add to an existing study unless resuming (checked before any model loads)."""
    if (Path(folder) / STUDY_FILE).is_file() and not resume:
        raise SearchError(
            f"{folder} already holds a search ({STUDY_FILE}); pass --resume to continue it "
            "or choose another --out"
        )


def search_result(study: Any, new_trials: int) -> dict[str, Any]:
    """Every completed trial and the Pareto front, JSON-able."""

    def row(trial: Any) -> dict[str, Any]:
        return {
            "trial": trial.number,
            "heads": trial.user_attrs["heads"],
            "strength": trial.user_attrs["strength"],
            "refusal": trial.values[0],
            "kl": trial.values[1],
        }

    complete = [t for t in study.trials if t.values is not None and "heads" in t.user_attrs]
    front = sorted((row(t) for t in study.best_trials), key=lambda r: (r["kl"], r["refusal"]))
    return {
        "n_trials": len(complete),
        "new_trials": new_trials,
        "trials": [row(t) for t in complete],
        "pareto": front,
    }


__all__ = [
    "STUDY_FILE",
    "SearchError",
    "SearchSettings",
    "check_new_or_resuming",
    "load_optuna",
    "search_head_sets",
    "search_result",
]
