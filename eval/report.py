"""`dfm eval`: score held-out documents under the baseline, every expert and every routing mode,
and judge perplexity equivalence of the decentralized ensemble against the central baseline."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from dfm.atomic import write_json, write_text
from dfm.errors import DfmError
from eval.equivalence import equivalence
from eval.loss_split import loss_split, markdown_lines
from eval.perplexity import doc_bits, entropy_floor_bpb, mixed_token_log_probs, summarize, synthetic_corpus
from eval.router_quality import inference_accounting, router_quality
from models.ar_kind import AR, AR_MODES
from models.ensemble import Ensemble
from models.expert import load_expert, num_parameters
from models.manifest import Manifest
from models.partition import Partition
from models.path_kinds import PathKind
from models.scoring import document_bos, expert_token_log_probs, token_log_probs
from models.weighers import BayesWeigher, Scoring, mode_log_weights
from training.config import read_run_config
from training.data import load_saved
from training.layout import RunLayout
from training.lm_training import compute_matching
from training.run_config import RunConfig


def check_modes(modes: Sequence[str], kind: PathKind) -> None:
    """Refuse evaluation modes the run's path does not have, naming the ones it has."""
    unknown = [m for m in modes if m not in kind.eval_modes]
    if unknown:
        raise DfmError(
            f"unknown evaluation mode(s) {unknown}: not available on the {kind.name} path; choose from "
            f"{', '.join(kind.eval_modes)}"
        )


