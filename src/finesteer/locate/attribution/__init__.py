"""Gradient pre-ranking (attribution patching) of single-head ablations, then exact verification.

Every head gets a gate a (one per prompt row, layer and head) that moves it from the model (a = 0)
to its Ships ablation (a = 1), at every position:

- `linearize="gate"`: the head's query (`ua`) or output (`sc`) is multiplied by 1 + a(ε − 1), so
  a = 1 is exactly the `Scale(ε)` op the exact scan applies;
- `linearize="activation"` (default; for `sc` it is the same path): the head's output z moves along
  z + a·Δz, where for `ua` Δz = (its output under uniform attention) − z, computed for every head at
  once from the layer's own values and mask (softmax of the mask alone = uniform over what each
  position may attend to). a = 1 is then the ε → 0 limit of the `ua` ablation, so the attention
  softmax — the part the query gate linearises badly when ε ≈ 0 — is exact, and only the effect of
  the changed output on later layers is linearised (attribution patching, Nanda 2023). On
  smollm2-135m-instruct (16 advbench prompts, ua, ε = 1e-5, 2 outcomes) this lifts the Spearman
  correlation with the exact query-level Ships scan over all 270 heads from 0.56 (gate) to 0.91.

One forward and a few backward passes, with the weights frozen so only gate gradients are computed,
estimate every head's effect at once:

- **first order** (a behaviour metric m, e.g. the log-probability of refusal tokens or the A/B
  letter margin): m(1) − m(0) ≈ ∂m/∂a. Importance is the drop, −∂m/∂a.
- **second order** (KL(p_base ‖ p_a), whose value and gradient vanish at a = 0):
  KL ≈ ½ F_hh with F_hh = Σ_y p_y (∂ log p_y / ∂a_h)², the Fisher information of the next-token
  distribution along the head's gate (the Hessian of KL at a = 0 is the Fisher, as the term
  Σ_y ∂²p_y vanishes). Over the whole vocabulary that needs one backward per token, so the outcomes
  are coarsened to the `outcomes` likeliest tokens (of the base model, per prompt) plus one "every
  other token" outcome: F is then the Fisher of that coarser variable, a lower bound of the full
  one (data processing), exact once the kept tokens carry all the mass or cover the vocabulary.
  Cost: one forward + (outcomes + 1) gate-only backward passes.

Modules: `metrics` (what is attributed: `TokenLogProb`, `LetterMargin`, `KLDivergence`), `gates`
(the gated-ablation hooks), `gradients` (the gate pass: first-order gradients or the Fisher),
`certify` (adaptive verification and the bound on missed top-k heads) and `prerank`
(`estimate_effects`, `exact_effects` — the exact per-head effects of any list of heads, the unit a
distributed verification runs —, `pre_ranked_scan`, `certified_scan`, `attribution_scan`);
`finesteer.locate.rank_stats` holds the rank statistics.

Why the estimate misses heads (smollm2-135m-instruct, ua, 16 advbench prompts, KL): the exact KL
is on average 6× the 2-outcome estimate (log-ratio mean 1.8, s.d. 0.55 over all 270 heads). Along
the gate, KL(a)/a² of a head at a → 0 (the full-vocabulary second-order term) is 4–9× the
2-outcome Fisher (the outcome truncation; fairly uniform across heads, so it barely reorders them),
and KL(1) is 0.46–10× that local term (the ablation is far from linear: downstream saturation),
which reorders them: the exact top 10 sit at estimate ranks 0–15, 33 and 69. More outcomes (8) or an
exact KL of the linearised outcome log-probabilities did not move the misses (ranks 32/77, 37/62),
so the estimate stays 2-outcome Fisher, and `certify` verifies until the calibrated residual
spread rules the rest out (docs/results/benchmarks.md).

`prerank.pre_ranked_scan` ranks all heads by the estimate, runs the exact
(fast) scan on the `top_n` best and reports how well the estimate ranked them (Spearman over the
verified heads); `rank_stats.rank_agreement` compares an estimate with a full exact scan.
"""
