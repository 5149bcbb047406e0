"""Typed recipe configs: one pydantic model per method, read from YAML, validated before any work.

Everything a run needs is in the config (model, data, method parameters, evaluation, judge, seed), so
a run folder's `recipe.yaml` is enough to reproduce it. Errors name the offending field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from finesteer.errors import FinesteerError
from finesteer.locate.hsi_table import check_alphas
from finesteer.methods.registry import resolve_method
from finesteer.models.info import ModelInfo
from finesteer.sites import SiteError, parse_heads


class RecipeError(FinesteerError, ValueError):
    """A recipe that cannot run: unknown method, missing or mistyped field, head out of range."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationSection(Section):
    """Decoding for every generation in the run (greedy by default: reproducible)."""

    max_new_tokens: PositiveInt = 48
    batch_size: PositiveInt = 8
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)


class RecipeBase(Section):
    """Fields every recipe has."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    model: str = "smollm2-135m-instruct"
    device: str = Field("cpu", pattern=r"^(cpu|cuda|cuda:\d+|mps|auto)$", description="where the model runs")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    seed: int = 0
    generation: GenerationSection = GenerationSection()
    judge: Literal["keyword", "gcg", "llm", "local", "none"] = "keyword"
    examples: PositiveInt = Field(4, description="prompts shown before/after in the report")

    def head_fields(self) -> dict[str, list[tuple[int, int]]]:
        """Head lists in this recipe (field name → heads), checked against the model's shape."""
        return {}


def _check_heads(value: list[str] | None) -> list[str] | None:
    if value is not None:
        for item in value:
            parse_heads(item)
    return value


class HSIRecipe(RecipeBase):
    """Locate heads by A/B sensitivity, steer them (HSI), compare with baselines on one behaviour."""

    method: Literal["hsi"]
    behaviour: str = "coordinate-other-ais"
    train_limit: PositiveInt = 120
    sweep_limit: PositiveInt = 24
    val_limit: PositiveInt = 24
    test_limit: PositiveInt = 50
    open_ended_limit: PositiveInt = 6
    heads: list[str] | None = Field(None, description="restrict the sweep to these heads (LAYER.HEAD)")
    layers: list[int] | None = Field(None, description="restrict the sweep to these layers")
    alphas: list[float] = Field(
        default_factory=lambda: [4.0, 8.0, 16.0, 32.0],
        description="α grid in units of σ, all of one sign (negative steers away)",
    )
    k: PositiveInt = 4
    directions_from: Literal["ab", "sampled", "both"] = Field(
        "ab", description="read directions from answer letters, the model's sampled answers, or both"
    )
    n_samples: PositiveInt = Field(2, description="sampled answers per training item (directions_from)")
    baselines: list[Literal["prompt", "caa", "iti"]] = Field(default_factory=list)
    controls: int = Field(
        0, ge=0, description="random-head control seeds (as many heads, same α in σ units); 0: none"
    )
    eval_data: list[str] = Field(
        default_factory=list,
        description="extra A/B test files (Anthropic evals JSONL) scored alongside the test split",
    )

    _heads = field_validator("heads")(classmethod(lambda cls, v: _check_heads(v)))

    @field_validator("alphas")
    @classmethod
    def _check_alphas(cls, value: list[float]) -> list[float]:
        return list(check_alphas(value))

    def head_fields(self) -> dict[str, list[tuple[int, int]]]:
        return {"heads": [h for item in self.heads for h in parse_heads(item)]} if self.heads else {}


