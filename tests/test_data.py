"""Tests for finesteer.data: vendored datasets, validated loaders, catalog and prompt formats.

Offline and model-free: the chat-template tokenizer is built in code from a tiny `tokenizers` model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finesteer.data import (
    CATALOG,
    HSI_INSTRUCTION,
    SHIPS_TEMPLATE,
    VENDORED_DIR,
    ABItem,
    DatasetError,
    OpenEndedItem,
    PromptItem,
    ab_completion,
    ab_prompt,
    chat_prompt,
    dataset_info,
    hsi_ab_prompt,
    list_datasets,
    load_dataset,
    load_open_ended,
    load_prompts,
    option_letters,
    raw_prompt,
    read_ab_items,
)

# Row counts from the datasets README / PROVENANCE files.
EXPECTED_ROWS: dict[tuple[str, str], tuple[int, type]] = {
    **{
        (behaviour, split): (n, ABItem if split != "test_open_ended" else OpenEndedItem)
        for behaviour, counts in {
            "coordinate-other-ais": (360, 50, 50),
            "corrigible-neutral-HHH": (290, 50, 50),
            "hallucination": (1000, 50, 50),
            "myopic-reward": (950, 50, 50),
            "refusal": (408, 50, 50),
            "survival-instinct": (903, 50, 50),
            "sycophancy": (1000, 50, 53),
        }.items()
        for split, n in zip(("generate", "test_ab", "test_open_ended"), counts, strict=True)
    },
    ("hsi-coordination", "test_ab"): (50, ABItem),
    ("hsi-coordination", "test_open_ended"): (50, OpenEndedItem),
    ("hsi-coordination", "train_selection"): (3, ABItem),
    ("anthropic-coordinate-other-ais", "all"): (410, ABItem),
    ("advbench", "all"): (520, PromptItem),
    ("jailbreakbench", "all"): (100, PromptItem),
    ("jailbreakbench-benign", "all"): (100, PromptItem),
    ("refusal-direction-harmful", "train"): (260, PromptItem),
    ("refusal-direction-harmful", "val"): (39, PromptItem),
    ("refusal-direction-harmful", "test"): (572, PromptItem),
    ("refusal-direction-harmless", "train"): (18793, PromptItem),
    ("refusal-direction-harmless", "val"): (6264, PromptItem),
    ("refusal-direction-harmless", "test"): (6266, PromptItem),
    ("alpaca", "all"): (2000, PromptItem),
    ("xstest", "safe"): (250, PromptItem),
    ("xstest", "unsafe"): (200, PromptItem),
    ("xstest", "all"): (450, PromptItem),
    ("finesteer-mc", "test"): (40, ABItem),
}

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def make_tokenizer(chat_template: str | None) -> Any:
    """A real HF fast tokenizer without network or model cache: a word-level vocabulary built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "(": 3, "A": 4, "B": 5, ")": 6}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def chatml_tokenizer() -> Any:
    return make_tokenizer(CHATML)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def ab_record(question: str = "Q?\n\nChoices:\n (A) Yes\n (B) No", m: str = "(A)", n: str = "(B)") -> dict:
    return {"question": question, "answer_matching_behavior": m, "answer_not_matching_behavior": n}


# --- vendored files -------------------------------------------------------------------------------------


def test_vendored_files_match_provenance_sha256() -> None:
    """Every data file listed in a PROVENANCE table is shipped unchanged (sha256 as documented)."""
    checked = 0
    for provenance in VENDORED_DIR.glob("*/PROVENANCE.md"):
        folder = provenance.parent
        assert any(p.name.startswith(("LICENSE", "DATA_LICENSE")) for p in folder.iterdir()), folder
        for line in provenance.read_text(encoding="utf-8").splitlines():
            match = re.match(r"\| `([^`]+)` \|.*`([0-9a-f]{64})` \|$", line)
            if match:
                name, digest = match.groups()
                assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
                checked += 1
    # 21 CAA + 3 HSI + 1 Anthropic + 1 AdvBench + 2 JBB + 1 XSTest + 6 RD + 1 Alpaca + 1 finesteer-mc
    assert checked == 37
    assert (VENDORED_DIR / "README.md").is_file()
    assert (VENDORED_DIR / "refusal_direction" / "harmful_row_origins.csv").is_file()


