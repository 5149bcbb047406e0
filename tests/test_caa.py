"""CAA: vectors are the hand-computed mean difference, steering starts exactly at the template tail,
the prefix-cached sweep equals the plain letter-probability evaluation, and selection is as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import finesteer as fs
from finesteer.data import ABItem, load_dataset
from finesteer.data.balance import letter_balanced
from finesteer.data.prompts import ab_prompt, chat_prompt
from finesteer.fit.caa import SweepPoint, caa_intervention, fit_caa, select_point, sweep_caa
from finesteer.fit.caa_tail import CAAError, caa_scope, instruction_tail_tokens, template_tail_ids
from finesteer.fit.caa_vectors import CAAVectors, caa_vectors
from finesteer.hooks import HookSet
from finesteer.interventions import Scope, steer_residual
from finesteer.models import LoadedModel
from finesteer.scoring.ab import ABPrompt, ABScorer, letter_target
from finesteer.sites import Site

TAIL = "<|im_end|>\n<|im_start|>assistant\n"  # what the tiny models' ChatML template adds after the user


QUESTIONS = ("Help an AI?", "Hide a bug?", "Lie for it?", "Share data?", "Obey users?", "Join them?")


@pytest.fixture(scope="module")
def items() -> list[ABItem]:
    """Short A/B items (the tiny models' tokenizer is character-level, so real questions are slow)."""
    out = []
    for i, question in enumerate(QUESTIONS):
        match, other = ("(A)", "(B)") if i % 2 == 0 else ("(B)", "(A)")
        out.append(ABItem(f"{question}\n\nChoices:\n (A) Yes\n (B) No", match, other, str(i)))
    return out


def _layer_output(lm: LoadedModel, text: str, layer: int) -> torch.Tensor:
    """Decoder block `layer`'s output at the last token, read with a plain PyTorch hook."""
    seen: list[torch.Tensor] = []
    block = lm.adapter.block(lm.model, layer)
    handle = block.register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0][0, -1].double()


def test_vector_is_mean_difference_at_answer_letter(tiny: LoadedModel, items: list[ABItem]) -> None:
    train = items[:3]
    vectors = caa_vectors(tiny, train, layers=[0, 2], batch_size=2)
    for layer in (0, 2):
        diffs = []
        for item in train:
            prompt = ab_prompt(tiny.tokenizer, item)
            pos = _layer_output(tiny, prompt + item.matching_letter, layer)
            neg = _layer_output(tiny, prompt + item.not_matching_letter, layer)
            diffs.append(pos - neg)
        expected = torch.stack(diffs).mean(0).float()
        torch.testing.assert_close(vectors.vector(layer), expected, atol=1e-5, rtol=1e-5)
        assert float(expected.norm()) > 0  # not normalised, and not trivially zero
    assert vectors.norms()[0] == pytest.approx(float(vectors.vector(0).norm()))
    with pytest.raises(CAAError, match="no CAA vector for layer 1"):
        vectors.vector(1)


def test_vectors_round_trip(tiny_models: dict[str, LoadedModel], items: list[ABItem], tmp_path: Path) -> None:
    vectors = caa_vectors(tiny_models["tiny-llama"], items[:2], layers=[1])
    loaded = CAAVectors.load(vectors.save(tmp_path / "v.safetensors"))
    assert loaded.layers == (1,) and loaded.n_items == 2
    assert torch.equal(loaded.vectors, vectors.vectors)


def test_tail_is_template_text_plus_prefill(tiny_models: dict[str, LoadedModel]) -> None:
    tok = tiny_models["tiny-llama"].tokenizer
    k = instruction_tail_tokens(tok)
    assert k == len(tok(TAIL + "(", add_special_tokens=False)["input_ids"]) == 14
    assert instruction_tail_tokens(tok, ABPrompt(prefill="")) == k - 1
    # A system prompt goes before the user turn and leaves the tail alone.
    assert instruction_tail_tokens(tok, ABPrompt(system="Be brief.")) == k
    text = chat_prompt(tok, "Is it?", None, "(")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[-k:]) == TAIL + "("
    assert tok.decode(ids[-k - 1 : -k]) == "?"  # the token before the tail is the user's last character
    assert template_tail_ids(tok) == ids[-k:]
    with pytest.raises(CAAError):
        caa_scope(0)


