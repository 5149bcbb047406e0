"""The bad-input catalogue of issue 15: each kind of bad input gives one clear error, nothing is
written or lost, and every check that does not need the weights fails before the model loads.

`CATALOGUE` (at the end) lists the kinds covered, each with the test showing it (47 kinds);
`BEFORE_LOAD` those refused before any model load (33: 20 CLI cases whose test asserts the weights
were never built, and 13 library checks that involve no model at all). The hook-leak, crafted-pickle,
truncated-checkpoint and corrupted-cache cases are imported from their own modules and run here
again. Tiny models only, nothing downloaded.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import finesteer.models
import finesteer.models.loading
from finesteer.activations import capture
from finesteer.artifacts import ArtifactError, load_intervention, save_intervention
from finesteer.cli import app
from finesteer.errors import FinesteerError
from finesteer.evaluate.asr_effect import AsrSettings, asr_effect
from finesteer.evaluate.harness import ResumeError, run_generations
from finesteer.fit.hsi import split_items
from finesteer.generation import GenerationConfig, generate
from finesteer.interventions import Scope, intervene, steer_residual
from finesteer.interventions.edit import check_eps
from finesteer.locate.sahara import check_sahara_settings
from finesteer.locate.ships import check_template
from finesteer.models import LoadedModel, ModelLoadError, load_model, peek_model_info
from finesteer.models.context import PromptLengthError
from finesteer.recipes import RunFolder, RunResumeError
from finesteer.runs import FolderLock, FolderLockedError, ManifestError, OutputFolderError, write_json_atomic
from finesteer.scoring.ab import ABScorer
from finesteer.sites import Site

# Cases that live in their own modules, run here again so the catalogue is in one place.
from tests.test_hook_safety import (  # noqa: F401
    test_generator_abandoned_in_reference_cycle_leaves_no_hook,
    test_paused_generator_does_not_steer_other_callers,
)
from tests.test_model_cache import fakes, test_same_size_corruption_is_found_and_reconverted  # noqa: F401
from tests.test_sae_checkpoint import (  # noqa: F401
    acts,
    test_crafted_pickle_checkpoint_is_refused_and_never_runs,
    test_truncated_checkpoint_is_a_clear_error,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model("tiny-llama")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: compared before and after to show nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The model loader fails the test if called: the error must come before any load."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the bad input was refused")

    # patched where the weights are built, so every binding of `load_model` (however imported) hits it
    import transformers

    monkeypatch.setattr(finesteer.models.loading, "build_tiny", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    yield


@pytest.fixture
def other_thread_holds() -> Iterator[Callable[[Path], None]]:
    """hold(folder): another thread takes the folder's lock until the test ends (a second writer)."""
    release = threading.Event()
    threads: list[threading.Thread] = []

    def hold(folder: Path) -> None:
        taken = threading.Event()

        def run() -> None:
            with FolderLock(folder):
                taken.set()
                release.wait(30)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        assert taken.wait(10)

    yield hold
    release.set()
    for thread in threads:
        thread.join(10)


