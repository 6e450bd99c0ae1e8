"""`dfm bench --serve RUN`: `dfm serve` under load, paired against the run's baseline on the same server.

The server runs as `dfm serve` in its own process on a free local port; C client threads here
stream completions of prompts cut from the test split (``run_prompts``), each client sending its
next request when the last one ends, until every prompt of the round is answered. For every C,
the same prompts go to the baseline, to top1 and to mixture in turn on the same warm server, and
the three rounds repeat (this VM's speed drifts by 20% within minutes, so a ratio is taken
against the baseline's round of the same repetition): throughput (generated tokens per second of
wall time), time to first token and the per-token latency (p50, p99). The C = 1 overhead is per
token against ``generate_text`` of the same prompts one by one in this process, timed just before.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dfm.atomic import write_json
from dfm.errors import DfmError
from eval.bench import machine_info
from eval.run_bench import run_prompts
from models.generation import generate_text
from models.tokenizer import load_tokenizer
from training.config import read_run_config
from training.layout import RunLayout

SERVED = (("baseline", "mixture"), ("dfm", "top1"), ("dfm", "mixture"))


def _complete(url: str, body: dict) -> tuple[float, list[float], int]:
    """One completion in one response: its seconds, no chunk times, its tokens."""
    request = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        tokens = json.loads(response.read())["usage"]["completion_tokens"]
    return time.perf_counter() - start, [], tokens


def _stream(url: str, body: dict) -> tuple[float, list[float], int]:
    """One streamed completion: seconds to the first chunk, the arrival time of every chunk, tokens."""
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode(),
        headers={"content-type": "application/json"},
    )
    start, times, tokens = time.perf_counter(), [], 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                times.append(time.perf_counter())
    return (times[0] - start if times else float("nan")), times, tokens


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _load(
    url: str, model: str, routing: str, prompts: list[str], clients: int, new_tokens: int, stream: bool = True
) -> dict:
    """Every prompt once, from ``clients`` concurrent clients (streamed, or each in one response)."""
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    first, gaps, tokens, failed = [], [], [], []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i, prompt = todo.pop(0)
            body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "seed": i}
            if model != "baseline":
                body["routing"] = routing
            try:
                ttft, times, count = (_stream if stream else _complete)(url, body)
            except OSError as err:  # urllib's HTTP and connection errors: counted, never dropped quietly
                with lock:
                    failed.append(f"prompt {i}: {err}")
                continue
            with lock:
                first.append(ttft)
                gaps.extend(b - a for a, b in zip(times, times[1:]))
                tokens.append(count)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failed:
        raise DfmError(f"{len(failed)} of {len(prompts)} requests to {model} ({routing}) failed, first: {failed[0]}")
    return {
        "requests": len(prompts),
        "tokens": sum(tokens),
        "seconds": wall,
        "tokens_per_second": sum(tokens) / wall,
        "ttft_p50": _percentile(first, 0.5),
        "ttft_p99": _percentile(first, 0.99),
        "token_latency_p50": _percentile(gaps, 0.5),
        "token_latency_p99": _percentile(gaps, 0.99),
    }


def _wait_for(url: str, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise DfmError(f"`dfm serve` exited with {child.returncode} before it served: run it alone to see why")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DfmError("`dfm serve` did not answer /health within 300 s")


def bench_serve(
    run_dir: str | Path,
    *,
    concurrency: Sequence[int] = (1, 4, 16, 64),
    prompts_per_round: int = 64,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    max_batch: int = 16,
    repeats: int = 3,
    device: torch.device = torch.device("cpu"),
    out: Path | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> dict:
    """Every round ``repeats`` times, the models taking turns (baseline, top1, mixture), so that
    each ratio is paired with the baseline's round of the same repetition; likewise the C = 1
    overhead: ``generate_text`` timed just before the server decodes the same prompts."""
    started = time.perf_counter()
    layout = RunLayout.of(run_dir)
    tokenizer = load_tokenizer(layout.tokenizer)
    ids = run_prompts(run_dir, prompts_per_round, prompt_tokens)
    prompts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    served_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]  # as the server reads them
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the server in its own process, as `dfm serve` runs: the clients here never hold its GIL
    command = [sys.executable, "-m", "dfm.cli", "--quiet", "serve", "--run", str(run_dir), "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--device", str(device)]
    child = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    url = f"http://127.0.0.1:{port}"
    _wait_for(url, child)
    results: dict = {
        "machine": machine_info(device),
        "run": str(run_dir),
        "max_batch": max_batch,
        "repeats": repeats,
        "rounds": [],
        "overhead": [],
    }
    try:
        ensemble = read_run_config(run_dir).kind.load_ensemble(run_dir, device)
        for model, routing in SERVED:  # warm-up: no round pays a model's first call
            _load(url, model, routing, prompts[:4], 4, 4)
        for routing in ("top1", "mixture"):
            _generate(ensemble, served_ids[:2], routing, 4)
        for clients in concurrency:
            for repeat in range(repeats):
                for model, routing in SERVED:
                    name = "baseline" if model == "baseline" else routing
                    say(f"serve bench: C = {clients}, {name}, repetition {repeat + 1} of {repeats} ...")
                    figures = _load(url, model, routing, prompts, clients, new_tokens)
                    results["rounds"].append({"clients": clients, "model": name, "repeat": repeat, **figures})
        for repeat in range(repeats):
            for routing in ("top1", "mixture"):
                say(f"serve bench: C = 1 overhead, {routing}, repetition {repeat + 1} of {repeats} ...")
                seconds, made = _generate(ensemble, served_ids, routing, new_tokens)
                row = {"model": routing, "repeat": repeat, "generate_tokens_per_second": made / seconds}
                row["generate_tokens"] = made
                for stream in (False, True):
                    figures = _load(url, "dfm", routing, prompts, 1, new_tokens, stream=stream)
                    key = "streamed" if stream else "one_response"
                    row[f"{key}_tokens"] = figures["tokens"]
                    row[f"{key}_overhead"] = row["generate_tokens_per_second"] / figures["tokens_per_second"] - 1
                results["overhead"].append(row)
    finally:
        child.terminate()
        child.wait(timeout=60)
    results["seconds"] = time.perf_counter() - started
    if out is not None:
        write_json(out, results)
    return results


def _generate(ensemble, rows: list[list[int]], routing: str, new_tokens: int) -> tuple[float, int]:
    """``generate_text`` of every prompt alone, greedy: its seconds and the tokens it made."""
    mode, k = ("topk", 1) if routing == "top1" else ("mixture", None)
    start, made = time.perf_counter(), 0
    for row in rows:
        made += len(
            generate_text(ensemble, [row], max_new_tokens=new_tokens, routing=mode, k=k, temperature=0).token_ids[0]
        )
    return time.perf_counter() - start, made


def serve_summary(results: dict) -> list[dict]:
    """Per C and model, medians over the repetitions; ``vs_baseline`` is the median of the ratios
    to the baseline's round of the same repetition."""
    rounds = results["rounds"]
    out = []
    for clients in sorted({r["clients"] for r in rounds}):
        for name in ("baseline", "top1", "mixture"):
            mine = [r for r in rounds if r["clients"] == clients and r["model"] == name]
            base = {r["repeat"]: r for r in rounds if r["clients"] == clients and r["model"] == "baseline"}
            ratios = [r["tokens_per_second"] / base[r["repeat"]]["tokens_per_second"] for r in mine]
            row = {"clients": clients, "model": name, "vs_baseline": statistics.median(ratios)}
            row["vs_baseline_range"] = [min(ratios), max(ratios)]
            for key in ("tokens_per_second", "ttft_p50", "ttft_p99", "token_latency_p50", "token_latency_p99"):
                row[key] = statistics.median(r[key] for r in mine)
            out.append(row)
    return out


