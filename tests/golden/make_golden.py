"""Golden outputs of the `finesteer` CLI, recorded on the code before the refactor (issue 13).

Each case is one `finesteer … --json` command run in-process on a tiny random model (or, marked
`real`, on SmolLM2-135M-Instruct). Its JSON result, minus volatile keys (timings, paths), is stored in
`tests/golden/<case>.json`; `tests/test_golden.py` re-runs every case and compares.

Only the CLI (`finesteer.cli.app`) is used, never internal modules: their paths change in the refactor.

Regenerate (one thread, as the tests run; `--no-real` skips the SmolLM2 cases):

    PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 python -m tests.golden.make_golden
    PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 python -m tests.golden.make_golden --check   # compare only

Only regenerate on purpose (a deliberate change of numbers), never to make a refactor's test pass.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GOLDEN_DIR = Path(__file__).resolve().parent

# Floats may differ by this much (relative or absolute, `math.isclose`): a refactor that only reorders
# floating-point operations (another reduction order, a fused op, float32 sums done in another grouping)
# may move the last bits of a result; anything larger is a change of behaviour. The relative part matters
# for float32 values of magnitude ≳ 1 (one float32 ulp at 20 is 1.9e-6). Ints, bools, strings, key sets
# of the golden dicts, list lengths and head rankings must match exactly.
REL_TOL = 1e-6
ABS_TOL = 1e-6

# Keys dropped before storing/comparing: wall-clock and CPU times vary from run to run; a digest of
# trained float weights (LoRA) cannot be compared within a tolerance (the losses and rates it gives are).
VOLATILE_KEYS = frozenset({"seconds", "timing", "timings", "adapter_digest"})
VOLATILE_SUFFIXES = ("_seconds", "_seconds_total", "_wall_s", "_cpu_s", "wall_s")

REAL = "smollm2-135m-instruct"

HSI_RECIPE = {
    "method": "hsi",
    "name": "golden-hsi",
    "model": "tiny-llama",
    "behaviour": "coordinate-other-ais",
    "train_limit": 12,
    "sweep_limit": 4,
    "val_limit": 4,
    "test_limit": 6,
    "open_ended_limit": 2,
    "layers": [1],
    "alphas": [4.0],
    "k": 2,
    "examples": 2,
    "generation": {"max_new_tokens": 6},
}

SHIPS_RECIPE = {
    "method": "ships",
    "name": "golden-ships",
    "model": "tiny-qwen2",
    "attribution_data": "advbench",
    "attribution_limit": 3,
    "evaluation_data": "jailbreakbench",
    "evaluation_limit": 3,
    "sahara_group_size": 2,
    "sahara_candidates": 4,
    "top_k": [1, 2],
    "random_seeds": 1,
    "harmless_limit": 2,
    "examples": 1,
    "generation": {"max_new_tokens": 4},
}


@dataclass(frozen=True)
class Case:
    """One CLI command (without `--json`); `WORK` at the start of an argument is the work folder.

    `needs` names cases whose outputs (folders under `WORK`) this one reads; they run first. `recipe`
    is written to `WORK/<name>.yaml` before the command runs.
    """

    name: str
    command: str
    needs: tuple[str, ...] = ()
    real: bool = False
    recipe: dict[str, Any] | None = None

    def args(self, work: Path) -> list[str]:
        return [str(work) + a[4:] if a.startswith("WORK") else a for a in shlex.split(self.command)]


AB_SMALL = (
    "--train-limit 4 --val-limit 2 --test-limit 3 --open-ended-limit 1 --harmless-limit 2 "
    "--max-new-tokens 3 --ab-max-new-tokens 3 --judge none"
)
AB_SETTINGS = shlex.quote(json.dumps({"lora": {"max_steps": 2}, "hsi": {"k": 1}}))

CASES: tuple[Case, ...] = (
    # --- eval ab ---------------------------------------------------------------------------------
    Case(
        "eval_ab",
        "eval ab tiny-qwen2 --data coordinate-other-ais --limit 3 --max-new-tokens 3 --single-order",
    ),
    Case(
        "eval_ab_balanced",
        "eval ab tiny-qwen2 --data coordinate-other-ais --limit 3 --max-new-tokens 3 --balanced",
    ),
    # --- compare, A/B task: every method ---------------------------------------------------------
    Case(
        "compare_ab_all_methods",
        "compare tiny-llama --data coordinate-other-ais --methods baseline,prompt,caa,iti,hsi,lora "
        f"{AB_SMALL} --settings {AB_SETTINGS} --single-order --out WORK/compare_ab_all_methods",
    ),
    Case(
        "compare_ab_balanced",
        f"compare tiny-qwen2 --data myopic-reward --methods baseline,caa {AB_SMALL} --balanced "
        "--out WORK/compare_ab_balanced",
    ),
    # --- SAE, STA and the refusal task ------------------------------------------------------------
    Case(
        "sae_train",
        "sae train tiny-qwen2 --layer 1 --out WORK/sae_train --width 32 --k 4 --tokens 1000 --epochs 1 "
        "--batch-size 128",
    ),
    Case(
        "fit_sta",
        "fit sta tiny-qwen2 --sae WORK/sae_train --out WORK/fit_sta --data refusal --limit 10 --trim 0.9 "
        "--lambda 2",
        needs=("sae_train",),
    ),
    Case(
        "compare_refusal",
        "compare tiny-qwen2 --task refusal --sae WORK/sae_train --n-pairs 10 --n-harmful 2 --n-harmless 2 "
        "--trim 0.9 --lambdas 1,2 --max-new-tokens 3 --out WORK/compare_refusal",
        needs=("sae_train",),
    ),
    # --- locate ------------------------------------------------------------------------------------
    Case(
        "locate_ships_ua",
        "locate ships tiny-llama --data advbench --limit 4 --mode ua --out WORK/locate_ships_ua",
    ),
    Case(
        "locate_ships_sc",
        "locate ships tiny-llama --data advbench --limit 4 --mode sc --out WORK/locate_ships_sc",
    ),
    Case(
        "locate_ships_both_levels_simple",
        "locate ships tiny-mistral --data advbench --limit 3 --level both --engine simple "
        "--out WORK/locate_ships_both_levels_simple",
    ),
    Case(
        "locate_overlap",
        "locate overlap WORK/locate_ships_ua WORK/locate_ships_sc --k 5",
        needs=("locate_ships_ua", "locate_ships_sc"),
    ),
    Case(
        "locate_sahara",
        "locate sahara tiny-llama --data advbench --limit 4 --group-size 2 --out WORK/locate_sahara",
    ),
    Case(
        "locate_attribution_refusal",
        "locate attribution tiny-qwen2 --data advbench --limit 3 --top-n 2 --metric refusal "
        "--out WORK/locate_attribution_refusal",
    ),
    Case(
        "locate_attribution_kl",
        "locate attribution tiny-gemma3 --data advbench --limit 3 --top-n 3 --mode sc "
        "--out WORK/locate_attribution_kl",
    ),
    # --- fit ---------------------------------------------------------------------------------------
    Case(
        "fit_caa",
        "fit caa tiny-llama --out WORK/fit_caa --train-limit 2 --val-limit 2 --layers 1,2 --multipliers 1,2",
    ),
    Case(
        "fit_hsi",
        "fit hsi tiny-llama --limit 6 --n-sweep 2 --n-val 2 --k 1 --alphas 2,4 --heads 0.1,2.3 "
        "--final-check-tokens 3 --out WORK/fit_hsi",
    ),
    Case(
        "eval_ab_with_hsi_artifact",
        "eval ab tiny-llama --data coordinate-other-ais --limit 3 --method prob --intervention WORK/fit_hsi "
        "--single-order",
        needs=("fit_hsi",),
    ),
    # --- ablate ------------------------------------------------------------------------------------
    Case(
        "ablate",
        "ablate tiny-llama --heads 0.3,0.0,1.1 --data advbench --limit 3 --ks 1,2 --random-seeds 2 "
        "--max-new-tokens 3 --harmless-limit 2 --mc none --out WORK/ablate",
    ),
    # --- recipes -----------------------------------------------------------------------------------
    Case(
        "run_hsi_recipe",
        "run WORK/run_hsi_recipe.yaml --out WORK/run_hsi_recipe",
        recipe=HSI_RECIPE,
    ),
    Case(
        "run_ships_recipe",
        "run WORK/run_ships_recipe.yaml --out WORK/run_ships_recipe",
        recipe=SHIPS_RECIPE,
    ),
    # --- SmolLM2-135M-Instruct (real weights; small limits) ----------------------------------------
    Case(
        "real_eval_ab",
        f"eval ab {REAL} --data coordinate-other-ais --limit 4 --max-new-tokens 4 --single-order",
        real=True,
    ),
    Case(
        "real_locate_attribution",
        f"locate attribution {REAL} --data advbench --limit 3 --top-n 3 --metric refusal --mode sc "
        "--out WORK/real_locate_attribution",
        real=True,
    ),
    Case(
        "real_locate_sahara",
        f"locate sahara {REAL} --data advbench --limit 3 --group-size 2 "
        "--candidates-from WORK/real_locate_attribution --top-n 4 --out WORK/real_locate_sahara",
        needs=("real_locate_attribution",),
        real=True,
    ),
    Case(
        "real_fit_hsi",
        f"fit hsi {REAL} --limit 6 --n-sweep 3 --n-val 3 --k 2 --alphas 8 --heads 12.3,15.4,20.0 "
        "--final-check-tokens 2 --out WORK/real_fit_hsi",
        real=True,
    ),
)
CASES_BY_NAME = {case.name: case for case in CASES}


# ------------------------------------------------------------------------------------- running


@contextmanager
def _deterministic() -> Iterator[None]:
    """Same global seeds and one torch thread for every case, whatever ran before in the process.

    One thread makes the numbers independent of OMP_NUM_THREADS and of the machine's core count (a
    reduction split over threads sums in another order).
    """
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def invoke(args: list[str]) -> dict[str, Any]:
    """Run `finesteer ARGS --json` in-process; the parsed JSON object it printed on stdout."""
    from typer.testing import CliRunner

    from finesteer.cli import app

    with _deterministic():
        result = CliRunner().invoke(app, [*args, "--json"])
    if result.exit_code != 0:
        raise AssertionError(
            f"finesteer {shlex.join(args)} exited {result.exit_code}:\n{result.output[-4000:]}"
        ) from None
    return json.loads(result.stdout.strip().splitlines()[-1])


def _volatile(key: str) -> bool:
    return key in VOLATILE_KEYS or key.endswith(VOLATILE_SUFFIXES)


def normalize(value: Any, work: Path) -> Any:
    """Drop volatile keys and every path under the work folder (run folders carry a time stamp)."""
    root = str(work)
    if isinstance(value, dict):
        return {
            k: normalize(v, work)
            for k, v in value.items()
            if not _volatile(k) and not (isinstance(v, str) and root in v)
        }
    if isinstance(value, list):
        return [normalize(v, work) for v in value]
    if isinstance(value, str) and root in value:
        return "<path>"
    return value


class Session:
    """Runs cases in one work folder, each once, dependencies first; keeps the normalized outputs."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.outputs: dict[str, dict[str, Any]] = {}
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def output(self, name: str) -> dict[str, Any]:
        if name not in self.outputs:
            case = CASES_BY_NAME[name]
            for need in case.needs:
                self.output(need)
            if case.recipe is not None:
                import yaml

                text = yaml.safe_dump(case.recipe, sort_keys=False)
                (self.work / f"{name}.yaml").write_text(text, encoding="utf-8")
            started, cpu = time.perf_counter(), time.process_time()
            raw = invoke(case.args(self.work))
            self.seconds[name] = time.perf_counter() - started
            self.cpu_seconds[name] = time.process_time() - cpu
            self.outputs[name] = normalize(raw, self.work)
        return self.outputs[name]


