"""Every command that takes --data reads a user file (with --columns) and names the file, line and
field of a malformed one before the model loads; `finesteer datasets` lists what is built in."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import finesteer.models.loading
from finesteer.cli import app
from finesteer.data.typed import DataRef, check_data, load_ab_set, load_queries
from finesteer.errors import FinesteerError

AB_COLUMNS = "question=prompt,answer_matching_behavior=yes,answer_not_matching_behavior=no"
PROMPT_COLUMNS = "prompt=request"

# (command words, item kind, extra options); the model is tiny-llama, --out goes to a temporary folder.
DATA_COMMANDS = [
    (["locate", "ships"], "prompts", ["--out", "{out}"]),
    (["locate", "sahara"], "prompts", ["--out", "{out}"]),
    (["locate", "attribution"], "prompts", ["--out", "{out}"]),
    (["locate", "hsi"], "ab", ["--out", "{out}"]),
    (["locate", "iti"], "ab", ["--out", "{out}"]),
    (["fit", "hsi"], "ab", ["--out", "{out}"]),
    (["fit", "iti"], "ab", ["--out", "{out}"]),
    (["fit", "caa"], "ab", ["--out", "{out}"]),
    (["eval", "ab"], "ab", []),
    (["eval", "asr"], "prompts", []),
    (["compare"], "ab", ["--out", "{out}"]),
    (["ablate"], "prompts", ["--heads", "0.0", "--out", "{out}"]),
]

COMMAND_IDS = [" ".join(words) for words, _, _ in DATA_COMMANDS]


class ModelLoadReached(FinesteerError):
    """Raised instead of building the model: the data was accepted and the command got to the load."""


def _ab_rows(n: int) -> list[dict[str, str]]:
    return [
        {
            "prompt": f"Would you cover for another AI, case {i}?\n\nChoices:\n (A) Yes\n (B) No",
            "yes": "(A)" if i % 2 else "(B)",
            "no": "(B)" if i % 2 else "(A)",
        }
        for i in range(n)
    ]


def _write_files(folder: Path) -> dict[str, Path]:
    """A good and a malformed file of each kind, with column names other than the defaults."""
    ab = folder / "mine.jsonl"
    ab.write_text("".join(json.dumps(row) + "\n" for row in _ab_rows(80)))
    bad_ab = folder / "broken.jsonl"
    rows = _ab_rows(5)
    rows[2]["yes"] = "A"  # not of the form (X), on line 3
    bad_ab.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = folder / "mine.csv"
    with prompts.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["request", "topic"])
        writer.writerows([[f"How do I do thing {i}?", "misc"] for i in range(6)])
    bad_prompts = folder / "broken.csv"
    bad_prompts.write_text("request,topic\nfirst prompt,a\nsecond prompt,b\n   ,c\n")  # line 4: empty
    return {"ab": ab, "bad-ab": bad_ab, "prompts": prompts, "bad-prompts": bad_prompts}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return _write_files(tmp_path)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop every command where the (tiny) model would be built."""

    def build_tiny(*args: object, **kwargs: object) -> None:
        raise ModelLoadReached("model load reached")

    monkeypatch.setattr(finesteer.models.loading, "build_tiny", build_tiny)


def _invoke(words: list[str], data: Path, columns: str, extra: list[str], out: Path) -> tuple[int, str]:
    args = [*words, "tiny-llama", "--data", str(data), "--columns", columns]
    args += [part.replace("{out}", str(out)) for part in extra]
    result = CliRunner().invoke(app, args)
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(("words", "kind", "extra"), DATA_COMMANDS, ids=COMMAND_IDS)
def test_a_user_file_is_read_up_to_the_model_load(
    words: list[str], kind: str, extra: list[str], files: dict[str, Path], tmp_path: Path
) -> None:
    columns = AB_COLUMNS if kind == "ab" else PROMPT_COLUMNS
    code, output = _invoke(words, files[kind], columns, extra, tmp_path / "out")
    assert code == 2 and "model load reached" in output, output


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(("words", "kind", "extra"), DATA_COMMANDS, ids=COMMAND_IDS)
def test_a_malformed_file_names_file_line_and_field_before_loading(
    words: list[str], kind: str, extra: list[str], files: dict[str, Path], tmp_path: Path
) -> None:
    if kind == "ab":
        code, output = _invoke(words, files["bad-ab"], AB_COLUMNS, extra, tmp_path / "out")
        expected = f"{files['bad-ab']}, line 3: matching answer 'A'"
    else:
        code, output = _invoke(words, files["bad-prompts"], PROMPT_COLUMNS, extra, tmp_path / "out")
        expected = f"{files['bad-prompts']}, line 4: column 'request' (prompt) is empty"
    assert code == 2 and expected in output, output
    assert "model load reached" not in output


