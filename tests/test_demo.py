"""The demo: its table from the ASR step's paired effects on hand-made outcomes, the demo pipeline on a
tiny model (table with intervals, a control row and a computed verdict), and the HSI tour's own verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from finesteer.cli import app
from finesteer.evaluate.asr_paired import ablation_effects, helpfulness_effects
from finesteer.evaluate.effect_verdict import EFFECT_LABELS, NO_RELIABLE_EFFECT, RELIABLE_EFFECT
from finesteer.recipes import RecipeError, RunFolder, execute, parse_recipe
from finesteer.recipes.demo import tour_recipe, tour_verdict
from finesteer.recipes.refusal_heads import demo_effect, verdict_table


def _asr(
    base: list[int],
    top: list[int],
    controls: list[list[int]],
    harmless: tuple[list[int], list[int]] | None = None,
) -> dict[str, Any]:
    """An `asr_effect` payload for top-2 heads (the keys the demo reads), from per-prompt outcomes."""
    asr: dict[str, Any] = {
        "effects": ablation_effects(
            base, {"2": top}, {"2": {str(s): c for s, c in enumerate(controls)}} if controls else {}
        ),
        "ablated": {"2": {"heads": ["1.2", "0.1"]}},
        "random": {"2": {"per_seed": {str(s): {"heads": ["3.4", "2.0"]} for s in range(len(controls))}}},
    }
    if harmless:
        before, after = ({"over_refusal": [float(x) for x in h]} for h in harmless)
        asr["helpfulness"] = {"top-2": {"vs_baseline": helpfulness_effects(before, after)}}
    return asr


def test_planted_asr_effect_prints_the_demo_table() -> None:
    """The demo's table from the ASR step's effects: the same cells as the former records-based
    `asr_paired_effects` printed for these outcomes (pinned from it before it was folded in)."""
    base = [1] * 10 + [0] * 30
    top = [1] * 30 + [0] * 10  # 20 prompts gained, none lost
    controls = [base, [1] * 11 + [0] * 29, [0] * 5 + [1] * 14 + [0] * 21]
    effect = demo_effect(_asr(base, top, controls, ([0, 0, 0, 0, 1], [0, 1, 1, 1, 0])), 2)
    assert effect["vs_baseline"]["n_gained"] == 20 and effect["vs_baseline"]["test"] == "exact-mcnemar"
    assert effect["verdict"]["verdict"] == RELIABLE_EFFECT
    assert effect["holm_p"]["vs_random"] >= effect["vs_random"]["p_value"]
    table = verdict_table(effect)
    assert table["title"] == "ASR on 40 held-out harmful prompts; located heads: 1.2, 0.1"
    assert table["rows"] == [
        ["unmodified", "0.250 [0.142, 0.402]", "–", "–"],
        ["top-2 located heads ablated", "0.750 [0.598, 0.858]", "+0.500 [+0.350, +0.650]",
         "3.8e-06 McNemar, Holm"],
        ["control: 2 random heads, 3 seeds (mean ± sd)", "0.292 ± 0.052", "+0.042 ± 0.052", "–"],
        ["effect: located − random", "–", "+0.458 [+0.333, +0.584]", "0.0005 sign-flip, Holm"],
        ["cost: over-refusal, 5 harmless prompts", "0.200 → 0.600", "+0.400 [-0.400, +1.000]",
         "0.62 McNemar"],
    ]  # fmt: skip
    assert table["verdict_line"] == (
        "verdict: reliable effect — ablating the top-2 located heads changes ASR by +0.458 [+0.333, +0.584] "
        "(95% CI) beyond 2 random heads (3 seeds, control ASR 0.292), Holm-adjusted p = 0.0005 (paired "
        "sign-flip test); n = 40 held-out harmful prompts"
    )
    seeds = effect["random"]["seeds"]
    assert [s["asr"]["value"] for s in seeds.values()] == [0.25, 0.275, 0.35]
    assert seeds["2"]["heads"] == ["3.4", "2.0"]
    assert seeds["2"]["vs_baseline"]["difference"] == pytest.approx(0.1)


def test_no_effect_against_controls_is_said_plainly() -> None:
    base = [1] * 10 + [0] * 30
    top = [1] * 20 + [0] * 20  # beats the unmodified model, but so do the random heads
    controls = [[1] * 20 + [0] * 20, [0] * 20 + [1] * 20, top]
    effect = demo_effect(_asr(base, top, controls), 2)
    assert effect["verdict_vs_baseline"]["verdict"] == RELIABLE_EFFECT
    assert effect["verdict"]["verdict"] == NO_RELIABLE_EFFECT and effect["verdict"]["reasons"]
    assert "over_refusal" not in effect and len(verdict_table(effect)["rows"]) == 4


def test_demo_effect_needs_a_random_head_control() -> None:
    with pytest.raises(RecipeError, match="against random heads"):
        demo_effect(_asr([1, 0, 0], [1, 1, 0], []), 2)
    with pytest.raises(RecipeError, match="top-3"):
        demo_effect(_asr([1, 0, 0], [1, 1, 0], [[0, 0, 0]] * 3), 3)


def test_demo_on_a_tiny_model_prints_interval_control_and_verdict(tmp_path: Path) -> None:
    """`finesteer demo` on a tiny model: the default tour's recipe, code path and printed table."""
    result = CliRunner().invoke(app, ["demo", "--model", "tiny-mistral", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["verdict"] in EFFECT_LABELS
    assert Path(payload["report"]).is_file()
    assert "verdict" in Path(payload["report"]).read_text()
    table = payload["table"]
    conditions = [row[0] for row in table["rows"]]
    assert conditions[:2] == ["unmodified", "top-8 located heads ablated"]
    assert any(c.startswith("control: 8 random heads, 3 seeds") for c in conditions)
    assert "[" in table["rows"][1][1] and "±" in table["rows"][2][1]
    effect = payload["effect"]["vs_random"]
    assert effect["low"] <= effect["difference"] <= effect["high"]
    assert table["verdict_line"].startswith(f"verdict: {payload['verdict']}")
    # the same run resumed prints the table: verdict first, then the table, the verdict line, the report
    run_dir = payload["run_dir"]
    printed = CliRunner().invoke(app, ["run", "--resume", run_dir])
    assert printed.exit_code == 0, printed.output
    lines = printed.stdout.strip().splitlines()
    assert lines[0] == f"verdict: {payload['verdict']}"
    assert "located − random" in printed.stdout and "control: 8 random heads" in printed.stdout
    assert lines[-1].startswith("report:")


def test_demo_refuses_what_cannot_run_before_loading(tmp_path: Path) -> None:
    unknown = CliRunner().invoke(app, ["demo", "--tour", "nope", "--out", str(tmp_path)])
    assert unknown.exit_code != 0 and "unknown demo tour 'nope'" in unknown.output
    small = CliRunner().invoke(app, ["demo", "--model", "tiny-qwen2", "--out", str(tmp_path)])
    assert small.exit_code != 0 and "top_k: 8 heads and as many random control heads" in small.output
    assert not list(tmp_path.glob("demo-*"))
    with pytest.raises(RecipeError):
        tour_recipe("nope")


def test_hsi_tour_prints_its_own_verdict(tmp_path: Path) -> None:
    recipe = tour_recipe("hsi", "tiny-llama").model_copy(
        update={"train_limit": 12, "sweep_limit": 4, "val_limit": 4, "test_limit": 6, "layers": [1],
                "k": 2, "examples": 1, "open_ended_limit": 1}
    )  # fmt: skip
    assert recipe.controls == 3  # the tour judges HSI against random heads at the same α
    recipe = parse_recipe(recipe.model_dump(mode="json"))
    run = RunFolder.create(tmp_path, recipe, "test")
    metrics = tour_verdict(run, execute(run, progress=False))
    assert metrics["verdict"] in EFFECT_LABELS
    assert metrics["table"]["verdict_line"].startswith(f"verdict: {metrics['verdict']}")
    assert "beyond as many random heads at the same α (3 seeds)" in metrics["table"]["verdict_line"]
    assert metrics["effect"]["matching"]["n"] == 12  # 6 test items, each in both option orders
    vs_control = metrics["effect_vs_control"]
    assert vs_control["n_seeds"] == 3 and vs_control["matching"]["n"] == 12
    assert metrics["holm_p"]["vs_control"] >= vs_control["matching"]["p_value"]
    rows, k = metrics["table"]["rows"], len(metrics["hsi"]["heads"])
    assert rows[2][0] == f"control: {k} random heads, 3 seeds (mean ± sd)" and "±" in rows[2][2]
    assert rows[3][0] == "effect: HSI − random" and "[" in rows[3][3]
    seeds = run.result("controls")["seeds"]
    hsi_heads = {f"{a}.{b}" for a, b in metrics["hsi"]["heads"]}
    assert len(seeds) == 3
    assert all(len(s["heads"]) == k and not hsi_heads & set(s["heads"]) for s in seeds.values())
    stored = json.loads((run.path / "metrics.json").read_text())
    assert stored["verdict"] == metrics["verdict"] and "report" in stored
    bias = stored["answer_bias"]  # the polarity groups checked for a wrong-way move
    assert bias["caveat"] is None or bias["caveat"] in metrics["table"]["verdict_line"]
