"""Run by tests/test_partition.py in a fresh process: how far assigning and centroid-weighing 100
documents at a 1M-token vocabulary raises this process's peak RSS (KiB, VmHWM), printed alone."""

import os
import random
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])  # the checkout's packages, not tests/ as top-level names

from eval.measured import peak_rss_kib  # noqa: E402
from training.clustering import from_labels  # noqa: E402

vocab, rng = 1_000_000, random.Random(0)
docs = [[rng.randrange(vocab) for _ in range(200)] for _ in range(100)]
part = from_labels(docs, [i % 2 for i in range(len(docs))], vocab)
before = peak_rss_kib()
part.assign(docs)
part.log_weights(docs, 0.1)
print(peak_rss_kib() - before)
