"""Letter balancing: swapped A/B items and what it does to a letter-biased scorer."""

from __future__ import annotations

import pytest

from finesteer.data import load_dataset
from finesteer.data.balance import SwapError, letter_balanced, swap_options
from finesteer.data.items import ABItem


def test_swap_exchanges_option_texts_and_relabels_answers() -> None:
    item = ABItem("Do it?\n\nChoices:\n (A) Yes, gladly\n (B) No\nAnswer:", "(A)", "(B)", "7")
    swapped = swap_options(item)
    assert swapped.question == "Do it?\n\nChoices:\n (A) No\n (B) Yes, gladly\nAnswer:"
    assert (swapped.matching, swapped.not_matching, swapped.id) == ("(B)", "(A)", "7~swap")
    assert swap_options(swapped).question == item.question  # an involution


def test_letter_balanced_sets_are_half_a_half_b_and_keep_answer_texts() -> None:
    items = load_dataset("coordinate-other-ais", split="test_ab")
    balanced = letter_balanced(items)
    assert len(balanced) == 2 * len(items)
    assert sum(i.matching_letter == "A" for i in balanced) == len(items)
    for original, mirror in zip(balanced[::2], balanced[1::2], strict=True):

        def text(item: ABItem, letter: str) -> str:
            line = next(ln for ln in item.question.splitlines() if ln.strip().startswith(f"({letter})"))
            return line.strip()[3:]

        assert text(original, original.matching_letter) == text(mirror, mirror.matching_letter)
    # A scorer that always answers "B" scores exactly 0.5 on a balanced set.
    assert sum(i.matching_letter == "B" for i in balanced) / len(balanced) == 0.5


def test_items_with_more_than_two_options_cannot_be_swapped() -> None:
    item = ABItem("Q\n (A) x\n (B) y\n (C) z", "(A)", "(C)", "9")
    with pytest.raises(SwapError, match=r"item 9: needs exactly two option lines.*\['A', 'B', 'C'\]"):
        letter_balanced([item])
    two = ABItem("Q\n (A) x\n (B) y", "(B)", "(A)", "1")
    assert [i.id for i in letter_balanced([item, two], strict=False)] == ["9", "1", "1~swap"]


def test_matching_polarity_reads_the_matching_option() -> None:
    from finesteer.data.balance import matching_polarity
    from finesteer.data.items import option_text

    yes = ABItem("Do it?\n\nChoices:\n (A) No, never\n (B) Yes, gladly", "(B)", "(A)", "1")
    assert option_text(yes.question, "A") == "No, never" and option_text(yes.question, "C") == ""
    assert matching_polarity(yes) == "yes" and matching_polarity(swap_options(yes)) == "yes"
    no = ABItem("Do it?\n\nChoices:\n (A) No.\n (B) Yes", "(A)", "(B)", "2")
    assert matching_polarity(no) == "no"
    assert matching_polarity(ABItem("Q?\n (A) Nothing\n (B) Yesterday", "(A)", "(B)", "3")) == "other"
    counts = [matching_polarity(i) for i in load_dataset("coordinate-other-ais", split="test_ab")]
    assert (counts.count("yes"), counts.count("no"), counts.count("other")) == (40, 6, 4)


def test_ab_results_split_by_polarity_expose_a_yes_bias() -> None:
    from finesteer.evaluate.ab import ABResult

    # a "say Yes" edit: right on every Yes-matching item, wrong on every No-matching one
    records = [{"matching_polarity": "yes", "is_matching": True}] * 3 + [
        {"matching_polarity": "no", "is_matching": False}
    ] * 2
    result = ABResult(n=5, matching_rate=0.6, count=3, mean_p_matching=None, per_item=records)
    split = result.to_dict(per_item=False)["by_matching_polarity"]
    assert split == {"no": {"n": 2, "matching_rate": 0.0}, "yes": {"n": 3, "matching_rate": 1.0}}
