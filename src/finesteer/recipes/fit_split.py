"""Fit a head-steering method on an A/B `generate` split and save the artifact (`finesteer fit hsi|iti`).

The first `limit` items of the split are divided with a seeded shuffle (`split_items`): `n_val` items
choose α, the rest are the training items the method reads its directions from. With `test`, the
dataset's `test_ab` split is scored (letter probability) with and without the fitted intervention and
the numbers are kept in the artifact's metadata too. The test split is scored once, after the
selection, in both option orders by default (`balance_letters`), with the paired effect, the
anti-steerable fraction and the split by matching polarity (`finesteer.evaluate.ab_effect`). The
result carries the selection's `verdict` (validation only, see `finesteer.methods.verdict`) first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finesteer.data.balance import letter_balanced
from finesteer.data.items import ABItem
from finesteer.data.typed import load_ab_set
from finesteer.evaluate.ab_effect import ab_effect
from finesteer.fit.hsi import split_items
from finesteer.fit.steering import Steering
from finesteer.models.loading import LoadedModel, load_model
from finesteer.runs import check_writable
from finesteer.scoring.ab import DEFAULT_PROMPT, ABPrompt

log = logging.getLogger(__name__)

GENERATE_SPLIT = "generate"
TEST_SPLIT = "test_ab"

Fit = Callable[[LoadedModel, Sequence[ABItem], Sequence[ABItem]], Steering]


def fit_on_generate_split(
    method: str,
    model: str,
    data: str,
    fit: Fit,
    out: Path,
    *,
    limit: int | None = None,
    n_val: int = 30,
    seed: int = 0,
    test: bool = False,
    prompt: ABPrompt = DEFAULT_PROMPT,
    batch_size: int = 8,
    say: Callable[[str], None] = log.info,
    device: str = "cpu",
    dtype: str = "float32",
    balance_letters: bool = True,
) -> dict[str, Any]:
    """Load `model`, fit `method` with `fit(lm, train, val)`, optionally score test_ab, save to `out`.

    Returns the command's result: the chosen heads, α and selection table, the final check (when the
    method ran one), the test effect (with `test`) and the timings. `device` and `dtype` place and
    cast the model (`models.load_model`).
    """
    check_writable(out)  # an unwritable --out fails now, not after the fit
    items = load_ab_set(data, GENERATE_SPLIT, limit)
    train, val = split_items(items, n_val, seed)
    test_items = load_ab_set(data, TEST_SPLIT) if test else []  # a user file has none: fail before the fit
    started = time.perf_counter()
    lm = load_model(model, device=device, dtype=dtype)
    say(f"fitting {method} on {model}/{data}: {len(train)} train items, {len(val)} val items")
    fitted = fit(lm, train, val)
    fit_seconds = time.perf_counter() - started
    metadata = {**fitted.metadata, "data": data, "limit": limit, "split_seed": seed}
    result: dict[str, Any] = {
        "verdict": metadata.get("verdict"),
        "method": method,
        "model": model,
        "data": data,
        "artifact": str(out),
        "heads": metadata["heads"],
        "alpha": metadata["alpha"],
        "selection": metadata["selection"],
        "fit_seconds": round(fit_seconds, 1),
    }
    for key in ("selection_verdict", "direction_diagnostics"):
        if metadata.get(key) is not None:
            result[key] = metadata[key]
    if metadata.get("final_check") is not None:
        result["final_check"] = metadata["final_check"]
    if test:
        if balance_letters:
            test_items = letter_balanced(test_items, strict=False)
        orders = ", both option orders" if balance_letters else ""
        say(f"scoring the test_ab split once ({len(test_items)} rows{orders})")
        result["test_letter_balanced"] = balance_letters
        result["test"] = ab_effect(lm, test_items, fitted.intervention, prompt=prompt, batch_size=batch_size)
        metadata["test"] = result["test"]
    fitted.metadata.update(metadata)
    fitted.save(out, lm)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