def _weighers(
    ensemble: Ensemble,
    modes: Sequence[str],
    docs: Sequence[Sequence[int]],
    clusters: Sequence[int],
    expert_lps: list[Tensor],
    scoring: Scoring,
    partition: Partition | None,
    centroid_temperature: float,
) -> dict[str, list[Tensor]]:
    """Per mode, every document's per-prefix log-weights: the mode's weigher (``Ensemble.weigher``,
    the same one decoding uses), sparsified as the mode says; modes sharing a weigher (mixture,
    top1, top2: the router) share its scores."""
    by_weigher: dict[type, list[Tensor]] = {}
    out = {}
    for mode in modes:
        weigher = ensemble.weigher(
            mode, partition=partition, oracle=clusters, centroid_temperature=centroid_temperature
        )
        if type(weigher) not in by_weigher:
            by_weigher[type(weigher)] = weigher.documents(docs, expert_lps, scoring)
        out[mode] = [mode_log_weights(mode, w) for w in by_weigher[type(weigher)]]
    return out


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    modes: Sequence[str] = AR_MODES,
    max_documents: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    margin: float = 0.02,
    centroid_temperature: float = 0.1,
    resamples: int = 2000,
    seed: int = 0,
    device: torch.device | str | None = None,
    allow_missing: bool = False,
    dtype: torch.dtype | None = None,
) -> dict:
    """Everything `report.json` holds; see README for the keys. ``dtype``: of every scored model's
    weights (default: as saved, float32)."""
    check_modes(modes, AR)
    layout = RunLayout.of(run_dir)
    config = read_run_config(run_dir)
    if config.is_masked:
        raise DfmError(
            f"{run_dir} is a masked run: score it with eval.masked_report.evaluate_masked_run (dfm eval does)"
        )
    docs, clusters, num_bytes, texts = held_out(layout, config, split, max_documents)

    ensemble = Ensemble.from_run(run_dir, device=device, allow_missing=allow_missing, dtype=dtype)
    if ensemble.clusters != list(range(config.partition.num_clusters)) and "oracle" in modes:
        warnings.warn("oracle mode skipped: the true cluster's expert is missing for some documents", stacklevel=2)
        modes = [m for m in modes if m != "oracle"]
    context = config.scoring_context(ensemble.experts[0].config.max_position_embeddings)
    stride = (
        max(1, context // 2) if stride is None else stride
    )  # documents longer than the context keep half a window of history
    scoring = Scoring(document_bos(ensemble.tokenizer), context, stride, batch_size)
    score = {
        "bos_id": scoring.bos_id,
        "eos_id": ensemble.tokenizer.eos_token_id,
        "context": context,
        "stride": stride,
        "batch_size": batch_size,
    }
    expert_lps = expert_token_log_probs(ensemble.experts, docs, **score, desc=f"eval: {ensemble.num_experts} experts")
    partition = Manifest.load(run_dir).load_partition(run_dir) if "centroid" in modes else None  # verified

    log_probs: dict[str, list[Tensor]] = {}
    baseline = load_expert(layout.baseline, device, dtype=dtype) if layout.baseline.is_dir() else None
    verify_baseline(run_dir, baseline is not None)
    if baseline is not None:
        log_probs["baseline"] = token_log_probs(baseline, docs, **score, desc="eval: baseline")
    for k, name in enumerate(ensemble.names):
        log_probs[name] = [lp[k] for lp in expert_lps]
    weights = _weighers(ensemble, modes, docs, clusters, expert_lps, scoring, partition, centroid_temperature)
    for mode in modes:
        log_probs[mode] = mixed_token_log_probs(expert_lps, weights[mode])

    nll = {name: [-lp for lp in lps] for name, lps in log_probs.items()}
    report: dict = {"split": split, "documents": len(docs), "context": context, "stride": stride}
    report["models"] = {name: summarize(values, num_bytes) for name, values in nll.items()}
    report["per_cluster"] = {}
    for k in sorted(set(clusters)):
        members = [i for i, c in enumerate(clusters) if c == k]
        report["per_cluster"][str(k)] = {
            name: summarize([values[i] for i in members], [num_bytes[i] for i in members])
            for name, values in nll.items()
        }
    corpus = synthetic_corpus(config)
    report["entropy_floor_bpb"] = entropy_floor_bpb(corpus, texts) if corpus is not None else None
    if baseline is not None:
        base_bits = doc_bits(nll["baseline"])
        report["equivalence_by_mode"] = {
            mode: equivalence(doc_bits(nll[mode]), base_bits, num_bytes, margin, resamples, seed) for mode in modes
        }
        if "mixture" in modes:
            report["equivalence"] = report["equivalence_by_mode"]["mixture"]
            report["equivalence_per_cluster"] = {}
            for k in sorted(set(clusters)):
                idx = torch.tensor([i for i, c in enumerate(clusters) if c == k])
                report["equivalence_per_cluster"][str(k)] = equivalence(
                    doc_bits(nll["mixture"])[idx], base_bits[idx], torch.tensor(num_bytes)[idx], margin, resamples, seed
                )
    if baseline is not None and {"oracle", "bayes"} <= set(modes):
        bits = {name: doc_bits(nll[name]).tolist() for name in ["baseline", *modes]}
        report["loss_split"] = loss_split(bits, clusters, [len(d) for d in docs], num_bytes, context)
    if ensemble.router is not None and ensemble.clusters == list(range(ensemble.num_experts)):
        router_lw = (
            weights["mixture"] if "mixture" in modes else ensemble.router_weigher().documents(docs, expert_lps, scoring)
        )
        bayes = BayesWeigher(ensemble.log_prior).documents(docs, expert_lps, scoring)
        quality = router_quality(router_lw, bayes, clusters, context)
        trained = layout.read_summary("router") or {}
        report["router"] = {
            "accuracy_by_prefix": quality["accuracy_by_length"],
            "kl_to_bayes": quality["kl_bayes_router"],
            "ece": quality["ece"],
            "kl_train": trained.get("kl_train"),
            "kl_validation": trained.get("kl_validation"),
            "targets": trained.get("targets"),
            "temperature": trained.get("temperature"),
        }
    report["compute"] = compute_section(layout, ensemble, baseline)
    return report


def held_out(
    layout: RunLayout, config: RunConfig, split: str, max_documents: int | None
) -> tuple[list[list[int]], list[int], list[int], list[str]]:
    """Token ids, clusters, UTF-8 byte counts and texts of the first ``max_documents`` documents of ``split``."""
    documents = load_saved(layout.documents, "the tokenized documents")
    if split not in documents:
        raise DfmError(f"no split {split!r} in {layout.documents}: choose one of {sorted(documents)}")
    data = documents[split]
    if max_documents is not None:
        data = data.select(range(min(max_documents, len(data))))
    if len(data) == 0:
        raise DfmError(f"the {split} split is empty: nothing to evaluate")
    return (
        list(data["input_ids"]),
        list(data["cluster"]),
        list(data["num_bytes"]),
        list(data[config.data.text_column]),
    )


def require_baseline(report: dict, run_dir: str | Path) -> None:
    """Refuse a report without a baseline (scores, but no equivalence verdict): what `dfm eval`
    does after writing it, unless --no-baseline accepts that."""
    if "baseline" not in report["models"]:
        raise DfmError(
            f"no baseline at {RunLayout.of(run_dir).baseline} to compare with: report.json has the scores "
            f"but no equivalence verdict; train one with `dfm train-baseline --run {run_dir}`, or pass "
            f"--no-baseline to accept a report without a verdict"
        )


def require_matched(report: dict, run_dir: str | Path) -> None:
    """Refuse a report whose baseline is not compute-matched (eval.matching_check), after writing it."""
    problem = report.get("compute", {}).get("matching_problem")
    if problem:
        raise DfmError(
            f"{problem}; the report has no verdict. Train the baseline last: delete {RunLayout.of(run_dir).baseline} "
            f"and its checkpoints, then `dfm train-baseline --run {run_dir}`"
        )


def verify_baseline(run_dir: str | Path, loaded: bool) -> None:
    """Refuse a loaded baseline whose files differ from those `dfm assemble` recorded."""
    manifest = Manifest.load(run_dir)
    if loaded and manifest.baseline is not None:
        manifest.verify_model(run_dir, manifest.baseline)


def compute_section(layout: RunLayout, ensemble, baseline) -> dict:
    """``matching``: the run's one training-FLOP account (``training.lm_training.compute_matching``:
    every expert, the router's training and the experts' scoring of its documents, against the
    baseline; the seed shared by both), and the inference FLOPs per token of every mode."""
    router_params = ensemble.router.num_parameters if ensemble.router is not None else 0
    return {
        "matching": compute_matching(layout.root, ensemble.names),
        **inference_accounting(
            expert_params=[num_parameters(e) for e in ensemble.experts],
            router_params=router_params,
            baseline_params=num_parameters(baseline) if baseline is not None else 0,
            top_k=[k for k in (1, 2) if k <= ensemble.num_experts],
        ),
    }


def markdown(report: dict) -> str:
    """The report as a Markdown table (also printed by `dfm eval`)."""
    floor = report.get("entropy_floor_bpb")
    base = report["models"].get("baseline", {}).get("bpb")
    bound = report.get("bound") == "elbo"
    unit = "bits/byte (ELBO bound)" if bound else "bits/byte"
    lines = [
        f"# dfm evaluation ({report['split']} split, {report['documents']} documents)",
        "",
        f"| model | NLL/token | perplexity | {unit} | vs baseline | vs floor |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        ratio = f"{m['bpb'] / base:.3f}x" if base else "-"
        over = f"{m['bpb'] / floor:.3f}x" if floor else "-"
        lines.append(f"| {name} | {m['nll']:.4f} | {m['ppl']:.3f} | {m['bpb']:.4f} | {ratio} | {over} |")
    if bound:
        lines += [
            "",
            f"Masked path: every figure is the ELBO ({report['elbo_samples']} masked draws per row), an "
            "upper bound on the NLL; all models are scored on the same draws.",
        ]
    if floor is not None:
        lines += ["", f"True entropy floor of the synthetic source: {floor:.4f} bits/byte."]
    if base is None:
        lines += ["", "No baseline in this run: no equivalence verdict (train one with `dfm train-baseline`)."]
    if "equivalence" in report:
        eq = report["equivalence"]
        lines += [
            "",
            f"Equivalence (mixture - baseline): delta {eq['delta_bpb']:+.4f} bpb, 95% CI "
            f"[{eq['ci95'][0]:+.4f}, {eq['ci95'][1]:+.4f}], margin ±{eq['margin']:.4f}: **{eq['verdict']}**",
        ]
    matching = report.get("compute", {}).get("matching", {})
    if matching.get("baseline_over_decentralized"):
        router_share = (matching["router_training_flops"] + matching["router_scoring_flops"]) / matching[
            "decentralized_flops"
        ]
        lines += [
            "",
            f"Compute: baseline {matching['baseline_flops']:.3g} training FLOPs = "
            f"{matching['baseline_over_decentralized']:.3f}x the decentralized side's "
            f"{matching['decentralized_flops']:.3g} (experts {matching['experts_flops']:.3g}, router "
            f"{matching['router_training_flops']:.3g}, experts scoring the router's documents "
            f"{matching['router_scoring_flops']:.3g}: the router's share "
            f"{router_share:.1%}); "
            f"both start from {matching['seed_from'] or 'scratch'}"
            + (f" (seed phase {matching['seed_flops']:.3g})" if matching["seed_flops"] else ""),
        ]
    if report.get("compute", {}).get("matching_problem"):
        lines += ["", f"**No verdict: {report['compute']['matching_problem']}.**"]
    if "router" in report:
        acc = report["router"]["accuracy_by_prefix"]
        cells = ", ".join(f"{n}: {a:.3f}" for n, a in zip(acc["lengths"], acc["accuracy"]))
        router = report["router"]
        fitted = [
            f"{name} {router[key]:.4f}"
            for name, key in (("training documents", "kl_train"), ("validation documents", "kl_validation"))
            if router.get(key) is not None
        ]
        lines += [
            "",
            f"Router accuracy by prefix length: {cells}",
            f"Router KL(bayes || router) {router['kl_to_bayes']:.4f} nats on these held-out documents, "
            f"ECE {router['ece']:.4f}"
            + (f", temperature {router['temperature']:.3f}" if router.get("temperature") else ""),
        ]
        if fitted:  # over-fitting shows as a gap between its training and validation documents
            lines.append(f"Router KL to its own targets ({router.get('targets')}): {', '.join(fitted)}")
    if "loss_split" in report:
        lines += ["", *markdown_lines(report["loss_split"])]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))
