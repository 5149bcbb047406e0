"""Low-level hooking shared by interventions and capture.

Every site is presented to callbacks as one tensor of shape [batch, seq, width] whatever the module
returns (tuples, per-head 4-D q_norm outputs, pre-hook arguments), and each forward call is described
by a `CallContext` (which positions are real tokens, their index in the sequence, the cache length),
read from the base model's arguments so it is right under left padding and KV-cached generation.
Handles live in a `HookSet` that is a context manager and removes them on any exit.

Hooks cannot outlive their owner. torch's `RemovableHandle` holds only weak references to the hook
dicts, and CPython clears weak references that are themselves cyclic garbage *before* it runs the
cycle's finalizers, so a handle abandoned in a reference cycle (say, with a generator whose `finally`
would remove it) can no longer remove anything. A `HookSet` therefore keeps strong references to the
dicts it registered into and removes its ids from them directly, and every live `HookSet` is recorded
per model (`live_hook_sets`, `remove_all_hooks`) so leftover hooks can be found and cleared.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from finesteer.models.adapters import ArchitectureAdapter
from finesteer.models.info import ModelInfo
from finesteer.sites import Site, SiteError

SiteCallback = Callable[[Tensor, "CallContext"], Tensor | None]


@dataclass
class CallContext:
    """Positions of the current forward call.

    real: [B, S] bool, False on padding. index: [B, S] long, the token's index among the row's real
    tokens (0 = first prompt token), counting tokens already in the KV cache. prompt_len: [B], the
    number of real tokens in the row's prompt (fixed by the first forward without cache).
    """

    real: Tensor
    index: Tensor
    past_len: int
    prompt_len: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.real.shape[0])

    def last_real(self) -> Tensor:
        """[B, S] mask of each row's last real position in this call."""
        seq = self.real.shape[1]
        positions = torch.arange(seq, device=self.real.device).expand_as(self.real)
        last = torch.where(self.real, positions, torch.full_like(positions, -1)).max(dim=1).values
        return positions == last[:, None]


@dataclass
class CallTracker:
    """Reads each forward call's positions off the base model's inputs (a pre-hook with kwargs)."""

    current: CallContext | None = None
    _prompt_len: Tensor | None = field(default=None, repr=False)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise RuntimeError("finesteer could not find input_ids or inputs_embeds in the model call")
        batch, seq = int(ref.shape[0]), int(ref.shape[1])
        device = ref.device
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(mask, Tensor) and mask.dim() == 2:
            past_len = int(mask.shape[1]) - seq
            full = mask.to(torch.long)
            index = (full.cumsum(dim=1) - 1)[:, past_len:]
            real = full[:, past_len:].bool()
        else:
            past_len = (
                int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
            )
            position_ids = kwargs.get("position_ids")
            if isinstance(position_ids, Tensor) and position_ids.dim() == 2:
                index = position_ids.to(device).expand(batch, seq).clone()
            else:
                index = (torch.arange(seq, device=device) + past_len).expand(batch, seq).clone()
            real = torch.ones(batch, seq, dtype=torch.bool, device=device)
        if past_len == 0 or self._prompt_len is None or self._prompt_len.shape[0] != batch:
            self._prompt_len = real.sum(dim=1)
        self.current = CallContext(real=real, index=index, past_len=past_len, prompt_len=self._prompt_len)


@dataclass(frozen=True)
class HookPoint:
    """Where a site lives: a module's input ('pre') or output ('post'); `index` picks a tuple output's
    element (1: attention weights); `columns` a slice of the last dim (q/k/v of a fused projection);
    `heads_first` says a 4-D value is [batch, heads, seq, dim]; `flat_tokens` that it comes as
    [batch·seq, width] (router logits); `read_only` that a new value could not reach the model."""

    module: nn.Module
    kind: str
    index: int = 0
    columns: tuple[int, int] | None = None
    heads_first: bool = False
    flat_tokens: bool = False
    read_only: bool = False


def _qkv_columns(info: ModelInfo, component: str) -> tuple[int, int]:
    """Column span of q, k or v inside a fused [q | k | v] projection output."""
    q_width, kv_width = info.n_heads * info.head_dim, info.n_kv_heads * info.head_dim
    start = {"q": 0, "k": q_width, "v": q_width + kv_width}[component]
    return start, start + (q_width if component == "q" else kv_width)


