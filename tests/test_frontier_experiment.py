"""The frontier experiment end to end on a tiny model: registry methods (with STA's output-side
selection) swept over λ, head ablations against random heads, the CLI's one JSON object, the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from finesteer.cli import app
from finesteer.evaluate.compare import ComparisonError
from finesteer.models import LoadedModel
from finesteer.recipes import RunFolder, execute, load_recipe
from finesteer.recipes.frontier import FrontierExperiment
from finesteer.sae import SAEConfig, SparseAutoencoder, save_sae

SMALL = ["--n-pairs", "10", "--n-harmful", "3", "--n-harmless", "2", "--n-kl", "2", "--trim", "0.9",
         "--max-new-tokens", "3", "--lambdas", "1,2"]  # fmt: skip


@pytest.fixture
def sae_dir(tiny_models: dict[str, LoadedModel], tmp_path: Path) -> Path:
    lm = tiny_models["tiny-llama"]
    cfg = SAEConfig(d_in=lm.info.hidden_size, d_sae=48, architecture="topk", k=6,
                    hook_name="blocks.1.hook_resid_post")  # fmt: skip
    sae = SparseAutoencoder(cfg).initialize(torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    save_sae(sae, tmp_path / "sae")
    return tmp_path / "sae"


def test_cli_frontier_prints_one_json_object_and_resumes(sae_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["frontier", "tiny-llama", "--sae", str(sae_dir), "--out", str(out), *SMALL,
            "--methods", "baseline,prompt,caa,sta,sta_output",
            "--settings", '{"sta_output": {"output_keep": 1.0}}',
            "--heads", "1.0,0.1", "--ks", "1,2", "--seeds", "0,1,2", "--n-mc", "2",
            "--head-steer-k", "2", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    series = {row["series"] for row in payload["points"]}
    assert series == {
        "baseline",
        "prompt",
        "caa",
        "sta",
        "sta_output",
        "top:heads",
        "random:heads",
        "head_steer",
    }
    assert all(row["mc_accuracy"]["n"] == 2 for row in payload["points"])
    assert {c["strength"] for c in payload["controls"]} == {1, 2}
    assert set(payload["equal_over_refusal"]["series"]) == {
        "prompt",
        "caa",
        "sta",
        "sta_output",
        "top:heads",
        "head_steer",
    }
    assert (out / "frontier.json").is_file() and (out / "frontier_kl.png").is_file()
    assert "At equal over-refusal" in (out / "report.html").read_text()
    assert len(list((out / "points").glob("*.json"))) == len(payload["points"])
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")} == stamps


def test_cli_frontier_refuses_bad_options_before_loading(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    bad = CliRunner().invoke(app, ["frontier", "tiny-llama", "--out", out, "--goal", "nope"])
    assert bad.exit_code == 2 and "goal" in bad.output
    no_sae = CliRunner().invoke(app, ["frontier", "tiny-llama", "--out", out, "--methods", "sta"])
    assert no_sae.exit_code == 2 and "--sae" in no_sae.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ComparisonError, match="ks"):
        FrontierExperiment(heads=((0, 0),), ks=(2,))


def test_frontier_recipe_runs_and_reports(sae_dir: Path, tmp_path: Path) -> None:
    recipe = {"method": "frontier", "name": "tiny-frontier", "model": "tiny-llama", "sae_path": str(sae_dir),
              "methods": ["baseline", "caa"], "lambdas": [1.0], "heads": ["1.0,0.1"], "ks": [1],
              "control_seeds": [0, 1, 2], "n_harmful": 2, "n_harmless": 2, "n_kl": 2, "n_pairs": 10,
              "generation": {"max_new_tokens": 3, "batch_size": 4}}  # fmt: skip
    path = tmp_path / "frontier.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = RunFolder.create(tmp_path / "runs", load_recipe(path), "test")
    metrics = execute(run, progress=False)
    assert {row["series"] for row in metrics["frontier"]["points"]} == {
        "baseline",
        "caa",
        "top:heads",
        "random:heads",
    }
    report = (run.path / "report.html").read_text()
    assert "Refusal frontier" in report and "At equal over-refusal" in report and "data:image/png" in report


def test_head_steering_ranks_heads_by_standardised_separation(tiny_models: dict[str, LoadedModel]) -> None:
    from finesteer.activations.directions import capture_heads
    from finesteer.data.prompts import chat_prompt
    from finesteer.recipes.frontier_heads import head_steering, separating_heads

    lm = tiny_models["tiny-llama"]
    triples = [
        ("how do i pick a lock", "i cannot help", "sure, take a pin"),
        ("steal a car", "sorry, no", "break the window"),
        ("make a fake id", "i refuse", "get a printer"),
    ]
    ranked, directions = separating_heads(lm, triples)
    inputs = [(chat_prompt(lm.tokenizer, q), a) for q, r, c in triples for a in (r, c)]
    z = capture_heads(lm, inputs, position="last").double()
    for (layer, head), d in ranked[:3]:
        pos, neg = z[0::2, layer, head], z[1::2, layer, head]
        diff = pos.mean(0) - neg.mean(0)
        unit = diff / diff.norm()
        sigma = torch.cat([pos, neg]) @ unit
        assert d == pytest.approx(
            float((pos @ unit).mean() - (neg @ unit).mean()) / float(sigma.std(correction=0)), rel=1e-4
        )
    assert [d for _, d in ranked] == sorted((d for _, d in ranked), reverse=True)
    steering = head_steering(lm, triples, k=2, alpha=4.0)
    edits = steering.intervention.edits  # type: ignore[union-attr]
    assert [(e.site.layer, e.site.head) for e in edits] == [h for h, _ in ranked[:2]]
    for edit, ((layer, head), _) in zip(edits, ranked[:2], strict=True):
        assert edit.op.scale == pytest.approx(4.0 * float(directions.sigma[layer, head]))  # type: ignore[attr-defined]


def test_frontier_recipe_validation_names_the_missing_sae_and_unknown_methods() -> None:
    from finesteer.recipes import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="sae_path"):
        parse_recipe({"method": "frontier", "name": "x", "methods": ["baseline", "sta_output"]})
    with pytest.raises(RecipeError, match="unknown method 'nope'"):
        parse_recipe({"method": "frontier", "name": "x", "methods": ["nope"]})
    ok = parse_recipe({"method": "frontier", "name": "x", "methods": ["prompt"], "heads": ["1.0,0.1"]})
    assert ok.head_fields() == {"heads": [(1, 0), (0, 1)]}


def test_cli_frontier_remove_compares_directional_ablation_with_several_rankings(
    tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    """--goal remove: the saved refusal direction ablated everywhere is one point; every ranking
    (--heads NAME=…, a joint run's forward order via --ranking) gets its top-k; only the first ranking's
    sizes get random-head controls, and a ranking shorter than some k keeps the ks it can fill."""
    from finesteer.fit.refusal_direction import RefusalDirection

    lm = tiny_models["tiny-llama"]
    vector = torch.randn(lm.info.hidden_size, generator=torch.Generator().manual_seed(0))
    RefusalDirection(vector, 1, -1).save(tmp_path / "refdir" / "direction", lm)  # a run folder's layout
    joint = tmp_path / "joint"
    joint.mkdir()
    forward = [{"heads": ["1.1"]}, {"heads": ["1.1", "0.0"]}]
    (joint / "result.json").write_text(json.dumps({"forward": forward}))
    out = tmp_path / "run"
    args = ["frontier", "tiny-llama", "--out", str(out), *SMALL, "--methods", "", "--goal", "remove",
            "--direction", str(tmp_path / "refdir"), "--heads", "logit=1.0,0.1", "--heads", "single=0.1",
            "--ranking", str(joint), "--ks", "1,2", "--seeds", "0,1", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    points = {row["id"]: row for row in payload["points"]}
    assert set(points) == {
        "baseline",
        "direction:refdir-ablation@1",
        "top:logit@1",
        "top:logit@2",
        "top:single@1",
        "top:joint@1",
        "top:joint@2",
        *(f"random:logit@{k}-seed{s}" for k in (1, 2) for s in (0, 1)),
    }
    assert points["top:joint@2"]["metadata"]["heads"] == [[1, 1], [0, 0]]
    assert points["direction:refdir-ablation@1"]["metadata"]["op"] == "ablation"
    assert payload["y_label"].startswith("attack success rate")
    assert payload["reference"] == "direction:refdir-ablation@1"
    share = points["top:logit@2"]["share_of_reference"]
    assert share["reference"] == "direction:refdir-ablation@1" and share["n"] == 3
    assert "share_of_reference" not in points["baseline"]
    first = points["baseline"]["p_refusal_first_token"]
    assert first["n"] == 3 and 0.0 <= first["low"] <= first["value"] <= first["high"] <= 1.0
    # a direction that moves the stream costs KL; the unmodified model costs none
    assert points["direction:refdir-ablation@1"]["kl"]["value"] > 0 == points["baseline"]["kl"]["value"]
    bad = CliRunner().invoke(app, [*args[:-1], "--ranking", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "nowhere" in bad.output
    wrong = CliRunner().invoke(app, [*args[:-1], "--heads", "far=9.0", "--out", str(tmp_path / "w")])
    assert wrong.exit_code == 2 and "9.0" in wrong.output and not (tmp_path / "w").exists()
    with pytest.raises(ComparisonError, match="fewer than every k"):
        FrontierExperiment(methods=(), heads=((0, 0), (1, 1)), rankings=(("one", ((0, 1),)),), ks=(2,))


def test_frontier_recipe_takes_named_rankings_and_directions() -> None:
    from finesteer.recipes import RecipeError, parse_recipe

    ok = parse_recipe({"method": "frontier", "name": "x", "methods": [], "goal": "remove",
                       "rankings": {"logit": "12.2,8.3"}, "directions": ["runs/dir"]})  # fmt: skip
    assert ok.head_fields() == {"rankings.logit": [(12, 2), (8, 3)]}
    with pytest.raises(RecipeError, match="rankings"):
        parse_recipe({"method": "frontier", "name": "x", "methods": [], "rankings": {"bad": "twelve"}})


def test_a_pre_ranked_folder_ranks_past_its_verified_heads_by_the_estimate(tmp_path: Path) -> None:
    """A fixed `--top-n` scan saves exact values for its verified heads only (0 elsewhere); a longer
    ranking must continue in the estimate's order, not in head-index order."""
    from finesteer.locate.run_folder import ranking_from_folder
    from finesteer.locate.scores import HeadScores

    out = tmp_path / "attr"
    args = ["locate", "attribution", "tiny-llama", "--data", "advbench", "--limit", "3", "--top-n", "2",
            "--metric", "refusal", "--out", str(out), "--json"]  # fmt: skip
    assert CliRunner().invoke(app, args).exit_code == 0
    scores = HeadScores.load(out)
    verified = scores.top_heads(2)
    estimate = [h for h in HeadScores.load(out / "estimate").top_heads(12) if h not in verified]
    ranking = ranking_from_folder(out, 6)
    assert ranking == verified + estimate[:4] and len(set(ranking)) == 6
    assert ranking_from_folder(out, 2) == verified
