"""Where the loss goes: every mode's gap to the baseline split into what the experts lose and what
the routing loses, per cluster and per document length.

A mode's bits/byte ratio to the baseline factors exactly into three ratios of bits/byte:

    mode / baseline = (oracle / baseline) x (bayes / oracle) x (mode / bayes)

- **experts**: the true cluster's expert alone against the central model (training, data split);
- **posterior**: the experts' exact Bayes mixture against that oracle (below 1 where mixing helps);
- **routing**: the mode's weights against the exact posterior (the router's share).

Each factor is a ratio of totals over the same documents, so per group the three multiply to the
group's mode / baseline ratio exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from dfm.errors import DfmError

#: Document length buckets in tokens: short ones are mostly routed on a few tokens; documents
#: longer than the context are scored (and routed) in windows.
SHORT_TOKENS = 64


def length_bucket(tokens: int, context: int) -> str:
    """``short`` (< SHORT_TOKENS tokens), ``medium`` (up to the context) or ``long`` (beyond it)."""
    if tokens < SHORT_TOKENS:
        return "short"
    return "medium" if tokens <= context else "long"


def _split(bits: dict[str, float], modes: Sequence[str]) -> dict:
    base, oracle, bayes = bits["baseline"], bits["oracle"], bits["bayes"]
    out = {"experts": oracle / base, "posterior": bayes / oracle}
    out["modes"] = {mode: {"total": bits[mode] / base, "routing": bits[mode] / bayes} for mode in modes}
    return out


def loss_split(
    doc_bits: dict[str, Sequence[float]],
    clusters: Sequence[int],
    tokens: Sequence[int],
    num_bytes: Sequence[int],
    context: int,
) -> dict:
    """The split of every mode in ``doc_bits`` (per-document total bits of baseline, oracle, bayes
    and the modes) over all documents, per cluster and per length bucket; each group also says how
    many documents and bytes it holds."""
    missing = [name for name in ("baseline", "oracle", "bayes") if name not in doc_bits]
    if missing:
        raise DfmError(f"the loss split needs the scores of {missing}: evaluate with --modes oracle bayes too")
    modes = [name for name in doc_bits if name not in ("baseline", "oracle")]
    groups: dict[str, dict[str, list[int]]] = {"all": {"all": list(range(len(clusters)))}, "cluster": {}, "length": {}}
    for i, (cluster, count) in enumerate(zip(clusters, tokens, strict=True)):
        groups["cluster"].setdefault(str(cluster), []).append(i)
        groups["length"].setdefault(length_bucket(count, context), []).append(i)
    out: dict = {
        "buckets": {
            "short": f"< {SHORT_TOKENS} tokens",
            "medium": f"{SHORT_TOKENS}-{context} tokens",
            "long": f"> {context} tokens, scored in windows",
        }
    }
    for kind, members in groups.items():
        out[kind] = {}
        for name, idx in sorted(members.items()):
            bits = {model: sum(float(values[i]) for i in idx) for model, values in doc_bits.items()}
            out[kind][name] = {
                "documents": len(idx),
                "bytes": sum(int(num_bytes[i]) for i in idx),
                **_split(bits, modes),
            }
    out["all"] = out["all"]["all"]
    return out


def markdown_lines(split: dict) -> list[str]:
    """The split as a Markdown table: one row per group, experts / posterior, then each mode's routing and total."""
    modes = list(split["all"]["modes"])
    head = (
        "| group | documents | experts (oracle/baseline) | posterior (bayes/oracle) | "
        + " | ".join(f"{m}: routing / total" for m in modes)
        + " |"
    )
    lines = [
        "## Where the loss goes",
        "",
        "Each mode's ratio to the baseline = experts x posterior x routing (ratios of bits/byte).",
        "",
        head,
        "|" + "---|" * (4 + len(modes)),
    ]

    def row(label: str, group: dict) -> str:
        cells = " | ".join(f"{group['modes'][m]['routing']:.3f} / {group['modes'][m]['total']:.3f}" for m in modes)
        return f"| {label} | {group['documents']} | {group['experts']:.3f} | {group['posterior']:.3f} | {cells} |"

    lines.append(row("all", split["all"]))
    lines += [row(f"cluster {name}", group) for name, group in split["cluster"].items()]
    lines += [
        row(f"{name} ({split['buckets'][name]})", split["length"][name])
        for name in ("short", "medium", "long")
        if name in split["length"]
    ]
    return lines