class ShipsRecipe(RecipeBase):
    """Score heads by ablation (Ships), grow a group (Sahara), measure ASR against random heads."""

    method: Literal["ships"]
    model: str = "qwen2.5-coder-0.5b-instruct"
    attribution_data: str = "refusal-direction-harmful"
    attribution_split: str | None = None
    attribution_limit: PositiveInt = 32
    evaluation_data: str = "jailbreakbench"
    evaluation_limit: PositiveInt = 40
    mode: Literal["ua", "sc"] = "ua"
    eps: float = Field(1e-5, ge=0)
    level: Literal["query", "dataset"] = "query"
    score: Literal["ships", "refusal"] = Field(
        "ships",
        description="ships: rank heads by the Ships score of `level`; refusal: by the drop in log "
        "p(refusal opening tokens), estimated for every head and verified exactly for the top `verify_top`",
    )
    verify_top: PositiveInt = 16
    sahara_group_size: int = Field(0, ge=0, description="0 skips Sahara")
    sahara_candidates: PositiveInt | None = Field(
        None, description="search the Sahara group among the top N Ships heads (None: every head)"
    )
    top_k: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 3])
    random_seeds: int = Field(3, ge=0)
    harmless_data: str | None = Field(
        "jailbreakbench-benign", description="harmless prompts for the helpfulness cost (None skips it)"
    )
    harmless_limit: PositiveInt = 40
    mc_data: str | None = Field("finesteer-mc", description="multiple-choice set for accuracy")
    heads: list[str] | None = Field(None, description="score only these heads (LAYER.HEAD)")

    _heads = field_validator("heads")(classmethod(lambda cls, v: _check_heads(v)))

    def head_fields(self) -> dict[str, list[tuple[int, int]]]:
        return {"heads": [h for item in self.heads for h in parse_heads(item)]} if self.heads else {}


class RefusalHeadsRecipe(ShipsRecipe):
    """The demo's showcase: heads ranked by the refusal metric (cheap, no generation), the top `top_k`
    ablated, ASR on held-out harmful prompts against random heads of the same count, with paired
    tests, intervals and a verdict (`finesteer.evaluate.asr_paired`)."""

    method: Literal["refusal-heads"]  # type: ignore[assignment]
    score: Literal["ships", "refusal"] = "refusal"
    mode: Literal["ua", "sc"] = "sc"
    top_k: list[PositiveInt] = Field(default_factory=lambda: [8])
    random_seeds: int = Field(3, ge=3, description="random-head control seeds (at least 3)")
    mc_data: str | None = None


class STARecipe(RecipeBase):
    """Train (or load) an SAE, select target atoms, steer, compare with CAA and prompting."""

    method: Literal["sta"]
    layer: int = Field(12, ge=0)
    sae_path: str | None = Field(None, description="a SAELens-format folder; trained here when absent")
    sae_width: PositiveInt = 4608
    sae_k: PositiveInt = 64
    sae_tokens: PositiveInt = 120_000
    n_pairs: PositiveInt = 160
    n_harmful: PositiveInt = 40
    n_harmless: PositiveInt = 40
    methods: list[Literal["baseline", "prompt", "caa", "sae_all", "sta"]] = Field(
        default_factory=lambda: ["baseline", "prompt", "caa", "sae_all", "sta"]
    )
    multipliers: list[float] = Field(default_factory=lambda: [0.5, 1.0, 1.5])
    headline: float = 1.0
    trim: float = Field(0.35, gt=0, le=1)


class FrontierRecipe(RecipeBase):
    """The refusal frontier: steering methods over λ, top-k head ablations against random heads."""

    method: Literal["frontier"]
    sae_path: str | None = Field(None, description="SAE folder (needed by caa, sae_all, sta, sta_output)")
    methods: list[str] = Field(
        default_factory=lambda: ["baseline", "prompt", "caa", "sae_all", "sta", "sta_output"]
    )
    lambdas: list[float] = Field(default_factory=lambda: [0.5, 1.0, 1.5])
    goal: Literal["induce", "remove"] = "induce"
    heads: list[str] | None = Field(None, description="head ranking (LAYER.HEAD), best first")
    rankings: dict[str, str] = Field(
        default_factory=dict, description="more named rankings, NAME: 'L.H,L.H,…' (no controls of their own)"
    )
    directions: list[str] = Field(
        default_factory=list, description="refusal direction folders (ablated, or added over λ)"
    )
    ks: list[PositiveInt] = Field(default_factory=lambda: [1, 3, 8])
    control_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    ablation_mode: Literal["ua", "sc"] = "ua"
    n_harmful: PositiveInt = 50
    n_harmless: PositiveInt = 50
    n_kl: PositiveInt = 50
    n_mc: int = Field(0, ge=0)
    n_pairs: PositiveInt = 160
    trim: float = Field(0.35, gt=0, le=1)
    refusal_judge: Literal["gcg+", "gcg", "ships"] = "gcg+"

    _heads = field_validator("heads")(classmethod(lambda cls, v: _check_heads(v)))

    @model_validator(mode="after")
    def _sae_for_methods(self) -> FrontierRecipe:
        """Method names resolve in the refusal task; the SAE-based ones need `sae_path`."""
        names = {m: resolve_method(m, "refusal").method.name for m in self.methods}
        need = [m for m, name in names.items() if name in ("sta", "caa_answer_mean")]
        if need and not self.sae_path:
            raise ValueError(f"methods {', '.join(need)} read an SAE: set sae_path")
        return self

    @field_validator("rankings")
    @classmethod
    def _rankings(cls, value: dict[str, str]) -> dict[str, str]:
        for text in value.values():
            parse_heads(text)
        return value

    def head_fields(self) -> dict[str, list[tuple[int, int]]]:
        fields = {f"rankings.{name}": parse_heads(text) for name, text in self.rankings.items()}
        if self.heads:
            fields["heads"] = [h for item in self.heads for h in parse_heads(item)]
        return fields


