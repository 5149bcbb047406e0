"""How far can ANY additive head edit at the answer position move SmolLM2's A/B choice?

HSI adds a fixed vector to some heads' o_proj input at the last prompt position. This script skips
the mass-mean direction entirely and *learns* the vectors of all 270 heads by gradient ascent on the
letter margin log p(matching) − log p(not matching) after the pre-filled "(", over 120 training items
in both option orders, then scores the training items, 32 validation items (both orders) and the
50-item test split. If even this optimum cannot fit the training items, no choice of ≤ 8 heads and
directions can reach HSI's +0.3 on this model.

    OMP_NUM_THREADS=1 python docs/results/scripts/hsi_upper_bound.py   # ≈ 10 min an epoch, 1 thread
"""

from __future__ import annotations

import json
import time

import torch

from finesteer.data.balance import letter_balanced
from finesteer.methods import load_behaviour_data
from finesteer.models import load_model
from finesteer.scoring.ab import item_target

EPOCHS = 2
LEARNING_RATE = 0.05


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = load_model("smollm2-135m-instruct")
    model, tokenizer, info = lm.model, lm.tokenizer, lm.info
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    data = load_behaviour_data("coordinate-other-ais", seed=0)

    def encode(items: list) -> list[tuple[torch.Tensor, int, int]]:
        rows = []
        for item in items:
            target = item_target(tokenizer, item)
            ids = torch.tensor([target.tokens])
            rows.append(
                (ids, target.letter_ids[item.matching_letter], target.letter_ids[item.not_matching_letter])
            )
        return rows

    train = encode(letter_balanced(list(data.train)[:120], strict=False))
    val = encode(letter_balanced(list(data.val)[:32], strict=False))
    test = encode(list(data.test_ab))
    test_balanced = encode(letter_balanced(list(data.test_ab), strict=False))

    vectors = torch.zeros(info.n_layers, info.n_heads, info.head_dim, requires_grad=True)

    def pre_hook(layer: int):  # add this layer's head vectors at the last position of o_proj's input
        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0].clone()
            x[:, -1] = x[:, -1] + vectors[layer].reshape(-1)
            return (x,)

        return hook

    handles = [
        model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre_hook(layer))
        for layer in range(info.n_layers)
    ]
    try:

        def margin(ids: torch.Tensor, matching: int, other: int) -> torch.Tensor:
            logp = model(ids).logits[0, -1].log_softmax(-1)
            return logp[matching] - logp[other]

        def score(rows: list) -> dict[str, float]:
            with torch.no_grad():
                margins = [float(margin(*row)) for row in rows]
            return {
                "matching_rate": sum(m > 0 for m in margins) / len(margins),
                "mean_margin": sum(margins) / len(margins),
            }

        started = time.time()
        report = {"epoch": "unmodified", "train": score(train), "val": score(val), "test": score(test),
                  "test_both_orders": score(test_balanced)}  # fmt: skip
        print(json.dumps(report), flush=True)
        optimiser = torch.optim.Adam([vectors], lr=LEARNING_RATE)
        for epoch in range(EPOCHS):
            for index in torch.randperm(len(train)).tolist():
                loss = -torch.nn.functional.logsigmoid(margin(*train[index]))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            largest = sorted(vectors.detach().norm(dim=-1).flatten().tolist())[-8:]
            report = {"epoch": epoch, "train": score(train), "val": score(val), "test": score(test),
                      "test_both_orders": score(test_balanced), "largest_head_norms": largest,
                      "seconds": round(time.time() - started)}  # fmt: skip
            print(json.dumps(report), flush=True)
    finally:
        for handle in handles:
            handle.remove()


if __name__ == "__main__":
    main()
