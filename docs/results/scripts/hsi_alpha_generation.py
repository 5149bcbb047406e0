"""Exploration: the demo's HSI heads (A/B-letter directions) at larger α, scored by generated answers too.

Reads the directions and head ranking of a `finesteer demo` run folder and scores validation items
24–47 (both option orders) by letter probability and by generating (HSI prompt, 32 greedy tokens).

    finesteer demo                       # writes runs/demo-hsi-coordination-<time>
    OMP_NUM_THREADS=1 python docs/results/scripts/hsi_alpha_generation.py runs/demo-hsi-coordination-<time>
"""

import json
import sys
import time

import torch

from finesteer.activations.directions import HeadDirections
from finesteer.data.balance import letter_balanced
from finesteer.evaluate.ab import ab_matching_rate_generated, ab_matching_rate_prob
from finesteer.generation import GenerationConfig
from finesteer.locate.scores import HeadScores
from finesteer.methods import load_behaviour_data
from finesteer.models import load_model

R = sys.argv[1].rstrip("/") + "/steps/locate_and_fit"
torch.set_num_threads(1)
lm = load_model("smollm2-135m-instruct")
data = load_behaviour_data("coordinate-other-ais", seed=0)
val = letter_balanced(list(data.val)[24:48], strict=False)  # items the demo's α choice never saw
d = HeadDirections.load(R + "/directions.safetensors")
scores = HeadScores.load(R + "/head_scores")
heads = [tuple(h) for h in scores.top_heads(16)]
print("ranking", heads, file=sys.stderr)
cfg = GenerationConfig(max_new_tokens=32, batch_size=16)
out = []


def run(k, alpha):
    t = time.time()
    iv = None if alpha == 0 else d.intervention(heads[:k], alpha, scope="last")
    g = ab_matching_rate_generated(lm, val, intervention=iv, config=cfg)
    p = ab_matching_rate_prob(lm, val, intervention=iv, batch_size=16)
    row = dict(
        k=k,
        alpha=alpha,
        gen=g.matching_rate,
        undef=g.n_undefined,
        prob=p.matching_rate,
        p=p.mean_p_matching,
        s=round(time.time() - t, 1),
        ex=[r["response"][:80] for r in g.per_item[:2]],
    )
    print(json.dumps(row), flush=True)


run(0, 0)
for k in (4, 8):
    for a in (8, 16, 32, 64):
        run(k, a)
