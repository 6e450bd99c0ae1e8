"""`dfm bench --prepare N [N ...] --prepare-vocab V`: seconds and peak resident memory of the
partition at a pretrained-size vocabulary (V token ids, e.g. 150_000): ``fit_kmeans`` on N
synthetic token-id documents, then ``assign`` and the centroid-routing weights
(``Partition.log_weights``) of a batch of ``ASSIGN_BATCH`` new documents.

Each step runs in a fresh process (the fit in one, the batch in a second that loads the saved
partition), so each peak is its own: VmHWM at the end, next to its value just before the
measured call (the process with its imports and its documents). Not ``ru_maxrss``: Linux carries
it over ``exec`` from the forking process, so a child would report this bench's own peak. The
measured code is imported from ``source``, the root of a dfm checkout (default: this one), so
the same measurement runs against an older commit checked out beside it (``git worktree add``);
only the API both sides have is called (fit_kmeans, Partition.save/load/assign/log_weights,
partition_stats).

The documents: ``CLUSTERS`` topics, each with its own ``TOPIC_IDS`` token ids; a document takes
70% of its 100-400 tokens from its topic and the rest from a Zipf law over the whole vocabulary,
so purity and NMI against the topics show the partition's quality next to its cost.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dfm.errors import DfmError
from eval.measured import run_measured

#: Documents whose assignment and centroid weights are measured (one `assign` batch of prepare).
ASSIGN_BATCH = 1000
#: Clusters fitted, and topics of the synthetic documents.
CLUSTERS = 8
#: Token ids of each topic's own vocabulary.
TOPIC_IDS = 1000
#: Where dfm's packages are imported from unless told otherwise: this checkout.
HERE = Path(__file__).resolve().parents[1]


def check_source(source: str | os.PathLike | None) -> Path:
    """The checkout root the measured processes import dfm from (``HERE`` when None)."""
    root = HERE if source is None else Path(source).resolve()
    fitting = [root / "training" / name for name in ("clustering.py", "partition.py")]  # its name before and after
    if not any(path.is_file() for path in fitting) or not (root / "models" / "partition.py").is_file():
        raise DfmError(
            f"--prepare-source {root} is not a dfm checkout (no training/clustering.py and "
            "models/partition.py): give the root of one, e.g. made with `git worktree add DIR COMMIT`"
        )
    return root


def source_version(root: Path) -> str | None:
    """``git describe --always --dirty`` of the checkout at ``root``, or None outside git."""
    done = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    )
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def source_env(root: Path) -> dict[str, str]:
    """The environment of a measured process: dfm's packages from ``root`` before any installed copy."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


def check_imported(module: str, root: Path) -> None:
    """Refuse a measurement whose process imported dfm's ``module`` from outside the checkout ``root``."""
    if not Path(module).resolve().is_relative_to(root):
        raise DfmError(
            f"the measured process imported {module}, not the checkout {root}: "
            "unset PYTHONPATH entries or installs that shadow it"
        )


def _child(mode: str, num_documents: int, vocab: int, directory: Path, root: Path) -> dict:
    result = run_measured(
        "partition",
        mode,
        str(num_documents),
        str(vocab),
        str(CLUSTERS),
        str(TOPIC_IDS),
        str(directory),
        what=f"the partition {mode} on {num_documents} documents at vocabulary {vocab}",
        env=source_env(root),
        cwd=root,
    )
    check_imported(result["module"], root)
    return result


def measure_partition(num_documents: int, vocab: int, workdir: Path, root: Path = HERE) -> dict:
    """Fit on ``num_documents`` documents, then assign and weigh ``ASSIGN_BATCH`` new ones, each in
    a fresh process importing dfm from ``root``."""
    if num_documents < 2 * CLUSTERS or vocab < CLUSTERS * TOPIC_IDS:
        raise DfmError(
            f"the partition bench needs at least {2 * CLUSTERS} documents and a vocabulary of at least "
            f"{CLUSTERS * TOPIC_IDS} token ids, got {num_documents} and {vocab}"
        )
    fit = _child("fit", num_documents, vocab, workdir / "partition", root)
    batch = _child("assign", ASSIGN_BATCH, vocab, workdir / "partition", root)
    return {
        "documents": num_documents,
        "vocab": vocab,
        "clusters": CLUSTERS,
        "module": fit["module"],
        "scikit_learn": fit["scikit_learn"],
        "fit": {key: fit[key] for key in ("seconds", "start_rss_mb", "peak_rss_mb", "sizes", "purity", "nmi")},
        "batch": {
            "documents": ASSIGN_BATCH,
            **{
                key: batch[key]
                for key in ("assign_seconds", "log_weights_seconds", "start_rss_mb", "peak_rss_mb", "purity")
            },
        },
    }


def format_partition_table(runs: list[dict]) -> str:
    """Markdown table of ``measure_partition``'s results."""
    lines = [
        "| documents | vocabulary | fit s | fit peak RSS MB (at start) | purity | NMI | assign s | "
        "centroid weights s | batch peak RSS MB (at start) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        fit, batch = run["fit"], run["batch"]
        lines.append(
            f"| {run['documents']} | {run['vocab']} | {fit['seconds']:.2f} | {fit['peak_rss_mb']:.0f} "
            f"({fit['start_rss_mb']:.0f}) | {fit['purity']:.3f} | {fit['nmi']:.3f} | "
            f"{batch['assign_seconds']:.3f} | {batch['log_weights_seconds']:.3f} | "
            f"{batch['peak_rss_mb']:.0f} ({batch['start_rss_mb']:.0f}) |"
        )
    return "\n".join(lines)
