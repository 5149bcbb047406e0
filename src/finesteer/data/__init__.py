"""Datasets for locating and steering safety behaviours: vendored public data, typed loaders, prompts.

Import cost is small on purpose (no torch / transformers): tokenizers are passed to the prompt
functions by the caller.

    from finesteer.data import load_dataset, ab_prompt
    items = load_dataset("coordinate-other-ais", split="generate")
    text = ab_prompt(tokenizer, items[0])
"""

from __future__ import annotations

from finesteer.data.ab import load_ab_items
from finesteer.data.catalog import (
    CATALOG,
    ITEM_KINDS,
    VENDORED_DIR,
    DatasetInfo,
    DatasetSpec,
    ItemKind,
    SplitSpec,
    dataset_info,
    list_datasets,
    load_dataset,
)
from finesteer.data.errors import DatasetError
from finesteer.data.items import (
    ABItem,
    ABTriple,
    Item,
    OpenEndedItem,
    OptionLine,
    PromptItem,
    ab_triples,
    answer_letter,
    option_letters,
    option_lines,
    option_text,
    question_stem,
)
from finesteer.data.loaders import load_open_ended, load_prompts, read_ab_items, read_rows
from finesteer.data.prompts import (
    HSI_INSTRUCTION,
    PLAIN_FORMAT,
    SAHARA_TEMPLATE,
    SHIPS_TEMPLATE,
    ab_completion,
    ab_prompt,
    chat_prompt,
    hsi_ab_prompt,
    raw_prompt,
)

__all__ = [
    "CATALOG",
    "HSI_INSTRUCTION",
    "ITEM_KINDS",
    "PLAIN_FORMAT",
    "SAHARA_TEMPLATE",
    "SHIPS_TEMPLATE",
    "VENDORED_DIR",
    "ABItem",
    "ABTriple",
    "DatasetError",
    "DatasetInfo",
    "DatasetSpec",
    "Item",
    "ItemKind",
    "OpenEndedItem",
    "OptionLine",
    "PromptItem",
    "SplitSpec",
    "ab_completion",
    "ab_prompt",
    "ab_triples",
    "answer_letter",
    "chat_prompt",
    "dataset_info",
    "hsi_ab_prompt",
    "list_datasets",
    "load_ab_items",
    "load_dataset",
    "load_open_ended",
    "load_prompts",
    "option_letters",
    "option_lines",
    "option_text",
    "question_stem",
    "raw_prompt",
    "read_ab_items",
    "read_rows",
]
