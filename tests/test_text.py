"""Text metrics: word tokenizer, fluency (n-gram entropy) and repetition detection."""

from __future__ import annotations

import math

import pytest

from finesteer.evaluate.text import (
    fluency,
    is_repetitive,
    longest_tandem_repeat,
    ngram_entropy,
    word_tokenize,
)


def _h(*probs: float) -> float:
    return -sum(p * math.log2(p) for p in probs)


# --- fluency ----------------------------------------------------------------------------------------


def test_word_tokenize_treebank_like() -> None:
    assert word_tokenize("I can’t do it, don't ask!") == [
        "I",
        "ca",
        "n't",
        "do",
        "it",
        ",",
        "do",
        "n't",
        "ask",
        "!",
    ]
    assert word_tokenize("It's 3.14 and well-known...") == ["It", "'s", "3.14", "and", "well-known", "..."]


def test_ngram_entropy_hand_computed() -> None:
    # "a b a b": bigrams (a,b)x2 (b,a)x1 -> H2 = H(2/3, 1/3); trigrams (a,b,a),(b,a,b) -> H3 = 1.
    expected = (2 / 3 * _h(2 / 3, 1 / 3) + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected, rel=1e-12)
    assert ngram_entropy("a b a b") == pytest.approx(0.9727652780, abs=1e-9)
    # 6 distinct-context tokens: 5 distinct bigrams, 4 distinct trigrams.
    assert ngram_entropy("the cat sat on the mat") == pytest.approx(
        (2 / 3 * math.log2(5) + 4 / 3 * 2.0) / 2, rel=1e-12
    )
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("hello") == 0.0  # fewer tokens than n: 0, as in EasyEdit


def test_fluency_orders_repetitive_below_varied() -> None:
    repetitive = "the the the the the the the the the the the the"
    varied = "Steering vectors change model behaviour by adding a direction to the residual stream."
    assert ngram_entropy(repetitive) == 0.0
    assert ngram_entropy(varied) > 3.0 > ngram_entropy(repetitive)
    assert fluency([repetitive, varied]) == pytest.approx(
        (ngram_entropy(repetitive) + ngram_entropy(varied)) / 2
    )
    assert fluency(varied) == ngram_entropy(varied)
    assert math.isnan(fluency([]))


def test_ngram_entropy_custom_tokenizer() -> None:
    class CharTok:
        def tokenize(self, text: str) -> list[str]:
            return list(text)

    # "abab" as characters = "a b a b" as words
    assert ngram_entropy("abab", CharTok()) == pytest.approx(ngram_entropy("a b a b"))
    assert ngram_entropy("abab", list) == pytest.approx(ngram_entropy("a b a b"))
    with pytest.raises(ValueError):
        ngram_entropy("a b", ns=(2,), weights=(1.0, 2.0))


# --- repetition -------------------------------------------------------------------------------------


def test_longest_tandem_repeat() -> None:
    rep = longest_tandem_repeat(["x", "a", "b", "c", "a", "b", "c", "a", "b", "c", "y"])
    assert rep is not None and (rep.start, rep.unit, rep.copies, rep.covered) == (1, 3, 3, 9)
    assert longest_tandem_repeat(["a", "b", "c", "d"]) is None
    rep = longest_tandem_repeat(["z"] * 7)
    assert rep is not None and (rep.unit, rep.copies) == (1, 7)


def test_is_repetitive_rule() -> None:
    assert is_repetitive("I will help you. " * 10) is not None
    assert is_repetitive("!" * 40) is not None
    assert is_repetitive("Sure, here is how: first mix the flour, then add water and stir.") is None
    # a loop shorter than min_run_tokens does not count
    assert is_repetitive("no no no") is None
    # real content followed by a short loop: coverage below 50% -> not repetitive
    content = " ".join(f"word{i}" for i in range(40))
    assert is_repetitive(content + " ok ok ok ok ok ok ok ok ok ok ok ok") is None
    assert is_repetitive(content + " ok" * 60) is not None
