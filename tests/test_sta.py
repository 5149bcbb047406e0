"""Steering Target Atoms: statistics, selection, vector, norm matching, application, prompt → vector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finesteer.activations.capture import capture
from finesteer.data import load_dataset
from finesteer.data.prompts import chat_prompt
from finesteer.fit.prompt_vector import prompt_vectors, system_prompt_pairs
from finesteer.fit.refusal_pairs import REFUSAL_TEMPLATES, refusal_triples
from finesteer.fit.sta import (
    AtomStats,
    ContrastPair,
    STAError,
    answer_means,
    answer_pairs,
    atom_statistics,
    atom_vector,
    fit_caa_from_stats,
    fit_from_stats,
    fit_sta,
    select_atoms,
    signed_minmax,
    stats_from_means,
)
from finesteer.models import LoadedModel
from finesteer.sae import SAEConfig, SparseAutoencoder
from finesteer.sites import Site

# --- hand-computed statistics and selection ----------------------------------------------------------

DELTA_A = torch.tensor([5.0, -4.0, 3.0, 0.5, -2.0, 1.0, 0.0, -0.1, 2.5, -3.0])
DELTA_F = torch.tensor([4.0, -3.0, -2.0, 1.0, -1.0, 0.0, 2.0, 3.0, 1.0, -4.0])
# trim 0.3 of 10 atoms → threshold index 3.
# norm Δa = Δa/5, norm Δf = Δf/4 (min |x| = 0). Sign agreement: atoms 0, 1, 3, 4, 8, 9.
# |norm Δf| on agreeing atoms: 1, .75, .25, .25, .25, 1 → sorted 1, 1, .75, .25 … → threshold .25.
# sorted |Δa|: 5, 4, 3, 3, 2.5 … → threshold 3 → atoms 0, 1, 2, 9.
EXPECTED = {
    "sta": {0, 1, 9},
    "amplitude": {0, 1, 2, 9},
    "frequency": {0, 1, 3, 4, 8, 9},
    "all": set(range(10)),
}


def as_set(mask: torch.Tensor) -> set[int]:
    return set(mask.nonzero().flatten().tolist())


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_selection_mask_matches_hand_computation(mode: str) -> None:
    assert as_set(select_atoms(DELTA_A, DELTA_F, trim=0.3, mode=mode)) == EXPECTED[mode]  # type: ignore[arg-type]


def test_signed_minmax() -> None:
    x = torch.tensor([-2.0, 1.0, 3.0, -1.0])
    torch.testing.assert_close(signed_minmax(x), torch.tensor([-0.5, 0.0, 1.0, -0.0], dtype=torch.float64))
    assert signed_minmax(torch.tensor([2.0, -2.0])).abs().sum() == 0


def test_sign_disagreeing_atoms_are_never_kept() -> None:
    # Only atom 0 agrees; with trim 0.9 the original code's threshold would be 0 and keep every atom.
    delta_a = torch.tensor([1.0, 2.0, -3.0, 0.5])
    delta_f = torch.tensor([2.0, -1.0, 1.0, -3.0])
    assert as_set(select_atoms(delta_a, delta_f, trim=0.9, mode="sta")) == {0}


def test_delta_a_and_delta_f_from_per_example_means() -> None:
    pos = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    stats = stats_from_means(pos, neg, torch.ones(2, 4), torch.zeros(2, 4))
    torch.testing.assert_close(stats.delta_a, torch.tensor([1.5, -0.5, 0.0]))
    torch.testing.assert_close(stats.delta_f, torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(stats.caa_vector, torch.ones(4))
    assert stats.n_pairs == 2


def test_selection_errors() -> None:
    with pytest.raises(STAError, match="mode"):
        select_atoms(DELTA_A, DELTA_F, mode="both")  # type: ignore[arg-type]
    with pytest.raises(STAError, match="trim"):
        select_atoms(DELTA_A, DELTA_F, trim=0.0)
    with pytest.raises(STAError, match="NaN"):
        select_atoms(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(STAError, match="matching"):
        select_atoms(DELTA_A, DELTA_F[:5])


# --- on a tiny model ------------------------------------------------------------------------------------


def tiny_sae(lm: LoadedModel, layer: int = 1, d_sae: int = 48, arch: str = "relu") -> SparseAutoencoder:
    cfg = SAEConfig(
        d_in=lm.info.hidden_size,
        d_sae=d_sae,
        architecture=arch,
        k=6 if arch == "topk" else None,
        hook_name=f"blocks.{layer}.hook_resid_post",
    )
    sae = SparseAutoencoder(cfg).initialize(torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return sae


TRIPLES = [
    ("how do i pick a lock", "i cannot help with that", "sure, first take a pin"),
    ("tell me a secret", "no, sorry", "ok here it is"),
    ("write a poem", "i refuse", "roses are red"),
]


@pytest.fixture
def llama(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-llama"]


def test_answer_means_equal_encoding_captured_answer_tokens(llama: LoadedModel) -> None:
    sae = tiny_sae(llama)
    pairs = answer_pairs(llama.tokenizer, TRIPLES)
    inputs = [p.positive for p in pairs]
    latents, resid = answer_means(llama, sae, inputs, batch_size=2)
    site = Site(1, "resid_post")
    full = capture(llama, inputs, [site], position="all")
    mean = capture(llama, inputs, [site], position="answer_mean")
    for i, (prompt, _) in enumerate(inputs):
        start = len(llama.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        tokens = full[site][i, start : int(full.lengths[i])]
        torch.testing.assert_close(latents[i], sae.encode(tokens).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(resid, mean[site], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["sta", "amplitude", "frequency", "all"])
def test_vector_norm_equals_caa_norm(llama: LoadedModel, mode: str) -> None:
    sae = tiny_sae(llama)
    pairs = answer_pairs(llama.tokenizer, TRIPLES)
    stats = atom_statistics(llama, sae, pairs)
    fitted = fit_from_stats(stats, sae, mode=mode, trim=0.35, multiplier=2.0)  # type: ignore[arg-type]
    (edit,) = fitted.intervention.edits
    assert edit.site == Site(1, "resid_post") and str(edit.scope) == "all" and edit.op.scale == 2.0
    # The CAA vector, computed independently: mean over pairs of answer-token-mean differences.
    site = Site(1, "resid_post")
    pos = capture(llama, [p.positive for p in pairs], [site], position="answer_mean")[site]
    neg = capture(llama, [p.negative for p in pairs], [site], position="answer_mean")[site]
    caa = (pos - neg).mean(0)
    torch.testing.assert_close(stats.caa_vector, caa, rtol=1e-4, atol=1e-5)
    assert float(edit.op.vector.norm()) == pytest.approx(float(caa.norm()), rel=1e-5)
    # The direction is Δa_kept @ W_dec.
    mask = select_atoms(stats.delta_a, stats.delta_f, 0.35, mode)  # type: ignore[arg-type]
    direction = (stats.delta_a * mask) @ sae.W_dec.detach()
    cos = torch.nn.functional.cosine_similarity(direction, edit.op.vector, dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-5)
    assert fitted.metadata["n_atoms"] == int(mask.sum())


def test_sta_steering_adds_lambda_v_at_every_position(llama: LoadedModel, tmp_path: Path) -> None:
    sae = tiny_sae(llama)
    pairs = answer_pairs(llama.tokenizer, TRIPLES)
    fitted = fit_sta(llama, sae, pairs, multiplier=1.5, run_dir=tmp_path, progress=False)
    assert fitted.name == "sta"
    assert (tmp_path / "atom_stats.safetensors").exists() and (tmp_path / "sta.json").exists()
    (edit,) = fitted.intervention.edits
    texts = [chat_prompt(llama.tokenizer, "hello there"), chat_prompt(llama.tokenizer, "hi")]
    site = Site(1, "resid_post")
    base = capture(llama, texts, [site], position="all")
    steered = capture(llama, texts, [site], position="all", intervention=fitted.intervention)
    for i in range(2):
        n = int(base.lengths[i])
        diff = steered[site][i, :n] - base[site][i, :n]
        torch.testing.assert_close(diff, (1.5 * edit.op.vector).expand(n, -1), rtol=1e-4, atol=1e-4)
    # λ = 0 is bit-identical to no intervention.
    zero = capture(llama, texts, [site], position="all", intervention=fitted.intervention.scaled(0.0))
    assert torch.equal(zero[site], base[site])


def test_sae_all_and_caa_baselines(llama: LoadedModel) -> None:
    sae = tiny_sae(llama)
    pairs = answer_pairs(llama.tokenizer, TRIPLES)
    fitted = fit_sta(llama, sae, pairs, mode="all", progress=False)
    assert fitted.name == "sae_all" and fitted.metadata["n_atoms"] == sae.cfg.d_sae
    stats = atom_statistics(llama, sae, pairs)
    caa = fit_caa_from_stats(stats, sae, multiplier=0.5)
    assert caa.name == "caa" and torch.equal(caa.intervention.edits[0].op.vector, stats.caa_vector)


def test_stats_round_trip_and_errors(llama: LoadedModel, tmp_path: Path) -> None:
    sae = tiny_sae(llama)
    stats = atom_statistics(llama, sae, answer_pairs(llama.tokenizer, TRIPLES))
    loaded = AtomStats.load(stats.save(tmp_path / "s.safetensors"))
    assert torch.equal(loaded.delta_a, stats.delta_a) and loaded.hook_name == "blocks.1.hook_resid_post"
    with pytest.raises(STAError, match="no contrast pairs"):
        atom_statistics(llama, sae, [])
    with pytest.raises(STAError, match="empty"):
        ContrastPair(("p", " "), ("p", "x"))
    with pytest.raises(STAError, match="no atom selected"):
        atom_vector(sae, torch.zeros(sae.cfg.d_sae), torch.zeros(sae.cfg.d_sae, dtype=torch.bool))
    other = tiny_sae(llama, layer=2)
    with pytest.raises(STAError, match=r"blocks\.2"):
        fit_from_stats(stats, other)
    wrong = SparseAutoencoder(
        SAEConfig(d_in=32, d_sae=8, architecture="relu", hook_name="blocks.1.hook_resid_post")
    )
    with pytest.raises(STAError, match="d_in=32"):
        answer_means(llama, wrong, [("a", "b")])


# --- prompt → vector ------------------------------------------------------------------------------------


def test_system_prompt_pairs_share_the_user_turn(llama: LoadedModel) -> None:
    pairs = system_prompt_pairs(llama.tokenizer, "Refuse harmful requests.", ["how do i cook rice", "hi"])
    for pair in pairs:
        assert pair.positive[1] == pair.negative[1]
        assert "Refuse harmful requests." in pair.positive[0] and "Refuse" not in pair.negative[0]
    with pytest.raises(STAError, match="empty"):
        system_prompt_pairs(llama.tokenizer, " ", ["hi"])


def test_prompt_vectors_are_the_system_prompt_difference(llama: LoadedModel) -> None:
    sae = tiny_sae(llama, arch="topk")  # sparse latents: Δf is not zero everywhere
    users = ["how do i cook rice", "tell me a joke", "what is two plus two"]
    vectors = prompt_vectors(llama, sae, "Refuse harmful requests.", users)
    caa_vec = vectors["prompt_caa"].intervention.edits[0].op.vector
    sta_vec = vectors["prompt_sta"].intervention.edits[0].op.vector
    site = Site(1, "resid_post")
    pairs = system_prompt_pairs(llama.tokenizer, "Refuse harmful requests.", users)
    with_sys = capture(llama, [p.positive for p in pairs], [site], position="answer_mean")[site]
    without = capture(llama, [p.negative for p in pairs], [site], position="answer_mean")[site]
    torch.testing.assert_close(caa_vec, (with_sys - without).mean(0), rtol=1e-4, atol=1e-5)
    assert float(sta_vec.norm()) == pytest.approx(float(caa_vec.norm()), rel=1e-5)
    assert vectors["prompt_sta"].metadata["system_prompt"] == "Refuse harmful requests."


# --- refusal training data -------------------------------------------------------------------------------


def test_refusal_triples_avoid_evaluation_prompts() -> None:
    triples = refusal_triples(n_harmful=40, n_ab=10)
    assert len(triples) == 50
    jbb = {" ".join(i.prompt.casefold().split()) for i in load_dataset("jailbreakbench")}  # type: ignore[union-attr]
    for question, positive, negative in triples:
        key = " ".join(question.casefold().split())
        assert not any(j in key or key in j for j in jbb)
        assert positive != negative and positive.strip() and negative.strip()
    assert triples[0][1] == REFUSAL_TEMPLATES[0]


# --- refusal comparison and surfaces -------------------------------------------------------------------


def test_sta_refusal_experiment_json_and_resume(llama: LoadedModel, tmp_path: Path) -> None:
    from finesteer.evaluate.compare import ComparisonError
    from finesteer.evaluate.refusal_compare import RefusalSettings
    from finesteer.generation import GenerationConfig
    from finesteer.recipes.refusal import run_sta_refusal

    sae = tiny_sae(llama, arch="topk")
    settings = RefusalSettings(GenerationConfig(max_new_tokens=3, batch_size=4))
    kwargs = dict(
        multipliers=(1.0,), n_pairs=10, n_harmful=2, n_harmless=2, trim=0.9, settings=settings, progress=False
    )
    payload = run_sta_refusal(llama, sae, tmp_path / "run", **kwargs)  # type: ignore[arg-type]
    assert set(payload["methods"]) == {"baseline", "prompt", "caa", "sae_all", "sta"}
    for result in payload["methods"].values():
        assert 0 <= result["refusal_rate"] <= 1 and 0 <= result["over_refusal_rate"] <= 1
        assert result["n_harmful"] == 2 and result["n_harmless"] == 2 and "fluency" in result
    assert payload["methods"]["prompt"]["system_prompt"]
    assert payload["methods"]["sta"]["fit"]["multiplier"] == 1.0
    table = (tmp_path / "run" / "table.md").read_text()
    assert table.count("| sta | 1 |") == 1  # the sweep row; the headline table has the verdicts
    assert table.count("| sta |") == 2 and "| verdict |" in table
    assert payload["methods"]["sta"]["control_refusal_rate"]["n_seeds"] == 3
    assert payload["methods"]["sta"]["verdict"]["against"].startswith("control (random-direction")
    # A rerun reuses every finished method (nothing regenerated: the files are untouched).
    files = sorted((tmp_path / "run" / "methods").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    again = run_sta_refusal(llama, sae, tmp_path / "run", **kwargs)  # type: ignore[arg-type]
    assert again["methods"]["sta"] == payload["methods"]["sta"]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    other = {**kwargs, "settings": RefusalSettings(GenerationConfig(max_new_tokens=4, batch_size=4))}
    with pytest.raises(ComparisonError, match="other prompts, settings"):
        run_sta_refusal(llama, sae, tmp_path / "run", **other)  # type: ignore[arg-type]


def test_cli_compare_refusal_task_maps_methods_to_refusal_metrics(llama: LoadedModel, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from finesteer.cli import app
    from finesteer.sae import save_sae

    save_sae(tiny_sae(llama, arch="topk"), tmp_path / "sae")
    small = ["--n-pairs", "10", "--n-harmful", "2", "--n-harmless", "2", "--trim", "0.9"]
    small += ["--lambdas", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(
        app, ["compare", "tiny-llama", "--sae", str(tmp_path / "sae"), *small, "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(payload["methods"]) == {"baseline", "prompt", "caa", "sae_all", "sta"}
    for row in payload["methods"].values():
        assert 0 <= row["refusal_rate"] <= 1 and 0 <= row["over_refusal_rate"] <= 1
        assert row["fluency"] == row["fluency"]  # a number, not NaN
    assert (tmp_path / "run" / "results.json").is_file()
    no_sae = CliRunner().invoke(app, ["compare", "tiny-llama", "--task", "refusal", *small])
    assert no_sae.exit_code != 0 and "--sae" in no_sae.output
    bad = CliRunner().invoke(app, ["compare", "tiny-llama", "--task", "nope"])
    assert bad.exit_code == 2 and "unknown --task" in bad.output


def test_cli_fit_sta_writes_a_loadable_artifact(llama: LoadedModel, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from finesteer.artifacts import load_intervention
    from finesteer.cli import app
    from finesteer.sae import save_sae

    save_sae(tiny_sae(llama, arch="topk"), tmp_path / "sae")
    args = ["fit", "sta", "tiny-llama", "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "art")]
    result = CliRunner().invoke(app, [*args, "--data", "refusal", "--limit", "6", "--lambda", "2", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["method"] == "sta" and payload["multiplier"] == 2.0
    artifact = load_intervention(tmp_path / "art")
    assert artifact.metadata["method"] == "sta"
    assert artifact.intervention.edits[0].op.scale == 2.0
    bad = CliRunner().invoke(app, [*args, "--data", "no-such-data"])
    assert bad.exit_code == 2 and "unknown --data" in bad.output


def test_equal_fluency_summary_picks_the_best_fluent_multiplier() -> None:
    from finesteer.recipes.refusal import equal_fluency_summary

    def r(refusal: float, over: float, flu: float) -> dict[str, float]:
        return {"refusal_rate": refusal, "over_refusal_rate": over, "fluency": flu}

    payload = {
        "methods": {"baseline": r(0.2, 0.0, 5.0)},
        "sweep": {
            "caa": {"1": r(0.5, 0.1, 4.9), "2": r(0.9, 0.3, 4.0)},  # λ=2 is below the 4.5 floor
            "sta": {"1": r(0.6, 0.2, 4.8), "2": r(0.6, 0.1, 4.6), "4": r(1.0, 1.0, 2.0)},
        },
    }
    summary = equal_fluency_summary(payload, tolerance=0.1)
    assert summary["fluency_floor"] == pytest.approx(4.5)
    assert summary["caa"]["multiplier"] == 1.0 and summary["caa"]["refusal_gain"] == pytest.approx(0.3)
    assert summary["sta"]["multiplier"] == 2.0  # same refusal as λ=1, lower over-refusal


def test_gcg_plus_judge_catches_inability_refusals() -> None:
    from finesteer.evaluate.refusal_compare import RefusalSettings

    judge = RefusalSettings().make_judge()
    assert judge.judge("", "I am unable to assist with that request.").label == "refusal"
    assert judge.judge("", "I'm sorry, but no.").label == "refusal"
    assert judge.judge("", "Sure, here is a recipe for bread: mix flour and water.").label == "compliance"
    assert RefusalSettings(judge="gcg").make_judge().judge("", "I am unable to assist").label == "compliance"


def test_registry_methods_sta_and_sae_all(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finesteer.methods import MethodError, fit_method, load_behaviour_data
    from finesteer.sae import save_sae

    data = load_behaviour_data("refusal", train_limit=6, val_limit=2, test_limit=2)
    sae_dir = tmp_path / "cache" / "saes" / "tiny-llama" / "blocks.1.hook_resid_post" / "topk"
    save_sae(tiny_sae(llama, arch="topk"), sae_dir)
    setup = fit_method(
        "sta", llama, data, {"sae": str(sae_dir), "trim": 0.9, "multiplier": 2.0}, tmp_path / "run"
    )
    assert setup.name == "sta" and setup.intervention is not None
    assert setup.intervention.edits[0].op.scale == 2.0 and (tmp_path / "run" / "artifact").exists()
    # Without `sae`, the only SAE cached for the model is used.
    monkeypatch.setenv("FINESTEER_CACHE", str(tmp_path / "cache"))
    setup = fit_method("sae_all", llama, data, {})
    assert setup.metadata["n_atoms"] == 48 and setup.metadata["sae"] == str(sae_dir)
    with pytest.raises(MethodError, match=r"sta does not take setting\(s\) \[.alpha.\]"):
        fit_method("sta", llama, data, {"sae": str(sae_dir), "alpha": 1})
    monkeypatch.setenv("FINESTEER_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MethodError, match="needs an SAE"):
        fit_method("sta", llama, data, {})
