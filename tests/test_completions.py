"""Labelled completions: the model's own sampled A/B answers, user files, HSI directions from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finesteer.activations.directions import fit_head_directions
from finesteer.data.errors import DatasetError
from finesteer.data.items import ABItem
from finesteer.fit import completions as completions_module
from finesteer.fit.completions import (
    CompletionError,
    CompletionSet,
    SampledAnswer,
    load_labelled_completions,
    sample_labelled_completions,
)
from finesteer.fit.hsi import HSIConfig, fit_hsi
from finesteer.fit.hsi_directions import SAMPLED_FILE, direction_completions
from finesteer.generation import GenerationConfig
from finesteer.models import LoadedModel
from finesteer.scoring.ab import parse_ab_answer
from tests.test_hsi import ITEMS as HSI_ITEMS

ITEMS = HSI_ITEMS[:3]


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["tiny-llama"]


def _answers(labels: list[str | None]) -> CompletionSet:
    """Hand-made sampled answers: 'A'/'B' name an option, None names none."""
    rows = []
    for i, answer in enumerate(labels):
        text = f"Answer: ({answer}) because {i}" if answer else f"no idea {i}"
        rows.append(SampledAnswer(str(i), f"<user>q{i}</user>", text, answer or "undefined", "A", 0))
    return CompletionSet(tuple(rows), "</s>")


def test_completion_set_labels_stats_and_round_trip(tmp_path: Path) -> None:
    answers = _answers(["A", "B", None, "A"])
    labelled = answers.labelled()
    assert [label for _, _, label in labelled] == [True, False, True]  # the undefined reply is dropped
    assert labelled[0] == ("<user>q0</user>", "Answer: (A) because 0</s>", True)
    assert answers.stats() == {
        "n_sampled": 4,
        "n_defined": 3,
        "n_matching": 2,
        "n_not_matching": 1,
        "defined_rate": 0.75,
    }
    again = CompletionSet.load(answers.save(tmp_path / "a.jsonl"))
    assert again == answers
    (tmp_path / "bad.jsonl").write_text('{"item_id": "0"}\n')
    with pytest.raises(CompletionError, match="end_of_turn"):
        CompletionSet.load(tmp_path / "bad.jsonl")


def test_sampling_is_seeded_and_parsed_with_hsis_rule(llama: LoadedModel) -> None:
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0, seed=3, batch_size=2)
    first = sample_labelled_completions(llama, ITEMS, n_samples=2, config=config)
    again = sample_labelled_completions(llama, ITEMS, n_samples=2, config=config)
    assert first == again and len(first.answers) == 2 * len(ITEMS)
    assert [a.sample for a in first.answers] == [0, 0, 0, 1, 1, 1]
    assert all(a.answer == parse_ab_answer(a.response, ("A", "B")) for a in first.answers)
    assert [a.matching_letter for a in first.answers[:3]] == ["A", "B", "A"]
    assert first.end_of_turn == llama.tokenizer.eos_token
    with pytest.raises(CompletionError, match="n_samples"):
        sample_labelled_completions(llama, ITEMS, n_samples=0)


def test_load_labelled_completions_names_the_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "c.jsonl"
    good.write_text(
        json.dumps({"prompt": "p1", "completion": "(A) yes", "label": True})
        + "\n\n"
        + json.dumps({"prompt": "p2", "completion": "(B) no", "label": False})
        + "\n"
    )
    assert load_labelled_completions(good) == [("p1", "(A) yes", True), ("p2", "(B) no", False)]
    cases = {
        '{"prompt": "p", "completion": "c"}': "missing field",
        '{"prompt": "p", "completion": "c", "label": "yes"}': "label must be true or false",
        '{"prompt": "", "completion": "c", "label": true}': "non-empty strings",
        "[1, 2]": "expected an object",
        "{oops": "not valid JSON",
    }
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n" + line + "\n")
        with pytest.raises(DatasetError, match=message) as info:
            load_labelled_completions(bad)
        assert "bad.jsonl:2" in str(info.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_labelled_completions(tmp_path / "missing.jsonl")


def test_sampled_directions_equal_directions_from_the_same_completions(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canned = _answers(["A", "B", "A", None, "B"])
    calls: list[int] = []

    def fake_sampler(lm: LoadedModel, items: list[ABItem], **kwargs: object) -> CompletionSet:
        calls.append(len(items))
        return canned

    monkeypatch.setattr("finesteer.fit.hsi_directions.sample_labelled_completions", fake_sampler)
    labelled, stats = direction_completions(llama, ITEMS, "sampled", run_dir=tmp_path)
    assert labelled == canned.labelled() and stats is not None and stats["n_defined"] == 4
    assert (tmp_path / SAMPLED_FILE).is_file()
    direction_completions(llama, ITEMS, "sampled", run_dir=tmp_path)
    assert calls == [3], "a rerun with the same items and settings reuses the saved answers"
    given = [("p", "(A) sure", True), ("q", "(B) no", False)]
    both, _ = direction_completions(llama, ITEMS, "both", given, run_dir=tmp_path)
    assert both == given + canned.labelled()
    assert direction_completions(llama, ITEMS, "ab", given) == (given, None)

    config = HSIConfig(k=1, alphas=(4.0,), n_sweep=2, directions_from="sampled")
    fitted = fit_hsi(llama, ITEMS * 2, ITEMS[:2], config, run_dir=tmp_path / "fit", progress=False)
    expected = fit_head_directions(llama, completions=canned.labelled())
    head = tuple(fitted.metadata["heads"][0])
    op = fitted.intervention.edits[0].op
    assert torch.allclose(op.vector, expected.directions[head], atol=1e-6)  # type: ignore[attr-defined]
    assert op.scale == pytest.approx(4.0 * float(expected.sigma[head]))  # type: ignore[attr-defined]
    assert fitted.metadata["directions_from"] == "sampled" and fitted.metadata["n_completions"] == 4


def test_sampled_directions_need_both_classes(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "finesteer.fit.hsi_directions.sample_labelled_completions",
        lambda lm, items, **kw: _answers(["A", None, "A"]),
    )
    with pytest.raises(CompletionError, match="2 behaviour-matching and 0 not-matching"):
        direction_completions(llama, ITEMS, "sampled")
    with pytest.raises(CompletionError, match="needs labelled completions"):
        direction_completions(llama, ITEMS, "given")
    with pytest.raises(ValueError, match="directions_from must be one of"):
        direction_completions(llama, ITEMS, "letters")  # type: ignore[arg-type]
    assert completions_module.end_of_turn_marker(object()) == ""


def test_cli_fit_hsi_reads_directions_from_a_completions_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from finesteer.cli import app

    rows = [("(A) sure, happily", True), ("(B) no, never", False), ("(A) yes", True), ("(B) I refuse", False)]
    file = tmp_path / "completions.jsonl"
    lines = [
        json.dumps({"prompt": f"<q>{i}</q>", "completion": c, "label": y}) for i, (c, y) in enumerate(rows)
    ]
    file.write_text("\n".join(lines) + "\n")
    args = ["fit", "hsi", "tiny-llama", "--limit", "6", "--n-sweep", "2", "--n-val", "2", "--k", "1"]
    out = tmp_path / "art"
    result = CliRunner().invoke(
        app,
        [*args, "--alphas", "2", "--heads", "0.1", "--directions-from", "given", "--completions", str(file),
         "--out", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["heads"] == [[0, 1]]
    from finesteer.artifacts import load_intervention

    meta = load_intervention(out).metadata
    assert meta["directions_from"] == "given" and meta["n_completions"] == 4
    check = payload["final_check"]  # the CLI answers the validation items by generating, by default
    assert check["max_new_tokens"] == 32 and check["n"] == 4  # 2 validation items in both orders
    assert {"matching_rate", "n_undefined"} <= set(check["unmodified"]) and 0 <= check["steered"][
        "n_undefined"
    ] <= 4
    file.write_text('{"prompt": "p", "completion": "c", "label": 1}\n')
    bad = CliRunner().invoke(
        app, [*args, "--directions-from", "given", "--completions", str(file), "--out", str(out)]
    )
    assert bad.exit_code == 2 and "label must be true or false" in bad.output


def test_final_check_of_a_zero_edit_equals_the_unmodified_model(llama: LoadedModel) -> None:
    from finesteer.evaluate.ab import generation_check

    zero = fit_head_directions(llama, ITEMS).intervention([(0, 1), (1, 2)], 0.0)
    check = generation_check(llama, ITEMS, zero, max_new_tokens=8, batch_size=2)
    assert check["steered"] == check["unmodified"] and check["n"] == 3


def test_cli_locate_hsi_sweeps_resumes_and_takes_completions(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from finesteer.cli import app

    out = tmp_path / "sweep"
    args = ["locate", "hsi", "tiny-llama", "--limit", "6", "--n-sweep", "2", "--alphas", "2,4"]
    args += ["--heads", "0.1,1.2", "--out", str(out), "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    payload = json.loads(first.stdout.strip().splitlines()[-1])
    assert payload["directions_from"] == "ab" and payload["n_completions"] == 0 and payload["sampled"] is None
    assert (out / "head_scores").exists() and payload["resumed_layers"] == []
    again = json.loads(CliRunner().invoke(app, args).stdout.strip().splitlines()[-1])
    assert again["resumed_layers"] == [0, 1]  # same directions and items: both swept layers reused
    file = tmp_path / "c.jsonl"
    lines = [
        {"prompt": "<q>1</q>", "completion": "(A) yes", "label": True},
        {"prompt": "<q>2</q>", "completion": "(B) no", "label": False},
    ]
    file.write_text("".join(json.dumps(row) + "\n" for row in lines))
    with_file = [*args, "--directions-from", "given", "--completions", str(file)]
    refused = CliRunner().invoke(app, with_file)  # same folder, other directions: refused, not mixed
    assert refused.exit_code == 2 and "another configuration" in refused.output
    other = [
        *with_file[: with_file.index("--out") + 1],
        str(tmp_path / "given"),
        *with_file[with_file.index("--out") + 2 :],
    ]
    given = CliRunner().invoke(app, other)
    assert given.exit_code == 0, given.output
    result = json.loads(given.stdout.strip().splitlines()[-1])
    assert result["n_completions"] == 2 and result["directions_from"] == "given"
