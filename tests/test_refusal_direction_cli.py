"""`finesteer locate refusal-direction | head-direction | joint` on a tiny model: one JSON object each."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner

from finesteer.cli import app


def _json(args: list[str]) -> dict[str, Any]:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_refusal_commands_chain(tmp_path) -> None:
    direction = tmp_path / "dir" / "direction"
    settings = ["--n-train", "3", "--n-val", "2", "--shortlist", "2"]
    found = _json(
        ["locate", "refusal-direction", "tiny-qwen2", *settings, "--out", str(tmp_path / "dir"), "--json"]
    )
    assert found["position"] < 0 and found["candidates"] and direction.is_dir()
    base = ["locate", "head-direction", "tiny-qwen2", "--direction", str(direction), "--limit", "3"]
    first = _json([*base, "--out", str(tmp_path / "hd"), "--json"])
    assert first["top"] and first["agreement"] == []
    second = _json([*base, "--out", str(tmp_path / "hd2"), "--compare", str(tmp_path / "hd"), "--json"])
    assert second["agreement"][0]["spearman"] == 1.0  # same prompts, same direction: same ranking
    joint = ["locate", "joint", "tiny-qwen2", "--pool-from", str(tmp_path / "hd"), "--search"]
    sizes = ["--per-table", "4", "--limit", "2", "--k", "2", "--n-trials", "2"]
    result = _json([*joint, *sizes, "--out", str(tmp_path / "j"), "--json"])
    assert len(result["forward"]) == 2 and result["search"]["n_trials"] == 2
    again = CliRunner().invoke(app, [*joint, "--out", str(tmp_path / "j")])
    assert again.exit_code == 2 and "--resume" in again.output