def golden_path(name: str, folder: Path = GOLDEN_DIR) -> Path:
    return folder / f"{name}.json"


def load_golden(name: str, folder: Path = GOLDEN_DIR) -> dict[str, Any]:
    return json.loads(golden_path(name, folder).read_text(encoding="utf-8"))["output"]


# ----------------------------------------------------------------------------------- comparing


def differences(golden: Any, actual: Any, where: str = "$") -> list[str]:
    """Where `actual` departs from `golden`; keys that `actual` adds are fine, lost or changed ones not."""
    if isinstance(golden, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {actual!r}"]
        out = []
        for key, value in golden.items():
            if key not in actual:
                out.append(f"{where}.{key}: missing")
            else:
                out.extend(differences(value, actual[key], f"{where}.{key}"))
        return out
    if isinstance(golden, list):
        if not isinstance(actual, list) or len(actual) != len(golden):
            return [f"{where}: expected {golden!r}, got {actual!r}"]
        return [
            d
            for i, (g, a) in enumerate(zip(golden, actual, strict=True))
            for d in differences(g, a, f"{where}[{i}]")
        ]
    if isinstance(golden, bool) or isinstance(actual, bool) or golden is None or isinstance(golden, str):
        return (
            []
            if type(golden) is type(actual) and golden == actual
            else [f"{where}: expected {golden!r}, got {actual!r}"]
        )
    if isinstance(golden, int) and isinstance(actual, int):
        return [] if golden == actual else [f"{where}: expected {golden!r}, got {actual!r}"]
    if isinstance(golden, (int, float)) and isinstance(actual, (int, float)):
        if math.isnan(golden) and math.isnan(actual):
            return []
        if math.isclose(golden, actual, rel_tol=REL_TOL, abs_tol=ABS_TOL):
            return []
        return [f"{where}: expected {golden!r}, got {actual!r} (Δ = {actual - golden:.3g})"]
    return [f"{where}: expected {golden!r}, got {actual!r}"]


# -------------------------------------------------------------------------------------- script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-real", action="store_true", help="Skip the SmolLM2 cases.")
    parser.add_argument("--only", nargs="*", default=None, help="Case names (default: all).")
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR, help="Folder for the JSON files.")
    parser.add_argument("--check", action="store_true", help="Compare with the stored files, write nothing.")
    args = parser.parse_args(argv)
    names = args.only or [c.name for c in CASES if not (args.no_real and c.real)]
    unknown = sorted(set(names) - set(CASES_BY_NAME))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES_BY_NAME)}")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="finesteer-golden-") as tmp:
        session = Session(Path(tmp))
        for name in names:
            output = session.output(name)
            wall, cpu = session.seconds[name], session.cpu_seconds[name]
            print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr)
            if args.check:
                problems = differences(load_golden(name, args.out), output)
                failed += bool(problems)
                for line in problems:
                    print(f"  {line}", file=sys.stderr)
                continue
            command = f"finesteer {CASES_BY_NAME[name].command} --json"
            record = {"case": name, "command": command, "output": output}
            args.out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(record, indent=1, ensure_ascii=False) + "\n"
            golden_path(name, args.out).write_text(text, encoding="utf-8")
    if failed:
        print(f"{failed} case(s) differ", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
