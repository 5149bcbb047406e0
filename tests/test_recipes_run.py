"""Recipes run end to end on a tiny model; a run killed midway and resumed ends with the same results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finesteer.cli import app
from finesteer.recipes import RunFolder, StepInterrupted, execute, parse_recipe

TINY_HSI = {
    "method": "hsi",
    "name": "tiny-hsi",
    "model": "tiny-llama",
    "behaviour": "coordinate-other-ais",
    "train_limit": 12,
    "sweep_limit": 4,
    "val_limit": 4,
    "test_limit": 6,
    "open_ended_limit": 2,
    "layers": [1],
    "alphas": [4.0],
    "k": 2,
    "examples": 2,
    "generation": {"max_new_tokens": 6},
}


def _comparable(metrics: dict) -> dict:
    """Metrics minus wall-clock times and paths, which legitimately differ between runs."""
    clean = json.loads(json.dumps(metrics))
    clean.pop("report", None)
    clean.get("hsi", {}).pop("seconds", None)
    return clean


def test_killed_run_resumes_to_the_same_results(tmp_path: Path) -> None:
    recipe = parse_recipe(TINY_HSI)
    full = execute(RunFolder.create(tmp_path / "a", recipe, "test"), progress=False)

    run = RunFolder.create(tmp_path / "b", recipe, "test")
    run.stop_after = "locate_and_fit"
    with pytest.raises(StepInterrupted):
        execute(run, progress=False)
    assert not (run.path / "metrics.json").exists()
    resumed_run = RunFolder.open(run.path)
    resumed = execute(resumed_run, progress=False)

    assert _comparable(resumed) == _comparable(full)
    assert resumed_run.state["status"] == "finished"
    for name in ("recipe.yaml", "run.json", "metrics.json", "report.html", "artifacts/hsi/intervention.json"):
        assert (run.path / name).is_file(), name
    assert set(full["methods"]) == {"baseline", "hsi"}
    assert full["methods"]["baseline"]["n"] == 12  # the 6 test items in both option orders
    assert full["summary"]["verdict"] in (
        "no reliable effect",
        "reliable effect",
        "effect in the wrong direction",
    )


def test_cli_run_rejects_bad_recipe_before_loading(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY_HSI, "model": "smollm2-135m-instruct", "layers": [99]}))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "layers[0]: layer 99 out of range" in result.output
    assert not (tmp_path / "runs").exists()


def test_cli_run_json(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(TINY_HSI))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(payload["report"]).is_file() and set(payload["methods"]) == {"baseline", "hsi"}


def test_ships_recipe_on_tiny_model(tmp_path: Path) -> None:
    recipe = parse_recipe(
        {
            "method": "ships",
            "name": "tiny-ships",
            "model": "tiny-qwen2",
            "attribution_data": "advbench",
            "attribution_limit": 3,
            "evaluation_data": "jailbreakbench",
            "evaluation_limit": 3,
            "sahara_group_size": 2,
            "sahara_candidates": 4,
            "top_k": [1, 2],
            "random_seeds": 1,
            "harmless_limit": 2,
            "examples": 1,
            "generation": {"max_new_tokens": 4},
        }
    )
    metrics = execute(RunFolder.create(tmp_path, recipe, "test"), progress=False)
    assert len(metrics["ranking"]) >= 2 and set(metrics["asr"]) >= {"baseline", "ablated", "random"}
    folder = next(tmp_path.iterdir())
    ships_top = json.loads((folder / "steps" / "ships" / "result.json").read_text())["top"]
    group = json.loads((folder / "steps" / "sahara" / "result.json").read_text())["group"]
    assert {tuple(h) for h in group} <= {(lay, h) for lay, h, _ in ships_top[:4]}  # searched top 4
    assert set(metrics["asr"]["helpfulness"]) == {"baseline", "top-2"}
    assert 0.0 <= metrics["asr"]["helpfulness"]["top-2"]["mc_accuracy"] <= 1.0
    assert (folder / "steps" / "ships" / "ships_heatmap.png").is_file()
    assert (folder / "report.html").is_file()


def test_ships_recipe_with_the_refusal_score(tmp_path: Path) -> None:
    recipe = parse_recipe(
        {
            "method": "ships",
            "name": "tiny-ships-refusal",
            "model": "tiny-llama",
            "attribution_data": "advbench",
            "attribution_limit": 3,
            "evaluation_data": "jailbreakbench",
            "evaluation_limit": 2,
            "score": "refusal",
            "mode": "sc",
            "verify_top": 4,
            "top_k": [1, 3],
            "random_seeds": 1,
            "harmless_data": None,
            "examples": 1,
            "generation": {"max_new_tokens": 3},
        }
    )
    metrics = execute(RunFolder.create(tmp_path, recipe, "test"), progress=False)
    folder = next(tmp_path.iterdir())
    top = json.loads((folder / "steps" / "ships" / "result.json").read_text())["top"]
    verified = [row[2] for row in top[:4]]
    assert all(v is not None for v in verified) and verified == sorted(verified, reverse=True)
    assert all(row[2] is None for row in top[4:])  # ranked by the estimate only
    assert [tuple(h) for h in metrics["ranking"][:4]] == [(row[0], row[1]) for row in top[:4]]
    assert (folder / "steps" / "ships" / "estimate" / "scores.safetensors").is_file()
    assert set(metrics["asr"]["ablated"]) == {"1", "3"}


def test_sta_recipe_on_tiny_model(tmp_path: Path) -> None:
    recipe = parse_recipe(
        {
            "method": "sta",
            "name": "tiny-sta",
            "model": "tiny-llama",
            "layer": 1,
            "sae_width": 32,
            "sae_k": 4,
            "sae_tokens": 3000,
            "n_pairs": 20,
            "trim": 1.0,
            "n_harmful": 3,
            "n_harmless": 3,
            "methods": ["baseline", "caa", "sta"],
            "multipliers": [1.0],
            "examples": 1,
            "generation": {"max_new_tokens": 4},
        }
    )
    metrics = execute(RunFolder.create(tmp_path, recipe, "test"), progress=False)
    assert set(metrics["methods"]) == {"baseline", "caa", "sta"}
    assert {"refusal_rate", "over_refusal_rate", "fluency"} <= set(metrics["methods"]["sta"])
    folder = next(tmp_path.iterdir())
    assert (folder / "artifacts" / "sta" / "intervention.json").is_file()
    assert (folder / "report.html").is_file()


def test_compare_run_folders_side_by_side(tmp_path: Path) -> None:
    runs = []
    for name, alpha in (("tiny-a", 4.0), ("tiny-b", -4.0)):
        recipe = parse_recipe({**TINY_HSI, "name": name, "alphas": [alpha], "open_ended_limit": 1})
        run = RunFolder.create(tmp_path / "runs", recipe, "test")
        execute(run, progress=False)
        runs.append(str(run.path))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", *runs, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert {row["run"] for row in payload["rows"]} == {Path(r).name for r in runs}
    page = Path(payload["report"]).read_text()
    assert "All runs, all methods" in page and Path(runs[0]).name in page
    bad = CliRunner().invoke(app, ["compare", runs[0], str(tmp_path)])
    assert bad.exit_code == 2 and "is not a run folder" in bad.output
