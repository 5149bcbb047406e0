"""Hooks cannot outlive their owner (issue 15): abandoned contexts and generators leave nothing behind.

CPython clears every weak reference that is itself part of a garbage cycle before it runs the cycle's
finalizers, so a torch `RemovableHandle` (which only holds weak references to the hook dicts) found in
the same cycle as the generator that owns it can no longer remove anything. These tests build exactly
that situation and check that 0 hooks remain and the model's logits are unsteered afterwards.
"""

from __future__ import annotations

import gc

import pytest
import torch

import finesteer as fs
from finesteer.generation import GenerationConfig, generate_batches
from finesteer.hooks import HookSet, count_hooks, live_hook_sets, remove_all_hooks
from finesteer.models import LoadedModel, load_model
from finesteer.sites import Site


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model("tiny-llama")


PROMPTS = ["hello there", "a longer prompt, padded less", "hi"]


def _steer(lm: LoadedModel) -> fs.Intervention:
    generator = torch.Generator().manual_seed(1)
    return fs.steer_head(1, 1, torch.randn(lm.info.head_dim, generator=generator) * 50, 4.0, scope="all")


def _logits(lm: LoadedModel) -> torch.Tensor:
    enc = lm.tokenizer(
        PROMPTS, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    with torch.no_grad():
        return lm.model(**enc).logits


def _consume_and_fail(lm: LoadedModel) -> BaseException:
    """Consume `generate_batches` and keep the exception raised meanwhile: the natural way to abandon
    a generator inside a reference cycle (frame -> exception -> traceback -> frame -> generator)."""
    batches = generate_batches(
        lm, PROMPTS, GenerationConfig(max_new_tokens=3, batch_size=2), intervention=_steer(lm)
    )
    try:
        for _batch in batches:
            raise RuntimeError("caller failed while consuming")
    except RuntimeError as exc:
        error = exc  # the frame now holds its own exception: frame -> exception -> traceback -> frame
    return error


def test_generator_abandoned_in_reference_cycle_leaves_no_hook(lm: LoadedModel) -> None:
    base_hooks, base_logits = count_hooks(lm.model), _logits(lm)
    kept = _consume_and_fail(lm)
    del kept
    gc.collect()
    assert count_hooks(lm.model) == base_hooks == 0
    assert torch.equal(_logits(lm), base_logits)
    assert live_hook_sets(lm.model) == []


def test_intervene_abandoned_in_reference_cycle_leaves_no_hook(lm: LoadedModel) -> None:
    """An entered `intervene()` whose owner becomes cyclic garbage: its finalizer must still remove."""
    base_logits = _logits(lm)

    class Owner:
        pass

    owner = Owner()
    owner.self = owner  # type: ignore[attr-defined]
    owner.context = fs.intervene(lm, _steer(lm))  # type: ignore[attr-defined]
    owner.context.__enter__()  # type: ignore[attr-defined]
    assert count_hooks(lm.model) > 0
    assert not torch.equal(_logits(lm), base_logits)
    del owner
    gc.collect()
    assert count_hooks(lm.model) == 0
    assert torch.equal(_logits(lm), base_logits)


def test_hookset_abandoned_in_reference_cycle_leaves_no_hook(lm: LoadedModel) -> None:
    def record(act: torch.Tensor, ctx: object) -> None:
        return None

    def owner_generator():
        with HookSet(lm.model, lm.adapter) as hooks:
            hooks.add(Site(0, "z"), record)
            yield hooks

    gen = owner_generator()
    next(gen)
    cycle: list[object] = [gen]
    cycle.append(cycle)
    assert count_hooks(lm.model) > 0
    del gen, cycle
    gc.collect()
    assert count_hooks(lm.model) == 0


def test_paused_generator_does_not_steer_other_callers(lm: LoadedModel) -> None:
    base_logits = _logits(lm)
    config = GenerationConfig(max_new_tokens=4, batch_size=1)
    unsteered = fs.generate(lm, PROMPTS, config)
    steer = _steer(lm)
    steered = fs.generate(lm, PROMPTS, config, intervention=steer)
    assert steered != unsteered  # the steering is not vacuous

    batches = generate_batches(lm, PROMPTS, config, intervention=steer)
    first = next(batches)  # paused after its first batch
    assert count_hooks(lm.model) == 0
    assert torch.equal(_logits(lm), base_logits)
    assert fs.generate(lm, PROMPTS, config) == unsteered  # another caller, while it is paused
    rest = [text for batch in batches for text in batch]
    assert [*first, *rest] == steered  # and it still steers its own forward calls
    assert count_hooks(lm.model) == 0


def test_interleaved_steered_generators_keep_their_own_edits(lm: LoadedModel) -> None:
    config = GenerationConfig(max_new_tokens=4, batch_size=1)
    a, b = _steer(lm), fs.steer_residual(0, torch.ones(lm.info.hidden_size) * 3.0)
    alone_a = fs.generate(lm, PROMPTS, config, intervention=a)
    alone_b = fs.generate(lm, PROMPTS, config, intervention=b)
    gen_a = generate_batches(lm, PROMPTS, config, intervention=a)
    gen_b = generate_batches(lm, PROMPTS, config, intervention=b)
    out_a: list[str] = []
    out_b: list[str] = []
    for batch_a, batch_b in zip(gen_a, gen_b, strict=True):
        out_a += batch_a
        out_b += batch_b
    assert out_a == alone_a and out_b == alone_b


def test_live_hook_sets_and_remove_all(lm: LoadedModel) -> None:
    hooks = HookSet(lm.model, lm.adapter)
    hooks.add(Site(0, "resid_post"), lambda act, ctx: act * 2)
    assert live_hook_sets(lm.model) == [hooks]
    assert count_hooks(lm.model) > 0
    assert remove_all_hooks(lm.model) == 1
    assert count_hooks(lm.model) == 0 and live_hook_sets(lm.model) == []
    hooks.remove()  # removing twice is harmless
    assert count_hooks(lm.model) == 0
