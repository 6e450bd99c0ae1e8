"""PNG plots of an evaluation report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dfm.atomic import atomic_file  # noqa: E402

COMPARED = ("baseline", "mixture", "top1", "switch", "bayes", "centroid", "oracle")


def save_figure(fig, path: Path) -> None:
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_bpb_by_cluster(report: dict, path: Path) -> None:
    clusters = sorted(report["per_cluster"], key=int)
    names = [n for n in COMPARED if n in report["models"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(clusters)), 4))
    width = 0.8 / max(1, len(names))
    shown = []
    for i, name in enumerate(names):
        values = [report["per_cluster"][c][name]["bpb"] for c in clusters]
        shown += values
        ax.bar([j + i * width for j in range(len(clusters))], values, width, label=name)
    if report.get("entropy_floor_bpb") is not None:
        shown.append(report["entropy_floor_bpb"])
        ax.axhline(report["entropy_floor_bpb"], color="black", linestyle="--", linewidth=1, label="entropy floor")
    ax.set_ylim(0.9 * min(shown), 1.03 * max(shown))  # the differences are a few percent: zoom in
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(clusters))], [f"cluster {c}" for c in clusters])
    ax.set_ylabel("bits per byte (ELBO bound)" if report.get("bound") == "elbo" else "bits per byte")
    ax.set_title("Bits per byte by cluster: baseline vs ensemble modes")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_router_accuracy(report: dict, path: Path) -> None:
    acc = report["router"]["accuracy_by_prefix"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(acc["lengths"], acc["accuracy"], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("prefix length (tokens)")
    ax.set_ylabel("router argmax accuracy")
    ax.set_title("Router accuracy vs prefix length")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_loss_split(report: dict, path: Path) -> None:
    """Per group (all, each cluster, each length bucket), the experts', the posterior's and the
    mixture's routing factor of the ratio to the baseline (eval.loss_split), as bars around 1."""
    split = report["loss_split"]
    groups = (
        [("all", split["all"])]
        + [(f"cluster {c}", g) for c, g in split["cluster"].items()]
        + [(name, split["length"][name]) for name in ("short", "medium", "long") if name in split["length"]]
    )
    mode = "mixture" if "mixture" in split["all"]["modes"] else next(iter(split["all"]["modes"]))
    factors = {
        "experts (oracle/baseline)": [g["experts"] for _, g in groups],
        "posterior (bayes/oracle)": [g["posterior"] for _, g in groups],
        f"routing ({mode}/bayes)": [g["modes"][mode]["routing"] for _, g in groups],
        f"total ({mode}/baseline)": [g["modes"][mode]["total"] for _, g in groups],
    }
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(groups)), 4))
    width = 0.8 / len(factors)
    for i, (label, values) in enumerate(factors.items()):
        ax.bar([j + i * width for j in range(len(groups))], [v - 1 for v in values], width, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [name for name, _ in groups], rotation=20)
    ax.set_ylabel("ratio - 1 (above 0: worse than the reference)")
    ax.set_title("Where the loss goes: experts, posterior and routing")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [out_dir / "bpb_by_cluster.png"]
    plot_bpb_by_cluster(report, paths[0])
    if "router" in report:
        paths.append(out_dir / "router_accuracy.png")
        plot_router_accuracy(report, paths[-1])
    if "loss_split" in report:
        paths.append(out_dir / "loss_split.png")
        plot_loss_split(report, paths[-1])
    return paths
