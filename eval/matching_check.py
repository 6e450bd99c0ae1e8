"""Is the comparison fair? A verdict against the baseline means something only when the baseline
spent at least the decentralized side's training FLOPs (compute matching gives it exactly that,
rounded up to a whole optimizer step). A baseline that spent less (trained before the router, or
with steps set by hand) would flatter the ensemble: its report keeps the scores, and every verdict
becomes ``unmatched`` with the reason, so no under-trained baseline reads as an ensemble that wins.
A baseline that spent more only makes the comparison harder and is left alone.
"""

from __future__ import annotations

#: Relative slack for float rounding of the logged FLOP counts (they come from token counts).
SLACK = 1e-9
UNMATCHED = "unmatched"


def matching_problem(matching: dict) -> str | None:
    """Why ``compute.matching`` of a report does not match, or None when it does (or cannot be
    checked: no baseline, or no training log of one side)."""
    baseline, decentralized = matching.get("baseline_flops") or 0, matching.get("decentralized_flops") or 0
    if baseline <= 0 or decentralized <= 0 or baseline >= decentralized * (1 - SLACK):
        return None
    return (
        f"the baseline spent {baseline:.3g} training FLOPs, {baseline / decentralized:.3f}x the decentralized "
        f"side's {decentralized:.3g}: it is not compute-matched (was it trained before the router?)"
    )


def check_matching(report: dict) -> dict:
    """``report`` with its verdicts replaced by ``unmatched`` when the baseline is under-trained,
    and ``compute.matching_problem`` saying why (None when matched)."""
    problem = matching_problem(report.get("compute", {}).get("matching", {}))
    report.setdefault("compute", {})["matching_problem"] = problem
    if problem is not None:
        for key in ("equivalence_by_mode", "equivalence_per_cluster"):
            for result in report.get(key, {}).values():
                result["verdict"] = UNMATCHED
        if "equivalence" in report:
            report["equivalence"]["verdict"] = UNMATCHED
    return report