AnyRecipe = HSIRecipe | ShipsRecipe | RefusalHeadsRecipe | STARecipe | FrontierRecipe
Recipe = Annotated[AnyRecipe, Field(discriminator="method")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Recipe)
METHODS = ("hsi", "ships", "refusal-heads", "sta", "frontier")


def _format(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if not (isinstance(p, str) and p in METHODS))
        msg = item["msg"]
        if item["type"] == "union_tag_invalid":
            msg = f"unknown method {item['input'].get('method')!r}; choose one of {', '.join(METHODS)}"
            loc = "method"
        elif item["type"] == "union_tag_not_found":
            msg = f"missing field 'method' (one of {', '.join(METHODS)})"
            loc = "method"
        lines.append(f"{loc or '<recipe>'}: {msg}")
    return "invalid recipe: " + "; ".join(lines)


def parse_recipe(data: dict[str, Any]) -> AnyRecipe:
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe: expected a mapping of fields, got {type(data).__name__}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise RecipeError(_format(exc)) from None
    except SiteError as exc:
        raise RecipeError(f"invalid recipe: heads: {exc}") from None


def load_recipe(path: str | Path) -> AnyRecipe:
    """A recipe from its YAML file; every error names the file."""
    path = Path(path)
    try:
        return parse_recipe(yaml.safe_load(path.read_text()))
    except (FileNotFoundError, IsADirectoryError):
        raise RecipeError(f"recipe file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def dump_recipe(recipe: RecipeBase) -> str:
    data = recipe.model_dump(mode="json")
    ordered = {"method": data.pop("method"), **data}
    return yaml.safe_dump(ordered, sort_keys=False)


def check_against_model(recipe: RecipeBase, info: ModelInfo | None) -> None:
    """Reject layers and heads outside the model before any weights are loaded."""
    if info is None:
        return
    for field, heads in recipe.head_fields().items():
        for i, (layer, head) in enumerate(heads):
            if not 0 <= layer < info.n_layers:
                raise RecipeError(
                    f"invalid recipe: {field}[{i}]: layer {layer} out of range; {recipe.model} has "
                    f"{info.n_layers} layers (0..{info.n_layers - 1})"
                )
            if not 0 <= head < info.n_heads:
                raise RecipeError(
                    f"invalid recipe: {field}[{i}]: head {head} out of range; {recipe.model} has "
                    f"{info.n_heads} heads per layer (0..{info.n_heads - 1})"
                )
    top_k, seeds = getattr(recipe, "top_k", None), getattr(recipe, "random_seeds", 0)
    if top_k and seeds and 2 * max(top_k) > info.n_layers * info.n_heads:
        raise RecipeError(
            f"invalid recipe: top_k: {max(top_k)} heads and as many random control heads outside them need "
            f"{2 * max(top_k)} heads; {recipe.model} has {info.n_layers * info.n_heads}"
        )
    layers = getattr(recipe, "layers", None) or []
    layer_field = getattr(recipe, "layer", None)
    for i, layer in enumerate([*layers, *([layer_field] if layer_field is not None else [])]):
        if not 0 <= layer < info.n_layers:
            name = f"layers[{i}]" if i < len(layers) else "layer"
            raise RecipeError(
                f"invalid recipe: {name}: layer {layer} out of range; "
                f"{recipe.model} has {info.n_layers} layers"
            )