# --- catalog ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "split"), sorted(EXPECTED_ROWS))
def test_catalog_dataset_loads_with_expected_rows(name: str, split: str) -> None:
    rows, item_type = EXPECTED_ROWS[name, split]
    items = load_dataset(name, split)
    assert len(items) == rows
    assert all(type(item) is item_type for item in items)
    assert len({item.id for item in items}) == rows  # ids are unique within a split
    assert dataset_info(name).rows[split] == rows


def test_catalog_covers_exactly_the_expected_splits() -> None:
    listed = {(info.name, split) for info in list_datasets() for split in info.splits}
    assert listed == set(EXPECTED_ROWS)


def test_list_datasets_reports_licences() -> None:
    infos = {info.name: info for info in list_datasets()}
    assert {n for n, i in infos.items() if i.non_commercial} == {"alpaca", "refusal-direction-harmless"}
    assert all(info.licence and info.description and info.provenance.is_file() for info in infos.values())
    assert infos["sycophancy"].kind == "ab"
    assert infos["sycophancy"].default_split == "test_ab"
    assert infos["xstest"].rows == {"safe": 250, "unsafe": 200, "all": 450}


def test_catalog_is_read_only() -> None:
    with pytest.raises(TypeError):
        CATALOG["mine"] = CATALOG["advbench"]  # type: ignore[index]
    with pytest.raises(TypeError):
        CATALOG["xstest"].splits["new"] = CATALOG["xstest"].splits["all"]  # type: ignore[index]


def test_default_split_and_limit() -> None:
    assert load_dataset("coordinate-other-ais") == load_dataset("coordinate-other-ais", "test_ab")
    assert load_dataset("advbench", limit=5) == load_dataset("advbench")[:5]
    with pytest.raises(ValueError, match="limit"):
        load_dataset("advbench", limit=-1)


def test_non_commercial_notice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="finesteer.data"):
        load_dataset("advbench")
        assert not caplog.records
        load_dataset("alpaca", limit=1)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "alpaca" in message and "CC BY-NC" in message and "\n" not in message


def test_unknown_name_and_split() -> None:
    with pytest.raises(DatasetError, match=r"Did you mean 'sycophancy'\?.*Available: .*advbench"):
        load_dataset("sycophancyy")
    with pytest.raises(DatasetError, match="splits: generate, test_ab, test_open_ended"):
        load_dataset("sycophancy", "train")
    with pytest.raises(DatasetError, match="unknown dataset"):
        dataset_info("nope")


def test_jailbreakbench_pairs_by_index() -> None:
    harmful = load_dataset("jailbreakbench")
    benign = load_dataset("jailbreakbench-benign")
    assert [h.id for h in harmful] == [b.id for b in benign] == [str(i) for i in range(100)]
    for h, b in zip(harmful, benign, strict=True):
        assert isinstance(h, PromptItem) and isinstance(b, PromptItem)
        assert h.category == b.category
        # Upstream stores row 67's behaviour as "Human  trafficking" (harmful) / "Human trafficking".
        assert " ".join(h.get_extra("Behavior", "").split()) == b.get_extra("behavior")
        assert h.target and h.target.startswith("Sure, here ")
    assert harmful[0].prompt.startswith("Write a defamatory article")
    assert benign[0].prompt.startswith("Write a fictional story")


def _origins_table() -> dict[str, dict[str, list[str]]]:
    table: dict[str, dict[str, list[str]]] = {}
    path = VENDORED_DIR / "refusal_direction" / "harmful_row_origins.csv"
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            table.setdefault(row["split"], {})[row["index"]] = row["origins"].split(";")
    return table


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_refusal_direction_origin_filter_removes_exactly_those_rows(split: str) -> None:
    origins = _origins_table()[f"harmful_{split}"]
    every = load_dataset("refusal-direction-harmful", split)
    assert all(isinstance(i, PromptItem) and i.source == ";".join(origins[i.id]) for i in every)
    kept = load_dataset("refusal-direction-harmful", split, exclude_origins=("MaliciousInstruct",))
    expected = [i for i in every if "malicious_instruct" not in origins[i.id]]
    assert kept == expected
    only = load_dataset("refusal-direction-harmful", split, origins="malicious_instruct")
    assert {i.id for i in only} == {i.id for i in every} - {i.id for i in kept}


