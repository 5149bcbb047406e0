"""ITI head ranking: one logistic-regression probe per head, ranked by validation accuracy.

Inference-Time Intervention (Li et al. 2023) trains a linear probe on each head's output to tell
behaviour-matching from not-matching activations, keeps the top-K heads by held-out accuracy and
steers them along the mass-mean direction ("use_center_of_mass"), scaled by α·σ. Probes are fitted
on the train split's activations and scored on the val split's, as in `honest_llama`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from finesteer.errors import FinesteerError
from finesteer.locate.scores import HeadScores
from finesteer.sites import Head


class ProbeError(FinesteerError, ValueError):
    """Probe data that cannot be used (shape mismatch, one class only, NaN)."""


@dataclass(frozen=True)
class ProbeScores:
    """Per-head probe accuracies [n_layers, n_heads] on the train and val activations."""

    train_accuracy: Tensor
    val_accuracy: Tensor

    def top_heads(self, k: int) -> list[Head]:
        """The k heads with the best val accuracy (ties: better train accuracy, then (layer, head))."""
        n_layers, n_heads = self.val_accuracy.shape
        if not 1 <= k <= n_layers * n_heads:
            raise ProbeError(f"k must be in 1..{n_layers * n_heads}, got {k}")
        val = self.val_accuracy.flatten().tolist()
        train = self.train_accuracy.flatten().tolist()
        order = sorted(range(len(val)), key=lambda i: (-val[i], -train[i], i))
        return [(i // n_heads, i % n_heads) for i in order[:k]]

    def head_scores(self, **provenance: object) -> HeadScores:
        return HeadScores(scores=self.val_accuracy, method="iti", mode="probe_val_accuracy", **provenance)  # type: ignore[arg-type]


def _check(name: str, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    y = torch.as_tensor(y, dtype=torch.bool)
    if z.dim() != 4:
        raise ProbeError(f"{name} activations must be [N, n_layers, n_heads, head_dim], got {tuple(z.shape)}")
    if y.shape != (z.shape[0],):
        raise ProbeError(f"{name}: {z.shape[0]} activations but labels of shape {tuple(y.shape)}")
    if not torch.isfinite(z).all():
        raise ProbeError(f"{name} activations contain NaN/inf")
    if int(y.sum()) in (0, len(y)):
        raise ProbeError(f"{name} labels have one class only; probes need both")
    return z, y


def train_probes(
    train_z: Tensor,
    train_y: Tensor | Sequence[bool],
    val_z: Tensor,
    val_y: Tensor | Sequence[bool],
    *,
    seed: int = 0,
    max_iter: int = 1000,
    progress: bool = False,
) -> ProbeScores:
    """Fit `LogisticRegression(max_iter)` per head on train, report accuracy on train and val."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train_z, train_y = _check("train", train_z, torch.as_tensor(train_y))
    val_z, val_y = _check("val", val_z, torch.as_tensor(val_y))
    if train_z.shape[1:] != val_z.shape[1:]:
        raise ProbeError(f"train {tuple(train_z.shape[1:])} and val {tuple(val_z.shape[1:])} heads differ")
    n_layers, n_heads = train_z.shape[1:3]
    train_acc = torch.zeros(n_layers, n_heads)
    val_acc = torch.zeros(n_layers, n_heads)
    xs, ys = train_z.double().numpy(), train_y.numpy()
    xv, yv = val_z.double().numpy(), val_y.numpy()
    for layer in tqdm(range(n_layers), desc="iti probes", disable=not progress, unit="layer"):
        for head in range(n_heads):
            probe = LogisticRegression(random_state=seed, max_iter=max_iter)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                probe.fit(xs[:, layer, head], ys)
            train_acc[layer, head] = float(probe.score(xs[:, layer, head], ys))
            val_acc[layer, head] = float(probe.score(xv[:, layer, head], yv))
    return ProbeScores(train_acc, val_acc)
