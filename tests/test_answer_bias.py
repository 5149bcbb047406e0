"""`answer_bias` on hand-made A/B records: a pure "Yes" preference is flagged on the "No" rows, a gain
on every polarity is not, small groups are not tested, and the flag reaches the verdict, the table
and the report of a comparison."""

from __future__ import annotations

from typing import Any

from finesteer.evaluate.ab import ABResult
from finesteer.evaluate.ab_paired import ab_effect_vs
from finesteer.evaluate.answer_bias import ANSWER_BIAS, MIN_GROUP_ROWS, answer_bias
from finesteer.evaluate.compare_effects import add_effects
from finesteer.evaluate.compare_result import ComparisonResult, table_row
from finesteer.evaluate.effect_verdict import RELIABLE_EFFECT


def _result(matching: dict[str, list[bool]]) -> ABResult:
    """Records in both option orders: question q of a polarity and its mirror q~swap."""
    records: list[dict[str, Any]] = []
    for polarity, answers in matching.items():
        for i, is_matching in enumerate(answers):
            qid = f"{polarity}{i // 2}" + ("~swap" if i % 2 else "")
            records.append(
                {
                    "id": qid,
                    "is_matching": is_matching,
                    "p_matching": 0.9 if is_matching else 0.1,
                    "matching_polarity": polarity,
                }
            )
    n = len(records)
    count = sum(r["is_matching"] for r in records)
    return ABResult(n, count / n, count, sum(r["p_matching"] for r in records) / n, records)


BEFORE = {"yes": [False] * 30 + [True] * 10, "no": [True] * 8 + [False] * 4, "other": [True, False] * 2}
YES_BIAS = {"yes": [True] * 40, "no": [False] * 12, "other": [True, False] * 2}
EVERYWHERE = {"yes": [True] * 40, "no": [True] * 12, "other": [True] * 4}


def test_a_yes_preference_is_flagged_on_the_no_rows() -> None:
    bias = answer_bias(ab_effect_vs(_result(BEFORE), _result(YES_BIAS)))
    assert [g["group"] for g in bias["wrong_way"]] == ["no"]
    wrong = bias["wrong_way"][0]
    assert (wrong["n"], round(wrong["before"], 2), wrong["after"]) == (12, 0.67, 0.0)
    assert wrong["high"] < 0 and wrong["difference"] < 0
    assert bias["caveat"].startswith(ANSWER_BIAS) and "'no' rows (n=12)" in bias["caveat"]


def test_a_gain_on_every_polarity_is_not_flagged() -> None:
    bias = answer_bias(ab_effect_vs(_result(BEFORE), _result(EVERYWHERE)))
    assert bias["wrong_way"] == [] and bias["caveat"] is None
    assert set(bias["tested"]) == {"yes", "no"}


def test_groups_smaller_than_the_minimum_are_not_tested() -> None:
    bias = answer_bias(ab_effect_vs(_result(BEFORE), _result(YES_BIAS)))
    assert bias["not_tested"] == ["other"] and MIN_GROUP_ROWS > 4
    lowered = answer_bias(ab_effect_vs(_result(BEFORE), _result(YES_BIAS)), min_rows=13)
    assert lowered["wrong_way"] == [] and "no" in lowered["not_tested"]


def test_no_change_is_not_flagged() -> None:
    assert answer_bias(ab_effect_vs(_result(BEFORE), _result(BEFORE)))["caveat"] is None


def _row(result: ABResult) -> dict[str, Any]:
    return {"ab_per_item": result.per_item, "ab_matching_rate": result.matching_rate}


def test_a_comparison_marks_the_biased_reliable_effect_only() -> None:
    methods = {
        "baseline": _row(_result(BEFORE)),
        "biased": _row(_result(YES_BIAS)),
        "everywhere": _row(_result(EVERYWHERE)),
    }
    add_effects(methods)
    biased, clean = methods["biased"]["verdict"], methods["everywhere"]["verdict"]
    assert biased["verdict"] == RELIABLE_EFFECT and clean["verdict"] == RELIABLE_EFFECT
    assert len(biased["caveats"]) == 1 and clean["caveats"] == []
    assert table_row("biased", methods["biased"])[6] == f"{RELIABLE_EFFECT} ⚠ {ANSWER_BIAS}"
    assert table_row("everywhere", methods["everywhere"])[6] == RELIABLE_EFFECT
    comparison = ComparisonResult(methods, "none", {"n_ab": 56, "settings": {"controls": 0}})
    assert [name for name, _ in comparison.caveats()] == ["biased"]
    assert "⚠ biased: answer bias" in str(comparison.table().caption)
