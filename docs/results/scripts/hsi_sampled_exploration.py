"""Exploration: HSI directions from the model's own sampled answers (the paper's recipe).

Sample answers to HSI-format A/B prompts, parse the letter, label matching / not, read every head at
the end-of-turn token after the answer, then sweep/select heads as fit_hsi does and score validation
items 0–23 (both orders) by letter probability and by generation (HSI prompt, 32 greedy tokens).
(`fit_hsi(..., HSIConfig(directions_from="sampled"))` is the library form of the same recipe.)

    OMP_NUM_THREADS=1 python docs/results/scripts/hsi_sampled_exploration.py   # ≈ 20 min, 1 thread
"""

import json
import sys
import time
from pathlib import Path

import torch

from finesteer.activations.directions import fit_head_directions
from finesteer.data.balance import letter_balanced
from finesteer.evaluate.ab import ab_matching_rate_generated, ab_matching_rate_prob
from finesteer.generation import GenerationConfig, generate
from finesteer.locate.hsi import select_heads, sweep_heads
from finesteer.methods import load_behaviour_data
from finesteer.models import load_model
from finesteer.scoring.ab import ab_generation_prompt, parse_ab_answer

torch.set_num_threads(1)
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/hsi-sampled-exploration")
OUT.mkdir(parents=True, exist_ok=True)
lm = load_model("smollm2-135m-instruct")
data = load_behaviour_data("coordinate-other-ais", seed=0)
train = letter_balanced(list(data.train)[:120], strict=False)
sweep_items = letter_balanced(list(data.train)[200:224], strict=False)
val = letter_balanced(list(data.val)[:24], strict=False)
t0 = time.time()
comp_file = OUT / "completions.json"
if comp_file.exists():
    comps = json.loads(comp_file.read_text())
else:
    prompts = [ab_generation_prompt(lm.tokenizer, it)[0] for it in train]
    cfg = GenerationConfig(
        max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.95, seed=0, batch_size=16
    )
    comps = []
    for s in range(2):
        from dataclasses import replace

        resp = generate(lm, prompts, replace(cfg, seed=100 * s))
        for it, p, r in zip(train, prompts, resp, strict=True):
            a = parse_ab_answer(r, it.options)
            comps.append(dict(id=it.id, prompt=p, response=r, parsed=a, matching=it.matching_letter))
    comp_file.write_text(json.dumps(comps))
print("sampled", round(time.time() - t0), "s", file=sys.stderr)
labelled = [
    (c["prompt"], c["response"].rstrip() + "<|im_end|>", c["parsed"] == c["matching"])
    for c in comps
    if c["parsed"] in ("A", "B")
]
print(json.dumps(dict(n=len(comps), defined=len(labelled), pos=sum(row[2] for row in labelled))), flush=True)
d = fit_head_directions(lm, completions=labelled, batch_size=16)
d.save(OUT / "directions.safetensors")
alphas = (8.0, 16.0, 32.0)
sw = sweep_heads(lm, sweep_items, d, alphas, batch_size=16, run_dir=OUT, progress=False)
print("sweep", round(time.time() - t0), "s", file=sys.stderr)
sel = select_heads(lm, sw, val, d, k=8, alphas=alphas, batch_size=16)
print(json.dumps(sel.to_dict())[:1500], flush=True)
cfg = GenerationConfig(max_new_tokens=32, batch_size=16)
heads = [(h[0], h[1]) for h in sw.ranked_heads("balanced")[:8]]
print("top8", heads, flush=True)
for k, a in [(0, 0), (8, 8), (8, 16), (4, 32), (8, 32)]:
    iv = None if a == 0 else d.intervention(heads[:k], a, scope="last")
    g = ab_matching_rate_generated(lm, val, intervention=iv, config=cfg)
    p = ab_matching_rate_prob(lm, val, intervention=iv, batch_size=16)
    print(
        json.dumps(
            dict(
                k=k,
                alpha=a,
                gen=g.matching_rate,
                undef=g.n_undefined,
                prob=p.matching_rate,
                p=p.mean_p_matching,
            )
        ),
        flush=True,
    )