def site_hook_point(model: nn.Module, adapter: ArchitectureAdapter, info: ModelInfo, site: Site) -> HookPoint:
    """The hook point of a site (resid_mid, made of two, is handled by `HookSet.add`)."""
    layer, component = site.layer, site.component
    if component == "z":
        return HookPoint(adapter.attn_part(model, layer, adapter.o_proj), "pre")
    if component in ("q", "k", "v"):
        name = {"q": adapter.query_module, "k": adapter.key_module, "v": adapter.v_proj}[component]
        fused = adapter.fused_qkv and name == adapter.q_proj
        return HookPoint(
            adapter.attn_part(model, layer, name),
            "post",
            columns=_qkv_columns(info, component) if fused else None,
            heads_first=adapter.query_heads_first and component != "v",
        )
    if component == "ln_final":
        return HookPoint(adapter.get(model, adapter.final_norm), "post")
    block = adapter.block(model, layer)
    if component == "pattern":
        attention = adapter.get(block, adapter.attention)
        return HookPoint(attention, "post", index=1, heads_first=True, read_only=True)
    if component == "mlp_post":
        return HookPoint(adapter.mlp_part(model, layer, adapter.mlp_down, "single MLP hidden layer"), "pre")
    if component == "router_logits":
        router = adapter.mlp_part(model, layer, adapter.router, "expert router")
        return HookPoint(router, "post", flat_tokens=True, read_only=True)  # routing is decided inside
    if component in ("resid_pre", "resid_post"):
        return HookPoint(block, "pre" if component == "resid_pre" else "post")
    if component == "attn_out":
        return HookPoint(adapter.get(block, adapter.attention), "post")
    if component == "mlp_out":
        return HookPoint(adapter.get(block, adapter.mlp), "post")
    raise SiteError(f"site {site.name} has no single hook point")


def _flatten(value: Tensor, heads_first: bool) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Present per-head 4-D outputs (q_norm) as [B, S, H*D]; return the inverse to restore the layout."""
    if value.dim() != 4:
        return value, lambda new: new
    if heads_first:
        batch, heads, seq, dim = value.shape
        flat = value.transpose(1, 2).reshape(batch, seq, heads * dim)
        return flat, lambda new: new.reshape(batch, seq, heads, dim).transpose(1, 2)
    batch, seq, heads, dim = value.shape
    return value.reshape(batch, seq, heads * dim), lambda new: new.reshape(batch, seq, heads, dim)


def _present(value: Tensor, point: HookPoint, ctx: CallContext) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The site's [B, S, W] view of a hooked value, and the function putting an edited view back."""
    if point.flat_tokens:
        shape = value.shape
        return value.view(ctx.batch_size, -1, shape[-1]), lambda new: new.reshape(shape)
    if point.columns is not None:
        lo, hi = point.columns
        part, restore = _flatten(value[..., lo:hi], point.heads_first)
        return part, lambda new: torch.cat((value[..., :lo], restore(new), value[..., hi:]), dim=-1)
    return _flatten(value, point.heads_first)


def _wrap(callback: SiteCallback, tracker: CallTracker, point: HookPoint, name: str) -> Callable[..., Any]:
    def context() -> CallContext:
        if tracker.current is None:
            raise RuntimeError(
                "site hook ran before the base model's forward: call the model, not a submodule"
            )
        return tracker.current

    def edit(value: Tensor | None) -> Tensor | None:
        if value is None:
            raise SiteError(
                f"{name}: the model returned no attention weights; hook_pattern needs "
                "attn_implementation='eager' (finesteer.capture switches to it by itself)"
            )
        ctx = context()
        flat, restore = _present(value, point, ctx)
        new = callback(flat, ctx)
        if new is None:
            return None
        if point.read_only:
            raise SiteError(f"{name} is read-only: a hook there cannot change the model")
        return restore(new)

    if point.kind == "pre":

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            new = edit(_first_input(args, kwargs))
            if new is None:
                return None
            if not args:
                return args, {**kwargs, "hidden_states": new}
            return (new, *args[1:]), kwargs

        return pre_hook

    def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        is_tuple = isinstance(output, tuple)
        new = edit(output[point.index] if is_tuple else output)
        if new is None:
            return None
        return (*output[: point.index], new, *output[point.index + 1 :]) if is_tuple else new

    return post_hook


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@dataclass(frozen=True)
class _Registration:
    """One registered hook: its id and strong references to every dict torch filed it under."""

    id: int
    dicts: tuple[dict[int, Any], ...]

    @classmethod
    def of(cls, handle: RemovableHandle) -> _Registration:
        refs = (handle.hooks_dict_ref, *handle.extra_dict_ref)
        return cls(handle.id, tuple(d for d in (ref() for ref in refs) if d is not None))

    def remove(self) -> None:
        for hooks in self.dicts:
            hooks.pop(self.id, None)


