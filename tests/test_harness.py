"""Generation harness: streamed JSONL rows, judges, resume after an interruption, no loss or duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finesteer.data import PromptItem
from finesteer.evaluate import harness as harness_module
from finesteer.evaluate.harness import ResumeError, read_rows, run_generations
from finesteer.evaluate.judges import KeywordRefusalJudge
from finesteer.evaluate.verdict import Verdict
from finesteer.generation import GenerationConfig
from finesteer.interventions import steer_residual
from finesteer.models import LoadedModel, load_model

CONFIG = GenerationConfig(max_new_tokens=4, batch_size=2)
ITEMS = [PromptItem(f"prompt number {i}", id=f"p{i}") for i in range(5)]


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model("tiny-qwen2")


@pytest.fixture(scope="module")
def reference(lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """An uninterrupted run (greedy), to compare resumed runs with."""
    out = tmp_path_factory.mktemp("ref") / "gen.jsonl"
    return run_generations(
        lm, ITEMS, out, config=CONFIG, judges={"kw": KeywordRefusalJudge.gcg()}, progress=False
    )


class FailingJudge:
    """Judges normally until `fail_after` responses were judged, then raises like a dead endpoint."""

    def __init__(self, fail_after: int) -> None:
        self.fail_after = fail_after
        self.seen = 0

    def judge(self, prompt: str, response: str) -> Verdict:
        if self.seen >= self.fail_after:
            raise RuntimeError("judge endpoint went away")
        self.seen += 1
        return KeywordRefusalJudge.gcg().judge(prompt, response)

    def judge_many(self, pairs):
        return [self.judge(p, r) for p, r in pairs]


def count_generated(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    generated: list[str] = []
    real = harness_module.generate

    def spy(lm_, prompts, config, *, intervention=None):
        generated.extend(prompts)
        return real(lm_, prompts, config, intervention=intervention)

    monkeypatch.setattr(harness_module, "generate", spy)
    return generated


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rows_streamed_with_verdicts(reference: list[dict], lm: LoadedModel) -> None:
    assert [r["id"] for r in reference] == [i.id for i in ITEMS]
    assert [r["index"] for r in reference] == list(range(5))
    for row, it in zip(reference, ITEMS, strict=True):
        assert row["prompt"] == it.prompt
        assert (
            row["formatted_prompt"].endswith("<|im_start|>assistant\n")
            and it.prompt in row["formatted_prompt"]
        )
        verdict = row["verdicts"]["kw"]
        assert verdict["label"] in ("refusal", "compliance") and verdict["score"] in (0.0, 1.0)
        assert verdict == harness_module.verdict_record(
            KeywordRefusalJudge.gcg().judge(it.prompt, row["response"])
        )


def test_resume_after_judge_failure_has_one_row_per_prompt(
    lm: LoadedModel, reference: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "gen.jsonl"
    judge = FailingJudge(3)
    with pytest.raises(RuntimeError, match="went away"):
        run_generations(lm, ITEMS, out, config=CONFIG, judges={"kw": judge}, progress=False)
    assert [r["id"] for r in lines(out)] == ["p0", "p1"]  # the first batch was saved, the failing one not
    judge.fail_after = 100  # the endpoint is back
    generated = count_generated(monkeypatch)
    rows = run_generations(lm, ITEMS, out, config=CONFIG, judges={"kw": judge}, progress=False)
    assert len(generated) == 3  # only the 3 missing prompts were generated again
    on_disk = lines(out)
    assert sorted(r["id"] for r in on_disk) == [i.id for i in ITEMS]  # exactly one row per prompt
    assert rows == reference and sorted(on_disk, key=lambda r: r["index"]) == reference


def test_resume_after_kill_mid_line(
    lm: LoadedModel, reference: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "gen.jsonl"
    run_generations(lm, ITEMS, out, config=CONFIG, judges={"kw": KeywordRefusalJudge.gcg()}, progress=False)
    data = out.read_bytes()
    cut = data.rfind(b"\n", 0, len(data) - 1) + 20  # 20 bytes into the last row, no newline
    out.write_bytes(data[:cut])
    generated = count_generated(monkeypatch)
    rows = run_generations(
        lm, ITEMS, out, config=CONFIG, judges={"kw": KeywordRefusalJudge.gcg()}, progress=False
    )
    assert len(generated) == 1  # the half-written prompt is redone, nothing else
    on_disk = lines(out)  # every line parses: the partial one was removed
    assert [r["id"] for r in on_disk] == [i.id for i in ITEMS]
    assert rows == reference


def test_resume_refuses_other_settings_and_corrupt_rows(lm: LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    run_generations(lm, ITEMS[:2], out, config=CONFIG, progress=False)
    with pytest.raises(ResumeError, match="max_new_tokens"):
        run_generations(lm, ITEMS, out, config=GenerationConfig(max_new_tokens=5), progress=False)
    steer = steer_residual(1, torch.ones(lm.info.hidden_size), 1.0)
    with pytest.raises(ResumeError, match="intervention"):
        run_generations(lm, ITEMS, out, config=CONFIG, intervention=steer, progress=False)
    with pytest.raises(ResumeError, match="judges"):
        run_generations(
            lm, ITEMS, out, config=CONFIG, judges={"kw": KeywordRefusalJudge.ships()}, progress=False
        )
    # a larger batch size is fine: greedy rows do not depend on it
    assert (
        len(run_generations(lm, ITEMS[:2], out, config=GenerationConfig(4, batch_size=8), progress=False))
        == 2
    )
    text = out.read_text(encoding="utf-8").splitlines()
    out.write_text(text[0] + "\n{broken\n" + text[1] + "\n", encoding="utf-8")
    with pytest.raises(ResumeError, match="line 2: not valid JSON"):
        read_rows(out)


def test_in_memory_stop_strings_and_bad_input(lm: LoadedModel) -> None:
    rows = run_generations(lm, [("a", "hello"), ("b", "world")], None, config=CONFIG, progress=False)
    assert [r["id"] for r in rows] == ["a", "b"] and "verdicts" not in rows[0]
    full = rows[0]["response"]
    assert len(full) >= 2  # greedy on fixed tiny weights: deterministic
    cut = run_generations(lm, [("a", "hello")], None, config=CONFIG, stop=("zz", full[1]), progress=False)
    assert cut[0]["response"] == full[: full.index(full[1])]
    with pytest.raises(ValueError, match="unique"):
        run_generations(lm, [("a", "x"), ("a", "y")], None, config=CONFIG, progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        run_generations(lm, [], None, config=CONFIG, progress=False)


def test_cli_asr_json(tmp_path: Path) -> None:
    from finesteer.cli import app

    args = ["eval", "asr", "tiny-qwen2", "--data", "jailbreakbench", "--limit", "3", "--max-new-tokens", "4"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["n"] == 3 and len(payload["records"]) == 3
    assert 0 <= payload["asr"] <= 1 and 0 <= payload["refusal_rate"] <= 1
    records = payload["records"]
    assert all(r["response"] is not None and "keyword" in r["verdicts"] for r in records)
    assert payload["asr"] == pytest.approx(sum(r["verdicts"]["keyword"]["score"] for r in records) / 3)
    assert len(read_rows(Path(payload["jsonl"]))) == 3
    bad = CliRunner().invoke(app, [*args, "--judge", "nope", "--json"])
    assert bad.exit_code == 2 and "--judge must be one of" in bad.output
