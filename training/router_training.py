"""`dfm train-router`: learn P(cluster | prefix) at every prefix length.

Each training sequence is one document read from BOS (as evaluation and generation read it),
cut at ``max_length`` tokens; with ``router.windows``, every document longer than that also
gives one window from a seeded offset inside it (what evaluation's later windows show the
router). Its target at every prefix is a distribution over the K experts:

- ``cluster`` (default): the document's cluster, one-hot. Its optimum is the true posterior of
  the data, and it costs nothing: every owner has its documents' cluster, so the router reads
  every training document. Measured on dev4, this beats distilling from 1000 scored documents
  on held-out documents at a third of the price (README, "The router").
- ``bayes``: the experts' own posterior pi_k q_k(prefix) / sum_j pi_j q_j(prefix), from their
  per-token log-likelihoods of ``router.documents`` documents (their first ``scored_length``
  tokens; the cluster beyond). Mixture routing is exact when the weights are this posterior
  (README, "How it works"), but each scored token costs the ensemble a forward of every expert,
  and on too few documents the router fits them and not held-out ones. Each expert only sends
  back log-likelihoods of a shared router set, never weights or data.

Soft cross-entropy is a proper scoring rule either way: the optimum is the target distribution.
The token embedding starts from the seed model's (``router.init``), and after training the
logits' temperature is fitted on the validation documents (``router.temperature``,
training.router_calibration); the summary records the router's KL to its own targets (Bayes
rows, or its cross-entropy on one-hot clusters) on training and validation documents, so
over-fitting shows beside the report's held-out KL.

On the masked path the router reads noisy states X_t (documents masked at a random t) and learns
P(k | X_t) against the document's cluster (the router of Decentralized Diffusion Models): the
experts' posterior given a masked state has no tractable form to distil from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import torch
from torch import Tensor, nn

from dfm.atomic import write_json
from dfm.errors import DfmError
from dfm.posterior import prefix_log_posteriors
from models.expert import load_expert, num_parameters
from models.masked_kind import noisy_router_loss, run_path
from models.router import Router, RouterConfig
from models.scoring import document_bos, expert_token_log_probs
from models.tokenizer import load_tokenizer
from training.config import read_run_config
from training.data import document_rows, load_saved
from training.distributed import setup_distributed
from training.layout import RunLayout
from training.lm_training import stage_flops, training_flops
from training.router_calibration import fit_temperature, posterior_kl, seed_embedding
from training.run_config import RunConfig
from training.trainer import TrainConfig, train

#: Training sequences the router's fit to its own targets is measured on (the first of its shuffled documents).
FIT_ROWS = 1000
#: The router's seed offset, so it never shares an initialisation with an expert.
ROUTER_SEED_OFFSET = 20_000


def router_examples(
    docs: list[list[int]], targets: list[Tensor], max_length: int, bos_id: int, starts: list[int] | None = None
) -> datasets.Dataset:
    """One sequence per document, ``[BOS] + ids`` cut at ``max_length``, with a (max_length, K)
    target distribution per position (row j: the prefix of BOS and j document tokens); padding
    rows are zero, so they carry no loss. ``length`` (real positions) lets the trainer cut every
    batch after its longest sequence. ``starts`` replaces BOS by each sequence's own first token
    (a window from inside a long document)."""
    num_clusters = targets[0].shape[1] if targets else 1
    input_ids = torch.full((len(docs), max_length), bos_id, dtype=torch.int32)
    rows = torch.zeros(len(docs), max_length, num_clusters, dtype=torch.float32)
    lengths = []
    firsts = [bos_id] * len(docs) if starts is None else starts
    for i, (ids, target, first) in enumerate(zip(docs, targets, firsts, strict=True)):
        chunk = [first, *ids][:max_length]
        input_ids[i, : len(chunk)] = torch.tensor(chunk, dtype=torch.int32)
        rows[i, : len(chunk)] = target[: len(chunk)]
        lengths.append(len(chunk))
    # fixed-shape features: a batch comes out of Arrow as one array, not as nested Python lists
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32"), length=max_length),
            "targets": datasets.Array2D((max_length, num_clusters), "float32"),
            "length": datasets.Value("int32"),
        }
    )
    return datasets.Dataset.from_dict(
        {"input_ids": input_ids.numpy(), "targets": rows.numpy(), "length": lengths}, features=features
    )


def cluster_targets(docs: list[list[int]], clusters: list[int], num_clusters: int) -> list[Tensor]:
    """The document's cluster, one-hot at every prefix."""
    eye = torch.eye(num_clusters)
    return [eye[k].expand(len(ids) + 1, -1) for ids, k in zip(docs, clusters, strict=True)]


