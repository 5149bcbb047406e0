"""Recipes are validated before any model is loaded, and errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from finesteer.recipes import RecipeError, load_recipe, parse_recipe, prepare
from finesteer.recipes.config import dump_recipe
from finesteer.recipes.run import RunFolder, StepInterrupted


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"method": "nope", "name": "x"}, r"method 'nope'; choose one of hsi, ships, refusal-heads, sta"),
        ({"name": "x"}, r"method: missing field 'method'"),
        ({"method": "hsi"}, r"name: Field required"),
        ({"method": "hsi", "name": "x", "k": "many"}, r"k: Input should be a valid integer"),
        ({"method": "hsi", "name": "x", "alphas": "big"}, r"alphas: Input should be a valid list"),
        ({"method": "hsi", "name": "x", "alphas": [-8, 8]}, r"alphas: .*mixes signs"),
        ({"method": "hsi", "name": "x", "directions_from": "x"}, r"directions_from: Input should be 'ab'"),
        ({"method": "ships", "name": "x", "mode": "zz"}, r"mode: Input should be 'ua' or 'sc'"),
        ({"method": "hsi", "name": "x", "surprise": 1}, r"surprise: Extra inputs are not permitted"),
        ({"method": "hsi", "name": "x", "generation": {"max_new_tokens": 0}}, r"generation.max_new_tokens"),
        ({"method": "ships", "name": "x", "heads": ["3.1", "x"]}, r"heads: .*cannot parse head 'x'"),
    ],
)
def test_invalid_recipes_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_hsi_recipe_defaults_are_runnable() -> None:
    recipe = parse_recipe({"method": "hsi", "name": "x"})
    assert recipe.alphas == [4.0, 8.0, 16.0, 32.0] and recipe.directions_from == "ab"  # type: ignore[union-attr]


def test_head_and_layer_ranges_checked_without_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import finesteer.models.loading as loading

    def forbidden(*args, **kwargs):
        raise AssertionError("the model must not be loaded to validate a recipe")

    monkeypatch.setattr(loading, "load_model", forbidden)
    recipe = parse_recipe(
        {"method": "ships", "name": "x", "model": "smollm2-135m-instruct", "heads": ["3.1", "2.9"]}
    )
    with pytest.raises(
        RecipeError, match=r"heads\[1\]: head 9 out of range; smollm2-135m-instruct has 9 heads"
    ):
        prepare(recipe)
    recipe = parse_recipe({"method": "hsi", "name": "x", "model": "tiny-llama", "layers": [0, 3]})
    with pytest.raises(RecipeError, match=r"layers\[1\]: layer 3 out of range; tiny-llama has 3 layers"):
        prepare(recipe)
    recipe = parse_recipe({"method": "hsi", "name": "x", "behaviour": "coordinate-with-aliens"})
    with pytest.raises(RecipeError, match=r"behaviour: unknown dataset 'coordinate-with-aliens'"):
        prepare(recipe)


def test_yaml_roundtrip_and_file_errors(tmp_path: Path) -> None:
    recipe = parse_recipe({"method": "hsi", "name": "demo", "model": "tiny-llama", "alphas": [2.0]})
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe
    path.write_text("method: hsi\nname: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_run_folder_steps_resume(tmp_path: Path) -> None:
    recipe = parse_recipe({"method": "hsi", "name": "demo", "model": "tiny-llama"})
    calls: list[str] = []

    def make(name: str):
        def step(folder: Path) -> dict:
            calls.append(name)
            (folder / "out.txt").write_text(name)
            return {"value": len(calls)}

        return step

    run = RunFolder.create(tmp_path, recipe, "finesteer run r.yaml")
    run.stop_after = "two"
    assert run.step("one", make("one")) == {"value": 1}
    with pytest.raises(StepInterrupted):
        run.step("two", make("two"))
    resumed = RunFolder.open(run.path)
    assert resumed.recipe == recipe
    assert resumed.step("one", make("one")) == {"value": 1}  # not run again
    assert resumed.step("two", make("two")) == {"value": 2}
    assert resumed.step("three", make("three")) == {"value": 3}
    assert calls == ["one", "two", "three"]
    with pytest.raises(FileExistsError, match="resume it"):
        RunFolder.create(tmp_path, recipe, "again", folder=run.path)


def test_shipped_recipes_validate() -> None:
    root = Path(__file__).resolve().parents[1]
    examples = sorted((root / "examples" / "recipes").glob("*.yaml"))
    paths = [*examples, *sorted((root / "src/finesteer/recipes").glob("demo*.yaml"))]
    assert len(paths) >= 3
    for path in paths:
        prepare(load_recipe(path))


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("examples/recipes/*.yaml")), ids=str)
def test_every_example_recipe_is_valid(path: Path) -> None:
    import yaml

    recipe = parse_recipe(yaml.safe_load(path.read_text()))
    assert recipe.name and recipe.method in ("hsi", "ships", "sta", "frontier")
