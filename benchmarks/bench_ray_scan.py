"""The Ships scan plan on Ray actors vs in process: what `--backend ray` costs on one machine.

    flock /tmp/finesteer-real.lock python benchmarks/bench_ray_scan.py --prompts 8 --layers 0-5 --json

Runs the same plan jobs (`finesteer.locate.ships_plan`: prompt batch × layer, query level, fast engine)
twice, on `--backend local` with 2 torch threads and on `--backend ray` with 2 single-thread actors,
and reports wall and CPU seconds of each (CPU: this process plus the actors' processes, from
/proc) and the Ray/local ratios. Ray start-up and the actors' model loads are timed separately, not
in the scan; `--layers` restricts the jobs to a range of layers (all heads of each). The two tables
must be byte-identical, or the script fails.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from typing import Any

import torch
from _bench import load_note, log, print_table

from finesteer.data import load_dataset
from finesteer.locate.engine import encode_prompts
from finesteer.locate.ships import format_queries
from finesteer.locate.ships_plan import assemble_values, ships_job, ships_plan
from finesteer.models import load_model
from finesteer.runs.backend import BackendOptions, LocalBackend
from finesteer.runs.ray_backend import RayBackend, import_ray
from finesteer.runs.runner import run_jobs


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (/proc; Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _timed(jobs: list[Any], backend: Any, pids: list[int]) -> tuple[dict[str, Any], float, float]:
    cpu0, wall0 = time.process_time() + _cpu_seconds(pids), time.perf_counter()
    records = run_jobs(jobs, None, backend=backend, task=ships_job)
    wall = time.perf_counter() - wall0
    return records, wall, time.process_time() + _cpu_seconds(pids) - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="advbench")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", default=None, help="first-last layer scanned (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    ray = import_ray()
    lm = load_model(args.model)
    queries = [item.prompt for item in load_dataset(args.data, limit=args.prompts)]
    encoded = encode_prompts(lm, format_queries(lm, queries))
    plan = ships_plan(lm, encoded, batch_size=args.batch_size)
    first, last = map(int, args.layers.split("-")) if args.layers else (0, lm.info.n_layers - 1)
    jobs = [job for job in plan.jobs if first <= job.payload.layers[0] <= last]
    log(f"{len(jobs)} jobs: {args.prompts} prompts × layers {first}-{last} × {lm.info.n_heads} heads")
    log(load_note())

    torch.set_num_threads(2)
    run_jobs(jobs[:1], None, backend=LocalBackend(lm), task=ships_job)  # warm-up, untimed
    local, local_wall, local_cpu = _timed(jobs, LocalBackend(lm), [])
    log(f"local (2 threads): {local_wall:.1f} s wall, {local_cpu:.1f} s CPU")

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    backend = RayBackend(partial(load_model, args.model), BackendOptions("ray", actors=2, num_cpus=1))
    pids = backend.pids()  # waits until both actors have loaded the model
    list(backend.map(ships_job, [(job.id, job.payload) for job in jobs[:2]]))  # warm-up, untimed
    startup = time.perf_counter() - started
    torch.set_num_threads(1)
    remote, ray_wall, ray_cpu = _timed(jobs, backend, pids)
    log(f"ray (2 actors × 1 thread): {ray_wall:.1f} s wall, {ray_cpu:.1f} s CPU; start-up {startup:.1f} s")
    backend.close()
    ray.shutdown()

    part = type(plan)(plan.key, tuple(jobs), plan.levels, plan.n_prompts)
    identical = all(
        a.numpy().tobytes() == b.numpy().tobytes()
        for a, b in zip(assemble_values(part, local)[:1], assemble_values(part, remote)[:1], strict=True)
    )
    if not identical:
        raise SystemExit("the Ray table differs from the local table")
    rows = [
        {"backend": "local", "workers": "1 process × 2 threads", "wall_s": round(local_wall, 2),
         "cpu_s": round(local_cpu, 2), "startup_s": 0.0},
        {"backend": "ray", "workers": "2 actors × 1 thread", "wall_s": round(ray_wall, 2),
         "cpu_s": round(ray_cpu, 2), "startup_s": round(startup, 2)},
    ]  # fmt: skip
    summary = {
        "model": args.model, "prompts": args.prompts, "layers": f"{first}-{last}", "jobs": len(jobs),
        "heads_scanned": len(jobs) * lm.info.n_heads // max(1, -(-args.prompts // args.batch_size)),
        "wall_ratio_ray_over_local": round(ray_wall / local_wall, 3),
        "cpu_ratio_ray_over_local": round(ray_cpu / local_cpu, 3),
        "tables_identical": identical, "load_average": load_note(), "rows": rows,
    }  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_table(f"Ships scan plan, {args.model}: Ray vs local ({load_note()})", rows,
                    ["backend", "workers", "wall_s", "cpu_s", "startup_s"], as_json=False)  # fmt: skip
        ratios = summary["wall_ratio_ray_over_local"], summary["cpu_ratio_ray_over_local"]
        print(f"\nwall ratio {ratios[0]}, CPU ratio {ratios[1]}")


if __name__ == "__main__":
    main()