def cli_error(args: list[str], pattern: str) -> str:
    """Run the CLI; it must exit 2 with one `error:` line matching `pattern` and no traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    line = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert line, result.output
    import re

    assert re.search(pattern, line[-1]), line[-1]
    return line[-1]


# ----------------------------------------------------------------------------- library / API


def test_empty_prompt_through_the_api(lm: LoadedModel) -> None:
    with pytest.raises(PromptLengthError, match="prompt 0 is empty"):
        generate(lm, [""], GenerationConfig(max_new_tokens=2))
    with pytest.raises(PromptLengthError, match="input 0 is empty"):
        capture(lm, [""], [Site(0, "resid_post")])


def test_prompt_longer_than_the_context_is_refused(lm: LoadedModel) -> None:
    from finesteer.data.items import ABItem

    long = ABItem("word " * 1000 + "\n\nChoices:\n (A) yes\n (B) no", "(A)", "(B)", "x")
    with pytest.raises(PromptLengthError, match="more than the model's context of 4096"):
        ABScorer(lm, [long])
    with pytest.raises(PromptLengthError, match="new tokens, more than the model's context"):
        generate(lm, ["a" * 4090], GenerationConfig(max_new_tokens=10))


@pytest.mark.parametrize("text", ["from:-1", "from:3,-2", "last:0", "from_end:-1"])
def test_negative_or_unknown_scope_is_refused(text: str) -> None:
    with pytest.raises(FinesteerError, match="scope"):
        Scope.parse(text)


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_negative_or_nan_eps_is_refused(eps: float) -> None:
    with pytest.raises(FinesteerError, match="ε must be a finite number ≥ 0"):
        check_eps(eps)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"do_sample": True, "temperature": float("nan")}, "temperature"),
    ],
)
def test_generation_settings_are_checked_on_construction(kwargs: dict, pattern: str) -> None:
    with pytest.raises(FinesteerError, match=pattern):
        GenerationConfig(**kwargs)


def test_zero_size_held_out_split_is_refused_not_made_one() -> None:
    from finesteer.data.typed import load_ab_set

    items = load_ab_set("coordinate-other-ais", None, 6)
    with pytest.raises(FinesteerError, match="held-out split needs ≥ 1 item, got 0"):
        split_items(items, 0)
    with pytest.raises(FinesteerError, match="has no items"):
        load_ab_set("coordinate-other-ais", None, 0)


def test_checks_that_need_only_the_config() -> None:
    info = peek_model_info("tiny-llama")
    assert info is not None
    with pytest.raises(FinesteerError, match=r"group_size must be in 1..12"):
        check_sahara_settings(info, group_size=0)
    with pytest.raises(FinesteerError, match=r"unknown head 9.0"):
        check_sahara_settings(info, group_size=1, candidates=[(9, 0)])
    with pytest.raises(FinesteerError, match="template must be"):
        check_template("no field")


def test_another_models_artifact_is_refused_by_the_api(lm: LoadedModel, tmp_path: Path) -> None:
    steer = steer_residual(1, torch.ones(lm.info.hidden_size), 1.0)
    folder = save_intervention(tmp_path / "art", steer, model_name="other", model_fingerprint="f" * 64,
                               model_info=lm.info)  # fmt: skip
    artifact = load_intervention(folder)
    with pytest.raises(ArtifactError, match="allow_other_weights=True"):
        load_intervention(folder, lm)
    with pytest.raises(ArtifactError, match="artifact was made for weights"), intervene(lm, artifact):
        pass
    with pytest.raises(ArtifactError, match="artifact was made for weights"):
        generate(lm, ["hi"], GenerationConfig(max_new_tokens=1), intervention=artifact)  # type: ignore[arg-type]
    with intervene(lm, artifact.intervention_for(lm, allow_other_weights=True)):
        pass  # explicitly allowed
    assert load_intervention(folder, lm, allow_other_weights=True).model_name == "other"


def test_malformed_and_truncated_artifacts(lm: LoadedModel, tmp_path: Path) -> None:
    steer = steer_residual(1, torch.ones(lm.info.hidden_size), 1.0)
    folder = save_intervention(tmp_path / "art", steer, lm)
    tensors = next(folder.glob("*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:40])
    with pytest.raises(ArtifactError, match="unreadable or truncated safetensors"):
        load_intervention(folder)
    spec = folder / "intervention.json"
    for text in ("{not json", "[1, 2]"):
        spec.write_text(text)
        with pytest.raises(ArtifactError, match=r"intervention.json"):
            load_intervention(folder)


def test_bad_config_json_and_truncated_weights(lm: LoadedModel, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match=r"config.json"):
        peek_model_info(bad)
    with pytest.raises(ModelLoadError, match="config"):
        load_model(bad)
    saved = tmp_path / "saved"
    lm.model.save_pretrained(saved)
    lm.tokenizer.save_pretrained(saved)
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(saved)


def test_offline_hub_id_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("nobody-here/no-such-model")
    assert time.perf_counter() - started < 5


def test_generations_resumed_with_other_data_are_refused(lm: LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "gen" / "generations.jsonl"
    config = GenerationConfig(max_new_tokens=2)
    run_generations(lm, [("1", "first data set")], out, config=config, progress=False)
    before = tree(tmp_path)
    with pytest.raises(ResumeError, match="another prompt under id '1'"):
        run_generations(lm, [("1", "second data set")], out, config=config, progress=False)
    with pytest.raises(ResumeError, match="system prompt or template"):
        run_generations(lm, [("1", "first data set")], out, config=config, progress=False,
                        format_fn=lambda text: "SYSTEM " + text)  # fmt: skip
    assert tree(tmp_path) == before  # nothing written, nothing lost


def test_ablation_resumed_on_another_model_is_refused(lm: LoadedModel, tmp_path: Path) -> None:
    settings = AsrSettings(ks=(1,), random_seeds=(), max_new_tokens=2, batch_size=4)
    asr_effect(lm, [(0, 1)], ["hi there"], settings=settings, out=tmp_path, progress=False)
    before = tree(tmp_path)
    other = load_model("tiny-qwen2")
    with pytest.raises(ManifestError, match="model: was 'tiny-llama-seed0', now 'tiny-qwen2-seed0'"):
        asr_effect(
            other, [(0, 1)], ["hi there"], settings=settings, out=tmp_path, resume=True, progress=False
        )
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- folders and locks


def test_second_writer_on_one_folder_is_refused_at_once(
    lm: LoadedModel, tmp_path: Path, other_thread_holds: Callable[[Path], None]
) -> None:
    out = tmp_path / "gen"
    run_generations(lm, [("1", "a")], out / "generations.jsonl", config=GenerationConfig(2), progress=False)
    before = tree(tmp_path)
    other_thread_holds(out)
    started = time.perf_counter()
    with pytest.raises(FolderLockedError, match="being written by another finesteer process"):
        run_generations(lm, [("1", "a"), ("2", "b")], out / "generations.jsonl",
                        config=GenerationConfig(2), progress=False)  # fmt: skip
    assert time.perf_counter() - started < 2  # at once, not after waiting
    assert tree(tmp_path) == before


def test_two_run_json_writers_never_corrupt_it(tmp_path: Path, other_thread_holds) -> None:
    from finesteer.recipes import parse_recipe

    recipe = parse_recipe({"method": "hsi", "name": "t", "model": "tiny-llama"})
    run = RunFolder.create(tmp_path, recipe, "test", folder=tmp_path / "run")
    # two threads writing run.json through the atomic writer: every read sees one whole file
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            for i in range(100):
                write_json_atomic(run.path / "run.json", {**run.state, "writer": tag, "i": i})
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads((run.path / "run.json").read_text())["i"] == 99
    assert not list(run.path.glob(".*.tmp"))  # unique temp names, all renamed or removed
    # read-modify-write: while another process holds the folder, an update is refused, not lost
    before = tree(run.path)
    other_thread_holds(run.path)
    with pytest.raises(FolderLockedError):
        run.update(status="finished")
    assert tree(run.path) == before


def test_output_folder_that_is_a_file(tmp_path: Path) -> None:
    from finesteer.runs import check_writable

    file = tmp_path / "file"
    file.write_text("keep me")
    with pytest.raises(OutputFolderError, match="is a file"):
        check_writable(file)
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        check_writable(file / "sub")
    with pytest.raises(OutputFolderError):
        FolderLock(file).acquire()
    assert file.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only folder")
def test_read_only_output_folder(tmp_path: Path) -> None:
    from finesteer.runs import check_writable

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputFolderError, match="cannot write"):
            check_writable(folder / "out")
    finally:
        folder.chmod(0o700)


# ----------------------------------------------------------------------------- run folders


def _recipe_file(tmp_path: Path, **fields: object) -> Path:
    data = {"method": "hsi", "name": "t", "model": "tiny-llama", "train_limit": 8, **fields}
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_folder(tmp_path: Path) -> Path:
    from finesteer.recipes import load_recipe

    run = RunFolder.create(tmp_path, load_recipe(_recipe_file(tmp_path)), "test", folder=tmp_path / "run")
    return run.path


def test_resume_after_recipe_yaml_was_edited_is_refused(tmp_path: Path, no_load: None) -> None:
    run = _run_folder(tmp_path)
    text = (run / "recipe.yaml").read_text().replace("train_limit: 8", "train_limit: 50")
    (run / "recipe.yaml").write_text(text)
    before = tree(tmp_path)
    cli_error(["run", "--resume", str(run)], "recipe.yaml was edited after the run started")
    assert tree(tmp_path) == before


def test_resume_with_another_recipe_is_refused(tmp_path: Path, no_load: None) -> None:
    run = _run_folder(tmp_path)
    other = _recipe_file(tmp_path, train_limit=20)
    before = tree(tmp_path)
    cli_error(["run", str(other), "--resume", str(run)], r"settings.train_limit: was 8, now 20")
    assert tree(tmp_path) == before
    with pytest.raises(RunResumeError):
        from finesteer.recipes import load_recipe

        RunFolder.open(run, load_recipe(other))


def test_resume_of_a_locked_run_folder_is_refused(tmp_path: Path, no_load: None, other_thread_holds) -> None:
    run = _run_folder(tmp_path)
    other_thread_holds(run)
    before = tree(tmp_path)
    cli_error(["run", "--resume", str(run)], "being written by another finesteer process")
    assert tree(tmp_path) == before


def test_pinned_inputs_differ_on_resume(tmp_path: Path) -> None:
    from finesteer.recipes import load_recipe

    run = RunFolder.create(tmp_path, load_recipe(_recipe_file(tmp_path)), "test", folder=tmp_path / "run")
    run.pin(model_fingerprint="aaa", data_hashes={"train": "1"})
    run.pin(model_fingerprint="aaa", data_hashes={"train": "1"})  # same inputs: fine
    with pytest.raises(RunResumeError, match="model_fingerprint differ"):
        run.pin(model_fingerprint="bbb")
    with pytest.raises(RunResumeError, match=r"data_hashes.train differ"):
        run.pin(data_hashes={"train": "2"})


# ----------------------------------------------------------------------------- CLI, before the load


def _artifacts(root: Path) -> dict[str, Path]:
    """Artifacts that cannot be applied to tiny-llama, each for one reason."""
    llama = peek_model_info("tiny-llama")
    qwen = peek_model_info("tiny-qwen2")
    assert llama is not None and qwen is not None
    ones = torch.ones(llama.hidden_size)
    made = {
        "shape": save_intervention(root / "shape", steer_residual(1, ones, 1.0), model_name="tiny-qwen2",
                                   model_fingerprint="tiny-qwen2-seed0", model_info=qwen),
        "weights": save_intervention(root / "weights", steer_residual(1, ones, 1.0), model_name="tiny-llama",
                                     model_fingerprint="f" * 64, model_info=llama),
        "layer": save_intervention(root / "layer", steer_residual(7, ones, 1.0), model_name="tiny-llama"),
        "vector": save_intervention(root / "vector", steer_residual(1, torch.ones(32), 1.0),
                                    model_name="tiny-llama"),
    }  # fmt: skip
    made["json"] = save_intervention(root / "json", steer_residual(1, ones, 1.0), model_name="tiny-llama")
    (made["json"] / "intervention.json").write_text('{"format": ')
    made["truncated"] = save_intervention(root / "truncated", steer_residual(1, ones, 1.0), model_name="x")
    tensors = next(made["truncated"].glob("*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:30])
    return made


ARTIFACT_CASES = {
    "shape": "artifact was made for tiny-qwen2",
    "weights": "artifact was made for weights .*allow-other-weights",
    "layer": "layer 7",
    "vector": "has 32 elements",
    "json": "invalid JSON",
    "truncated": "truncated safetensors",
}

ASR = ["eval", "asr", "tiny-llama", "--data", "jailbreakbench", "--limit", "2"]
SHIPS = ["locate", "ships", "tiny-llama", "--data", "jailbreakbench", "--limit", "2"]
SAHARA = ["locate", "sahara", "tiny-llama", "--data", "jailbreakbench", "--limit", "2"]
AB = ["eval", "ab", "tiny-llama", "--data", "coordinate-other-ais", "--limit", "2"]
FIT_HSI = ["fit", "hsi", "tiny-llama", "--limit", "12"]

#: (id, arguments, expected error text): every one fails before the model loads.
OPTION_CASES = [
    ("eval-asr-batch-size-0", [*ASR, "--batch-size", "0"], r"batch.size"),
    ("eval-asr-max-new-tokens-0", [*ASR, "--max-new-tokens", "0"], r"max.new.tokens"),
    ("eval-ab-batch-size-0", [*AB, "--batch-size", "0"], r"batch.size"),
    ("eval-ab-max-new-tokens-0", [*AB, "--max-new-tokens", "0"], r"max.new.tokens"),
    (
        "generate-max-new-tokens-0",
        ["generate", "tiny-llama", "hi", "--max-new-tokens", "0"],
        r"max.new.tokens",
    ),
    ("ships-eps-nan", [*SHIPS, "--eps", "nan"], "ε must be a finite number"),
    ("ships-eps-negative", [*SHIPS, "--eps", "-1"], "ε must be a finite number"),
    ("ships-template", [*SHIPS, "--template", "no field"], "template must be"),
    ("ships-batch-size-0", [*SHIPS, "--batch-size", "0"], r"batch.size"),
    ("sahara-group-size-0", [*SAHARA, "--group-size", "0"], "group_size must be in 1..12"),
    ("sahara-eps-nan", [*SAHARA, "--eps", "nan"], "ε must be a finite number"),
    (
        "ablate-head-out-of-range",
        ["ablate", "tiny-llama", "--data", "jailbreakbench", "--limit", "2", "--heads", "9.0"],
        "unknown head 9.0",
    ),
    (
        "ablate-eps-negative",
        ["ablate", "tiny-llama", "--data", "jailbreakbench", "--limit", "2", "--heads", "0.1", "--eps", "-1"],
        "ε must be a finite number",
    ),
    ("fit-hsi-n-sweep-0", [*FIT_HSI, "--n-sweep", "0"], r"n.sweep"),
    ("locate-hsi-head-out-of-range", ["locate", "hsi", "tiny-llama", "--heads", "0.9"], "unknown head 0.9"),
    ("sae-train-layer-out-of-range", ["sae", "train", "tiny-llama", "--layer", "7"], "layer 7"),
    ("fit-caa-layer-out-of-range", ["fit", "caa", "tiny-llama", "--layers", "1,7"], "layer 7"),
]


@pytest.mark.parametrize("args, pattern", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_option_errors_come_before_the_model_loads(
    args: list[str], pattern: str, tmp_path: Path, no_load: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # default output folders land here, and must not be created
    cli_error(args, pattern)
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("kind", list(ARTIFACT_CASES))
def test_artifact_errors_come_before_the_model_loads(kind: str, tmp_path: Path, no_load: None) -> None:
    artifact = _artifacts(tmp_path / "artifacts")[kind]
    before = tree(tmp_path)
    cli_error([*ASR, "--intervention", str(artifact)], ARTIFACT_CASES[kind])
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "args",
    [ASR, SHIPS, FIT_HSI, ["ablate", "tiny-llama", "--data", "jailbreakbench", "--heads", "0.1"],
     ["fit", "caa", "tiny-llama", "--train-limit", "8"]],
    ids=["eval-asr", "locate-ships", "fit-hsi", "ablate", "fit-caa"],
)
def test_output_folder_that_is_a_file_fails_before_the_load(
    args: list[str], tmp_path: Path, no_load: None
) -> None:
    file = tmp_path / "out"
    file.write_text("keep me")
    cli_error([*args, "--out", str(file)], "is a file")
    assert tree(tmp_path) == {"out": b"keep me"}


def test_locked_output_folder_is_refused_before_the_load(
    tmp_path: Path, no_load: None, other_thread_holds: Callable[[Path], None]
) -> None:
    out = tmp_path / "out"
    other_thread_holds(out)
    before = tree(tmp_path)
    cli_error([*ASR, "--out", str(out)], "being written by another finesteer process")
    cli_error([*SHIPS, "--out", str(out)], "being written by another finesteer process")
    cli_error(["compare", "tiny-llama", "--methods", "caa", "--train-limit", "8", "--out", str(out)],
              "being written by another finesteer process")  # fmt: skip
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- CLI, needing the model


def test_eval_asr_out_reused_with_other_data_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "asr"
    args = ["eval", "asr", "tiny-llama", "--limit", "2", "--max-new-tokens", "2", "--out", str(out), "--json"]
    first = runner.invoke(app, [*args, "--data", "jailbreakbench"])
    assert first.exit_code == 0, first.output
    before = tree(tmp_path)
    cli_error([*args, "--data", "advbench"], "another prompt under id")
    assert tree(tmp_path) == before


def test_locate_resume_with_other_prompts_keeps_the_run(tmp_path: Path) -> None:
    out = tmp_path / "ships"
    args = ["locate", "ships", "tiny-llama", "--data", "jailbreakbench", "--limit", "2", "--out", str(out)]
    first = runner.invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    before = tree(tmp_path)
    cli_error([*args[:-4], "--limit", "3", "--out", str(out), "--resume"], "holds a scan of other prompts")
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- the catalogue itself

#: kind of bad input -> (the test showing it, whether the error comes before any model load).
CATALOGUE: dict[str, tuple[str, bool]] = {
    # CLI, asserted with the loader guard (`no_load`)
    "--batch-size 0": ("test_option_errors_come_before_the_model_loads", True),
    "--max-new-tokens 0": ("test_option_errors_come_before_the_model_loads", True),
    "--eps nan": ("test_option_errors_come_before_the_model_loads", True),
    "negative --eps": ("test_option_errors_come_before_the_model_loads", True),
    "bad --template": ("test_option_errors_come_before_the_model_loads", True),
    "--group-size 0": ("test_option_errors_come_before_the_model_loads", True),
    "out-of-range --heads": ("test_option_errors_come_before_the_model_loads", True),
    "--n-sweep 0": ("test_option_errors_come_before_the_model_loads", True),
    "out-of-range --layer": ("test_option_errors_come_before_the_model_loads", True),
    "artifact of another shape": ("test_artifact_errors_come_before_the_model_loads", True),
    "artifact for other weights": ("test_artifact_errors_come_before_the_model_loads", True),
    "artifact layer out of range": ("test_artifact_errors_come_before_the_model_loads", True),
    "artifact vector size": ("test_artifact_errors_come_before_the_model_loads", True),
    "malformed artifact JSON": ("test_artifact_errors_come_before_the_model_loads", True),
    "truncated artifact safetensors": ("test_artifact_errors_come_before_the_model_loads", True),
    "--out is a file": ("test_output_folder_that_is_a_file_fails_before_the_load", True),
    "--out being written by another process": ("test_locked_output_folder_is_refused_before_the_load", True),
    "run --resume, recipe.yaml edited": ("test_resume_after_recipe_yaml_was_edited_is_refused", True),
    "run RECIPE --resume RUN with another recipe": ("test_resume_with_another_recipe_is_refused", True),
    "run --resume of a locked run folder": ("test_resume_of_a_locked_run_folder_is_refused", True),
    # need the model (tokenizer, fingerprint, forward) or are API-only
    "eval asr --out reused with other --data": ("test_eval_asr_out_reused_with_other_data_is_refused", False),
    "locate --resume with other prompts": ("test_locate_resume_with_other_prompts_keeps_the_run", False),
    "generations resumed, other data": ("test_generations_resumed_with_other_data_are_refused", False),
    "ablation resumed on another model": ("test_ablation_resumed_on_another_model_is_refused", False),
    "SAE training resumed on another model": ("test_sae_training_resumed_on_another_model_is_refused", False),
    "run resumed with another model or data": ("test_pinned_inputs_differ_on_resume", False),
    "empty prompt through the API": ("test_empty_prompt_through_the_api", False),
    "prompt longer than the context": ("test_prompt_longer_than_the_context_is_refused", False),
    "negative or unknown scope": ("test_negative_or_unknown_scope_is_refused", True),
    "ε < 0, NaN or inf through the API": ("test_negative_or_nan_eps_is_refused", True),
    "generation settings through the API": ("test_generation_settings_are_checked_on_construction", True),
    "zero-size split": ("test_zero_size_held_out_split_is_refused_not_made_one", True),
    "group size / heads / template through the API": ("test_checks_that_need_only_the_config", True),
    "another model's artifact through the API": ("test_another_models_artifact_is_refused_by_the_api", False),
    "malformed / truncated artifact through the API": ("test_malformed_and_truncated_artifacts", True),
    "bad config.json / truncated model weights": ("test_bad_config_json_and_truncated_weights", False),
    "offline hub id": ("test_offline_hub_id_fails_fast", False),
    "second writer on one folder": ("test_second_writer_on_one_folder_is_refused_at_once", True),
    "two run.json writers": ("test_two_run_json_writers_never_corrupt_it", True),
    "second writer in another process": ("test_a_second_process_is_refused_at_once", True),
    "output folder that is a file (library)": ("test_output_folder_that_is_a_file", True),
    "read-only output folder (skipped as root)": ("test_read_only_output_folder", True),
    "corrupted converted-model cache": ("test_same_size_corruption_is_found_and_reconverted", False),
    "crafted pickle checkpoint": ("test_crafted_pickle_checkpoint_is_refused_and_never_runs", True),
    "truncated SAE checkpoint": ("test_truncated_checkpoint_is_a_clear_error", True),
    "generator abandoned in a reference cycle (hook leak)": (
        "test_generator_abandoned_in_reference_cycle_leaves_no_hook", False),
    "paused generator steering another caller": ("test_paused_generator_does_not_steer_other_callers", False),
}  # fmt: skip
BEFORE_LOAD = [kind for kind, (_, before) in CATALOGUE.items() if before]


def test_every_catalogue_entry_has_its_test() -> None:
    missing = [test for test, _ in CATALOGUE.values() if not callable(globals().get(test))]
    assert not missing
    assert len(CATALOGUE) == 47 and len(BEFORE_LOAD) == 33


def test_sae_training_resumed_on_another_model_is_refused(lm: LoadedModel, tmp_path: Path) -> None:
    from finesteer.sae.corpus import CorpusSpec
    from finesteer.sae.pipeline import train_on_model
    from finesteer.sae.train import TrainConfig

    small = CorpusSpec(harmful=6, harmless=6, ab_per_behaviour=1, behaviours=("sycophancy",))
    cfg = TrainConfig(d_sae=32, k=4, epochs=1, batch_size=64)
    train_on_model(lm, 1, tmp_path / "sae", tokens=500, config=cfg, corpus=small, progress=False)
    before = tree(tmp_path)
    with pytest.raises(ManifestError, match="model: was 'tiny-llama-seed0', now 'tiny-qwen2-seed0'"):
        train_on_model(load_model("tiny-qwen2"), 1, tmp_path / "sae", tokens=500, config=cfg, corpus=small,
                       resume=True, progress=False)  # fmt: skip
    with pytest.raises(ManifestError, match=r"settings\.train\.k: was 4, now 8"):
        train_on_model(lm, 1, tmp_path / "sae", tokens=500, config=TrainConfig(d_sae=32, k=8, epochs=1,
                       batch_size=64), corpus=small, resume=True, progress=False)  # fmt: skip
    assert tree(tmp_path) == before


def test_a_second_process_is_refused_at_once(tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "out"
    code = "import sys; from finesteer.runs import FolderLock\nwith FolderLock(sys.argv[1]):\n" \
           "    print('held', flush=True); sys.stdin.read()"  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with pytest.raises(FolderLockedError, match="being written by another finesteer process"):
            FolderLock(out).acquire()
        assert time.perf_counter() - started < 1
    finally:
        holder.communicate("", timeout=10)
    FolderLock(out).acquire().release()  # free again once the other process has finished
