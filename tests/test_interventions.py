"""Invariants of the intervention engine on tiny models of every supported family (MHA and GQA,
fused q/k/v, Conv1D weights, q/k norms, post-norms, mixture of experts)."""

from __future__ import annotations

import pytest
import torch

import finesteer as fs
from finesteer.hooks import HookSet, count_hooks
from finesteer.interventions import Edit, Intervention, Scope, Zero
from finesteer.models import LoadedModel
from finesteer.sites import Site
from tests.conftest import ALL_FAMILIES


@pytest.fixture(params=ALL_FAMILIES)
def tiny(request: pytest.FixtureRequest, tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models[request.param]


def _encode(lm: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
    return lm.tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )


def _logits(
    lm: LoadedModel, texts: list[str], intervention: Intervention | None = None, **kw
) -> torch.Tensor:
    enc = _encode(lm, texts)
    position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        if intervention is None:
            return lm.model(**enc, position_ids=position_ids, **kw).logits
        with fs.intervene(lm, intervention):
            return lm.model(**enc, position_ids=position_ids, **kw).logits


def test_scale_zero_is_token_identical(tiny: LoadedModel, prompts: list[str]) -> None:
    vector = torch.randn(tiny.info.head_dim) * 100
    steer = fs.steer_head(1, 1, vector, scale=0.0) + fs.steer_residual(
        0, torch.randn(tiny.info.hidden_size), 0.0
    )
    base = fs.generate(tiny, prompts, max_new_tokens=12)
    assert fs.generate(tiny, prompts, max_new_tokens=12, intervention=steer) == base
    # and a non-zero scale really changes the output, so the no-op is not vacuous
    assert (
        fs.generate(
            tiny,
            prompts,
            max_new_tokens=12,
            intervention=steer.scaled(0.0) + fs.steer_head(1, 1, vector, 1.0),
        )
        != base
    )


def test_head_add_equals_wo_column_add(tiny: LoadedModel, prompts: list[str]) -> None:
    layer, head, d = 1, tiny.info.n_heads - 1, tiny.info.head_dim
    theta = torch.randn(d)
    o_proj = tiny.adapter.attn_part(tiny.model, layer, tiny.adapter.o_proj)
    via_wo = tiny.adapter.weight(o_proj)[:, head * d : (head + 1) * d].detach() @ theta
    a = _logits(tiny, prompts, fs.steer_head(layer, head, theta, scope="all"))
    b = _logits(tiny, prompts, Intervention((Edit(Site(layer, "attn_out"), fs.interventions.Add(via_wo)),)))
    base = _logits(tiny, prompts)
    assert not torch.allclose(a, base, atol=1e-3)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_uniform_attention_makes_rows_uniform_and_spares_other_heads(tiny: LoadedModel) -> None:
    text = ["uniform attention test"]
    layer, head = 1, 2
    with torch.no_grad():
        enc = _encode(tiny, text)
        base = tiny.model(**enc, output_attentions=True).attentions[layer][0]
        with fs.intervene(tiny, fs.ablate_head(layer, head, "uniform_attention", eps=1e-5)):
            ablated = tiny.model(**enc, output_attentions=True).attentions[layer][0]
    seq = ablated.shape[-1]
    expected = torch.tril(torch.ones(seq, seq)) / torch.arange(1, seq + 1)[:, None]
    torch.testing.assert_close(ablated[head], expected, atol=1e-4, rtol=0)
    others = [h for h in range(tiny.info.n_heads) if h != head]
    torch.testing.assert_close(ablated[others], base[others])
    assert not torch.allclose(base[head], expected, atol=1e-2)


def test_scale_output_zero_equals_zero_ablation(tiny: LoadedModel, prompts: list[str]) -> None:
    scaled = _logits(tiny, prompts, fs.ablate_head(2, 0, "scale_output", eps=0.0))
    zeroed = _logits(tiny, prompts, fs.ablate_head(2, 0, "zero"))
    torch.testing.assert_close(scaled, zeroed)
    assert not torch.allclose(zeroed, _logits(tiny, prompts), atol=1e-4)


def test_mean_ablation_sets_the_head_output(tiny: LoadedModel, prompts: list[str]) -> None:
    mean = torch.randn(tiny.info.head_dim)
    ablation = fs.ablate_head(1, 1, "mean", mean=mean)
    acts = fs.capture(tiny, prompts, ["blocks.1.attn.hook_z"], position="all", intervention=ablation)
    z = acts["blocks.1.attn.hook_z"]
    for row, length in enumerate(acts.lengths.tolist()):
        torch.testing.assert_close(z[row, :length, 1], mean.expand(length, -1))


def test_per_row_specs_equal_rows_run_alone(tiny: LoadedModel, prompts: list[str]) -> None:
    rows = [
        fs.ablate_head(0, 1, "uniform_attention"),
        fs.steer_head(1, 0, torch.randn(tiny.info.head_dim), 4.0, scope="all"),
        fs.ablate_head(2, 3, "zero") + fs.steer_residual(1, torch.randn(tiny.info.hidden_size), 2.0),
    ]
    batched = _logits(tiny, prompts, Intervention.per_row(rows))
    mask = _encode(tiny, prompts)["attention_mask"].bool()
    for i, (prompt, intervention) in enumerate(zip(prompts, rows, strict=True)):
        alone = _logits(tiny, [prompt], intervention)[0]
        torch.testing.assert_close(batched[i][mask[i]], alone, atol=1e-4, rtol=1e-4)


def test_batched_generation_equals_unbatched_under_last_scope(tiny: LoadedModel, prompts: list[str]) -> None:
    steer = fs.steer_head(1, 2, torch.randn(tiny.info.head_dim), 6.0, scope="last")
    batched = fs.generate(tiny, prompts, max_new_tokens=10, intervention=steer)
    alone = [fs.generate(tiny, [p], max_new_tokens=10, intervention=steer)[0] for p in prompts]
    assert batched == alone
    assert batched != fs.generate(tiny, prompts, max_new_tokens=10)


def test_no_hook_remains_after_exception(tiny: LoadedModel, prompts: list[str]) -> None:
    before = count_hooks(tiny.model)
    with pytest.raises(RuntimeError, match="boom"), fs.intervene(tiny, fs.ablate_head(0, 0, "zero")):
        assert count_hooks(tiny.model) > before
        raise RuntimeError("boom")
    assert count_hooks(tiny.model) == before
    # an error raised inside a hook during the forward pass also leaves nothing behind
    bad = Intervention((Edit(Site(0, "z", 0), Zero(), rows=(7,)),))
    with pytest.raises(ValueError, match="batch row 7"), fs.intervene(tiny, bad):
        _logits(tiny, prompts)
    assert count_hooks(tiny.model) == before


def test_last_scope_touches_last_prompt_token_then_each_generated_token(
    tiny: LoadedModel, prompts: list[str]
) -> None:
    """Record which (row, token index) the 'last' scope selects in every forward of a cached generation."""
    calls: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def record(act: torch.Tensor, ctx) -> None:
        calls.append((Scope("last").mask(ctx).clone(), ctx.index.clone(), ctx.past_len))

    new_tokens = 5
    hooks = HookSet(tiny.model, tiny.adapter)
    with hooks:
        hooks.add(Site(0, "z"), record)
        fs.generate(tiny, prompts, max_new_tokens=new_tokens)
    prompt_len = torch.tensor(
        [len(tiny.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    )
    assert len(calls) == new_tokens  # prefill + (new_tokens - 1) decode steps
    mask, index, past = calls[0]
    assert past == 0 and mask.sum(1).tolist() == [1] * len(prompts)
    assert index[mask].tolist() == (prompt_len - 1).tolist()  # the last prompt token of each row
    for step, (mask, index, _past) in enumerate(calls[1:], start=1):
        assert mask.shape[1] == 1 and mask.all()
        assert index[:, 0].tolist() == (prompt_len - 1 + step).tolist()


def test_prompt_generated_and_from_scopes(tiny: LoadedModel, prompts: list[str]) -> None:
    scopes = {
        "prompt": Scope("prompt"),
        "generated": Scope("generated"),
        "from": Scope.parse("from:3"),
        "from_end": Scope.parse("from_end:2"),
    }
    seen: dict[str, list[torch.Tensor]] = {kind: [] for kind in scopes}

    def record(act: torch.Tensor, ctx) -> None:
        for kind, scope in scopes.items():
            seen[kind].append(ctx.index[scope.mask(ctx)])

    hooks = HookSet(tiny.model, tiny.adapter)
    with hooks:
        hooks.add(Site(1, "resid_post"), record)
        fs.generate(tiny, prompts[:1], max_new_tokens=4)
    n = len(tiny.tokenizer(prompts[0], add_special_tokens=False)["input_ids"])
    assert torch.cat(seen["prompt"]).tolist() == list(range(n))
    assert torch.cat(seen["generated"]).tolist() == list(range(n, n + 3))
    assert torch.cat(seen["from"]).tolist() == list(range(3, n + 3))
    assert torch.cat(seen["from_end"]).tolist() == list(range(n - 2, n + 3))
    assert str(scopes["from_end"]) == "from_end:2" and Scope.parse("from_end:2") == scopes["from_end"]


def test_project_out_removes_direction(tiny: LoadedModel, prompts: list[str]) -> None:
    direction = torch.randn(tiny.info.hidden_size)
    acts = fs.capture(
        tiny, prompts, ["blocks.1.hook_resid_post"], intervention=fs.project_out(direction, [1])
    )
    projection = acts["blocks.1.hook_resid_post"] @ (direction / direction.norm())
    assert projection.abs().max() < 1e-4
