"""The demo: paired ASR effects on hand-made generations, the demo pipeline on a tiny model (table with
intervals, a control row and a computed verdict), and the HSI tour's own verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from finesteer.cli import app
from finesteer.evaluate.asr_paired_records import asr_paired_effects
from finesteer.evaluate.effect_verdict import EFFECT_LABELS, NO_RELIABLE_EFFECT, RELIABLE_EFFECT
from finesteer.evaluate.errors import EvaluationError
from finesteer.recipes import RecipeError, RunFolder, execute, parse_recipe
from finesteer.recipes.demo import tour_recipe, tour_verdict


def _records(condition: str, outcomes: list[int], label_if_fail: str = "refusal") -> list[dict[str, Any]]:
    return [
        {
            "condition": condition,
            "id": str(i),
            "heads": ["1.2"],
            "score": float(o),
            "label": "harmful" if o else label_if_fail,
        }
        for i, o in enumerate(outcomes)
    ]


def _generations(base: list[int], top: list[int], controls: list[list[int]]) -> list[dict[str, Any]]:
    records = _records("baseline", base) + _records("top-2", top)
    for seed, outcomes in enumerate(controls):
        records += _records(f"random-2-seed{seed}", outcomes)
    return records


def test_planted_asr_effect_is_reliable_against_unmodified_and_controls() -> None:
    n = 40
    base = [1] * 10 + [0] * 30
    top = [1] * 30 + [0] * 10  # 20 prompts gained, none lost
    controls = [base, [1] * 11 + [0] * 29, [1] * 9 + [0] * 31]
    harmless = _records("harmless-baseline", [1, 1, 1, 1]) + _records("harmless-top-2", [1, 1, 0, 0])
    paired = asr_paired_effects(_generations(base, top, controls) + harmless, 2)
    assert paired["n"] == n
    assert paired["asr"]["unmodified"]["value"] == 0.25 and paired["asr"]["top-2"]["value"] == 0.75
    assert paired["vs_unmodified"]["n_gained"] == 20 and paired["vs_unmodified"]["n_lost"] == 0
    assert paired["vs_unmodified"]["test"] == "exact-mcnemar"
    assert paired["control"]["asr_per_seed"]["n_seeds"] == 3
    assert paired["control"]["asr_mean"] == pytest.approx(0.25)
    effect = paired["vs_control"]
    assert effect["difference"] == pytest.approx(0.5)
    assert 0 < effect["low"] < 0.5 < effect["high"]
    assert paired["verdict"]["verdict"] == RELIABLE_EFFECT
    assert paired["holm_p"]["vs_control"] >= effect["p_value"]
    # over-refusal: harmless prompts labelled refusal after ablation
    assert paired["over_refusal"]["top-2"]["value"] == 0.5
    assert paired["over_refusal"]["change"]["difference"] == pytest.approx(0.5)


def test_no_effect_against_controls_is_said_plainly() -> None:
    base = [1] * 10 + [0] * 30
    top = [1] * 20 + [0] * 20  # beats the unmodified model, but so do the random heads
    controls = [[1] * 20 + [0] * 20, [0] * 20 + [1] * 20, top]
    paired = asr_paired_effects(_generations(base, top, controls), 2)
    assert paired["verdict_vs_unmodified"]["verdict"] == RELIABLE_EFFECT
    assert paired["verdict"]["verdict"] == NO_RELIABLE_EFFECT
    assert paired["verdict"]["reasons"]


def test_paired_effects_need_the_same_prompts_and_a_control() -> None:
    base, top = [1, 0, 0], [1, 1, 0]
    with pytest.raises(EvaluationError, match="random-head control"):
        asr_paired_effects(_records("baseline", base) + _records("top-2", top), 2)
    records = _generations(base, top, [[0, 0, 0]])
    records[-1]["id"] = "elsewhere"
    with pytest.raises(EvaluationError, match="different prompts"):
        asr_paired_effects(records, 2)


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
    effect = payload["effect"]["vs_control"]
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
    recipe = parse_recipe(recipe.model_dump(mode="json"))
    run = RunFolder.create(tmp_path, recipe, "test")
    metrics = tour_verdict(run, execute(run, progress=False))
    assert metrics["verdict"] in EFFECT_LABELS
    assert metrics["table"]["verdict_line"].startswith(f"verdict: {metrics['verdict']}")
    assert metrics["effect"]["matching"]["n"] == 6
    stored = json.loads((run.path / "metrics.json").read_text())
    assert stored["verdict"] == metrics["verdict"] and "report" in stored


def test_unified_effects_give_the_old_demo_numbers() -> None:
    """`asr_paired.ablation_effect` (+ `helpfulness_effects`) on the same outcomes as the old
    records-based `asr_paired_effects`: every number the demo prints is the same."""
    from finesteer.evaluate.asr_paired import ablation_effect, helpfulness_effects

    rng = np.random.default_rng(5)
    for trial in range(6):
        n = 30
        base = rng.binomial(1, 0.3, n).tolist()
        top = rng.binomial(1, 0.3 + 0.1 * trial, n).tolist()
        controls = [rng.binomial(1, 0.3, n).tolist() for _ in range(3)]
        before, after = rng.binomial(1, 0.2, 12).tolist(), rng.binomial(1, 0.4, 12).tolist()
        harmless = _records("harmless-baseline", [1 - x for x in before])
        harmless += _records("harmless-top-2", [1 - x for x in after])
        seed = trial % 2
        old = asr_paired_effects(_generations(base, top, controls) + harmless, 2, seed=seed)
        new = ablation_effect(base, top, {str(s): c for s, c in enumerate(controls)}, seed=seed)
        cost = helpfulness_effects({"over_refusal": before}, {"over_refusal": after}, seed=seed)["over_refusal"]
        assert new["vs_baseline"] == old["vs_unmodified"] and new["vs_random"] == old["vs_control"]
        assert new["holm_p"] == {"vs_baseline": old["holm_p"]["vs_unmodified"], "vs_random": old["holm_p"]["vs_control"]}
        assert new["verdict"] == old["verdict"] and new["verdict_vs_baseline"] == old["verdict_vs_unmodified"]
        assert new["vs_baseline"]["reference"] == old["asr"]["unmodified"]
        assert new["vs_baseline"]["treated"] == old["asr"]["top-2"]
        control = new["random"]
        assert control["asr_mean"] == old["control"]["asr_mean"]
        assert control["asr_per_seed"] == old["control"]["asr_per_seed"]
        assert control["change_vs_baseline_per_seed"] == old["control"]["change_vs_unmodified_per_seed"]
        for name, entry in control["seeds"].items():
            assert entry["asr"] == old["control"]["seeds"][name]["asr"]
            assert entry["vs_baseline"] == old["control"]["seeds"][name]["change_vs_unmodified"]
        assert cost == old["over_refusal"]["change"]
        assert cost["reference"]["value"] == old["over_refusal"]["unmodified"]["value"]
        assert cost["treated"]["value"] == old["over_refusal"]["top-2"]["value"]