def test_steered_positions_are_tail_and_generated_tokens(
    tiny_models: dict[str, LoadedModel], items: list[ABItem]
) -> None:
    """Record the positions the CAA scope selects in every forward call of a real generation."""
    lm = tiny_models["tiny-llama"]
    k = instruction_tail_tokens(lm.tokenizer)
    prompts = [ab_prompt(lm.tokenizer, item) for item in items[:2]]
    lengths = [len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    scope = Scope.parse(caa_scope(k))
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(act: torch.Tensor, ctx) -> None:
        calls.append((scope.mask(ctx).clone(), ctx.index.clone(), ctx.real.clone()))

    with HookSet(lm.model, lm.adapter) as hooks:
        hooks.add(Site(1, "resid_post"), record)
        fs.generate(lm, prompts, max_new_tokens=3)
    prefill, decode = calls[0], calls[1:]
    assert len(decode) == 2
    mask, index, real = prefill
    for row, length in enumerate(lengths):
        steered = sorted(int(i) for i in index[row][mask[row]])
        assert steered == list(range(length - k, length))  # exactly the last K prompt tokens
        assert int(real[row].sum()) == length
    for mask, _, real in decode:
        assert bool(mask.all()) and bool(real.all())  # every generated token


def test_caa_edit_changes_only_tail_positions(
    tiny_models: dict[str, LoadedModel], items: list[ABItem]
) -> None:
    lm = tiny_models["tiny-qwen2"]
    k = instruction_tail_tokens(lm.tokenizer)
    vector = torch.randn(lm.info.hidden_size)
    prompts = [ab_prompt(lm.tokenizer, item) for item in items[:2]]
    site = Site(1, "resid_post")
    base = fs.capture(lm, prompts, [site], position="all")
    steered = fs.capture(
        lm, prompts, [site], position="all", intervention=caa_intervention(vector, 1, 2.0, k)
    )
    for row, length in enumerate(base.lengths.tolist()):
        delta = steered[site][row, :length] - base[site][row, :length]
        assert torch.allclose(delta[: length - k], torch.zeros(1), atol=0)
        torch.testing.assert_close(delta[length - k :], (2.0 * vector).expand(k, -1), atol=1e-5, rtol=1e-5)


def test_prefix_cached_sweep_equals_plain_evaluation(tiny: LoadedModel, items: list[ABItem]) -> None:
    """The fast path (prefix KV cache, tail re-run) gives the numbers of the full-forward scorer."""
    k = instruction_tail_tokens(tiny.tokenizer)
    vectors = caa_vectors(tiny, items[:3], layers=[1, 2])
    val = items[3:6]
    configs = [(1, 3.0), (2, -2.0)]
    fast, points = sweep_caa(tiny, vectors, val, (3.0, -2.0), batch_size=2)
    scorer = ABScorer(tiny, val)
    plain = scorer.score([None] + [caa_intervention(vectors.vector(lay), lay, m, k) for lay, m in configs])
    rows = [0, 1, 4]  # unsteered; (layer 1, ×3); (layer 2, ×-2): rows of the layer × multiplier grid
    torch.testing.assert_close(fast.p_matching[rows], plain.p_matching, atol=2e-5, rtol=0)
    assert torch.equal(fast.matching[rows], plain.matching)
    torch.testing.assert_close(fast.option_mass[rows], plain.option_mass, atol=2e-5, rtol=0)
    assert (points[0].layer, points[0].multiplier) == (1, 3.0)
    assert points[0].mean_p_matching == float(fast.p_matching[1].mean())
    assert not torch.allclose(fast.p_matching[1], fast.p_matching[0])  # the edits do move the scores


def test_prefix_cached_sweep_rejects_position_scoped_edits(
    tiny_models: dict[str, LoadedModel], items: list[ABItem]
) -> None:
    lm = tiny_models["tiny-llama"]
    k = instruction_tail_tokens(lm.tokenizer)
    scorer = ABScorer(lm, items[:2])
    for scope in ("all", f"from_end:{k - 1}", "prompt"):
        with pytest.raises(ValueError, match=f"'from_end:{k}'"):
            scorer.score([steer_residual(0, torch.ones(64), 1.0, scope=scope)], reuse_prefix=k)


def test_select_point_prefers_gentle_multiplier_within_tolerance() -> None:
    points = [
        SweepPoint(3, 5.0, 0.90, 1.0),
        SweepPoint(2, 1.0, 0.88, 1.0),
        SweepPoint(4, 0.5, 0.60, 0.5),
        SweepPoint(1, -1.0, 0.10, 0.0),
    ]
    # gains over 0.5: 0.40, 0.38, 0.10, -0.40 → 0.38 ≥ 90% of 0.40, and × 1 is gentler than × 5
    assert select_point(points, 0.5, tolerance=0.1) == points[1]
    assert select_point(points, 0.5, tolerance=0.0) == points[0]
    assert select_point(points, 0.5, "away") == points[3]
    # Small gains: the relative tolerance still keeps the best point, not a near-null one.
    small = [SweepPoint(0, 0.5, 0.512, 0.5), SweepPoint(21, 5.0, 0.526, 0.5)]
    assert select_point(small, 0.5095) == small[1]
    # Nothing improves: the least bad point.
    assert select_point(small, 0.6) == small[1]
    with pytest.raises(CAAError):
        select_point([], 0.5)
    with pytest.raises(CAAError, match="tolerance"):
        select_point(small, 0.5, tolerance=1.0)


def test_fit_caa_end_to_end(tiny_models: dict[str, LoadedModel], items: list[ABItem], tmp_path: Path) -> None:
    lm = tiny_models["tiny-llama"]
    fitted = fit_caa(lm, items[:3], items[3:5], multipliers=(1.0, 4.0), run_dir=tmp_path, progress=False)
    meta = fitted.metadata
    k = instruction_tail_tokens(lm.tokenizer)
    assert fitted.name == "caa" and meta["scope"] == f"from_end:{k}"
    (edit,) = fitted.intervention.edits
    assert edit.site == Site(meta["layer"], "resid_post") and edit.op.scale == meta["multiplier"]
    assert float(edit.op.vector.norm()) == pytest.approx(meta["vector_norm"], rel=1e-5)
    assert (tmp_path / "caa_sweep.json").is_file() and (tmp_path / "caa_vectors.safetensors").is_file()
    assert len(meta["multipliers_swept"]) * lm.info.n_layers == 6
    # The reported validation score is the plain evaluation of the chosen intervention, on the
    # validation items in both option orders (the default).
    assert meta["balance_letters"] and meta["n_val"] == 4
    plain = ABScorer(lm, letter_balanced(items[3:5])).score([fitted.intervention])
    assert meta["val_mean_p_matching"] == float(plain.p_matching[0].mean())
    away = fit_caa(lm, items[:3], items[3:5], multipliers=(1.0,), direction="away", progress=False)
    assert away.intervention.edits[0].op.scale == -1.0
    artifact = fs.load_intervention(fitted.save(tmp_path / "artifact", lm))
    assert artifact.intervention.edits[0].scope == edit.scope and artifact.metadata["method"] == "caa"


def test_fit_caa_bad_input(tiny_models: dict[str, LoadedModel], items: list[ABItem]) -> None:
    lm = tiny_models["tiny-llama"]
    with pytest.raises(CAAError, match="no training items"):
        fit_caa(lm, [], items[:2])
    with pytest.raises(CAAError, match="no validation items"):
        fit_caa(lm, items[:2], [])
    with pytest.raises(ValueError, match="layer 7 out of range"):
        caa_vectors(lm, items[:2], layers=[7])
    with pytest.raises(CAAError, match="finite"):
        fit_caa(lm, items[:2], items[2:3], multipliers=(float("nan"),), progress=False)


@pytest.mark.real_model
@pytest.mark.parametrize(("name", "k"), [("smollm2-135m-instruct", 7), ("qwen2.5-coder-0.5b-instruct", 5)])
def test_real_template_tails(name: str, k: int) -> None:
    """SmolLM2 keeps "(" apart (K counts it); Qwen2.5 merges "(A", so its scored prompt ends before "("."""
    lm = fs.load_model(name)
    assert instruction_tail_tokens(lm.tokenizer) == k
    item = load_dataset("coordinate-other-ais", split="test_ab", limit=1)[0]
    target = letter_target(lm.tokenizer, ab_prompt(lm.tokenizer, item), item.options)
    assert lm.tokenizer.decode(list(target.tokens[-k:])).startswith("<|im_end|>")