def format_serve_table(results: dict) -> str:
    lines = [
        f"Medians over {results['repeats']} repetitions, the models taking turns; vs baseline: the median of "
        "the ratios to the baseline's round of the same repetition (range in brackets).",
        "",
        "| clients | model | tokens/s | vs baseline | TTFT p50 / p99 (s) | per-token p50 / p99 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in serve_summary(results):
        low, high = r["vs_baseline_range"]
        lines.append(
            f"| {r['clients']} | {r['model']} | {r['tokens_per_second']:.1f} | {r['vs_baseline']:.2f}x "
            f"[{low:.2f}-{high:.2f}] | {r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} | "
            f"{1000 * r['token_latency_p50']:.1f} / {1000 * r['token_latency_p99']:.1f} |"
        )
    for routing in ("top1", "mixture"):
        mine = [r for r in results["overhead"] if r["model"] == routing]
        if mine:
            one = statistics.median(r["one_response_overhead"] for r in mine)
            streamed = statistics.median(r["streamed_overhead"] for r in mine)
            lines.append(
                f"\nC = 1 {routing}, per token against generate_text of the same prompts just before (median of "
                f"{len(mine)}): one response each {one:+.1%}, streamed {streamed:+.1%}"
            )
    return "\n".join(lines) + "\n"
