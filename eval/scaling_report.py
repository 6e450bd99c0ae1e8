"""A scaling study's figures: rungs grouped over seeds (mean +- sd), a trend per K (the ratio to
the baseline as a straight line in log10 of total training FLOPs, fitted by least squares with
standard errors), the compute where a mode reaches 1.00x and 0.97x (measured when a rung reaches
it, else extrapolated from the trend and labelled so), then scaling.json, scaling.md, scaling.png.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib.pyplot as plt

from dfm.atomic import write_json, write_text
from eval.plots import save_figure  # also selects the Agg backend

#: The ratios a study reaches for: equivalence, and the ensemble clearly ahead.
TARGETS = (1.00, 0.97)
TRENDS = ("mixture", "oracle")


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def group(results: list[dict]) -> list[dict]:
    """The rungs of one K and budget over their seeds."""
    keys = sorted({(r["experts"], r["budget"]) for r in results})
    groups = []
    for k, budget in keys:
        members = [r for r in results if (r["experts"], r["budget"]) == (k, budget)]
        modes = sorted(set.intersection(*(set(r["ratios"]) for r in members)))
        groups.append(
            {
                "experts": k,
                "budget": budget,
                "seeds": [r["seed"] for r in members],
                "expert_steps": members[0]["expert_steps"],
                "total_flops": statistics.fmean(r["flops"]["total"] for r in members),
                "ratios": {m: _spread([r["ratios"][m] for r in members]) for m in modes},
                "verdicts": {
                    m: [r["equivalence"][m]["verdict"] for r in members if m in r["equivalence"]] for m in modes
                },
                "seconds": [r["seconds"] for r in members],
            }
        )
    return groups


def fit_trend(log_flops: list[float], ratios: list[float]) -> dict | None:
    """ratio = intercept + slope * log10(FLOPs) by least squares; standard errors from the
    residuals when there are more points than parameters (else None). None below two distinct x."""
    n = len(log_flops)
    if n < 2 or len(set(log_flops)) < 2:
        return None
    mx, my = statistics.fmean(log_flops), statistics.fmean(ratios)
    sxx = sum((x - mx) ** 2 for x in log_flops)
    slope = sum((x - mx) * (y - my) for x, y in zip(log_flops, ratios)) / sxx
    intercept = my - slope * mx
    fit = {"intercept": intercept, "slope": slope, "points": n, "slope_se": None, "intercept_se": None, "cov": None}
    if n > 2:
        s2 = sum((y - intercept - slope * x) ** 2 for x, y in zip(log_flops, ratios)) / (n - 2)
        fit.update(slope_se=math.sqrt(s2 / sxx), intercept_se=math.sqrt(s2 * (1 / n + mx**2 / sxx)), cov=-mx * s2 / sxx)
    return fit


def reach(fit: dict | None, target: float) -> dict:
    """Where the trend meets ``target``: log10 FLOPs with its standard error (delta method)."""
    if fit is None:
        return {"status": "no trend", "why": "fewer than two budgets"}
    a, b = fit["intercept"], fit["slope"]
    if b >= 0:
        return {"status": "not reached", "why": f"the ratio does not fall with compute (slope {b:+.4f} per decade)"}
    x = (target - a) / b
    se = None
    if fit["slope_se"] is not None:
        se = math.sqrt(max(0.0, fit["intercept_se"] ** 2 + x**2 * fit["slope_se"] ** 2 + 2 * x * fit["cov"])) / abs(b)
    return {"status": "extrapolated", "log10_flops": x, "log10_flops_se": se, "flops": 10**x}


def crossing(groups: list[dict], fit: dict | None, mode: str, target: float) -> dict:
    """Measured at the cheapest rung whose mean ratio is at or below ``target``, else the trend's."""
    for g in sorted(groups, key=lambda g: g["total_flops"]):
        if mode in g["ratios"] and g["ratios"][mode]["mean"] <= target:
            return {"status": "measured", "flops": g["total_flops"], "budget": g["budget"]}
    return reach(fit, target)


def summarize(results: list[dict], configured_experts: int) -> dict:
    """Groups, trends and crossings of every K in ``results``."""
    groups = group(results)
    by_k = {}
    for k in sorted({g["experts"] for g in groups}):
        rungs = [r for r in results if r["experts"] == k]
        trends = {}
        for mode in TRENDS:
            points = [(math.log10(r["flops"]["total"]), r["ratios"][mode]) for r in rungs if mode in r["ratios"]]
            fit = fit_trend([p[0] for p in points], [p[1] for p in points])
            mine = [g for g in groups if g["experts"] == k]
            trends[mode] = {
                "fit": fit,
                "crossings": {f"{t:.2f}": crossing(mine, fit, mode, t) for t in TARGETS},
            }
        by_k[str(k)] = trends
    return {
        "configured_experts": configured_experts,
        "rungs": sorted(results, key=lambda r: (r["seed"], r["experts"], r["budget"])),
        "groups": groups,
        "trends": by_k,
        "x_axis": "total training FLOPs: the shared seed model plus the decentralized side (experts and router)",
    }