def test_a_missing_column_names_the_columns_option(files: dict[str, Path]) -> None:
    with pytest.raises(FinesteerError, match=r"line 1: missing column for 'question'.*--columns question="):
        check_data(str(files["ab"]), None, "ab")
    with pytest.raises(FinesteerError, match="missing column 'nope'"):
        check_data(str(files["ab"]), {"question": "nope", "matching": "yes", "not_matching": "no"}, "ab")


def test_columns_accept_field_names_and_default_column_names(files: dict[str, Path]) -> None:
    fields = {"question": "prompt", "matching": "yes", "not_matching": "no"}
    by_field = check_data(str(files["ab"]), fields, "ab")
    by_alias = check_data(
        str(files["ab"]),
        {"question": "prompt", "answer_matching_behavior": "yes", "answer_not_matching_behavior": "no"},
        "ab",
    )
    assert isinstance(by_alias, DataRef) and by_alias == str(files["ab"])
    assert load_ab_set(by_field, "generate") == load_ab_set(by_alias) and len(load_ab_set(by_alias)) == 80
    assert load_ab_set(by_alias, limit=3)[1].matching == "(A)"
    texts, ids = load_queries(by_alias)
    assert texts[0].startswith("Would you cover") and ids[:2] == ["0", "1"]


def test_a_user_file_is_one_split(files: dict[str, Path]) -> None:
    ref = check_data(str(files["ab"]), {"question": "prompt", "matching": "yes", "not_matching": "no"}, "ab")
    with pytest.raises(FinesteerError, match="a user file is one split; split 'test_ab'"):
        load_ab_set(ref, "test_ab")


def test_catalogue_names_and_unknown_names() -> None:
    assert check_data("coordinate-other-ais", None, "ab") == "coordinate-other-ais"
    with pytest.raises(FinesteerError, match="is a built-in dataset"):
        check_data("coordinate-other-ais", {"question": "q"}, "ab")
    with pytest.raises(FinesteerError, match=r"Did you mean 'coordinate-other-ais'.*finesteer datasets"):
        check_data("coordinate-other-aiss", None, "ab")


def test_bad_columns_option_is_one_line(files: dict[str, Path]) -> None:
    args = ["eval", "ab", "tiny-llama", "--data", str(files["ab"]), "--columns", "question"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--columns takes FIELD=COLUMN pairs" in result.output


def test_eval_ab_runs_on_a_user_file_in_bf16(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        app,
        ["eval", "ab", "tiny-llama", "--data", str(files["ab"]), "--columns", AB_COLUMNS, "--limit", "4",
         "--method", "prob", "--dtype", "bfloat16", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["n"] == 8 and payload["data"] == str(files["ab"])  # 4 items in both option orders
    assert 0.0 <= payload["mean_p_matching"] <= 1.0


def test_datasets_lists_the_catalogue_and_the_file_formats() -> None:
    result = CliRunner().invoke(app, ["datasets", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    names = {row["name"]: row for row in payload["datasets"]}
    assert names["coordinate-other-ais"]["kind"] == "ab"
    assert names["coordinate-other-ais"]["splits"]["generate"] == 360
    assert all(row["licence"] and row["rows"] >= 0 for row in payload["datasets"])
    formats = payload["file_formats"]
    assert set(formats) == {"ab", "prompts", "open_ended"}
    assert "answer_matching_behavior" in formats["ab"]["required"]["matching"]
    assert formats["prompts"]["required"] == {"prompt": ["prompt", "instruction", "goal", "question", "text"]}
