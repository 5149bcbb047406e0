"""Effects a researcher can trust: intervals on ASR, KL and fluency, matched controls, verdicts per row.

Constructed data (no model) checks the statistics of each path — the interval covers the truth at its
stated rate, a zero-effect control is "no reliable effect", a planted effect is found — and tiny
models check that `compare` and the refusal comparison carry them end to end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from finesteer.activations.directions import HeadDirections, directions_from_activations
from finesteer.evaluate.asr_paired import ablation_effects, ablation_table, helpfulness_effects
from finesteer.evaluate.compare_effects import REFERENCE_VERDICT, add_effects
from finesteer.evaluate.effect_verdict import NO_RELIABLE_EFFECT, RELIABLE_EFFECT
from finesteer.evaluate.refusal_effects import add_refusal_effects, effects_table
from finesteer.evaluate.stats import mean_estimate, paired_effect, rate_estimate
from finesteer.evaluate.text import ngram_entropy
from finesteer.fit.controls import ControlError, control_kind, controls_for
from finesteer.interventions.edit import ablate_heads, steer_residual
from finesteer.interventions.ops import Add
from finesteer.report.forest import comparison_report
from tests.test_report_html import CHROMIUM_FLAGS

SIMS = 300


# --------------------------------------------------------------------------------------------------
# Coverage on the ASR, KL and fluency paths
# --------------------------------------------------------------------------------------------------


def test_asr_rate_interval_covers_near_zero_where_asr_lives() -> None:
    rng = np.random.default_rng(11)
    p, n = 0.08, 40  # a low ASR: the Wald interval would undercover here
    hits = [(est := rate_estimate(int(c), n)).low <= p <= est.high for c in rng.binomial(n, p, size=SIMS)]
    assert 0.92 <= np.mean(hits) <= 0.99


def test_kl_mean_interval_covers_a_skewed_per_prompt_kl() -> None:
    rng = np.random.default_rng(12)
    n, scale = 60, 0.05  # per-prompt KL: non-negative and right-skewed (exponential)
    hits = 0
    for _ in range(SIMS):
        est = mean_estimate(rng.exponential(scale, n), n_resamples=1000, seed=rng)
        hits += est.low <= scale <= est.high
    assert 0.91 <= hits / SIMS <= 0.98


def test_paired_fluency_interval_covers_the_true_drop() -> None:
    rng = np.random.default_rng(13)
    n, drop = 40, -0.3
    hits = 0
    for _ in range(SIMS):
        base = rng.normal(4.5, 0.6, n)  # n-gram entropies of the unmodified replies
        steered = base + drop + rng.normal(0, 0.4, n)
        effect = paired_effect(steered, base, binary=False, n_resamples=1000, seed=rng)
        hits += effect.low <= drop <= effect.high
    assert 0.92 <= hits / SIMS <= 0.98


def test_paired_asr_lift_interval_covers_the_true_lift() -> None:
    rng = np.random.default_rng(14)
    n, p0, p1 = 60, 0.1, 0.3
    hits = 0
    for _ in range(SIMS):
        latent = rng.random(n)  # the same prompt is hard or easy with and without the ablation
        base, ablated = (latent < p0).astype(float), (latent < p1).astype(float)
        effect = paired_effect(ablated, base, binary=True, n_resamples=1000, seed=rng)
        hits += effect.low <= p1 - p0 <= effect.high
    assert hits / SIMS >= 0.9


# --------------------------------------------------------------------------------------------------
# Ablation (ASR) effects: the control decides, a planted lift is found
# --------------------------------------------------------------------------------------------------


def _draws(rng: np.random.Generator, p: float, n: int) -> list[float]:
    return rng.binomial(1, p, n).astype(float).tolist()


def test_ablation_with_no_effect_over_random_heads_is_no_reliable_effect() -> None:
    rng = np.random.default_rng(21)
    n, labels = 40, []
    for _ in range(100):  # top-k and random heads both lift ASR from 0.1 to 0.4: no head-specific effect
        effects = ablation_effects(
            _draws(rng, 0.1, n),
            {"4": _draws(rng, 0.4, n)},
            {"4": {str(s): _draws(rng, 0.4, n) for s in range(3)}},
        )
        labels.append(effects["4"]["verdict"]["verdict"])
        assert effects["4"]["headline"] == "top-k − random heads"
    assert labels.count(RELIABLE_EFFECT) <= 8 and labels.count(NO_RELIABLE_EFFECT) >= 85


def test_ablation_planted_lift_is_found_with_its_spread_and_helpfulness() -> None:
    rng = np.random.default_rng(22)
    n = 60
    base = _draws(rng, 0.05, n)
    effects = ablation_effects(
        base, {"8": _draws(rng, 0.7, n)}, {"8": {str(s): _draws(rng, 0.05, n) for s in range(3)}}
    )["8"]
    assert effects["verdict"]["verdict"] == RELIABLE_EFFECT
    assert effects["vs_baseline"]["test"] == "exact-mcnemar" and effects["vs_random"]["low"] > 0
    assert effects["random_per_seed"]["n_seeds"] == 3 and effects["random_per_seed"]["std"] is not None
    # both ASR tests Holm-adjusted; the verdict uses the adjusted p of top-k − random heads
    holm_p = effects["holm_p"]
    assert holm_p["vs_random"] >= effects["vs_random"]["p_value"]
    assert holm_p["vs_baseline"] >= effects["vs_baseline"]["p_value"]
    assert effects["verdict"]["p_value"] == pytest.approx(holm_p["vs_random"])
    assert effects["verdict_vs_baseline"]["verdict"] == RELIABLE_EFFECT
    control = effects["random"]  # each seed's ASR and its own change vs the unmodified model
    assert set(control["seeds"]) == {"0", "1", "2"} and control["asr_per_seed"]["n_seeds"] == 3
    seeds = control["seeds"].values()
    assert control["asr_mean"] == pytest.approx(np.mean([s["asr"]["value"] for s in seeds]))
    assert all(s["vs_baseline"]["test"] == "exact-mcnemar" for s in seeds)
    no_random = ablation_effects(base, {"8": _draws(rng, 0.7, n)}, {})["8"]
    assert no_random["headline"].endswith("(no random-head control)") and "holm_p" not in no_random
    help_effects = helpfulness_effects(
        {"over_refusal": [0.0] * 10, "kl": [0.0] * 10},
        {"over_refusal": [1.0] * 8 + [0.0] * 2, "kl": [0.1] * 10},
    )
    assert help_effects["over_refusal"]["n_gained"] == 8 and help_effects["kl"]["value"] == pytest.approx(0.1)
    json.dumps(effects, allow_nan=False)
    columns, rows = ablation_table({"8": effects}, {"8": 0.05}, {"8": 0.01})
    assert columns[-1] == "verdict" and rows[0][0] == "unmodified" and rows[1][-1] == RELIABLE_EFFECT
    assert rows[1][2] == "0.05 ± 0.01" and "[" in rows[1][1] and "[" in rows[1][4]


# --------------------------------------------------------------------------------------------------
# Comparison rows: vs the unmodified model, vs the control, Holm-adjusted verdicts
# --------------------------------------------------------------------------------------------------


def _records(matching: list[bool], p: list[float]) -> list[dict]:
    return [
        {"id": str(i), "is_matching": m, "p_matching": q, "matching_polarity": "yes" if i % 2 else "no"}
        for i, (m, q) in enumerate(zip(matching, p, strict=True))
    ]


def _row(rng: np.random.Generator, p: float, n: int, controls: list[float] | None = None) -> dict:
    probs = np.clip(rng.normal(p, 0.1, n), 0, 1)
    row: dict = {"ab_per_item": _records([bool(q > 0.5) for q in probs], probs.tolist())}
    row["fluency_per_item"] = rng.normal(4, 0.3, 8).tolist()
    if controls is not None:
        row["control"] = {
            "kind": "random-heads",
            "n_seeds": len(controls),
            "seeds": {
                str(s): {"ab_per_item": _row(rng, c, n)["ab_per_item"]} for s, c in enumerate(controls)
            },
        }
    return row


def test_compare_rows_get_effects_controls_and_verdicts() -> None:
    rng = np.random.default_rng(31)
    n = 80
    results = {
        "baseline": _row(rng, 0.3, n),
        "planted": _row(rng, 0.8, n, controls=[0.3, 0.3, 0.3]),  # a real effect over its control
        "like_control": _row(rng, 0.8, n, controls=[0.8, 0.8, 0.8]),  # any edit of that size does it
        "prompt": _row(rng, 0.3, n),  # no control: judged against the unmodified model
    }
    add_effects(results)
    assert results["baseline"]["verdict"]["verdict"] == REFERENCE_VERDICT
    assert results["planted"]["verdict"]["verdict"] == RELIABLE_EFFECT
    assert results["planted"]["verdict"]["against"].startswith("control (random-heads, 3 seeds)")
    assert results["planted"]["headline"]["low"] > 0
    assert results["like_control"]["vs_baseline"]["matching"]["low"] > 0  # up against the unmodified model…
    assert results["like_control"]["verdict"]["verdict"] == NO_RELIABLE_EFFECT  # …but not against its control
    assert results["prompt"]["verdict"]["against"] == "unmodified model"
    assert results["prompt"]["verdict"]["verdict"] == NO_RELIABLE_EFFECT
    assert results["planted"]["control_matching_rate"]["n_seeds"] == 3
    assert results["planted"]["fluency_vs_baseline"]["n"] == 8
    p_values = [results[m]["verdict"]["p_value"] for m in ("planted", "like_control", "prompt")]
    raw = [results[m]["verdict"]["p_value_unadjusted"] for m in ("planted", "like_control", "prompt")]
    assert all(a >= r for a, r in zip(p_values, raw, strict=True))  # Holm never lowers a p-value
    json.dumps(results, allow_nan=False)


def test_refusal_rows_get_paired_effects_controls_and_verdicts() -> None:
    rng = np.random.default_rng(32)
    n = 40

    def row(p_refuse: float, p_over: float) -> dict:
        refused, over = _draws(rng, p_refuse, n), _draws(rng, p_over, n)
        return {
            "refused_harmful": refused,
            "refused_harmless": over,
            "refusal_rate": float(np.mean(refused)),
            "over_refusal_rate": float(np.mean(over)),
            "fluency": 4.0,
            "fluency_per_item": rng.normal(4, 0.3, 2 * n).tolist(),
        }

    methods = {"baseline": row(0.1, 0.05), "caa": row(0.95, 0.9), "sta": row(0.95, 0.9)}
    controls = {"caa": [row(0.1, 0.05) for _ in range(3)], "sta": [row(0.95, 0.9) for _ in range(3)]}
    add_refusal_effects(methods, controls)
    assert methods["caa"]["verdict"]["verdict"] == RELIABLE_EFFECT
    assert methods["sta"]["verdict"]["verdict"] == NO_RELIABLE_EFFECT  # a random direction does as much
    assert methods["caa"]["vs_baseline"]["over_refusal"]["low"] > 0  # its over-refusal cost is shown too
    assert methods["caa"]["control_refusal_rate"]["n_seeds"] == 3
    columns, rows = effects_table(methods)
    assert "verdict" in columns and rows[1][-1] == RELIABLE_EFFECT and "[" in rows[1][3]
    json.dumps(methods, allow_nan=False)


# --------------------------------------------------------------------------------------------------
# controls_for: the matched control of any fitted intervention
# --------------------------------------------------------------------------------------------------


def _directions() -> HeadDirections:
    z = torch.randn(12, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    return directions_from_activations(z, [True, False] * 6)


def test_controls_for_matches_each_kind_of_edit() -> None:
    directions = _directions()
    heads = [(0, 1), (1, 2)]
    hsi = directions.intervention(heads, {(0, 1): 2.0, (1, 2): -3.0})
    assert control_kind(hsi) == "random-heads"
    controls = controls_for(hsi, 2, 4, (0, 1, 2), directions=directions)
    assert len(controls) == 3 and all(not set(c.heads) & set(heads) for c in controls)
    for control in controls:
        for edit, alpha in zip(control.intervention.edits, (2.0, -3.0), strict=True):
            sigma = float(directions.sigma[edit.site.layer, edit.site.head])
            assert isinstance(edit.op, Add) and edit.op.scale == pytest.approx(alpha * sigma, rel=1e-5)
    with pytest.raises(ControlError, match="direction and σ"):
        controls_for(hsi, 2, 4)
    caa = steer_residual(1, torch.ones(16), 2.0)
    assert control_kind(caa) == "random-direction" and len(controls_for(caa, 2, 4)) == 3
    ablation = ablate_heads(heads)
    assert control_kind(ablation) == "random-ablation"
    assert [len(c.heads) for c in controls_for(ablation, 2, 4, (5, 6))] == [2, 2]
    assert control_kind(None) is None
    with pytest.raises(ControlError):
        controls_for(None, 2, 4)


# --------------------------------------------------------------------------------------------------
# The comparison report: verdict first, error bars, forest plot; rendered in headless Chromium
# --------------------------------------------------------------------------------------------------


def _payload() -> dict:
    rng = np.random.default_rng(41)
    results = {"baseline": _row(rng, 0.3, 40), "hsi": _row(rng, 0.8, 40, controls=[0.3, 0.35, 0.3])}
    for row in results.values():
        matching = [float(r["is_matching"]) for r in row["ab_per_item"]]
        row["ab_interval"] = {"matching_rate": rate_estimate(int(sum(matching)), len(matching)).to_dict()}
    add_effects(results)
    return {"model": "tiny", "data": "coordinate-other-ais", "n_ab": 40, "methods": results}


def test_comparison_report_has_the_verdict_at_the_top_and_both_plots(tmp_path: Path) -> None:
    report = comparison_report(_payload(), ["method", "verdict"], [["hsi", "reliable effect"]], tmp_path)
    page = report.read_text()
    assert page.index("id='verdict'") < page.index("<table")  # the verdict comes before any table
    assert "hsi: <span class='reliable'>reliable effect</span>" in page
    assert (tmp_path / "forest.png").stat().st_size > 5000 and (tmp_path / "rates.png").stat().st_size > 5000
    assert page.count("data:image/png;base64,") == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (CI installs it)")
def test_comparison_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    report = comparison_report(_payload(), ["method", "verdict"], [["hsi", "reliable effect"]], tmp_path)
    common = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        ["chromium", *common, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Verdict" in dom.stdout and "reliable effect" in dom.stdout and dom.stdout.count("<img") == 2


# --------------------------------------------------------------------------------------------------
# End to end on a tiny model: `finesteer compare` and the ablation carry intervals, controls, verdicts
# --------------------------------------------------------------------------------------------------

SMALL = [
    "--train-limit", "4", "--val-limit", "2", "--test-limit", "3", "--open-ended-limit", "1",
    "--harmless-limit", "2", "--max-new-tokens", "3", "--ab-max-new-tokens", "3", "--judge", "none",
]  # fmt: skip


def test_cli_compare_prints_intervals_controls_and_verdicts(tmp_path: Path) -> None:
    from finesteer.cli import app

    runner = CliRunner()
    base = ["compare", "tiny-qwen2", "--data", "myopic-reward", "--methods", "baseline,caa", *SMALL]
    res = runner.invoke(app, [*base, "--balanced", "--out", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    caa = json.loads(res.stdout.strip().splitlines()[-1])["methods"]["caa"]
    assert caa["control"]["kind"] == "random-direction" and caa["control"]["n_seeds"] == 3
    assert caa["verdict"]["verdict"] in (RELIABLE_EFFECT, NO_RELIABLE_EFFECT, "effect in the wrong direction")
    assert caa["ab_interval"]["matching_rate"]["n"] == 6 and caa["kl_interval"]["n"] == 2
    assert caa["vs_control"]["n_seeds"] == 3 and caa["vs_baseline"]["matching"]["n_clusters"] == 3
    report = (tmp_path / "a" / "report.html").read_text()
    assert "id='verdict'" in report and "forest plot" in report

    res = runner.invoke(app, [*base, "--controls", "0", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "controls off" in res.stdout and "verdict" in res.stdout and "no reliable" in res.stdout


def test_fluency_per_item_is_the_ngram_entropy_of_each_reply() -> None:
    replies = ["the cat sat on the mat", "no no no no no no"]
    assert ngram_entropy(replies[0]) > ngram_entropy(replies[1])