def steps_text(steps: int | list[int] | None) -> str:
    """One number when every expert trained the same steps, each expert's (a/b/c) when allocation split them."""
    return "/".join(map(str, steps)) if isinstance(steps, list) else str(steps)


def _ratio(spread: dict | None) -> str:
    if spread is None:
        return "–"
    return f"{spread['mean']:.3f}x" + (f" ± {spread['sd']:.3f}" if spread["sd"] is not None else "")


def _crossing_text(c: dict) -> str:
    if c["status"] == "measured":
        return f"measured at {c['flops']:.2e} FLOPs (budget {c['budget']:g})"
    if c["status"] == "extrapolated":
        rng = ""
        if c["log10_flops_se"] is not None:
            lo, hi = 10 ** (c["log10_flops"] - c["log10_flops_se"]), 10 ** (c["log10_flops"] + c["log10_flops_se"])
            rng = f" (±1 se: {lo:.1e} to {hi:.1e})"
        return f"**extrapolated** to {c['flops']:.2e} FLOPs{rng}"
    return f"{c['status']}: {c['why']}"


def markdown(summary: dict) -> str:
    groups = summary["groups"]
    modes = [m for m in ("mixture", "top1", "bayes", "oracle") if any(m in g["ratios"] for g in groups)]
    lines = [
        "# Scaling study",
        "",
        "Ratios of bits per byte to each rung's compute-matched baseline (mean ± sd over seeds); "
        f"x: {summary['x_axis']}.",
        "",
        "| K | budget | seeds | steps per expert | total FLOPs | "
        + " | ".join(modes)
        + " | verdicts (mixture) | wall per rung |",
        "|---|---|---|---|---|" + "---|" * len(modes) + "---|---|",
    ]
    for g in groups:
        verdicts = ", ".join(g["verdicts"].get("mixture", [])) or "–"
        wall = ", ".join(f"{s / 60:.1f} min" for s in g["seconds"])
        cells = " | ".join(_ratio(g["ratios"].get(m)) for m in modes)
        lines.append(
            f"| {g['experts']} | {g['budget']:g} | {' '.join(map(str, g['seeds']))} | "
            f"{steps_text(g['expert_steps'])} | {g['total_flops']:.2e} | {cells} | {verdicts} | {wall} |"
        )
    lines += ["", "## Trends (ratio = a + b log10 FLOPs) and crossings", ""]
    for k, trends in summary["trends"].items():
        for mode, trend in trends.items():
            fit = trend["fit"]
            if fit is None:
                lines.append(f"- K = {k}, {mode}: one budget, no trend")
                continue
            se = f" ± {fit['slope_se']:.4f}" if fit["slope_se"] is not None else " (two points: no uncertainty)"
            reached = "; ".join(f"{t}x {_crossing_text(c)}" for t, c in trend["crossings"].items())
            lines.append(f"- K = {k}, {mode}: b = {fit['slope']:+.4f}{se} per decade of compute; {reached}")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate(sorted({g["experts"] for g in summary["groups"]})):
        colour = f"C{i}"
        for mode, style in (("mixture", "-o"), ("oracle", "--s")):
            points = [g for g in summary["groups"] if g["experts"] == k and mode in g["ratios"]]
            if not points:
                continue
            ax.errorbar(
                [g["total_flops"] for g in points],
                [g["ratios"][mode]["mean"] for g in points],
                yerr=[g["ratios"][mode]["sd"] or 0.0 for g in points],
                fmt=style,
                color=colour,
                capsize=3,
                label=f"K = {k} {mode}",
                alpha=1.0 if mode == "mixture" else 0.6,
            )
    ax.axhline(1.0, color="black", linewidth=1)
    ax.axhline(0.97, color="grey", linewidth=1, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("total training FLOPs (seed model + experts + router)")
    ax.set_ylabel("bits/byte ÷ compute-matched baseline")
    ax.set_title("Decentralized ensemble vs central model as compute grows")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_study_report(summary: dict, out: str | Path) -> None:
    """scaling.json, scaling.md and scaling.png into ``out``."""
    out = Path(out)
    write_json(out / "scaling.json", summary)
    write_text(out / "scaling.md", markdown(summary))
    plot(summary, out / "scaling.png")
