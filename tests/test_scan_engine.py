"""The shared scan driver (`ScanEngine.run`): checkpoints, resume and callbacks for any engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from finesteer.interventions import Intervention, ablate_head
from finesteer.locate.engine import (
    MANIFEST_FILE,
    PART_PREFIX,
    EncodedPrompts,
    Readout,
    ScanEngine,
    ScanError,
    encode_prompts,
    prompt_batches,
)
from finesteer.locate.fast_scan import ENGINES, FastScan
from finesteer.locate.scan import LastHidden, SimpleScan
from finesteer.models import LoadedModel


class Counting(ScanEngine):
    """Candidate i's values are all i; yields blocks of two, and fails after `fail_after` candidates."""

    name = "counting"

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.computed: list[int] = []

    def check(self, lm: LoadedModel, candidates: Sequence[Intervention], batch_size: int, every: int) -> None:
        if batch_size < 1:
            raise ScanError("batch_size must be ≥ 1")

    def blocks(
        self,
        lm: LoadedModel,
        encoded: EncodedPrompts,
        candidates: Sequence[Intervention],
        todo: Sequence[int],
        readout: Readout,
        batch_size: int,
        checkpoint_every: int,
    ) -> Iterator[dict[int, Tensor]]:
        for start in range(0, len(todo), 2):
            block = {}
            for index in todo[start : start + 2]:
                if self.fail_after is not None and len(self.computed) == self.fail_after:
                    raise KeyboardInterrupt
                self.computed.append(index)
                block[index] = torch.full((len(encoded), 2), float(index))
            yield block


def test_driver_checkpoints_and_resumes_any_engine(
    tiny_models: dict[str, LoadedModel], tmp_path: Path
) -> None:
    lm = tiny_models["tiny-llama"]
    encoded = encode_prompts(lm, ["a b c", "d e"])
    candidates = [ablate_head(0, h, "scale_output", eps=0.5) for h in range(5)]
    with pytest.raises(KeyboardInterrupt):
        Counting(fail_after=3).run(lm, encoded, candidates, LastHidden(), checkpoint=tmp_path, progress=False)
    assert (tmp_path / MANIFEST_FILE).is_file() and list(tmp_path.glob(f"{PART_PREFIX}*"))
    again = Counting()
    seen: list[int] = []
    values = again.run(
        lm, encoded, candidates, LastHidden(), checkpoint=tmp_path, progress=False, on_candidate=seen.append
    )
    assert again.computed == seen == [2, 3, 4]  # block (0, 1) was written when the run was interrupted
    assert torch.equal(values[:, 0, 0], torch.arange(5, dtype=torch.float32))
    with pytest.raises(ScanError, match="no candidate"):
        again.run(lm, encoded, [], LastHidden(), progress=False)


def test_engines_share_the_interface(tiny_models: dict[str, LoadedModel]) -> None:
    lm = tiny_models["tiny-llama"]
    assert set(ENGINES) == {"simple", "fast"} and ENGINES["fast"] is FastScan
    encoded = encode_prompts(lm, ["a b c", "d e", "f"])
    batches = prompt_batches(encoded, 2, lm.tokenizer.pad_token_id, lm.device)
    assert [b.rows.tolist() for b in batches] == [[0, 1], [2]]  # longest first
    candidates = [Intervention(), ablate_head(1, 0, "scale_output", eps=0.0)]
    simple = SimpleScan().run(lm, encoded, candidates, LastHidden(), progress=False)
    fast = FastScan(max_rows=4).run(lm, encoded, candidates, LastHidden(), progress=False)
    assert float((simple - fast).abs().max()) <= 1e-5
