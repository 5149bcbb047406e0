"""Convert a checked GGUF into an fp32 safetensors HF folder with transformers' GGUF loader."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finesteer.errors import FinesteerError
from finesteer.models.registry import RegistryEntry

__all__ = ["ModelConversionError", "convert_gguf_to_hf", "load_gguf_fp32", "save_plain_folder"]


class ModelConversionError(FinesteerError, RuntimeError):
    """transformers could not turn the GGUF into the expected HF model."""


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' tqdm bars when ``progress=False``, restoring the previous state after."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            hf_logging.enable_progress_bar()


def load_gguf_fp32(gguf: Path, label: str, *, progress: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) from ``gguf`` with transformers' GGUF loader, de-quantized to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise ModelConversionError(
            "transformers needs the `accelerate` package to load GGUF files; `pip install accelerate`"
        )
    with _transformers_progress_bars(progress):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as exc:
            raise ModelConversionError(
                f"transformers could not load the GGUF of {label}: {type(exc).__name__}: {exc}"
            ) from exc
    return model, tokenizer


def save_plain_folder(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Save a GGUF-loaded model as a plain fp32 safetensors HF folder (+ tokenizer).

    ``save_pretrained`` refuses GGUF-loaded models ("quantized with gguf") although the weights are
    plain fp32 tensors by then, hence the quantizer fields are cleared first.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Qwen2's config has no head_dim field (its modeling code falls back to hidden // heads); per-head
    # code reads config.head_dim, so record the value the model really uses.
    if getattr(model.config, "head_dim", None) is None:
        model.config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def convert_gguf_to_hf(gguf: Path, out_dir: Path, entry: RegistryEntry, *, progress: bool = True) -> None:
    """Load ``gguf`` with transformers' GGUF loader (de-quantized to fp32) and save it as safetensors.

    The GGUF file is deleted as soon as model and tokenizer are in memory, so the peak disk use is
    one GGUF plus one fp32 folder.
    """
    model, tokenizer = load_gguf_fp32(gguf, f"{entry.name!r} ({entry.family})", progress=progress)
    gguf.unlink(missing_ok=True)

    arch = type(model).__name__
    if arch != entry.architecture:
        raise ModelConversionError(
            f"{entry.name!r}: transformers built {arch}, the registry expects {entry.architecture}"
        )
    if entry.has_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ModelConversionError(f"{entry.name!r}: the GGUF tokenizer carries no chat template")
    save_plain_folder(model, tokenizer, out_dir)
