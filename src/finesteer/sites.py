"""Named places in a model where activations are read or changed.

A `Site` is (layer, component, head). Names follow TransformerLens hook names
(`blocks.3.attn.hook_z`, `blocks.3.hook_resid_post`, …) so results line up with TL, SAELens and
Neuronpedia; a single head is written `blocks.3.attn.hook_z[5]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

from finesteer.errors import FinesteerError
from finesteer.models.info import ModelInfo

Component = Literal[
    "z",
    "q",
    "k",
    "v",
    "pattern",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "mlp_post",
    "router_logits",
    "ln_final",
]
HEAD_COMPONENTS: frozenset[str] = frozenset({"z", "q", "k", "v", "pattern"})
KV_COMPONENTS: frozenset[str] = frozenset({"k", "v"})
READ_ONLY_COMPONENTS: frozenset[str] = frozenset({"pattern", "router_logits"})
Head = tuple[int, int]
"""An attention head as (layer, head index)."""

_TL_NAMES = MappingProxyType(
    {
        "z": "blocks.{layer}.attn.hook_z",
        "q": "blocks.{layer}.attn.hook_q",
        "k": "blocks.{layer}.attn.hook_k",
        "v": "blocks.{layer}.attn.hook_v",
        "pattern": "blocks.{layer}.attn.hook_pattern",
        "resid_pre": "blocks.{layer}.hook_resid_pre",
        "resid_mid": "blocks.{layer}.hook_resid_mid",
        "resid_post": "blocks.{layer}.hook_resid_post",
        "attn_out": "blocks.{layer}.hook_attn_out",
        "mlp_out": "blocks.{layer}.hook_mlp_out",
        "mlp_post": "blocks.{layer}.mlp.hook_post",
        "router_logits": "blocks.{layer}.mlp.hook_router_logits",
        "ln_final": "ln_final.hook_normalized",
    }
)
_DESCRIPTIONS = MappingProxyType(
    {
        "z": "head output: the head's slice of the o_proj input",
        "q": "head query before RoPE (after q_norm where the family has one)",
        "k": "key head (one of n_kv_heads) before RoPE (after k_norm where the family has one)",
        "v": "value head (one of n_kv_heads)",
        "pattern": "attention probabilities [query pos, head, key pos] (read-only; needs eager attention)",
        "resid_pre": "residual stream entering the block",
        "resid_mid": "residual stream between attention and MLP",
        "resid_post": "residual stream leaving the block",
        "attn_out": "attention output after o_proj (before a post-attention norm)",
        "mlp_out": "MLP output (before a post-MLP norm)",
        "mlp_post": "MLP hidden activation: the input of its down projection (dense MLPs only)",
        "router_logits": "mixture-of-experts router logits, one per expert (read-only)",
        "ln_final": "final normalised hidden state (input of the unembedding)",
    }
)
# hook name -> component; "attn." is optional before block-level names (accepted since 0.1)
_BY_HOOK = MappingProxyType(
    {
        **{f"{pre}hook_{c}": c for c in ("z", "q", "k", "v", "pattern") for pre in ("attn.", "")},
        **{
            f"{pre}hook_{c}": c
            for c in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
            for pre in ("attn.", "")
        },
        "mlp.hook_post": "mlp_post",
        "mlp.hook_router_logits": "router_logits",
    }
)
_PATTERN = re.compile(
    r"^(?:blocks\.(?P<layer>-?\d+)\.(?P<hook>[a-z_.]+)|ln_final\.hook_normalized)(?:\[(?P<head>-?\d+)\])?$"
)


class SiteError(FinesteerError, ValueError):
    """A site that does not exist in the model (bad layer, head, or component name)."""


class HeadError(SiteError):
    """A (layer, head) pair outside the model, or a head listed twice."""


@dataclass(frozen=True, order=True)
class Site:
    """One hookable place. `head=None` on a head component means all heads of that layer."""

    layer: int
    component: Component
    head: int | None = None

    def __post_init__(self) -> None:
        if self.component not in get_args(Component):
            raise SiteError(
                f"unknown component '{self.component}'; choose from {', '.join(get_args(Component))}"
            )
        if self.head is not None and self.component not in HEAD_COMPONENTS:
            raise SiteError(
                f"component '{self.component}' has no heads; only "
                f"{', '.join(sorted(HEAD_COMPONENTS))} take a head index"
            )

    @property
    def name(self) -> str:
        base = _TL_NAMES[self.component].format(layer=self.layer)
        return base if self.head is None else f"{base}[{self.head}]"

    @property
    def is_head(self) -> bool:
        return self.component in HEAD_COMPONENTS

    @property
    def editable(self) -> bool:
        """False for sites that can only be read (attention pattern, router logits)."""
        return self.component not in READ_ONLY_COMPONENTS

    def head_count(self, info: ModelInfo) -> int:
        """Heads at this component: key/value heads for k and v (GQA), query heads otherwise."""
        return info.n_kv_heads if self.component in KV_COMPONENTS else info.n_heads

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str, n_layers: int | None = None) -> Site:
        """Read a TL-style name; `ln_final.hook_normalized` needs `n_layers` (it follows the last block)."""
        match = _PATTERN.match(text.strip())
        if match is None:
            raise SiteError(
                f"cannot parse site '{text}': expected e.g. 'blocks.3.attn.hook_z[5]' or "
                "'blocks.3.hook_resid_post'"
            )
        head = int(match["head"]) if match["head"] is not None else None
        if match["hook"] is None:
            if head is not None:
                raise SiteError(f"'{text}': ln_final has no heads")
            return cls(layer=(n_layers - 1) if n_layers else -1, component="ln_final")
        component = _BY_HOOK.get(match["hook"])
        if component is None:
            known = ", ".join(name.format(layer="L") for name in _TL_NAMES.values())
            raise SiteError(f"cannot parse site '{text}': unknown hook '{match['hook']}'; known: {known}")
        return cls(layer=int(match["layer"]), component=component, head=head)  # type: ignore[arg-type]

    def validate(self, info: ModelInfo) -> None:
        """Fail with the model's actual ranges when the site is outside them."""
        if self.component == "ln_final":
            return
        if not 0 <= self.layer < info.n_layers:
            raise SiteError(
                f"site {self.name}: layer {self.layer} out of range; model has {info.n_layers} layers "
                f"(0..{info.n_layers - 1})"
            )
        heads = self.head_count(info)
        if self.head is not None and not 0 <= self.head < heads:
            kind = "key/value" if self.component in KV_COMPONENTS else "query"
            raise SiteError(
                f"site {self.name}: head {self.head} out of range; model has {heads} {kind} heads "
                f"(0..{heads - 1}) per layer"
            )

    def width(self, info: ModelInfo) -> int:
        """Size of the activation vector at this site (what an added vector must have)."""
        if self.component == "pattern":
            raise SiteError(f"site {self.name} has no fixed width: it grows with the sequence")
        if self.component in ("mlp_post", "router_logits"):
            width = info.d_mlp if self.component == "mlp_post" else info.n_experts
            if width is None:
                what = "no single MLP hidden layer" if self.component == "mlp_post" else "no expert router"
                raise SiteError(f"site {self.name}: {info.family} has {what}")
            return width
        if self.is_head:
            return info.head_dim if self.head is not None else self.head_count(info) * info.head_dim
        return info.hidden_size


