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
from finesteer.sites import Site

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
        cache = kwargs.get("past_key_values")
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


def _site_module(model: nn.Module, adapter: ArchitectureAdapter, site: Site) -> tuple[nn.Module, str]:
    """The module to hook for a site, and whether its input ('pre') or output ('post') is the site."""
    if site.component == "z":
        return adapter.attn_part(model, site.layer, adapter.o_proj), "pre"
    if site.component == "q":
        return adapter.attn_part(model, site.layer, adapter.query_module), "post"
    if site.component == "ln_final":
        return adapter.get(model, adapter.final_norm), "post"
    block = adapter.block(model, site.layer)
    if site.component == "resid_pre":
        return block, "pre"
    if site.component == "resid_post":
        return block, "post"
    if site.component == "attn_out":
        return adapter.get(block, adapter.attention), "post"
    return adapter.get(block, adapter.mlp), "post"


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


def _wrap(callback: SiteCallback, tracker: CallTracker, kind: str, heads_first: bool) -> Callable[..., Any]:
    def context() -> CallContext:
        if tracker.current is None:
            raise RuntimeError(
                "site hook ran before the base model's forward: call the model, not a submodule"
            )
        return tracker.current

    if kind == "pre":

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            from_kwargs = not args
            value = kwargs["hidden_states"] if from_kwargs else args[0]
            flat, restore = _flatten(value, heads_first)
            new = callback(flat, context())
            if new is None:
                return None
            new = restore(new)
            if from_kwargs:
                return args, {**kwargs, "hidden_states": new}
            return (new, *args[1:]), kwargs

        return pre_hook

    def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        value = output[0] if isinstance(output, tuple) else output
        flat, restore = _flatten(value, heads_first)
        new = callback(flat, context())
        if new is None:
            return None
        new = restore(new)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return post_hook


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

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.tracker = CallTracker()
        self._registrations: list[_Registration] = []
        _LIVE.setdefault(model, {})[id(self)] = self
        try:
            base = adapter.get(model, adapter.base_model)
            self.keep(base.register_forward_pre_hook(self.tracker, with_kwargs=True))
        except Exception:
            self.remove()
            raise

    def keep(self, handle: RemovableHandle) -> None:
        """Take over a torch hook handle registered elsewhere: it is removed with this set."""
        self._registrations.append(_Registration.of(handle))

    def add(self, site: Site, callback: SiteCallback) -> None:
        module, kind = _site_module(self.model, self.adapter, site)
        heads_first = site.component == "q" and self.adapter.query_heads_first
        hook = _wrap(callback, self.tracker, kind, heads_first)
        try:
            if kind == "pre":
                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                handle = module.register_forward_hook(hook)
        except Exception:
            self.remove()
            raise
        self.keep(handle)

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