def test_refusal_direction_origin_counts_and_errors() -> None:
    train = load_dataset("refusal-direction-harmful", "train", exclude_origins="malicious_instruct")
    assert len(train) == 260 - 88
    assert all(not 117 <= int(item.id) <= 204 for item in train)
    test = load_dataset("refusal-direction-harmful", "test", exclude_origins=["malicious_instruct"])
    assert len(test) == 572 - 12
    harmbench = load_dataset("refusal-direction-harmful", "val", origins=["harmbench"])
    assert len(harmbench) == 39  # "harmbench" matches harmbench_val and harmbench_test
    with pytest.raises(DatasetError, match=r"unknown origin 'nosuch'.*malicious_instruct"):
        load_dataset("refusal-direction-harmful", "train", exclude_origins=["nosuch"])
    with pytest.raises(DatasetError, match="no origin metadata"):
        load_dataset("advbench", exclude_origins=["advbench"])


def test_xstest_labels_and_types() -> None:
    safe = load_dataset("xstest", "safe")
    unsafe = load_dataset("xstest", "unsafe")
    assert {i.label for i in safe} == {"safe"} and {i.label for i in unsafe} == {"unsafe"}
    assert all(
        isinstance(i, PromptItem) and i.category and i.category.startswith("contrast_") for i in unsafe
    )
    assert safe[0].id == "1" and safe[0].category == "homonyms" and safe[0].get_extra("focus") == "kill"


# --- A/B items -------------------------------------------------------------------------------------------


def test_survival_instinct_items_keep_extra_options() -> None:
    items = load_dataset("survival-instinct", "generate")
    assert all(isinstance(i, ABItem) for i in items)
    wide = [i for i in items if isinstance(i, ABItem) and len(i.options) > 2]
    assert len(wide) == 239
    assert max(len(i.options) for i in wide) == 8
    assert all(i.matching_letter in i.options and i.not_matching_letter in i.options for i in wide)
    assert any(i.matching_letter not in "AB" for i in wide)


def test_anthropic_answers_lose_leading_space() -> None:
    items = load_dataset("anthropic-coordinate-other-ais")
    assert {i.matching for i in items if isinstance(i, ABItem)} == {"(A)", "(B)"}


def test_option_letters_ignores_inline_mentions() -> None:
    question = hsi_ab_prompt("Q?\n\nChoices:\n (A) Yes\n (B) No")
    assert option_letters(question) == ("A", "B")
    assert option_letters("(A) one\n(B) two\n  (C) three") == ("A", "B", "C")
    assert option_letters("no options here (A)") == ()


def test_hsi_ab_prompt_reproduces_all_vendored_prompts() -> None:
    caa = load_dataset("coordinate-other-ais", "test_ab")
    rows = [json.loads(line) for line in (VENDORED_DIR / "hsi_ai_coordination" / "test_ab.jsonl").open()]
    assert len(caa) == len(rows) == 50
    for item, row in zip(caa, rows, strict=True):
        assert isinstance(item, ABItem)
        assert hsi_ab_prompt(item.question) == row["prompt"] == row["question"]
    hsi = load_dataset("hsi-coordination", "test_ab")
    for hsi_item, caa_item in zip(hsi, caa, strict=True):
        assert isinstance(hsi_item, ABItem) and isinstance(caa_item, ABItem)
        assert hsi_item.question == hsi_ab_prompt(caa_item.question)
        assert (hsi_item.matching, hsi_item.not_matching) == (caa_item.matching, caa_item.not_matching)
    assert HSI_INSTRUCTION == 'Include in your answer "Answer: (A) / (B)".'


def test_hsi_train_selection_prompts() -> None:
    items = load_dataset("hsi-coordination", "train_selection")
    assert [(i.id, i.matching, i.not_matching) for i in items if isinstance(i, ABItem)] == [
        ("304", "(A)", "(B)"),
        ("294", "(B)", "(A)"),
        ("307", "(B)", "(A)"),
    ]
    assert all(i.question.endswith(HSI_INSTRUCTION) for i in items if isinstance(i, ABItem))


def test_abitem_validates_itself() -> None:
    with pytest.raises(ValueError, match="not of the form"):
        ABItem("Q\n (A) x\n (B) y", "A", "(B)", "0")
    with pytest.raises(ValueError, match="both"):
        ABItem("Q\n (A) x\n (B) y", "(A)", "(A)", "0")
    with pytest.raises(ValueError, match=r"\(C\) is not one of"):
        ABItem("Q\n (A) x\n (B) y", "(C)", "(A)", "0")
    with pytest.raises(ValueError, match="empty"):
        PromptItem("   ", "0")


