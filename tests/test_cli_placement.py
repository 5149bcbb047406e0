"""Every command that loads a model takes --device and --dtype (checked before anything runs), and
commands run in bfloat16 on a tiny model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from finesteer.cli import app

# Commands that never load a model: they list, describe files, or compare finished tables.
NO_MODEL = {"models", "datasets", "locate overlap"}


def _leaves(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _leaves(sub, (*path, name))
    else:
        yield " ".join(path), command


COMMANDS = dict(_leaves(typer.main.get_command(app)))


def test_the_command_tree_is_walked() -> None:
    assert {"info", "locate ships", "fit caa", "eval asr", "sae train", "export hf", "serve"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - NO_MODEL))
def test_every_model_command_lists_device_and_dtype(name: str) -> None:
    result = CliRunner().invoke(app, [*name.split(), "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--device" in result.output and "--dtype" in result.output, name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--device", "cuda:0"], "CUDA is not available"),
    ],
)
def test_bad_placement_fails_before_any_work(args: list[str], message: str, tmp_path: Path) -> None:
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    missing = tmp_path / "not-there.jsonl"  # would fail too, later: the option is checked first
    result = CliRunner().invoke(
        app, ["eval", "asr", "tiny-llama", "--data", str(missing), *args], terminal_width=200
    )
    assert result.exit_code == 2
    assert message in result.output and "not-there" not in result.output


def test_locate_ships_in_bf16(tmp_path: Path) -> None:
    out = tmp_path / "ships"
    result = CliRunner().invoke(
        app,
        ["locate", "ships", "tiny-llama", "--data", "advbench", "--limit", "2", "--dtype", "bfloat16",
         "--device", "cpu", "--out", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["n_prompts"] == 2
    assert (out / "heatmap.png").is_file() or any(out.rglob("heatmap.png"))
