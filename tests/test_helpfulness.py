"""Helpfulness: MC log-likelihood accuracy, perplexity and next-token KL against hand computations."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from finesteer.data import ABItem, chat_prompt, dataset_info, load_dataset
from finesteer.evaluate.errors import EvaluationError
from finesteer.evaluate.helpfulness import (
    MCQuestion,
    mc_accuracy,
    mc_from_ab,
    next_token_kl,
    perplexity,
)
from finesteer.interventions import Intervention, steer_residual
from finesteer.models import LoadedModel, load_model

QUESTIONS = (
    MCQuestion("What is 2 + 2?", ("4", "five", "22"), 0, "m0"),
    MCQuestion("Sky colour?", ("blue", "green"), 1, "m1"),
    MCQuestion("Pick a letter", ("a", "bb", "ccc", "d"), 3, "m2"),
)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model("tiny-llama")


def manual_logprob(lm: LoadedModel, prompt: str, completion: str) -> float:
    p = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = lm.tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(p) - 1 + j, tok] for j, tok in enumerate(c)))


def test_mc_accuracy_matches_manual_log_likelihood(lm: LoadedModel) -> None:
    result = mc_accuracy(lm, QUESTIONS, batch_size=3)  # option rows of several questions share batches
    correct = 0
    for q, record in zip(QUESTIONS, result.per_item, strict=True):
        prompt = chat_prompt(lm.tokenizer, q.stem)
        expected = [manual_logprob(lm, prompt, c) for c in q.choices]
        assert record["logprob_sum"] == pytest.approx(expected, abs=1e-4)
        pick = max(range(len(expected)), key=lambda j: expected[j])
        assert record["choice"] == pick and record["correct"] == (pick == q.answer)
        lengths = [len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in q.choices]
        means = [s / n for s, n in zip(expected, lengths, strict=True)]
        assert record["logprob_mean"] == pytest.approx(means, abs=1e-4)
        correct += pick == q.answer
    assert result.count == correct and result.accuracy == pytest.approx(correct / 3)


def test_mc_accuracy_follows_the_model(lm: LoadedModel) -> None:
    """A question whose 'correct' option is defined as the model's favourite scores 1, its rival 0."""
    base = mc_accuracy(lm, QUESTIONS[:1])
    favourite = base.per_item[0]["choice"]
    rigged = MCQuestion(QUESTIONS[0].stem, QUESTIONS[0].choices, favourite, "fav")
    other = MCQuestion(QUESTIONS[0].stem, QUESTIONS[0].choices, (favourite + 1) % 3, "other")
    assert mc_accuracy(lm, [rigged, other]).count == 1
    assert mc_accuracy(lm, [rigged]).accuracy == 1.0


def test_mc_from_ab_and_catalog_entry() -> None:
    q = mc_from_ab(ABItem("What is 1 + 1?\n\nChoices:\n (A) 3\n (B) 2 \n (C) 11", "(B)", "(A)", "t"))
    assert (q.stem, q.choices, q.answer, q.letters) == (
        "What is 1 + 1?",
        ("3", "2", "11"),
        1,
        ("A", "B", "C"),
    )
    items = load_dataset("finesteer-mc")
    assert len(items) == 40 == dataset_info("finesteer-mc").rows["test"]
    assert len({i.id for i in items}) == 40
    assert all(isinstance(i, ABItem) and i.options == ("A", "B", "C", "D") for i in items)
    assert Counter(i.matching_letter for i in items) == {"A": 10, "B": 10, "C": 10, "D": 10}
    parsed = [mc_from_ab(i) for i in items]
    assert all(len(set(p.choices)) == 4 and "Choices" not in p.stem for p in parsed)
    assert parsed[0].choices[parsed[0].answer] == "Paris"
    assert not dataset_info("finesteer-mc").non_commercial


def test_perplexity_matches_hf_loss(lm: LoadedModel) -> None:
    texts = ["the cat sat on the mat", "hello world, again and again", "x"]
    result = perplexity(lm, texts, batch_size=2)
    total, count = 0.0, 0
    for text in texts[:2]:
        ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            loss = float(lm.model(input_ids=ids, labels=ids).loss)  # mean NLL over len-1 tokens
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert (result.n_texts, result.n_skipped, result.n_tokens) == (2, 1, count)
    assert result.mean_nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    with pytest.raises(EvaluationError, match="no texts"):
        perplexity(lm, [])


def test_next_token_kl_zero_without_and_positive_with_intervention(lm: LoadedModel) -> None:
    prompts = [chat_prompt(lm.tokenizer, t) for t in ("hi", "tell me a story", "what is 2+2?")]
    none = next_token_kl(lm, prompts, None, batch_size=2)
    assert none.per_prompt == [0.0, 0.0, 0.0] and none.max == 0.0
    identity = next_token_kl(lm, prompts, steer_residual(1, torch.ones(lm.info.hidden_size), 0.0))
    assert identity.max == 0.0
    steer = steer_residual(1, torch.randn(lm.info.hidden_size), 4.0)
    result = next_token_kl(lm, prompts, steer, batch_size=2)
    assert result.n == 3 and all(v > 0 for v in result.per_prompt)
    assert result.max == max(result.per_prompt) and result.mean == pytest.approx(sum(result.per_prompt) / 3)
    # hand computation for the first prompt
    ids = torch.tensor([lm.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]])
    from finesteer.interventions import intervene

    with torch.no_grad():
        p = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
        with intervene(lm, steer):
            q = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
    assert result.per_prompt[0] == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-4)
    with pytest.raises(EvaluationError, match="per-row"):
        next_token_kl(lm, prompts, Intervention.per_row([steer]))


def test_cli_helpfulness_json() -> None:
    from finesteer.cli import app

    result = CliRunner().invoke(app, ["eval", "helpfulness", "tiny-qwen2", "--limit", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["n"] == 3 and payload["n_texts"] == 3
    assert 0 <= payload["mc_accuracy"] <= 1 and payload["perplexity"] > 1
    assert payload["kl_mean"] == 0.0 and payload["intervened"] is None
