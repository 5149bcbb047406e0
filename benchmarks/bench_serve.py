"""Serving throughput: plain batched HF `generate` vs `finesteer serve` driven by N concurrent clients.

    python benchmarks/bench_serve.py --model smollm2-135m-instruct --clients 16 --tokens 64
    python benchmarks/bench_serve.py --json

Three rows, one run, same prompts, greedy, exactly `--tokens` new tokens per prompt (HF
`min_new_tokens` / the server's `min_tokens`, so no row stops early):
  (a) `generate`: one left-padded batch of all N prompts through `lm.model.generate` (what
      `finesteer.generation.generate` runs), in this process;
  (b) `serve, no intervention`: N `openai` clients, one request each, at once, against a loopback
      `finesteer serve` subprocess (the same model, the same thread count);
  (c) `serve, K interventions`: the same with request i asking for intervention i mod K (K = 8
      distinct 2-head steering artifacts), so every batch mixes K edits.
Repeats are interleaved (a, b, c, a, b, c, …) so load drift on a shared machine hits every row
alike, and the median is reported, both wall time and CPU time: the bench process's for (a), the
server process's (model, HTTP and JSON together) for (b)/(c). With `--threads 1` CPU time is the
work itself and its ratio is robust to other jobs on the machine. The server is warmed up first.
Latency percentiles are per request (end to end). "same tokens" checks that the server's
unsteered replies equal the batched `generate` output. Clients and server are separate processes,
so the client side's Python work competes for the same CPUs (on a 2-core box it is part of the
measured wall time, not of the CPU columns).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _bench import load_note, log, print_table

from finesteer.artifacts import save_intervention
from finesteer.data.prompts import chat_prompt
from finesteer.interventions import Intervention, steer_head
from finesteer.models import LoadedModel, load_model

USERS = (
    "Give me three tips for staying focused while studying.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about the sea.",
    "What is the capital of Australia, and why not Sydney?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I boil an egg?",
    "List four prime numbers greater than 50.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
    "What does a compiler do?",
    "Describe a cat to someone who has never seen one.",
    "Translate 'good morning' into French and Spanish.",
    "What are the benefits of regular exercise?",
    "Tell me a short joke about computers.",
    "How many minutes are in a day? Show the arithmetic.",
    "What should I pack for a weekend hiking trip?",
)
COLUMNS = (
    "row",
    "requests",
    "tokens",
    "seconds",
    "tokens_per_s",
    "ratio_to_generate",
    "cpu_seconds",
    "cpu_tokens_per_s",
    "cpu_ratio",
    "p50_s",
    "p90_s",
    "p99_s",
    "same_tokens",
)


def interventions(lm: LoadedModel, count: int) -> list[Intervention]:
    """`count` distinct head-steering edits: two heads each, scope last (HSI/ITI style)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        layer = (3 + 2 * i) % lm.info.n_layers
        edits = Intervention()
        for head in (i % lm.info.n_heads, (i + 3) % lm.info.n_heads):
            vector = torch.randn(lm.info.head_dim, generator=gen)
            edits = edits + steer_head(layer, head, vector / vector.norm() * 4.0, scope="last")
        out.append(edits)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not become healthy in time")


