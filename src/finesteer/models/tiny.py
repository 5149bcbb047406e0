"""Tiny randomly initialised models of several families, for tests and quick experiments.

They are real HF architectures built from configs (no weights to download), paired with a
character-level tokenizer that has a ChatML chat template, so every code path that needs a
tokenizer (chat prompts, generation, capture) runs on them too.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> Any:
    """A character-level fast tokenizer (printable ASCII + ChatML specials), built offline."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate((*_SPECIALS, *chars))}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = _CHATML
    return tokenizer


def _common(vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        # a character-level tokenizer makes A/B prompts several hundred tokens long; RoPE weights do not
        # depend on this, so the room changes no number (prompts beyond it are refused, see models.context)
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 5,
        "tie_word_embeddings": False,
    }


def _llama(vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_common(vocab_size), num_attention_heads=4, num_key_value_heads=4)


def _qwen2(vocab_size: int) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_common(vocab_size), num_attention_heads=4, num_key_value_heads=2)


def _mistral(vocab_size: int) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_common(vocab_size), num_attention_heads=8, num_key_value_heads=2, head_dim=8)


def _gemma3(vocab_size: int) -> Any:
    from transformers import Gemma3TextConfig

    # head_dim * heads = 128 ≠ hidden 64, one kv head, q/k norms: the awkward case on purpose.
    return Gemma3TextConfig(
        **_common(vocab_size),
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )


def _gpt2(vocab_size: int) -> Any:
    from transformers import GPT2Config

    common = _common(vocab_size)
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=common["max_position_embeddings"],
        n_embd=common["hidden_size"],
        n_layer=common["num_hidden_layers"],
        n_head=4,  # n_inner unset: GPT-2's MLP is 4 × hidden wide
        **{k: common[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")},
    )


def _phi3(vocab_size: int) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**_common(vocab_size), num_attention_heads=4, num_key_value_heads=2)


def _gemma2(vocab_size: int) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        **_common(vocab_size), num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=64
    )


def _qwen3(vocab_size: int) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_common(vocab_size), num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _olmo2(vocab_size: int) -> Any:
    from transformers import Olmo2Config

    return Olmo2Config(**_common(vocab_size), num_attention_heads=4, num_key_value_heads=2)


def _qwen2moe(vocab_size: int) -> Any:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_common(vocab_size),
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    )


def _mixtral(vocab_size: int) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        **_common(vocab_size), num_attention_heads=4, num_key_value_heads=2, num_local_experts=4
    )


TINY_CONFIGS: Mapping[str, Callable[[int], Any]] = MappingProxyType(
    {
        "tiny-llama": _llama,
        "tiny-qwen2": _qwen2,
        "tiny-mistral": _mistral,
        "tiny-gemma3": _gemma3,
        "tiny-gpt2": _gpt2,
        "tiny-phi3": _phi3,
        "tiny-gemma2": _gemma2,
        "tiny-qwen3": _qwen3,
        "tiny-olmo2": _olmo2,
        "tiny-qwen2moe": _qwen2moe,
        "tiny-mixtral": _mixtral,
    }
)


def build_tiny(name: str, *, seed: int = 0, attn_implementation: str = "eager") -> tuple[Any, Any]:
    """Build (model, tokenizer) for a tiny family by name; weights are seeded so tests repeat."""
    from transformers import AutoModelForCausalLM

    if name not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny model '{name}'; choose from {', '.join(TINY_CONFIGS)}")
    tokenizer = tiny_tokenizer()
    config = TINY_CONFIGS[name](len(tokenizer))
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        # Random init at std 0.02 makes every head nearly silent; widen it so heads matter in tests.
        for param in model.parameters():
            if param.dim() >= 2:
                torch.nn.init.normal_(param, std=0.2)
    model.eval()
    return model, tokenizer
