"""The atomic writers in `finesteer.runs`: same bytes as a plain write, unique temp files, no leftovers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finesteer.runs import write_atomic, write_json_atomic, write_safetensors_atomic


def test_json_is_written_whole_and_in_the_usual_format(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    data = {"b": [1, 2.5], "a": "é", "p": Path("x")}
    write_json_atomic(path, data, indent=1)
    assert path.read_text() == json.dumps(data, indent=1, default=str) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_safetensors_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {"x": torch.arange(6.0).reshape(2, 3).t(), "i": torch.tensor([1, 2])}
    write_safetensors_atomic(path, tensors)
    loaded = load_file(str(path))
    assert torch.equal(loaded["x"], tensors["x"]) and torch.equal(loaded["i"], tensors["i"])


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    write_json_atomic(path, {"old": True})

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_concurrent_writers_never_share_a_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    seen: list[Path] = []
    barrier = threading.Barrier(4)

    def write(tmp: Path) -> None:
        seen.append(tmp)
        barrier.wait(timeout=10)
        tmp.write_text("{}\n")

    threads = [threading.Thread(target=write_atomic, args=(path, write)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 4 and path.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
