"""Options and argument parsers shared by finesteer commands, defined once.

Commands declare their parameters with these `Annotated` types (`model: ModelArg`, `json_out:
JsonFlag = False`), so an option is spelled and documented the same way everywhere. Option values
that are lists ('8,10,12', 'baseline,caa') are parsed here into tuples; a bad value becomes an
`OptionError`, which the CLI prints as one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from finesteer.errors import FinesteerError


class OptionError(FinesteerError, ValueError):
    """An option value that cannot be parsed or is not one of the allowed choices."""


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
ModelArg = Annotated[str, typer.Argument(help="Registry name, tiny-* name, HF folder, .gguf file or hub id.")]
SplitOpt = Annotated[str | None, typer.Option(help="Dataset split (default: the dataset's default split).")]
LimitOpt = Annotated[int | None, typer.Option(help="Use only the first N items.")]
BatchOpt = Annotated[int, typer.Option(help="Prompts per forward (or generation batch).")]
SystemOpt = Annotated[str | None, typer.Option(help="System prompt for every prompt.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the train/val split.")]
InterventionOpt = Annotated[
    Path | None, typer.Option("--intervention", "-i", help="Artifact folder to apply.")
]


def check_device(value: str | None) -> str | None:
    """--device checked when the command line is parsed: an unknown name or a GPU this machine lacks
    fails before any data is read or weights load (`models.loading.resolve_device`)."""
    from finesteer.cli.common import run_command
    from finesteer.models.loading import resolve_device

    if value is not None:  # None: an override left unset (`run`: the recipe's own)
        run_command(lambda: resolve_device(value))  # a DeviceError: one line `error: …`, exit code 2
    return value


def check_dtype(value: str | None) -> str | None:
    """--dtype checked when the command line is parsed (`models.loading.resolve_dtype`)."""
    from finesteer.cli.common import run_command
    from finesteer.models.loading import resolve_dtype

    if value is not None:
        run_command(lambda: resolve_dtype(value))
    return value


DeviceOpt = Annotated[
    str,
    typer.Option(
        help="Where the model runs: cpu, cuda, cuda:N, mps, or auto (first GPU, else MPS, else CPU).",
        callback=check_device,
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="Weights' dtype: float32, bfloat16, float16, or auto (the checkpoint's own).",
        callback=check_dtype,
    ),
]
DeviceOverrideOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help="Override the recipe's device: cpu, cuda, cuda:N, mps, auto.", callback=check_device
    ),
]
DtypeOverrideOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype", help="Override the recipe's dtype: float32, bfloat16, float16, auto.", callback=check_dtype
    ),
]
ColumnsOpt = Annotated[
    str | None,
    typer.Option(
        help="For a --data file: which column holds each field, FIELD=COLUMN pairs, e.g. "
        "'question=prompt,answer_matching_behavior=yes' (fields per kind: `finesteer datasets`)."
    ),
]
OtherWeightsOpt = Annotated[
    bool, typer.Option(help="Apply an artifact fitted on other weights of the same shape.")
]

# Head-ablation commands (locate ships|sahara|attribution, ablate, export-surgery).
PromptDataOpt = Annotated[str, typer.Option("--data", help="Prompt dataset (e.g. advbench, jailbreakbench).")]
ModeOpt = Annotated[str, typer.Option(help="ua = uniform attention (query × ε), sc = scale output × ε.")]
EpsOpt = Annotated[float, typer.Option(help="Ablation factor ε.")]
# locate attribution: verify the estimate's top N, or adaptively (certify.py) with a printed bound.
TopNOpt = Annotated[
    int | None, typer.Option(help="Verify the estimate's best N exactly (default: adaptive).")
]
TemplateOpt = Annotated[
    str,
    typer.Option(help="'chat' (chat template), 'ships' / 'sahara' (authors' raw templates), or '…{query}…'."),
]
EngineOpt = Annotated[
    str, typer.Option(help="Scan engine: 'fast' (heads batched, earlier layers reused) or 'simple'.")
]

OutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder (default: runs/<command>-<model>-…).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue a checkpointed run in --out.")]

# Where a plan's jobs run (locate ships|hsi, eval asr): this process or model-holding Ray actors.
BackendOpt = Annotated[
    str, typer.Option(help="Where jobs run: local (this process) or ray (Ray actors; finesteer[ray]).")
]
RayAddressOpt = Annotated[
    str | None, typer.Option(help="Ray cluster to join, e.g. 'auto' (default: start a local Ray instance).")
]
ActorsOpt = Annotated[int, typer.Option(help="Ray actors, each loading the model once.")]
NumCpusOpt = Annotated[float, typer.Option(help="CPUs per Ray actor (its torch threads: the same number).")]
NumGpusOpt = Annotated[float, typer.Option(help="GPUs per Ray actor (e.g. 1 with --device cuda).")]

# A/B behaviour commands (locate hsi|iti, fit hsi|iti|caa, compare).
ABDataOpt = Annotated[
    str,
    typer.Option("--data", help="CAA-style A/B behaviour: coordinate-other-ais, sycophancy, myopic-reward…"),
]
EvalDataOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--eval-data",
        help="Extra A/B test file (Anthropic evals JSONL: question, answer_matching_behavior, "
        "answer_not_matching_behavior), scored alongside the test split; repeatable.",
    ),
]
GenerateLimitOpt = Annotated[int | None, typer.Option(help="Use the first N items of the generate split.")]
TrainLimitOpt = Annotated[int | None, typer.Option(help="Use the first N training items (after the split).")]
ValLimitOpt = Annotated[int | None, typer.Option(help="Use the first N validation items.")]
ValFractionOpt = Annotated[float, typer.Option(help="Share of the generate split held out for validation.")]
AlphasOpt = Annotated[
    str | None,
    typer.Option(help="α grid in units of σ, comma-separated (negative = steer away; write --alphas=-2,-4)."),
]
NSweepOpt = Annotated[int, typer.Option(help="Training items held out for the head sweep (HSI).")]
NValOpt = Annotated[int, typer.Option(help="Items held out to choose α (fit) / rank probes (ITI).")]
HeadsOpt = Annotated[str | None, typer.Option(help="Only sweep these heads, e.g. '12.3,13.1'.")]
KOpt = Annotated[int, typer.Option("--k", help="Number of heads to steer.")]
RankOpt = Annotated[
    str,
    typer.Option(
        help="Head ranking: 'balanced' (worst matching-letter group's gain, best α), 'max' (plain mean "
        "gain, best α) or 'mean' (plain gain averaged over α)."
        " 'polarity': worst letter × Yes/not-Yes group's gain (also chooses k and α that way)."
    ),
]
BalanceFormatFlag = Annotated[
    bool,
    typer.Option(
        "--balance-format",
        help="Project the answer-letter and Yes/No axes out of the directions (they then carry the "
        "behaviour, not the answer format).",
    ),
]
DirectionsFromOpt = Annotated[
    str,
    typer.Option(
        help="Read HSI directions from 'ab' (both answer letters after each prompt), 'sampled' (the "
        "model's own sampled answers, labelled by the option they name: the paper's recipe), 'both', "
        "or 'given' (only --completions)."
    ),
]
CompletionsOpt = Annotated[
    Path | None,
    typer.Option(help="JSONL of labelled completions {prompt, completion, label} added to the directions."),
]
NSamplesOpt = Annotated[
    int, typer.Option(help="Sampled answers per training item (--directions-from sampled).")
]


def out_option(help: str) -> Any:
    """The `--out` option with a command's own help: `out: Annotated[Path, out_option("…")] = …`."""
    return typer.Option("--out", help=help)


