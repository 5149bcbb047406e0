"""catalog.yaml: the shipped file is read and checked at import; malformed entries are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finesteer.data import CATALOG, DatasetError
from finesteer.data.catalog import CATALOG_FILE, read_catalog


def _write(tmp_path: Path, entries: object) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


def _entry(**changes: object) -> dict:
    entry = {
        "name": "mine",
        "description": "d",
        "licence": "MIT",
        "non_commercial": False,
        "provenance": "advbench/PROVENANCE.md",
        "default_split": "all",
        "splits": {
            "all": {
                "file": "advbench/harmful_behaviors.csv",
                "kind": "prompts",
                "rows": 520,
                "loader": "prompts",
                "options": {"column": "goal", "source": "advbench"},
            }
        },
    }
    entry.update(changes)
    return entry


def test_shipped_catalog_is_the_package_data_file() -> None:
    assert CATALOG_FILE.is_file() and CATALOG_FILE.name == "catalog.yaml"
    assert list(read_catalog(CATALOG_FILE)) == list(CATALOG)


def test_valid_entry_reads(tmp_path: Path) -> None:
    spec = read_catalog(_write(tmp_path, [_entry()]))["mine"]
    assert (spec.default_split, spec.has_origins, spec.splits["all"].rows) == ("all", False, 520)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "non-empty list"),
        ([_entry(colour="red")], "unknown keys"),
        ([{k: v for k, v in _entry().items() if k != "licence"}], "missing keys"),
        ([_entry(default_split="test")], "default_split"),
        ([_entry(non_commercial="no")], "true or false"),
        ([_entry(), _entry()], "listed twice"),
        ([_entry(splits={"all": {**_entry()["splits"]["all"], "loader": "nope"}})], "loader must be"),
        ([_entry(splits={"all": {**_entry()["splits"]["all"], "kind": "pairs"}})], "kind must be"),
        ([_entry(splits={"all": {**_entry()["splits"]["all"], "rows": -1}})], "rows must be"),
        ([_entry(splits={"all": {**_entry()["splits"]["all"], "options": {"colour": 1}}})], "bad options"),
    ],
)
def test_malformed_catalog_is_rejected(tmp_path: Path, entries: object, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        read_catalog(_write(tmp_path, entries))