# model -> its live HookSets (strong: a HookSet stays findable until removed; the model key is weak).
# No lock: `remove()` may run inside a garbage collection triggered anywhere, including while this
# thread would hold the lock; every access below is one atomic dict operation instead.
_LIVE: weakref.WeakKeyDictionary[nn.Module, dict[int, HookSet]] = weakref.WeakKeyDictionary()


def live_hook_sets(model: nn.Module) -> list[HookSet]:
    """The HookSets currently registered on `model` (in creation order)."""
    return list(_LIVE.get(model, {}).copy().values())


def remove_all_hooks(model: nn.Module) -> int:
    """Remove every finesteer HookSet still registered on `model`; returns how many there were."""
    sets = live_hook_sets(model)
    for hooks in sets:
        hooks.remove()
    return len(sets)


class HookSet:
    """Registers site callbacks plus the call tracker; removes every hook on `remove()`/exit."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, info: ModelInfo | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self._info = info
        self.tracker = CallTracker()
        self._registrations: list[_Registration] = []
        _LIVE.setdefault(model, {})[id(self)] = self
        try:
            base = adapter.get(model, adapter.base_model)
            self.keep(base.register_forward_pre_hook(self.tracker, with_kwargs=True))
        except Exception:
            self.remove()
            raise

    @property
    def info(self) -> ModelInfo:
        """The model's shape (read from its config when not given): fused q/k/v slices need it."""
        if self._info is None:
            config = self.model.config
            text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
            self._info = ModelInfo.from_config(text_config, family=self.adapter.family)
        return self._info

    def keep(self, handle: RemovableHandle) -> None:
        """Take over a torch hook handle registered elsewhere: it is removed with this set."""
        self._registrations.append(_Registration.of(handle))

    def add(self, site: Site, callback: SiteCallback) -> None:
        try:
            if site.component == "resid_mid":
                self._add_resid_mid(site, callback)
                return
            point = site_hook_point(self.model, self.adapter, self.info, site)
            hook = _wrap(callback, self.tracker, point, site.name)
            if point.kind == "pre":
                handle = point.module.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                handle = point.module.register_forward_hook(hook)
        except Exception:
            self.remove()
            raise
        self.keep(handle)

    def _add_resid_mid(self, site: Site, callback: SiteCallback) -> None:
        """resid_mid = residual entering attention + the branch added to it. Read at the branch's
        output; an edit x → f(x) turns the branch b into f(residual + b) − residual."""
        adapter = self.adapter
        if adapter.attn_branch is None:
            raise SiteError(f"{site.name}: {adapter.family} scales the attention output before adding it")
        block = adapter.block(self.model, site.layer)
        entry, branch = adapter.get(block, adapter.attn_input), adapter.get(block, adapter.attn_branch)
        stash: dict[str, Tensor] = {}

        def keep_residual(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            stash["residual"] = _first_input(args, kwargs)

        def on_branch(value: Tensor, ctx: CallContext) -> Tensor | None:
            residual = stash.pop("residual")
            new = callback(residual + value, ctx)
            return None if new is None else new - residual

        self.keep(entry.register_forward_pre_hook(keep_residual, with_kwargs=True))
        hook = _wrap(on_branch, self.tracker, HookPoint(branch, "post"), site.name)
        self.keep(branch.register_forward_hook(hook))

    def remove(self) -> None:
        """Unregister every hook (idempotent; works even after the handles' weak references died)."""
        while self._registrations:
            self._registrations.pop().remove()
        _LIVE.get(self.model, {}).pop(id(self), None)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextmanager
def hooked(
    model: nn.Module, adapter: ArchitectureAdapter, callbacks: list[tuple[Site, SiteCallback]]
) -> Iterator[HookSet]:
    """Register callbacks for the duration of a `with` block; partial registration is undone too."""
    hooks = HookSet(model, adapter)
    try:
        for site, callback in callbacks:
            hooks.add(site, callback)
        yield hooks
    finally:
        hooks.remove()


def count_hooks(model: nn.Module) -> int:
    """Total forward (pre-)hooks on a model: tests use it to prove nothing leaks."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