def head(layer: int, head_index: int) -> Site:
    """The output (o_proj input slice) of one attention head."""
    return Site(layer, "z", head_index)


def head_query(layer: int, head_index: int) -> Site:
    return Site(layer, "q", head_index)


def resid_post(layer: int) -> Site:
    return Site(layer, "resid_post")


def parse_heads(text: str) -> list[tuple[int, int]]:
    """Parse a CLI head list such as '12.3,13.1' (layer.head) into pairs."""
    heads = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        pieces = part.replace("L", "").replace("H", ".").split(".")
        pieces = [p for p in pieces if p]
        if len(pieces) != 2 or not all(p.lstrip("-").isdigit() for p in pieces):
            raise SiteError(f"cannot parse head '{part}': write heads as LAYER.HEAD, e.g. '12.3,13.1'")
        heads.append((int(pieces[0]), int(pieces[1])))
    if not heads:
        raise SiteError("empty head list: write heads as LAYER.HEAD, e.g. '12.3,13.1'")
    return heads


def check_heads(heads: Iterable[Head], n_layers: int, n_heads: int) -> list[Head]:
    """The one head-index validator: (layer, head) pairs as ints, each inside the model, none twice.

    An empty list is returned as is; callers that need at least one head say so in their own words.
    """
    checked: list[Head] = []
    for layer, head in heads:
        layer, head = int(layer), int(head)
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise HeadError(
                f"unknown head {layer}.{head}: out of range; model has {n_layers} layers × {n_heads} heads "
                f"(layer 0..{n_layers - 1}, head 0..{n_heads - 1})"
            )
        checked.append((layer, head))
    if len(set(checked)) != len(checked):
        seen: set[Head] = set()
        twice = next(h for h in checked if h in seen or seen.add(h))
        raise HeadError(
            f"duplicate head {twice[0]}.{twice[1]} in {[f'{layer}.{head}' for layer, head in checked]}"
        )
    return checked


def describe(component: Component) -> str:
    return _DESCRIPTIONS[component]