# --- malformed and user files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "line_no", "problem"),
    [
        ([ab_record(), ab_record(), '{"question": "Q", "answer_matching_behavior": '], 3, "invalid JSON"),
        (
            [ab_record(), {"question": "Q\n (A) a\n (B) b", "answer_matching_behavior": "(A)"}],
            2,
            "missing column",
        ),
        ([ab_record(), ab_record(question="   ")], 2, "empty"),
        ([ab_record(), ab_record(), ab_record(), ab_record(m="A")], 4, r"'A' is not of the form '\(X\)'"),
        ([ab_record(), ab_record(m="(a)")], 2, "not of the form"),
        ([ab_record(), ab_record(m="(C)")], 2, r"\(C\) is not one of the question's options"),
        ([ab_record(), ab_record(question=7)], 2, "must be a string"),
        ([ab_record(), "[1, 2]"], 2, "expected a JSON object"),
    ],
)
def test_malformed_jsonl_rows_name_file_and_line(
    tmp_path: Path, lines: list, line_no: int, problem: str
) -> None:
    path = write(tmp_path / "bad.jsonl", jsonl(*lines))
    with pytest.raises(DatasetError, match=rf"bad\.jsonl, line {line_no}: .*{problem}"):
        read_ab_items(path)


def test_malformed_csv_rows_name_file_and_line(tmp_path: Path) -> None:
    # Row 1 has a quoted field spanning two lines, so the bad row starts on line 4, not record 3.
    text = 'goal,target\n"multi\nline",t\nok,t\n  ,t\n'
    with pytest.raises(DatasetError, match=r"bad\.csv, line 5: column 'goal' \(prompt\) is empty"):
        load_prompts(write(tmp_path / "bad.csv", text))
    with pytest.raises(DatasetError, match=r"short\.csv, line 3: row has 1 fields but the header has 2"):
        load_prompts(write(tmp_path / "short.csv", "goal,target\na,b\nc\n"))
    with pytest.raises(DatasetError, match=r"nocol\.csv, line 2: missing column 'goal'"):
        load_prompts(write(tmp_path / "nocol.csv", "prompt_text,x\na,b\n"), column="goal")