def run_generate(lm: LoadedModel, prompts: list[str], tokens: int) -> tuple[float, list[list[int]]]:
    encoded = lm.tokenizer(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    started = time.perf_counter()
    with torch.no_grad():
        output = lm.model.generate(
            **encoded,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - started
    return seconds, output[:, encoded["input_ids"].shape[1] :].tolist()


def run_clients(
    url: str,
    model: str,
    users: list[str],
    names: list[str | None],
    tokens: int,
) -> tuple[float, list[float], list[str], int]:
    """All requests at once, one client (thread, own connection) each; wall, latencies, texts, tokens."""
    import openai

    clients = [
        openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600) for _ in users
    ]

    def one(i: int) -> tuple[float, str, int]:
        client, name = clients[i], names[i]
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=model if name is None else f"{model}:{name}",
            messages=[{"role": "user", "content": users[i]}],
            max_tokens=tokens,
            temperature=0,
            extra_body={"min_tokens": tokens},
        )
        assert reply.usage is not None
        return (
            time.perf_counter() - started,
            reply.choices[0].message.content or "",
            reply.usage.completion_tokens,
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(len(users)) as pool:
        results = list(pool.map(one, range(len(users))))
    wall = time.perf_counter() - started
    return wall, [r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (Linux /proc), so ratios survive a loaded machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--interventions", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    users = [USERS[i % len(USERS)] for i in range(args.clients)]
    prompts = [chat_prompt(lm.tokenizer, u) for u in users]
    edits = interventions(lm, args.interventions)
    names = [f"iv{i}" for i in range(len(edits))]
    labels = (
        "(a) generate, batch of all",
        "(b) serve, no intervention",
        f"(c) serve, {len(names)} interventions",
    )
    plans = {
        labels[1]: [None] * args.clients,
        labels[2]: [names[i % len(names)] for i in range(args.clients)],
    }
    walls: dict[str, list[float]] = {label: [] for label in labels}
    cpus: dict[str, list[float]] = {label: [] for label in labels}
    latencies: dict[str, list[float]] = {label: [] for label in labels}
    counts: dict[str, int] = {labels[0]: args.clients * args.tokens}
    texts: dict[str, list[str]] = {}

    with tempfile.TemporaryDirectory() as tmp:
        for name, iv in zip(names, edits, strict=True):
            save_intervention(Path(tmp) / name, iv, lm)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "FINESTEER_API_KEY": ""}
        command = [sys.executable, "-c", "from finesteer.cli import main; main()", "serve", args.model]
        command += ["--port", str(port), "--max-batch", str(args.clients)]
        command += [a for name in names for a in ("-i", f"{name}={Path(tmp) / name}")]
        log("starting " + " ".join(command[3:]))
        server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            wait_healthy(url, server)
            run_generate(lm, prompts[:2], 4)  # warm-up
            run_clients(url, args.model, users[:2], [None, names[0]], 4)
            for repeat in range(args.repeats):  # interleaved, so load drift hits every row alike
                log(f"repeat {repeat + 1}/{args.repeats}: {labels[0]}")
                cpu = time.process_time()
                seconds, tokens = run_generate(lm, prompts, args.tokens)
                cpus[labels[0]].append(time.process_time() - cpu)
                walls[labels[0]].append(seconds)
                texts[labels[0]] = lm.tokenizer.batch_decode(tokens, skip_special_tokens=True)
                for label, plan in plans.items():
                    log(f"repeat {repeat + 1}/{args.repeats}: {label}")
                    cpu = cpu_seconds(server.pid)
                    wall, lat, replies, count = run_clients(url, args.model, users, plan, args.tokens)
                    cpus[label].append(cpu_seconds(server.pid) - cpu)
                    walls[label].append(wall)
                    latencies[label] += lat
                    counts[label], texts[label] = count, replies
        finally:
            server.terminate()
            server.wait(timeout=60)

    base_wall = counts[labels[0]] / statistics.median(walls[labels[0]])
    base_cpu = counts[labels[0]] / statistics.median(cpus[labels[0]])
    rows: list[dict[str, Any]] = []
    for label in labels:
        wall, cpu = statistics.median(walls[label]), statistics.median(cpus[label])
        row: dict[str, Any] = {
            "row": label,
            "requests": args.clients,
            "tokens": counts[label],
            "seconds": wall,
            "tokens_per_s": counts[label] / wall,
            "ratio_to_generate": counts[label] / wall / base_wall,
            "cpu_seconds": cpu,
            "cpu_tokens_per_s": counts[label] / cpu,
            "cpu_ratio": counts[label] / cpu / base_cpu,
        }
        if latencies[label]:
            for q in (50, 90, 99):
                row[f"p{q}_s"] = percentile(latencies[label], q)
        if label == labels[1]:
            same = sum(a == b for a, b in zip(texts[label], texts[labels[0]], strict=True))
            row["same_tokens"] = f"{same}/{len(users)}"
        rows.append(row)

    note = (
        f"{args.model}, {args.clients} clients × {args.tokens} tokens, median of {args.repeats}, "
        f"{args.threads} torch threads, {load_note()}"
    )
    if args.json:
        print(json.dumps({"note": note, "rows": rows}, indent=1))
        return
    print_table(f"Serving throughput ({note})", rows, COLUMNS, as_json=False)


if __name__ == "__main__":
    main()
