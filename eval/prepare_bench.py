"""`dfm bench --prepare N [N ...]`: documents per second and peak resident memory of `dfm prepare`
on synthetic corpora of N documents, each run in a fresh process reading a JSONL file. Peak RSS
is reported whole (VmHWM) and as its allocated (anonymous) part, which is what a streaming
prepare keeps flat; the rest is memory-mapped Arrow files. With ``--prepare-vocab V`` it measures
the partition alone at a V-token vocabulary instead (eval/partition_bench.py); ``--prepare-source
DIR`` runs either against the dfm checkout at DIR (e.g. an older commit, for before/after figures).

The corpus is the embedded synthetic generator's (4 domains, documents of about 100 words),
written to disk first so the measured process reads it as a user's files are read, through
``load_dataset("json")`` with its own empty datasets cache.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dfm.atomic import write_json
from dfm.errors import DfmError
from dfm.progress import progress
from eval.bench import machine_info
from eval.measured import run_measured
from eval.partition_bench import (
    ASSIGN_BATCH,
    HERE,
    check_imported,
    check_source,
    format_partition_table,
    measure_partition,
    source_env,
    source_version,
)
from training.synthetic import SyntheticCorpus, SyntheticSpec

#: Documents the corpus writer samples at a time (its memory, not the measured process's).
CHUNK = 10_000


def write_corpus(path: Path, num_documents: int, seed: int = 0) -> int:
    """``num_documents`` synthetic documents as JSONL (text, domain) at ``path``; returns its bytes."""
    corpus = SyntheticCorpus(SyntheticSpec(num_domains=4, num_documents=CHUNK, seed=seed, mean_length=100))
    with open(path, "w", encoding="utf-8") as out:
        for start in range(0, num_documents, CHUNK):
            for text, domain in corpus.sample(min(CHUNK, num_documents - start), seed + start):
                out.write(json.dumps({"text": text, "domain": domain}) + "\n")
    return path.stat().st_size


def measure_prepare(num_documents: int, workdir: Path, root: Path = HERE) -> dict:
    """One fresh `dfm prepare` (dfm imported from ``root``) on ``num_documents`` documents: wall
    seconds, documents/s, peak RSS."""
    corpus = workdir / "corpus.jsonl"
    size = write_corpus(corpus, num_documents)
    env = {**source_env(root), "HF_DATASETS_CACHE": str(workdir / "hf-cache")}
    argv = [
        "prepare",
        "--out",
        str(workdir / "run"),
        "--dataset",
        "json",
        "--data-files",
        str(corpus),
        "--label-column",
        "domain",
    ]
    # VmHWM counts the pages of memory-mapped Arrow files the process touched, which grow with the
    # corpus but are page cache the kernel can take back; the allocated peak is reported beside it
    done = run_measured("prepare", *argv, what=f"dfm prepare on {num_documents} documents", env=env, cwd=root)
    seconds, peak_kib, anon_kib = done["seconds"], done["peak_rss_kib"], done["peak_anonymous_kib"]
    check_imported(done["module"], root)
    summary = json.loads((workdir / "run" / "partition" / "stats.json").read_text())
    return {
        "documents": num_documents,
        "corpus_mb": size / 1e6,
        "seconds": float(seconds),
        "documents_per_second": num_documents / float(seconds),
        "peak_rss_mb": int(peak_kib) / 1024,
        "peak_anonymous_mb": int(anon_kib) / 1024,
        "cluster_sizes": summary["sizes"],
        "purity": summary["purity"],
    }


def _prepare_runs(sizes: Sequence[int], root: Path, say: Callable[[str], None]) -> list[dict]:
    """``measure_prepare`` at every size, smallest first, with the growth of peak RSS from each size to the next."""
    runs = []
    for n in progress(sorted(sizes), desc="bench --prepare", unit="corpus"):
        say(f"prepare on {n} documents")
        with tempfile.TemporaryDirectory(prefix="dfm-prepare-bench-") as tmp:
            runs.append(measure_prepare(n, Path(tmp), root))
        say(
            f"  {runs[-1]['documents_per_second']:.0f} documents/s, peak RSS {runs[-1]['peak_rss_mb']:.0f} MB "
            f"(allocated: {runs[-1]['peak_anonymous_mb']:.0f} MB)"
        )
    for before, after in zip(runs, runs[1:]):
        after["rss_growth_vs_previous"] = after["peak_rss_mb"] / before["peak_rss_mb"]
        after["anonymous_growth_vs_previous"] = after["peak_anonymous_mb"] / before["peak_anonymous_mb"]
    return runs


def _partition_runs(sizes: Sequence[int], vocab: int, root: Path, say: Callable[[str], None]) -> list[dict]:
    """``measure_partition`` at every size, smallest first."""
    runs = []
    for n in progress(sorted(sizes), desc="bench --prepare-vocab", unit="corpus"):
        say(f"partition of {n} documents at a {vocab}-token vocabulary")
        with tempfile.TemporaryDirectory(prefix="dfm-partition-bench-") as tmp:
            runs.append(measure_partition(n, vocab, Path(tmp), root))
        say(
            f"  fit {runs[-1]['fit']['seconds']:.1f}s, peak RSS {runs[-1]['fit']['peak_rss_mb']:.0f} MB; "
            f"{ASSIGN_BATCH} documents assigned and weighed at peak RSS {runs[-1]['batch']['peak_rss_mb']:.0f} MB"
        )
    return runs


def bench_prepare(
    sizes: Sequence[int],
    out: Path | None = None,
    say: Callable[[str], None] = lambda message: None,
    vocab: int | None = None,
    source: str | os.PathLike | None = None,
) -> dict:
    """Whole `dfm prepare` runs at every corpus size (``"prepare"``), or with ``vocab`` the
    partition alone at that vocabulary (``"partition"``), dfm imported from the checkout
    ``source`` (default: this one); JSON to ``out``."""
    if not sizes or any(n < 100 for n in sizes):
        raise DfmError(f"--prepare needs corpus sizes of at least 100 documents, got {list(sizes)}")
    root = check_source(source)
    started = time.perf_counter()
    results: dict = {"machine": {**machine_info(), "source": str(root), "source_version": source_version(root)}}
    if vocab is None:
        results["prepare"] = _prepare_runs(sizes, root, say)
    else:
        results["partition"] = _partition_runs(sizes, vocab, root, say)
    results["seconds"] = time.perf_counter() - started
    if out is not None:
        write_json(out, results)
    return results


def format_prepare_table(results: dict) -> str:
    """Markdown table of ``bench_prepare``'s results."""
    if "partition" in results:
        return format_partition_table(results["partition"])
    lines = [
        "| documents | corpus MB | seconds | documents/s | peak RSS MB (growth) | of it allocated, MB (growth) |",
        "|---|---|---|---|---|---|",
    ]

    def growth(run: dict, key: str) -> str:
        return f" ({run[key]:.2f}x)" if key in run else ""

    for run in results["prepare"]:
        lines.append(
            f"| {run['documents']} | {run['corpus_mb']:.0f} | {run['seconds']:.1f} | "
            f"{run['documents_per_second']:.0f} | {run['peak_rss_mb']:.0f}{growth(run, 'rss_growth_vs_previous')} | "
            f"{run['peak_anonymous_mb']:.0f}{growth(run, 'anonymous_growth_vs_previous')} |"
        )
    return "\n".join(lines)
