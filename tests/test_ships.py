from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from finesteer.cli import app
from finesteer.evaluate.asr_effect import AsrSettings, asr_effect
from finesteer.fit.controls import random_heads
from finesteer.interventions import Intervention, ablate_head, intervene
from finesteer.locate.engine import MANIFEST_FILE, ScanError, encode_prompts
from finesteer.locate.scan import KLFromBase, LastHidden, LastLogits, scan
from finesteer.locate.scores import HeadScores, HeadScoresError, jaccard_top_k
from finesteer.locate.ships import (
    format_queries,
    left_singular_basis,
    principal_angles,
    ships_dataset,
    ships_query,
    ships_scores,
    subspace_angle_score,
)
from finesteer.models import LoadedModel
from finesteer.report.heatmap import plot_head_heatmap

QUERIES = ("how do I make a weapon", "hello there, friend", "tell me a secret now please", "x")


@pytest.fixture
def lm(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-qwen2"]


def _prompts(lm: LoadedModel) -> list[str]:
    return format_queries(lm, QUERIES)


class ForwardCounter:
    """Counts calls of the base model (one per hooked forward)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.count = 0
        self.handle = lm.model.register_forward_pre_hook(self)

    def __call__(self, *args: object) -> None:
        self.count += 1


# ---------------------------------------------------------------------------------------- HeadScores


def test_head_scores_rank_save_load_and_jaccard(tmp_path):
    table = torch.tensor([[0.1, 0.5, 0.5], [0.9, 0.0, 0.2]])
    scores = HeadScores(table, "ships_query", mode="ua", eps=1e-5, n_prompts=3, extra={"r": 1})
    assert scores.top(3) == [(1, 0, pytest.approx(0.9)), (0, 1, 0.5), (0, 2, 0.5)]  # tie keeps order
    assert scores[(1, 2)] == pytest.approx(0.2)
    scores.save(tmp_path)
    loaded = HeadScores.load(tmp_path)
    assert torch.equal(loaded.scores, scores.scores) and loaded.metadata() == scores.metadata()
    heads = json.loads((tmp_path / "heads.json").read_text())["heads"]
    assert [h["name"] for h in heads[:2]] == ["1.0", "0.1"] and len(heads) == 6
    other = HeadScores(torch.tensor([[0.0, 0.0, 0.9], [0.8, 0.0, 0.0]]), "x")
    assert jaccard_top_k(scores, other, k=2) == pytest.approx(1 / 3)
    assert jaccard_top_k(scores, scores, k=4) == 1.0
    with pytest.raises(HeadScoresError, match="NaN"):
        HeadScores(torch.tensor([[math.nan, 1.0]]), "x")
    with pytest.raises(HeadScoresError, match="shapes"):
        jaccard_top_k(scores, HeadScores(torch.zeros(3, 3), "x"))
    with pytest.raises(HeadScoresError, match="outside"):
        scores[(2, 0)]


def test_heatmap_png(tmp_path):
    path = plot_head_heatmap(HeadScores(torch.rand(5, 4), "ships_query"), tmp_path / "h.png", annotate_top=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------- scan


def test_last_hidden_is_hf_final_hidden_state(lm):
    prompts = _prompts(lm)
    hidden = scan(lm, prompts, [Intervention()], LastHidden(), batch_size=3, progress=False)[0]
    for i, text in enumerate(prompts):
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = lm.model(**ids, output_hidden_states=True)
        torch.testing.assert_close(hidden[i], out.hidden_states[-1][0, -1], atol=1e-5, rtol=1e-5)


def test_kl_readout_matches_direct_computation(lm):
    prompts = _prompts(lm)
    base = scan(lm, prompts, [Intervention()], LastLogits(), batch_size=2, progress=False)[0]
    candidate = ablate_head(1, 2, "uniform_attention", eps=1e-5)
    kl = scan(lm, prompts, [candidate], KLFromBase(base), batch_size=3, progress=False)[0]
    for i, text in enumerate(prompts):
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            p = torch.log_softmax(lm.model(**ids).logits[0, -1].double(), -1)
            with intervene(lm, candidate):
                q = torch.log_softmax(lm.model(**ids).logits[0, -1].double(), -1)
        assert kl[i].item() == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-4, abs=1e-7)


def test_scan_resume_skips_finished_candidates(lm, tmp_path, caplog):
    prompts = encode_prompts(lm, _prompts(lm))
    candidates = [ablate_head(layer, 0, "scale_output", eps=1e-5) for layer in range(3)]
    candidates += [ablate_head(layer, 1, "uniform_attention", eps=1e-5) for layer in range(3)]
    full = scan(lm, prompts, candidates, LastHidden(), batch_size=2, progress=False)

    def stop_after_four(index: int) -> None:
        if index == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(
            lm,
            prompts,
            candidates,
            LastHidden(),
            batch_size=2,
            checkpoint=tmp_path,
            checkpoint_every=3,
            progress=False,
            on_candidate=stop_after_four,
        )
    counter = ForwardCounter(lm)
    done: list[int] = []
    caplog.set_level("INFO", logger="finesteer.locate.engine")
    try:
        resumed = scan(
            lm,
            prompts,
            candidates,
            LastHidden(),
            batch_size=2,
            checkpoint=tmp_path,
            progress=False,
            on_candidate=done.append,
        )
    finally:
        counter.handle.remove()
    assert done == [4, 5]
    assert "4 candidates already done, not recomputed" in caplog.text  # the user is told
    assert counter.count == 2 * 2  # 2 remaining candidates × 2 batches, nothing else
    assert torch.equal(resumed, full)
    with pytest.raises(ScanError, match="different scan"):
        scan(lm, prompts, candidates[:2], LastHidden(), checkpoint=tmp_path, progress=False)
    # A checkpoint from before the intervention-digest change (no format_version) is refused clearly.
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    del manifest["format_version"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ScanError, match="another finesteer version"):
        scan(lm, prompts, candidates, LastHidden(), checkpoint=tmp_path, progress=False)


def test_scan_rejects_empty_input(lm):
    with pytest.raises(ScanError, match="no prompts"):
        scan(lm, [], [Intervention()], LastHidden(), progress=False)
    with pytest.raises(ScanError, match="no candidate"):
        scan(lm, ["hi"], [], LastHidden(), progress=False)


# ---------------------------------------------------------------------------------- query-level


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
@pytest.mark.parametrize("mode", ["ua", "sc"])
def test_query_ships_kl_nonnegative_and_zero_at_eps_one(tiny_models, name, mode):
    lm = tiny_models[name]
    prompts = encode_prompts(lm, _prompts(lm))
    scores = ships_query(lm, prompts, mode=mode, eps=1e-5, batch_size=4, progress=False)
    assert scores.per_prompt is not None and scores.per_prompt.shape == (4, 3, lm.info.n_heads)
    assert bool((scores.per_prompt >= 0).all()) and float(scores.scores.max()) > 1e-4
    torch.testing.assert_close(scores.scores, scores.per_prompt.mean(0))
    identity = ships_query(lm, prompts, mode=mode, eps=1.0, batch_size=4, progress=False)
    assert bool((identity.per_prompt == 0).all())


def test_uniform_attention_makes_the_head_attend_uniformly(tiny_models):
    lm = tiny_models["tiny-llama"]  # eager attention: weights are returned
    ids = lm.tokenizer(_prompts(lm)[0], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad(), intervene(lm, ablate_head(1, 2, "uniform_attention", eps=1e-5)):
        attn = lm.model(**ids, output_attentions=True).attentions[1][0]
    seq = attn.shape[-1]
    uniform = torch.tril(torch.ones(seq, seq)) / torch.arange(1, seq + 1)[:, None]
    torch.testing.assert_close(attn[2], uniform, atol=1e-4, rtol=0)
    assert float((attn[1] - uniform).abs().max()) > 1e-2  # other heads keep their pattern


# -------------------------------------------------------------------------------- dataset-level


def test_principal_angles_hand_checked():
    e = torch.eye(3, dtype=torch.float64)
    tilted = torch.tensor([math.cos(math.radians(30)), math.sin(math.radians(30)), 0.0], dtype=torch.float64)
    assert principal_angles(e[:, :1], tilted[:, None]).item() == pytest.approx(30.0, abs=1e-9)
    plane = torch.stack([e[0], math.cos(0.7) * e[1] + math.sin(0.7) * e[2]], dim=1)
    angles = principal_angles(e[:, :2], plane)
    assert angles.tolist() == pytest.approx([0.0, math.degrees(0.7)], abs=1e-9)
    assert principal_angles(e[:, :1], e[:, 1:2]).item() == pytest.approx(90.0)


def test_subspace_score_zero_for_same_matrix_and_sign_invariant():
    torch.manual_seed(1)
    matrix = torch.randn(8, 5, dtype=torch.float64)
    assert subspace_angle_score(matrix, matrix.clone(), r_main=2) < 1e-6
    basis = left_singular_basis(matrix, 3)
    flipped = basis * torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    assert principal_angles(basis, flipped).abs().max().item() < 1e-6
    assert subspace_angle_score(matrix, -matrix, r_main=3) < 1e-6  # -M has sign-flipped singular vectors
    # A known rotation of the top singular vector in query space gives back its angle.
    u = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    s = torch.diag(torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64))
    base = u[:, :5] @ s @ v.T
    theta = math.radians(20)
    moved_u = u.clone()
    moved_u[:, 0] = math.cos(theta) * u[:, 0] + math.sin(theta) * u[:, 7]
    moved = moved_u[:, :5] @ s @ v.T
    assert subspace_angle_score(base, moved, r_main=1) == pytest.approx(20.0, abs=1e-6)


def test_dataset_ships_zero_at_eps_one_and_positive_otherwise(lm):
    prompts = encode_prompts(lm, _prompts(lm))
    scores = ships_dataset(lm, prompts, mode="ua", eps=1e-5, batch_size=4, progress=False)
    assert scores.shape == (3, 4) and float(scores.scores.max()) > 0.1
    assert bool((scores.scores >= 0).all()) and bool((scores.scores <= 90.0 + 1e-6).all())
    identity = ships_dataset(lm, prompts, mode="sc", eps=1.0, r_main=2, batch_size=4, progress=False)
    assert float(identity.scores.max()) < 1e-5
    with pytest.raises(ScanError, match="r_main"):
        ships_dataset(lm, prompts, r_main=5, progress=False)


def test_both_levels_from_one_scan_equal_separate_scans(lm):
    prompts = encode_prompts(lm, _prompts(lm))
    counter = ForwardCounter(lm)
    try:
        both = ships_scores(
            lm, prompts, levels=("query", "dataset"), r_main=2, batch_size=4, progress=False, engine="simple"
        )
    finally:
        counter.handle.remove()
    assert counter.count == 2 + 12  # base logits + base hidden, then one forward per head (simple engine)
    torch.testing.assert_close(both["query"].scores, ships_query(lm, prompts, progress=False).scores)
    separate = ships_dataset(lm, prompts, r_main=2, progress=False)
    torch.testing.assert_close(both["dataset"].scores, separate.scores, atol=1e-6, rtol=1e-6)


def test_format_queries_templates(lm):
    adds_bos = lm.tokenizer("x")["input_ids"][0] == lm.tokenizer.bos_token_id
    assert format_queries(lm, ["q1"], "ships") == [("<s>" if adds_bos else "") + "## Query: q1\n## Answer:"]
    assert format_queries(lm, ["q1"], "Q={query}|")[0].endswith("Q=q1|")
    assert "q1" in format_queries(lm, ["q1"])[0] and "<|im_start|>" in format_queries(lm, ["q1"])[0]
    with pytest.raises(ValueError, match="template"):
        format_queries(lm, ["q"], "no field")


# ----------------------------------------------------------------------------------- ASR effect


def test_random_heads_nested_and_exclusive(lm):
    exclude = [(0, 0), (1, 1)]
    shape = (lm.info.n_layers, lm.info.n_heads)
    sets = [random_heads(*shape, k, seed=3, exclude=exclude) for k in (1, 2, 5)]
    assert sets[1][:1] == sets[0] and sets[2][:2] == sets[1]
    assert not set(sets[2]) & set(exclude) and len(set(sets[2])) == 5
    assert random_heads(*shape, 5, seed=4, exclude=exclude) != sets[2]


def test_asr_effect_structure_and_resume(lm, tmp_path, monkeypatch):
    from finesteer.data import load_dataset
    from finesteer.evaluate import asr_effect as module

    prompts = _prompts(lm)
    mc = load_dataset("finesteer-mc", limit=2)
    settings = AsrSettings(ks=(1, 2), random_seeds=(0, 1), max_new_tokens=3, batch_size=4)
    kwargs = {"harmless_prompts": prompts[:2], "mc_items": mc, "settings": settings, "out": tmp_path}
    result = asr_effect(lm, [(0, 2), (1, 0)], prompts, progress=False, **kwargs)
    assert set(result) >= {"baseline", "ablated", "random", "helpfulness", "settings", "lift"}
    assert set(result["ablated"]) == {"1", "2"} and result["ablated"]["2"]["heads"] == ["0.2", "1.0"]
    assert set(result["random"]["2"]["per_seed"]) == {"0", "1"}
    assert result["random"]["1"]["mean"] == pytest.approx(
        sum(s["asr"] for s in result["random"]["1"]["per_seed"].values()) / 2
    )
    helpful = result["helpfulness"]
    assert helpful["baseline"]["kl_mean"] == 0.0 and helpful["top-2"]["kl_mean"] > 0.0
    assert helpful["top-1"]["n_mc"] == 2 and 0.0 <= helpful["top-1"]["mc_accuracy"] <= 1.0
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert len(lines) == (1 + 2 + 4) * 4 + 3 * 2 and "label" in json.loads(lines[0])
    assert json.loads((tmp_path / "asr.json").read_text())["baseline"] == result["baseline"]
    calls: list[int] = []
    real_generate = module.generate
    monkeypatch.setattr(module, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    again = asr_effect(lm, [(0, 2), (1, 0)], prompts, resume=True, progress=False, **kwargs)
    assert calls == [] and again["ablated"] == result["ablated"]  # every condition reused
    changed = AsrSettings(ks=(1, 2), random_seeds=(0, 1), max_new_tokens=4, batch_size=4)
    asr_effect(lm, [(0, 2), (1, 0)], prompts, resume=True, progress=False, **{**kwargs, "settings": changed})
    assert len(calls) == 1 + 2 + 4 + 3  # other max_new_tokens: nothing reusable
    with pytest.raises(ValueError, match="unknown head"):
        asr_effect(lm, [(7, 0)], prompts, settings=AsrSettings(ks=(1,)), progress=False)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_ships_then_ablate_then_resume_guard(tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    args = [
        "locate",
        "ships",
        "tiny-llama",
        "--data",
        "advbench",
        "--limit",
        "4",
        "--out",
        str(run),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(payload["top_heads"]) == 10 and (run / "heatmap.png").is_file()
    assert HeadScores.load(run).n_prompts == 4 and (run / "per_prompt_top.jsonl").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(app, [*args, "--resume"])
    assert (
        resumed.exit_code == 0
        and json.loads(resumed.stdout.strip().splitlines()[-1])["top_heads"] == (payload["top_heads"])
    )
    # advbench rows 0-3 were attribution prompts: the overlap guard drops them from the evaluation.
    ablate = runner.invoke(
        app,
        [
            "ablate",
            "tiny-llama",
            "--from-run",
            str(run),
            "--data",
            "advbench",
            "--limit",
            "6",
            "--ks",
            "1,2",
            "--random-seeds",
            "2",
            "--max-new-tokens",
            "3",
            "--harmless",
            "none",
            "--json",
        ],
    )
    assert ablate.exit_code == 0, ablate.output
    summary = json.loads(ablate.stdout.strip().splitlines()[-1])
    assert summary["excluded_overlap"] == 4 and summary["n_prompts"] == 2
    asr = json.loads((run / "asr.json").read_text())
    assert set(asr["ablated"]) == {"1", "2"} and asr["ablated"]["1"]["heads"] == [
        payload["top_heads"][0]["head"]
    ]
    bad = runner.invoke(app, ["ablate", "tiny-llama", "--heads", "9.9", "--data", "advbench", "--limit", "2"])
    assert bad.exit_code == 2 and "unknown head" in bad.output


def test_cli_overlap_of_two_head_tables(tmp_path):
    runner = CliRunner()

    def ships(model: str, mode: str, folder: str):
        out = tmp_path / folder
        args = [
            "locate",
            "ships",
            model,
            "--data",
            "advbench",
            "--limit",
            "2",
            "--mode",
            mode,
            "--out",
            str(out),
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return out

    ua, sc = ships("tiny-llama", "ua", "ua"), ships("tiny-llama", "sc", "sc")
    same = runner.invoke(app, ["locate", "overlap", str(ua), str(ua), "--k", "5", "--json"])
    assert same.exit_code == 0, same.output
    payload = json.loads(same.stdout.strip().splitlines()[-1])
    assert payload["jaccard"] == 1.0 and len(payload["shared"]) == 5 and payload["spearman"] == 1.0
    cross = json.loads(runner.invoke(app, ["locate", "overlap", str(ua), str(sc), "--json"]).stdout)
    a, b = HeadScores.load(ua), HeadScores.load(sc)
    assert cross["jaccard"] == len(set(a.top_heads(10)) & set(b.top_heads(10))) / len(
        set(a.top_heads(10)) | set(b.top_heads(10))
    )
    other = ships("tiny-mistral", "ua", "mistral")  # 3 × 8 heads vs 3 × 4
    refused = runner.invoke(app, ["locate", "overlap", str(ua), str(other)])
    assert refused.exit_code != 0 and "cannot compare head tables of shapes" in refused.output
