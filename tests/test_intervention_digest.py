"""`Intervention.digest()` keeps the exact strings the old `evaluate.batching.intervention_digest` wrote.

Resumable runs (harness, compare) store the digest in their files and refuse to continue when it
differs, so these values were recorded from the old function and must never change.
"""

from __future__ import annotations

import pytest
import torch

from finesteer.interventions import (
    Intervention,
    ablate_head,
    ablate_heads,
    project_out,
    steer_head,
    steer_residual,
)


def _cases() -> dict[str, Intervention]:
    direction = torch.randn(8, generator=torch.Generator().manual_seed(0))
    return {
        "steer_head": steer_head(1, 2, torch.arange(4.0), 2.5),
        "steer_residual_bf16": steer_residual(
            0, torch.linspace(-1, 1, 8).to(torch.bfloat16), -0.5, scope="all"
        ),
        "ablate_group": ablate_heads([(0, 1), (1, 3)], "uniform_attention", eps=1e-4),
        "mean_ablation": ablate_head(1, 0, "mean", mean=torch.tensor([0.5, -0.25, 1.0, 2.0])),
        "project_out": project_out(direction, [0, 1], strength=0.75),
        "per_row": Intervention.per_row(
            [steer_head(0, 0, torch.ones(4), 1.0), Intervention(), ablate_heads([(1, 1)], "zero")]
        ),
        "empty": Intervention(),
    }


# Recorded with evaluate.batching.intervention_digest at 77ac89b.
OLD_DIGESTS = {
    "steer_head": "be500deced1da49b",
    "steer_residual_bf16": "8226aa0e84bdf4cd",
    "ablate_group": "71a35442951f43f9",
    "mean_ablation": "d9105cf61d68ccdd",
    "project_out": "98c08127df6c1ece",
    "per_row": "f5776889c8aacef3",
    "empty": "e3b0c44298fc1c14",
}


@pytest.mark.parametrize("name", sorted(OLD_DIGESTS))
def test_digest_matches_the_recorded_strings(name: str) -> None:
    assert _cases()[name].digest() == OLD_DIGESTS[name]


def test_digest_sees_every_field() -> None:
    base = steer_head(1, 2, torch.arange(4.0), 2.5)
    variants = [
        steer_head(1, 2, torch.arange(4.0), 2.0),
        steer_head(1, 3, torch.arange(4.0), 2.5),
        steer_head(1, 2, torch.arange(4.0) + 1e-3, 2.5),
        steer_head(1, 2, torch.arange(4.0), 2.5, scope="all"),
        base.on_rows([0]),
    ]
    digests = {v.digest() for v in variants}
    assert len(digests) == len(variants) and base.digest() not in digests
