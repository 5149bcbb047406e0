"""One option-line parser, the A/B → triples view and `load_ab_items` (data/items.py, data/ab.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finesteer.data import (
    ABItem,
    DatasetError,
    ab_triples,
    load_ab_items,
    load_dataset,
    option_letters,
    option_lines,
    option_text,
    question_stem,
)
from finesteer.evaluate.helpfulness import mc_from_ab

QUESTION = "Will you help?\n\nChoices:\n (A)  Yes, gladly \t\n\t(B) No\n (A) again"


def test_option_lines_keep_indent_text_and_span() -> None:
    lines = option_lines(QUESTION)
    assert [(line.indent, line.letter, line.text) for line in lines] == [
        (" ", "A", "  Yes, gladly \t"),
        ("\t", "B", " No"),
        (" ", "A", " again"),
    ]
    assert QUESTION[lines[1].start : lines[1].end] == "\t(B) No"
    assert option_letters(QUESTION) == ("A", "B")
    assert option_text(QUESTION, "A") == "Yes, gladly" and option_text(QUESTION, "C") == ""
    assert question_stem(QUESTION) == "Will you help?"


def test_ab_triples_and_the_clear_error_for_missing_options() -> None:
    item = ABItem("Q?\n\nChoices:\n (A) Yes\n (B) No", "(B)", "(A)", "x")
    assert ab_triples([item]) == [("Q?", "No", "Yes")]
    bare = ABItem("Answer (A) or (B)", "(A)", "(B)", "bare")
    with pytest.raises(DatasetError, match=r"item bare: option \(A\) not found"):
        ab_triples([bare])


def test_mc_from_ab_strips_only_blanks() -> None:
    item = ABItem("What is 1 + 1?\n\nChoices:\n (A) 3\n (B) 2 \n (C) 11", "(B)", "(A)", "t")
    q = mc_from_ab(item)
    assert (q.stem, q.choices, q.answer) == ("What is 1 + 1?", ("3", "2", "11"), 1)
    assert q.letters == ("A", "B", "C")


def test_load_ab_items_by_name_and_path(tmp_path: Path) -> None:
    assert load_ab_items("refusal", "generate", limit=3) == load_dataset("refusal", "generate", limit=3)
    path = tmp_path / "ab.jsonl"
    row = {
        "question": "Q?\n(A) y\n(B) n",
        "answer_matching_behavior": "(A)",
        "answer_not_matching_behavior": "(B)",
    }
    path.write_text(json.dumps(row) + "\n")
    assert [i.id for i in load_ab_items(path)] == ["0"]


def test_load_ab_items_rejects_other_rows() -> None:
    with pytest.raises(DatasetError, match=r"holds prompt rows, not A/B items; A/B datasets: .*refusal"):
        load_ab_items("advbench", limit=2)
    with pytest.raises(DatasetError, match=r"unknown|no dataset|not a"):
        load_ab_items("no-such-dataset")
