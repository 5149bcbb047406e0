"""SAE fast paths vs the plain ones: early-stopped activation collection, sparse TopK decoding.

    OMP_NUM_THREADS=1 python benchmarks/bench_sae.py smollm2-135m-instruct --layer 12 --texts 32

1. Collection: `finesteer.sae.store.site_activations` (forward stopped after the SAE's block) vs
   `finesteer.activations(position="all")` (full forward), same texts: seconds, ratio, max |difference|.
2. One TopK training step: `embedding_bag` decoding of the k active latents (what `train_sae` uses)
   vs the dense `latents @ W_dec`, forward + backward: seconds per step and ratio, max |Δ loss|.

On a shared CPU prefer OMP_NUM_THREADS=1: with more threads than free cores, OpenMP barriers make
small matmuls many times slower.
"""

from __future__ import annotations

import argparse
import time

import torch

from finesteer.activations.capture import capture
from finesteer.models import load_model
from finesteer.sae.corpus import CorpusSpec, training_texts
from finesteer.sae.model import SAEConfig, SparseAutoencoder
from finesteer.sae.store import site_activations
from finesteer.sae.train import TrainConfig, train_step_loss
from finesteer.sites import Site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()

    lm = load_model(args.model)
    site = Site(args.layer, "resid_post")
    texts = [
        t
        for _, t in training_texts(
            lm.tokenizer, CorpusSpec(harmful=args.texts, harmless=0, ab_per_behaviour=0)
        )
    ]
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    site_activations(lm, ids[:2], site, [0, 0])  # warm-up
    start = time.perf_counter()
    fast = site_activations(lm, ids, site, [0] * len(ids), batch_size=16)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    full = capture(lm, texts, [site], position="all", batch_size=16)
    t_full = time.perf_counter() - start
    diff = max(float((f - full[site][i, : len(f)]).abs().max()) for i, f in enumerate(fast))
    n_tokens = sum(len(i) for i in ids)
    print(f"{args.model} layer {args.layer} of {lm.info.n_layers}: {len(texts)} texts, {n_tokens} tokens")
    ratio = t_full / t_fast
    print(
        f"collection: early stop {t_fast:.2f} s, full capture {t_full:.2f} s, "
        f"ratio {ratio:.2f}x, max |Δ| {diff:.1e}"
    )

    d_in = lm.info.hidden_size
    cfg = TrainConfig(d_sae=args.width, k=args.k, batch_size=args.batch)
    sae = SparseAutoencoder(
        SAEConfig(d_in=d_in, d_sae=args.width, architecture="topk", k=args.k)
    ).initialize()
    x = torch.cat(fast)[: args.batch]
    if len(x) < args.batch:
        x = x.repeat(args.batch // len(x) + 1, 1)[: args.batch]
    x = x * (d_in**0.5 / float(x.norm(dim=-1).mean()))
    dead = torch.zeros(args.width, dtype=torch.bool)

    def dense_step() -> float:
        recon, _ = sae(x)
        loss = ((x - recon) ** 2).sum(-1).mean() / ((x - x.mean(0)) ** 2).sum(-1).mean()
        loss.backward()
        return float(loss.detach())

    def sparse_step() -> float:
        loss, _, _ = train_step_loss(sae, x, dead, cfg)
        loss.backward()
        return float(loss.detach())

    timings, losses = {}, {}
    for name, step in (("sparse", sparse_step), ("dense", dense_step)):
        step()
        start = time.perf_counter()
        for _ in range(5):
            sae.zero_grad()
            losses[name] = step()
        timings[name] = (time.perf_counter() - start) / 5
    print(f"TopK step (batch {args.batch}, d_sae {args.width}, k {args.k}):")
    print(
        f"  sparse decode {timings['sparse']:.3f} s, dense {timings['dense']:.3f} s, "
        f"ratio {timings['dense'] / timings['sparse']:.2f}x, "
        f"|Δ loss| {abs(losses['sparse'] - losses['dense']):.1e}"
    )


if __name__ == "__main__":
    main()
