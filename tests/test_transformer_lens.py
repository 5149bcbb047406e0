"""finesteer's TransformerLens-named sites hold TransformerLens's values.

Each tiny model is loaded into TransformerLens's `HookedTransformer` by TL's own config derivation
and weight conversion (from a local folder holding the config; no weight processing, so every
activation is comparable), and `finesteer.capture` must return the values of `run_with_cache` at
every shared hook within 1e-4, with `prepend_bos` set alike (TL's default is True, finesteer's
False). Known difference: in families with q/k norms (Qwen 3, Gemma 3, OLMo 2) finesteer's
hook_q / hook_k are read after the norm (where scaling a head's query acts), TL's before it.

TransformerLens is optional (`pip install "transformer-lens<4"`): the test skips without it, and
with TransformerLens ≥ 4, which removed `HookedTransformer`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import finesteer as fs
from finesteer.models import LoadedModel

pytest.importorskip("transformer_lens")
try:
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )
except ImportError:  # TransformerLens 4 replaced HookedTransformer by TransformerBridge
    pytest.skip("this TransformerLens has no HookedTransformer (removed in 4.0)", allow_module_level=True)

TEXT = "The quick brown fox jumps over the lazy dog!"
HOOKS = (
    "hook_resid_pre",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
# family -> hooks whose meaning differs on purpose (see the module docstring)
DIFFERENT = {"tiny-qwen3": ("attn.hook_q", "attn.hook_k")}


def _hooked_transformer(lm: LoadedModel, folder: Path) -> HookedTransformer:
    from transformers import AutoTokenizer

    config = copy.deepcopy(lm.model.config)
    config.architectures = [type(lm.model).__name__]
    if config.model_type == "gpt2":
        config.n_ctx = config.n_positions  # TL reads GPT-2's old name for it
    config.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    cfg = get_pretrained_model_config(str(folder), fold_ln=False, device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(folder))
    state = get_pretrained_state_dict(str(folder), cfg, hf_model=lm.model)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-phi3", "tiny-qwen3"])
def test_hook_values_match_transformer_lens(tiny_models, tmp_path: Path, name: str) -> None:
    lm = tiny_models[name]
    tl_model = _hooked_transformer(lm, tmp_path)
    names = [
        f"blocks.{layer}.{hook}"
        for layer in range(lm.info.n_layers)
        for hook in HOOKS
        if hook not in DIFFERENT.get(name, ())
    ]
    names.append("ln_final.hook_normalized")
    for prepend_bos in (True, False):
        tokens = tl_model.to_tokens(TEXT, prepend_bos=prepend_bos)
        assert tokens[0].tolist() == fs.to_tokens(lm.tokenizer, TEXT, prepend_bos=prepend_bos)
        ours = fs.capture(lm, [TEXT], names, position="all", prepend_bos=prepend_bos)
        with torch.no_grad():
            logits, cache = tl_model.run_with_cache(tokens)
            hf_logits = lm.model(input_ids=tokens).logits
        torch.testing.assert_close(hf_logits, logits, atol=1e-4, rtol=0)
        for site in names:
            theirs = cache[site][0]
            if site.endswith("hook_pattern"):
                theirs = theirs.transpose(0, 1)  # TL: [head, query, key]; finesteer: [query, head, key]
            torch.testing.assert_close(
                ours[site][0], theirs, atol=1e-4, rtol=0, msg=lambda m, s=site: f"{s}: {m}"
            )