def parse_numbers(text: str | None, option: str, kind: type = float) -> tuple[Any, ...] | None:
    """A comma-separated option ('8,10,12') as a tuple of `kind`; None when the option is not given."""
    if text is None:
        return None
    noun = "integers" if kind is int else "numbers"
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise OptionError(f"cannot parse {option} {text!r}: write {noun} separated by commas") from exc
    if not values:
        raise OptionError(f"{option} is empty")
    return values


def parse_names(text: str, option: str) -> list[str]:
    """A comma-separated list of names ('baseline,caa'), blanks dropped; an error if none is left."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise OptionError(f"{option} is empty")
    return names


def check_choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    """`value` if it is one of `allowed`, else an OptionError listing them."""
    if value not in allowed:
        raise OptionError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def head_names(heads: Iterable[tuple[int, int]]) -> list[str]:
    """Heads as the 'LAYER.HEAD' names the options take (the inverse of `sites.parse_heads`)."""
    return [f"{layer}.{head}" for layer, head in heads]


def slug(*parts: str) -> str:
    """A folder-name-safe slug of the parts ('runs/x', 'org/model' → their last component), joined by '-'."""
    return "-".join(
        re.sub(r"[^A-Za-z0-9._]+", "_", Path(part).name if "/" in part else part) for part in parts if part
    )


def parse_settings(text: str | None) -> dict[str, dict[str, Any]]:
    """--settings: a JSON object (or a path to a .json file) mapping method name → its settings."""
    if text is None:
        return {}
    path = Path(text)
    raw = path.read_text(encoding="utf-8") if path.suffix == ".json" and path.is_file() else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise OptionError(
            f'--settings must be JSON like \'{{"caa": {{"multipliers": [1, 2]}}}}\' or a .json file: {exc}'
        ) from exc
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise OptionError("--settings must map each method name to an object of settings")
    return value


def parse_columns(text: str | None) -> dict[str, str] | None:
    """--columns 'question=prompt,matching=yes' as {field: column}; None when not given."""
    if text is None:
        return None
    mapping: dict[str, str] = {}
    for pair in (part.strip() for part in text.split(",")):
        field, sep, column = pair.partition("=")
        if not pair:
            continue
        if not sep or not field.strip() or not column.strip():
            raise OptionError(f"--columns takes FIELD=COLUMN pairs separated by commas; got {pair!r}")
        if field.strip() in mapping:
            raise OptionError(f"--columns maps {field.strip()!r} twice")
        mapping[field.strip()] = column.strip()
    if not mapping:
        raise OptionError("--columns is empty")
    return mapping


def data_source(data: str, columns: str | None, kind: str) -> str:
    """`--data` (+ `--columns`) checked before the model loads: a catalogue name as is, or a user file
    read and validated in full as `kind` items (errors name the file, line and field), returned as a
    `data.typed.DataRef` that carries the column mapping to the loaders."""
    from finesteer.data.typed import check_data

    return check_data(data, parse_columns(columns), kind)  # type: ignore[arg-type]
