"""The fresh processes the benchmarks measure: `python eval/measured.py TASK ARGS...` prints its
result as the last line of stdout.

Run by path, not with ``-m``: the packages it imports then come from PYTHONPATH first, so `dfm
bench --prepare-source DIR` measures the dfm checkout at DIR (an older commit too) with this
file's code. Peak memory is VmHWM, the process's own high-water mark (not ``ru_maxrss``, which
Linux carries over ``exec`` from the forking process).

Tasks:
    imports                         torch and transformers imported, nothing else
    generate RUN NEW_TOKENS         load RUN's ensemble and decode NEW_TOKENS with mixture routing
    prepare ARGV...                 `dfm ARGV...` (a `dfm prepare`), with its seconds and allocated peak
    partition MODE N V K IDS DIR    fit_kmeans (MODE fit) or assign + centroid weights (MODE assign)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # this folder's modules are eval.*, not top-level names


def peak_rss_kib() -> int:
    """The process's peak resident memory in KiB."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss // 1024 if sys.platform == "darwin" else rss


def _imports() -> dict:
    import torch  # noqa: F401  (what is measured is the import)
    import transformers  # noqa: F401

    return {"peak_rss_kib": peak_rss_kib()}


def _generate(run_dir: str, new_tokens: str) -> dict:
    from models.ensemble import Ensemble
    from models.generation import generate_text

    ensemble = Ensemble.from_run(run_dir)
    generate_text(
        ensemble,
        [list(range(1, 17))],
        max_new_tokens=int(new_tokens),
        routing="mixture",
        temperature=0.0,
        stop_at_eos=False,
    )
    return {"peak_rss_kib": peak_rss_kib()}


def _prepare(*argv: str) -> dict:
    """`dfm ARGV`, with its wall seconds and the peak of RssAnon (what it allocated, as opposed to
    the memory-mapped Arrow pages VmHWM also counts), sampled every 20 ms since /proc keeps no
    high-water mark of it."""
    peak_anon = [0]

    def sample_anon() -> None:
        while True:
            with open("/proc/self/status") as status:
                anon = next((int(line.split()[1]) for line in status if line.startswith("RssAnon:")), 0)
            peak_anon[0] = max(peak_anon[0], anon)
            time.sleep(0.02)

    threading.Thread(target=sample_anon, daemon=True).start()
    import dfm.cli

    start = time.perf_counter()
    code = dfm.cli.main(list(argv))
    return {
        "code": code,
        "seconds": time.perf_counter() - start,
        "peak_rss_kib": peak_rss_kib(),
        "peak_anonymous_kib": peak_anon[0],
        "module": dfm.cli.__file__,
    }


def _topic_corpus(n: int, vocab: int, clusters: int, topic_ids: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """``n`` token-id documents of ``clusters`` topics (eval/partition_bench.py says how they are made)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = np.random.default_rng(0).permutation(vocab)  # the same topics and Zipf ranks for every corpus
    topics = ids[: clusters * topic_ids].reshape(clusters, topic_ids)
    zipf = 1 / (np.arange(vocab) + 10.0)
    labels = rng.integers(clusters, size=n)
    lengths = rng.integers(100, 401, size=n)
    background = ids[rng.choice(vocab, size=int(lengths.sum()), p=zipf / zipf.sum())]
    own = rng.random(int(lengths.sum())) < 0.7
    tokens = np.where(
        own, topics[np.repeat(labels, lengths), rng.integers(topic_ids, size=int(lengths.sum()))], background
    )
    return [doc.tolist() for doc in np.split(tokens, np.cumsum(lengths)[:-1])], labels.tolist()


def _partition(mode: str, num_documents: str, vocab: str, clusters: str, topic_ids: str, directory: str) -> dict:
    try:
        import training.clustering as fitting
    except ImportError:  # a checkout from before the module's rename
        import training.partition as fitting
    from models.partition import Partition

    n, v, k, ids = int(num_documents), int(vocab), int(clusters), int(topic_ids)
    out: dict = {"module": fitting.__file__}
    if mode == "fit":
        docs, labels = _topic_corpus(n, v, k, ids, 1)
        out["start_rss_mb"] = peak_rss_kib() / 1024
        start = time.perf_counter()
        partition = fitting.fit_kmeans(docs, k, v, seed=0)
        out["seconds"] = time.perf_counter() - start
        out["peak_rss_mb"] = peak_rss_kib() / 1024
        partition.save(directory)
        stats = fitting.partition_stats(partition.assignments, labels, k)
    else:
        partition = Partition.load(directory)
        docs, labels = _topic_corpus(n, v, k, ids, 2)
        out["start_rss_mb"] = peak_rss_kib() / 1024
        start = time.perf_counter()
        assigned = partition.assign(docs)
        out["assign_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        partition.log_weights(docs, 0.1)
        out["log_weights_seconds"] = time.perf_counter() - start
        out["peak_rss_mb"] = peak_rss_kib() / 1024
        stats = fitting.partition_stats(assigned, labels, k)
    out.update(
        sizes=stats["sizes"],
        purity=stats["purity"],
        nmi=stats["nmi"],
        scikit_learn=sys.modules["sklearn"].__version__ if "sklearn" in sys.modules else None,
    )
    return out


def run_measured(
    task: str, *args: str, what: str, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None
) -> dict:
    """``task`` in a fresh Python process; its result, or a one-line error naming ``what`` failed."""
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), task, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        from dfm.errors import DfmError

        raise DfmError(f"{what} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1])


TASKS = {"imports": _imports, "generate": _generate, "prepare": _prepare, "partition": _partition}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TASKS:
        print(f"usage: measured.py {{{','.join(TASKS)}}} ARGS...", file=sys.stderr)
        return 2
    result = TASKS[argv[0]](*argv[1:])
    print(json.dumps(result))
    return int(result.get("code") or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