def bayes_targets(
    experts: list[nn.Module],
    docs: list[list[int]],
    log_prior: Tensor,
    *,
    eos_id: int,
    context: int,
    batch_size: int = 16,
    bos_id: int | None = None,
) -> list[Tensor]:
    """The experts' posterior P(k | prefix) at every prefix of every document, from their per-token
    log-likelihoods of it read from ``bos_id`` (default ``eos_id``: one token for both)."""
    token_log_probs = expert_token_log_probs(
        experts,
        docs,
        bos_id=eos_id if bos_id is None else bos_id,
        eos_id=eos_id,
        context=context,
        batch_size=batch_size,
        desc="router targets: experts scoring",
    )
    return [prefix_log_posteriors(lp, log_prior).exp().float() for lp in token_log_probs]


def router_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Soft cross-entropy against the target distributions, averaged over real (non-padding) positions."""
    log_probs = torch.log_softmax(model(batch["input_ids"]).float(), dim=-1)
    targets = batch["targets"]
    real = targets.sum(-1) > 0
    return -(targets * log_probs).sum(-1)[real].mean()


def save_router(model: nn.Module, out_dir: Path) -> None:
    model.save_pretrained(out_dir)


def extended_targets(
    posteriors: list[Tensor], docs: list[list[int]], clusters: list[int], num_clusters: int
) -> list[Tensor]:
    """Each document's Bayes rows (its scored prefixes), then its cluster one-hot for the prefixes
    the experts did not score: one target row per prefix of the whole document."""
    eye = torch.eye(num_clusters)
    return [
        torch.cat([rows, eye[k].expand(len(ids) + 1 - len(rows), -1)])
        for rows, ids, k in zip(posteriors, docs, clusters, strict=True)
    ]


def _chosen(split: datasets.Dataset, start: int, count: int | None, max_length: int) -> datasets.Dataset:
    """Documents ``start`` .. ``start + count`` of a (shuffled) split (count None: all the rest),
    each cut to the ``max_length - 1`` tokens a router sequence holds."""
    end = len(split) if count is None else min(len(split), start + count)
    if end <= start:  # datasets refuses an empty range at the end, and maps nothing badly
        return split.select([])
    return split.select(range(start, end)).map(
        lambda ids: {"input_ids": ids[: max_length - 1]}, input_columns="input_ids"
    )


def train_router(run_dir: str | Path, resume: bool = False, device: torch.device | None = None) -> dict:
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    layout = RunLayout.of(run_dir)
    tokenizer = load_tokenizer(layout.tokenizer)
    documents = load_saved(layout.documents, "the tokenized documents")
    options = config.router
    max_length = options.max_length
    num_clusters = config.partition.num_clusters
    if num_clusters < 2:
        raise DfmError("a router needs at least 2 experts; with one expert use --routing mixture without a router")
    seed = config.seed + ROUTER_SEED_OFFSET
    scoring, fits = {"scoring_parameters": 0, "scoring_tokens": {}}, {}
    vocab_size = config.kind.router_vocab_size(len(tokenizer))
    if config.is_masked:  # noisy states of the path, against the cluster (no expert scores them)
        examples, loss, targets = _noisy_state_examples(config, documents, len(tokenizer), tokenizer.eos_token_id, seed)
    else:
        examples, scoring, fits = _prefix_examples(config, layout, documents, tokenizer, seed, device)
        loss, targets = router_loss, options.targets

    torch.manual_seed(seed)
    expert_context = config.expert.arch.get("max_position_embeddings", max_length)
    router = Router(
        RouterConfig(
            vocab_size=vocab_size,
            num_experts=num_clusters,
            hidden_size=options.hidden_size,
            num_layers=options.num_layers,
            num_heads=options.num_heads,
            max_positions=max(expert_context, max_length),
            dropout=options.dropout,
        )
    )
    embedding = seed_embedding(run_dir, config) if options.init == "seed" else None
    if embedding is not None:  # a run without a seed model starts its router from scratch too
        router.init_token_embedding(embedding)
    train_options = TrainConfig.from_dict({**options.train, "seed": seed})
    validation = examples["validation"]
    result = train(
        router,
        examples["train"],
        loss,
        train_options,
        save_fn=save_router,
        out_dir=layout.router,
        checkpoint_dir=layout.checkpoints("router"),
        log_path=layout.log("router"),
        val_data=validation if len(validation) else None,
        resume=resume,
        desc="router",
        device=device,
    )
    fit = {}
    if options.temperature == "fit" and len(validation):
        fit["temperature"] = fit_temperature(router, validation, device)
        router.config.temperature = fit["temperature"]
        if setup_distributed().is_main:
            save_router(router, layout.router)
    fit.update({f"kl_{name}": posterior_kl(router, rows, device) for name, rows in fits.items() if len(rows)})
    summary = {
        "name": "router",
        "parameters": router.num_parameters,
        "steps": result.steps,
        "tokens": result.tokens,
        "targets": targets,
        **scoring,
        **fit,
    }
    flops = stage_flops(summary)
    summary.update(
        {
            "scoring_flops": flops - training_flops(router.num_parameters, result.tokens),
            "flops": flops,
            "final_loss": result.final_loss,
            "val_loss": result.val_loss,
            "seconds": result.seconds,
        }
    )
    if setup_distributed().is_main:
        write_json(layout.summary("router"), summary)
    return summary


def _prefix_examples(
    config: RunConfig,
    layout: RunLayout,
    documents: datasets.DatasetDict,
    tokenizer,
    seed: int,
    device: torch.device | None,
) -> tuple[dict[str, datasets.Dataset], dict, dict]:
    """The ar router's sequences (one document from BOS) with their per-prefix targets; what the
    experts' scoring of them cost (bayes targets: the summary's ``scoring_parameters``, all
    experts', and ``scoring_tokens`` per split: each scored document's BOS and scored tokens, the
    positions the experts read); and, per split, the scored documents alone with their Bayes rows
    alone (where the router's fit to the posterior is measured).

    ``router.documents`` training documents get Bayes targets on their first ``scored_length``
    tokens and their cluster beyond; ``label_documents`` more get their cluster alone, which costs
    nothing; ``validation_documents`` validation documents are scored alike."""
    options = config.router
    max_length, num_clusters = options.max_length, config.partition.num_clusters
    bos_id, eos_id = document_bos(tokenizer), tokenizer.eos_token_id
    train_docs = documents["train"].shuffle(seed=seed)
    scored_count = options.documents
    if options.targets == "cluster":  # every chosen document is labelled: no scoring to save
        more = options.label_documents
        scored_count = None if scored_count is None or more is None else scored_count + more
    scored = {
        "train": _chosen(train_docs, 0, scored_count, max_length),
        "validation": _chosen(documents["validation"].shuffle(seed=seed), 0, options.validation_documents, max_length),
    }
    labelled = (
        _chosen(train_docs, len(scored["train"]), options.label_documents, max_length)
        if options.targets == "bayes"
        else train_docs.select([])
    )
    scoring = {"scoring_parameters": 0, "scoring_tokens": {}}
    ids = {name: list(split["input_ids"]) for name, split in scored.items()}
    clusters = {name: list(split["cluster"]) for name, split in scored.items()}
    if options.targets == "bayes":
        experts = [load_expert(layout.expert(k), device) for k in range(num_clusters)]
        context = config.scoring_context(experts[0].config.max_position_embeddings)
        priors = json.loads((layout.partition / "stats.json").read_text())["priors"]
        log_prior = torch.tensor(priors, dtype=torch.float64).log()
        length = options.scored_length or max_length
        prefixes = {name: [doc[:length] for doc in docs] for name, docs in ids.items()}
        posteriors = {
            name: bayes_targets(experts, docs, log_prior, bos_id=bos_id, eos_id=eos_id, context=context)
            for name, docs in prefixes.items()
        }
        scoring = {
            "scoring_parameters": sum(num_parameters(e) for e in experts),
            "scoring_tokens": {name: sum(len(doc) + 1 for doc in docs) for name, docs in prefixes.items()},
        }
        targets = {name: extended_targets(posteriors[name], ids[name], clusters[name], num_clusters) for name in ids}
        fits = {name: router_examples(prefixes[name], posteriors[name], max_length, bos_id) for name in ids}
    else:
        targets = {name: cluster_targets(ids[name], clusters[name], num_clusters) for name in ids}
    examples = {name: router_examples(ids[name], targets[name], max_length, bos_id) for name in ids}
    if options.targets == "cluster":  # the fit to its own (one-hot) targets: its cross-entropy
        fits = {
            "train": examples["train"].select(range(min(FIT_ROWS, len(examples["train"])))),
            "validation": examples["validation"],
        }
    if len(labelled):
        free = router_examples(
            list(labelled["input_ids"]),
            cluster_targets(list(labelled["input_ids"]), list(labelled["cluster"]), num_clusters),
            max_length,
            bos_id,
        )
        examples["train"] = datasets.concatenate_datasets([examples["train"], free])
    if options.windows:
        windows = _windows(train_docs, max_length, num_clusters, seed, bos_id)
        examples["train"] = datasets.concatenate_datasets([examples["train"], windows])
    return examples, scoring, fits


def _windows(
    documents: datasets.Dataset, max_length: int, num_clusters: int, seed: int, bos_id: int
) -> datasets.Dataset:
    """One window of ``max_length`` tokens from a seeded offset inside every training document longer
    than a router sequence, its cluster as target: what evaluation's later windows show the router
    (no BOS, the document already under way)."""
    rng = random.Random(seed)
    docs, starts, clusters = [], [], []
    for ids, cluster in zip(documents["input_ids"], documents["cluster"]):
        if len(ids) >= max_length:
            offset = rng.randrange(1, len(ids) - max_length + 1) if len(ids) > max_length else 1
            window = ids[offset : offset + max_length]
            docs.append(window[1:])
            starts.append(window[0])
            clusters.append(cluster)
    return router_examples(docs, cluster_targets(docs, clusters, num_clusters), max_length, bos_id, starts)


def _noisy_state_examples(config: RunConfig, documents: datasets.DatasetDict, vocab_size: int, eos_id: int, seed: int):
    """The masked router's rows (the experts' document rows with their cluster), its loss on
    noisy states of the run's path (no expert scores them), and the name of its targets."""
    count = config.router.documents
    chosen = {"train": documents["train"], "validation": documents["validation"]}
    if count is not None and count < len(chosen["train"]):
        chosen["train"] = chosen["train"].shuffle(seed=seed).select(range(count))
    block = config.expert.block_size
    examples = {name: document_rows(split, block, eos_id, columns=("cluster",)) for name, split in chosen.items()}
    return examples, noisy_router_loss(run_path(config.path.scheduler, vocab_size)), "cluster (noisy states)"