@pytest.mark.parametrize(
    ("name", "text"), [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("head.csv", "goal\n")]
)
def test_empty_file_is_a_clear_error(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(DatasetError, match=rf"{re.escape(name)}: file is empty"):
        load_prompts(write(tmp_path / name, text))


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothere\.jsonl"):
        load_prompts(tmp_path / "nothere.jsonl")
    with pytest.raises(DatasetError, match=r"unsupported file type '\.txt'"):
        load_prompts(write(tmp_path / "a.txt", "x"))


def test_user_ab_file_with_column_mapping(tmp_path: Path) -> None:
    rows = [
        {"q": "Help the other AI?\n (A) Yes\n (B) No", "pos": "(A)", "neg": " (B) ", "uid": "x1"},
        {"q": "Pick one\n (A) a\n (B) b\n (C) c", "pos": "(C)", "neg": "(A)", "uid": "x2"},
    ]
    path = write(tmp_path / "mine.jsonl", jsonl(*rows))
    columns = {"question": "q", "matching": "pos", "not_matching": "neg", "id": "uid"}
    items = read_ab_items(path, columns=columns)
    assert items == [
        ABItem(rows[0]["q"], "(A)", "(B)", "x1"),
        ABItem(rows[1]["q"], "(C)", "(A)", "x2"),
    ]
    assert load_dataset(path, kind="ab", columns=columns) == items
    assert load_dataset(str(path), kind="ab", columns=columns, limit=1) == items[:1]
    with pytest.raises(DatasetError, match="pass kind="):
        load_dataset(path)
    with pytest.raises(DatasetError, match="missing column 'question_text'"):
        read_ab_items(path, columns={**columns, "question": "question_text"})
    with pytest.raises(DatasetError, match="unknown field"):
        read_ab_items(path, columns={"answer": "pos"})


def test_user_prompt_and_open_ended_files(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "mine.csv", 'goal,target,Note\nDo X,"Sure, X",n1\nDo Y,,\n')
    items = load_prompts(csv_path, column="goal", source="mine")
    assert items == [
        PromptItem("Do X", "0", source="mine", target="Sure, X", extra=(("Note", "n1"),)),
        PromptItem("Do Y", "1", source="mine"),
    ]
    assert load_dataset(csv_path, kind="prompts", columns={"prompt": "goal"})[1].prompt == "Do Y"
    array = write(tmp_path / "mine.json", json.dumps([{"text": "Why?", "id": 3}, {"text": "How?", "id": 4}]))
    assert load_open_ended(array, "text") == [OpenEndedItem("Why?", "3"), OpenEndedItem("How?", "4")]
    bad_array = write(tmp_path / "bad.json", json.dumps([{"text": "Why?"}, {"text": ""}]))
    with pytest.raises(DatasetError, match=r"bad\.json, record 2: .*empty"):
        load_open_ended(bad_array, "text")


def test_hsi_style_file_infers_contrast(tmp_path: Path) -> None:
    path = write(tmp_path / "hsi.jsonl", jsonl({"prompt": "Q?\n (A) Yes\n (B) No", "gt": "(B)"}))
    items = read_ab_items(path, columns={"question": "prompt", "matching": "gt"}, infer_not_matching=True)
    assert items == [ABItem("Q?\n (A) Yes\n (B) No", "(B)", "(A)", "0")]
    wide = write(tmp_path / "wide.jsonl", jsonl({"prompt": "Q?\n (A) a\n (B) b\n (C) c", "gt": "(B)"}))
    with pytest.raises(DatasetError, match=r"wide\.jsonl, line 1: cannot infer"):
        read_ab_items(wide, columns={"question": "prompt", "matching": "gt"}, infer_not_matching=True)


# --- prompt formats --------------------------------------------------------------------------------------


def test_chat_prompt_chatml(chatml_tokenizer: Any) -> None:
    assert chat_prompt(chatml_tokenizer, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(chatml_tokenizer, "hi", system="Be brief.", assistant_prefix="Sure") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nSure"
    )


def test_chat_prompt_template_without_system_role() -> None:
    tokenizer = make_tokenizer(NO_SYSTEM_TEMPLATE)
    assert chat_prompt(tokenizer, "hi", system="Be brief.") == (
        "<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_chat_prompt_without_template_falls_back_to_plain_text() -> None:
    tokenizer = make_tokenizer(None)
    assert chat_prompt(tokenizer, "hi") == "hi\n"
    assert chat_prompt(tokenizer, "hi", system="S", assistant_prefix="(") == "S\n\nhi\n("


def test_ab_prompt_and_completion(chatml_tokenizer: Any) -> None:
    item = load_dataset("coordinate-other-ais", "test_ab")[0]
    assert isinstance(item, ABItem)
    prompt = ab_prompt(chatml_tokenizer, item)
    assert prompt == f"<|im_start|>user\n{item.question}<|im_end|>\n<|im_start|>assistant\n("
    assert ab_completion(chatml_tokenizer, item, "A") == prompt + "A)"
    assert ab_completion(chatml_tokenizer, item, item.not_matching) == prompt + f"{item.not_matching_letter})"
    assert ab_completion(chatml_tokenizer, item, "(B)", prefill="").endswith("assistant\n(B)")
    with pytest.raises(ValueError, match="not one of"):
        ab_completion(chatml_tokenizer, item, "C")
    with pytest.raises(ValueError, match="form"):
        ab_completion(chatml_tokenizer, item, "AB")
    wide = next(
        i for i in load_dataset("survival-instinct", "test_ab") if isinstance(i, ABItem) and "E" in i.options
    )
    assert ab_completion(chatml_tokenizer, wide, "E").endswith("(E)")
    hsi_item = load_dataset("hsi-coordination", "test_ab")[0]
    assert isinstance(hsi_item, ABItem)
    assert ab_prompt(chatml_tokenizer, hsi_item, prefill="").endswith(
        f"{HSI_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_raw_prompt_and_ships_template() -> None:
    assert SHIPS_TEMPLATE == "## Query: {query}\n## Answer:"
    assert raw_prompt(SHIPS_TEMPLATE, query="How?") == "## Query: How?\n## Answer:"
    with pytest.raises(ValueError, match=r"missing \['query'\]"):
        raw_prompt(SHIPS_TEMPLATE, q="How?")


def test_import_is_light() -> None:
    code = (
        "import sys, finesteer; before = set(sys.modules); import finesteer.data; "
        "new = set(sys.modules) - before; "
        "heavy = sorted(m for m in new if m.split('.')[0] in {'torch', 'transformers', 'jinja2', 'numpy'}); "
        "assert not heavy, heavy"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
