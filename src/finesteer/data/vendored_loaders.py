"""How each vendored data file is read: the `loader:` names that catalog.yaml may use."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from finesteer.data.items import ABItem, Item, option_letters
from finesteer.data.loaders import load_open_ended, load_prompts, read_ab_items, read_rows

__all__ = ["LOADERS", "Loader"]

Loader = Callable[[Path], list[Item]]
"""Reads one vendored file into typed rows."""


def _ab(path: Path) -> list[Item]:
    return list(read_ab_items(path))


def _open(path: Path) -> list[Item]:
    return list(load_open_ended(path))


def _prompts(column: str, source: str | None = None, columns: Mapping[str, str] | None = None) -> Loader:
    def load(path: Path) -> list[Item]:
        return list(load_prompts(path, column, columns=dict(columns or {}), source=source))

    return load


def _hsi_test_ab(path: Path) -> list[Item]:
    # `prompt` already holds the question, the choices and the HSI answer-format instruction; `gt` is
    # the coordinating letter and the contrast is the other of the two options.
    items = read_ab_items(
        path, columns={"question": "prompt", "matching": "gt", "id": "data_id"}, infer_not_matching=True
    )
    return list(items)


def _hsi_open_ended(path: Path) -> list[Item]:
    return list(load_open_ended(path, "question", columns={"id": "data_id"}))


def _hsi_train_selection(path: Path) -> list[Item]:
    # Each row lists the prompt strings HSI used upstream with how many of its 6 completions used each;
    # take the most used one (row 307: 4 of 6 use a straight apostrophe, 2 a curly one).
    items: list[Item] = []
    for row in read_rows(path):
        variants = row.values.get("prompt_variants")
        if not isinstance(variants, list) or not variants:
            raise row.error("prompt_variants must be a non-empty list")
        try:
            best = max(variants, key=lambda v: int(v["n_upstream_rows"]))
            prompt = best["prompt"]
        except (TypeError, KeyError, ValueError) as exc:
            raise row.error(f"malformed prompt_variants entry ({exc!r})") from exc
        gt = row.values.get("gt")
        if not isinstance(gt, str) or not isinstance(prompt, str):
            raise row.error("gt and prompt must be strings")
        others = [o for o in option_letters(prompt) if f"({o})" != gt]
        if len(others) != 1:
            raise row.error(f"expected two options, found {option_letters(prompt)}")
        try:
            items.append(ABItem(prompt, gt, f"({others[0]})", str(row.values.get("data_id"))))
        except ValueError as exc:
            raise row.error(str(exc)) from exc
    return items


def _xstest(label: str | None) -> Loader:
    def load(path: Path) -> list[Item]:
        items = load_prompts(
            path, "prompt", columns={"id": "id", "category": "type", "label": "label"}, source="xstest"
        )
        return [item for item in items if label is None or item.label == label]

    return load


def _fixed(loader: Loader) -> Callable[[], Loader]:
    """A loader factory for a loader without options."""

    def factory() -> Loader:
        return loader

    return factory


#: The `loader:` names of catalog.yaml -> factories taking the split's `options:` as keyword arguments.
LOADERS: Mapping[str, Callable[..., Loader]] = MappingProxyType(
    {
        "ab": _fixed(_ab),
        "open_ended": _fixed(_open),
        "prompts": _prompts,
        "hsi_test_ab": _fixed(_hsi_test_ab),
        "hsi_open_ended": _fixed(_hsi_open_ended),
        "hsi_train_selection": _fixed(_hsi_train_selection),
        "xstest": _xstest,
    }
)
