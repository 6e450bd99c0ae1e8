"""`dfm eval` on a masked run: bits per byte from the masked path's ELBO (an upper bound on the
NLL) for the central masked baseline, every expert and the ensemble under every routing mode.

Each document (and its closing EOS) is cut into the rows the experts trained on; every row is
scored on ``samples`` masked draws of ``dfm.elbo.elbo_masks``. Every model and mode
sees the same draws (common random numbers), so their differences carry less noise than their
levels. A mode's log-probability of a masked token is the router-weighted mixture of the
experts' log-probabilities of the true token (exact, as for the ar path); the weights come from
the noisy-state router (or the oracle), sparsified by ``models.weighers.mode_log_weights``, the
function (``dfm.routing.select_experts``) the sampler routes with.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from torch import Tensor

from dfm.elbo import draw_nats, elbo_masks
from dfm.mixing import mix_log_probs
from dfm.progress import progress
from dfm.routing import Routing, parse_mode
from eval.equivalence import equivalence
from eval.perplexity import summarize_totals
from eval.report import check_modes, compute_section, held_out, verify_baseline
from models.masked_ensemble import MaskedEnsemble
from models.masked_expert import clean_logits, load_masked_expert
from models.masked_kind import MASKED, MASKED_MODES
from models.weighers import OracleWeigher, mode_log_weights
from training.config import read_run_config
from training.data import document_rows
from training.layout import RunLayout


def _true_token_log_probs(model, xt: Tensor, attention: Tensor, x1: Tensor) -> Tensor:
    log_probs = clean_logits(model, xt, attention).double().log_softmax(-1)
    return log_probs.gather(-1, x1.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def masked_nats(
    ensemble: MaskedEnsemble,
    baseline,
    docs: Sequence[Sequence[int]],
    clusters: Sequence[int],
    *,
    eos_id: int,
    block_size: int,
    modes: Sequence[str],
    samples: int,
    batch_size: int,
    seed: int,
) -> dict[str, Tensor]:
    """Per document (its tokens and closing ``eos_id``), the ELBO in nats of the baseline (if
    any), every expert and every mode: (N,) float64 each."""
    rows = document_rows(
        datasets.Dataset.from_dict({"input_ids": [list(d) for d in docs], "doc": list(range(len(docs)))}),
        block_size,
        eos_id,
        columns=("doc",),
    )
    ids, attention = torch.tensor(rows["input_ids"]), torch.tensor(rows["attention_mask"])
    owner = torch.tensor(rows["doc"])
    order = attention.sum(-1).argsort(descending=True, stable=True).tolist()  # similar lengths share a batch
    generator = torch.Generator().manual_seed(seed)  # the masks: the same whatever the modes
    switches = torch.Generator().manual_seed(seed + 1)  # switch's expert draws
    names = (["baseline"] if baseline is not None else []) + ensemble.names + list(modes)
    totals = {name: torch.zeros(len(docs), dtype=torch.float64) for name in names}
    device = next(ensemble.experts[0].parameters()).device
    doc_clusters = torch.tensor(list(clusters))
    for first in progress(range(0, len(order), batch_size), desc="masked eval (batches of rows)"):
        batch = order[first : first + batch_size]
        width = int(attention[batch].sum(-1).max())
        x1 = ids[batch, :width].repeat_interleave(samples, 0)
        real = attention[batch, :width].repeat_interleave(samples, 0).bool()
        masked, weight = zip(*(elbo_masks(int(attention[r].sum()), samples, generator) for r in batch))
        masked = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masked])
        weight = torch.cat(weight).double()
        xt = torch.where(masked, torch.full_like(x1, ensemble.path.mask_id), x1)
        rows_doc = owner[batch].repeat_interleave(samples)
        inputs = (xt.to(device), real.long().to(device), x1.to(device))

        def add(name: str, token_log_probs: Tensor) -> None:
            nats = draw_nats(token_log_probs.cpu(), masked, weight) / samples  # mean over a row's draws
            totals[name].index_add_(0, rows_doc, nats)

        if baseline is not None:
            add("baseline", _true_token_log_probs(baseline, *inputs))
        expert_lps = torch.stack([_true_token_log_probs(e, *inputs) for e in ensemble.experts], dim=1)  # (R, K, n)
        for k, name in enumerate(ensemble.names):
            add(name, expert_lps[:, k])
        routed = [m for m in modes if parse_mode(m)[0] is not Routing.ORACLE]
        router_lw = ensemble.log_weights(inputs[0], inputs[1]).cpu() if routed else None
        for mode in modes:
            base = (
                OracleWeigher(doc_clusters[rows_doc].tolist(), ensemble.num_experts)(xt, real)
                if mode not in routed
                else router_lw
            )
            weights = mode_log_weights(mode, base, switches)
            add(mode, mix_log_probs(expert_lps.cpu().unsqueeze(-1), weights).squeeze(-1))
    return totals


def evaluate_masked_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    modes: Sequence[str] | None = None,
    max_documents: int | None = None,
    batch_size: int = 8,
    margin: float = 0.02,
    samples: int = 8,
    resamples: int = 2000,
    seed: int = 0,
    device: torch.device | str | None = None,
    allow_missing: bool = False,
    dtype: torch.dtype | None = None,
) -> dict:
    """The masked counterpart of ``eval.report.evaluate_run``: the same report keys, bits per byte from the ELBO."""
    modes = list(MASKED_MODES if modes is None else modes)
    check_modes(modes, MASKED)
    layout = RunLayout.of(run_dir)
    config = read_run_config(run_dir)
    docs, clusters, num_bytes, _ = held_out(layout, config, split, max_documents)
    ensemble = MaskedEnsemble.from_run(
        run_dir,
        device=device,
        allow_missing=allow_missing,
        load_router=any(parse_mode(m)[0].uses_router for m in modes),
        dtype=dtype,
    )
    if "oracle" in modes and ensemble.clusters != list(range(config.partition.num_clusters)):
        warnings.warn("oracle mode skipped: the true cluster's expert is missing for some documents", stacklevel=2)
        modes = [m for m in modes if m != "oracle"]
    baseline = load_masked_expert(layout.baseline, device, dtype) if layout.baseline.is_dir() else None
    verify_baseline(run_dir, baseline is not None)
    totals = masked_nats(
        ensemble,
        baseline,
        docs,
        clusters,
        eos_id=ensemble.tokenizer.eos_token_id,
        block_size=config.expert.block_size,
        modes=modes,
        samples=samples,
        batch_size=batch_size,
        seed=seed,
    )
    tokens = [len(d) + 1 for d in docs]  # every token and the closing EOS, as on the ar path
    report: dict = {
        "split": split,
        "documents": len(docs),
        "path": "masked",
        "bound": "elbo",
        "elbo_samples": samples,
        "context": config.expert.block_size,
    }
    report["models"] = {name: summarize_totals(nats.tolist(), tokens, num_bytes) for name, nats in totals.items()}
    report["per_cluster"] = {}
    for k in sorted(set(clusters)):
        members = [i for i, c in enumerate(clusters) if c == k]
        report["per_cluster"][str(k)] = {
            name: summarize_totals(
                nats[members].tolist(), [tokens[i] for i in members], [num_bytes[i] for i in members]
            )
            for name, nats in totals.items()
        }
    report["entropy_floor_bpb"] = None
    bits = {name: nats / math.log(2.0) for name, nats in totals.items()}
    if baseline is not None:
        report["equivalence_by_mode"] = {
            mode: equivalence(bits[mode], bits["baseline"], num_bytes, margin, resamples, seed) for mode in modes
        }
        if "mixture" in modes:
            report["equivalence"] = report["equivalence_by_mode"]["mixture"]
    report["compute"] = compute_section(layout, ensemble, baseline)
    return report
