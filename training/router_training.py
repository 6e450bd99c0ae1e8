"""`dfm train-router`: learn P(cluster | prefix) at every prefix length.

Each training sequence is one document read from BOS (as evaluation and generation read it),
cut at ``max_length`` tokens. Its target at every prefix is a distribution over the K experts:

- ``bayes`` (default): the experts' own posterior pi_k q_k(prefix) / sum_j pi_j q_j(prefix), from
  their per-token log-likelihoods of the document. Mixture routing is exact when the weights are
  this posterior (README, "How it works"), so the router is distilled towards it directly. Each expert only
  sends back log-likelihoods of a shared router set, never weights or data.
- ``cluster``: the document's cluster, one-hot. Its optimum is the true posterior of the data,
  but a finite router learns it slowly and is overconfident on short prefixes.

Soft cross-entropy is a proper scoring rule either way: the optimum is the target distribution.

On the masked path the router reads noisy states X_t (documents masked at a random t) and learns
P(k | X_t) against the document's cluster (the router of Decentralized Diffusion Models): the
experts' posterior given a masked state has no tractable form to distil from.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch
from torch import Tensor, nn

from dfm.atomic import write_json
from dfm.errors import DfmError
from dfm.posterior import prefix_log_posteriors
from models.ensemble import load_tokenizer
from models.expert import load_expert, num_parameters
from models.router import Router, RouterConfig
from models.scoring import document_bos, expert_token_log_probs
from training.config import is_masked, read_run_config, run_path, scoring_context
from training.data import load_saved
from training.distributed import setup_distributed
from training.experts import stage_flops, training_flops
from training.layout import RunLayout
from training.masked_training import document_rows, noisy_router_loss
from training.trainer import TrainConfig, train

#: The router's seed offset, so it never shares an initialisation with an expert.
ROUTER_SEED_OFFSET = 20_000


def router_examples(docs: list[list[int]], targets: list[Tensor], max_length: int, bos_id: int) -> datasets.Dataset:
    """One sequence per document, ``[BOS] + ids`` cut at ``max_length``, with a (max_length, K)
    target distribution per position (row j: the prefix of BOS and j document tokens); padding
    rows are zero, so they carry no loss. ``length`` (real positions) lets the trainer cut every
    batch after its longest sequence."""
    num_clusters = targets[0].shape[1] if targets else 1
    input_ids = torch.full((len(docs), max_length), bos_id, dtype=torch.int32)
    rows = torch.zeros(len(docs), max_length, num_clusters, dtype=torch.float32)
    lengths = []
    for i, (ids, target) in enumerate(zip(docs, targets, strict=True)):
        chunk = [bos_id, *ids][:max_length]
        input_ids[i, :len(chunk)] = torch.tensor(chunk, dtype=torch.int32)
        rows[i, :len(chunk)] = target[:len(chunk)]
        lengths.append(len(chunk))
    # fixed-shape features: a batch comes out of Arrow as one array, not as nested Python lists
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=max_length),
                                  "targets": datasets.Array2D((max_length, num_clusters), "float32"),
                                  "length": datasets.Value("int32")})
    return datasets.Dataset.from_dict({"input_ids": input_ids.numpy(), "targets": rows.numpy(), "length": lengths},
                                      features=features)


def cluster_targets(docs: list[list[int]], clusters: list[int], num_clusters: int) -> list[Tensor]:
    """The document's cluster, one-hot at every prefix."""
    eye = torch.eye(num_clusters)
    return [eye[k].expand(len(ids) + 1, -1) for ids, k in zip(docs, clusters, strict=True)]


def bayes_targets(experts: list[nn.Module], docs: list[list[int]], log_prior: Tensor, *, eos_id: int,
                  context: int, batch_size: int = 16, bos_id: int | None = None) -> list[Tensor]:
    """The experts' posterior P(k | prefix) at every prefix of every document, from their per-token
    log-likelihoods of it read from ``bos_id`` (default ``eos_id``: one token for both)."""
    token_log_probs = expert_token_log_probs(experts, docs, bos_id=eos_id if bos_id is None else bos_id,
                                             eos_id=eos_id, context=context, batch_size=batch_size,
                                             desc="router targets: experts scoring")
    return [prefix_log_posteriors(lp, log_prior).exp().float() for lp in token_log_probs]


def router_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Soft cross-entropy against the target distributions, averaged over real (non-padding) positions."""
    log_probs = torch.log_softmax(model(batch["input_ids"]).float(), dim=-1)
    targets = batch["targets"]
    real = targets.sum(-1) > 0
    return -(targets * log_probs).sum(-1)[real].mean()


def save_router(model: nn.Module, out_dir: Path) -> None:
    model.save_pretrained(out_dir)


def _truncated(documents: datasets.Dataset, count: int | None, max_length: int, seed: int) -> datasets.Dataset:
    """At most ``count`` documents (a seeded choice), each cut to the ``max_length - 1`` tokens a router sequence holds."""
    if count is not None and count < len(documents):
        documents = documents.shuffle(seed=seed).select(range(count))
    return documents.map(lambda ids: {"input_ids": ids[:max_length - 1]}, input_columns="input_ids")


def train_router(run_dir: str | Path, resume: bool = False, device: torch.device | None = None) -> dict:
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    layout = RunLayout.of(run_dir)
    tokenizer = load_tokenizer(layout.tokenizer)
    documents = load_saved(layout.documents, "the tokenized documents")
    options = config["router"]
    max_length = options["max_length"]
    num_clusters = config["partition"]["num_clusters"]
    if num_clusters < 2:
        raise DfmError("a router needs at least 2 experts; with one expert use --routing mixture without a router")
    seed = config["seed"] + ROUTER_SEED_OFFSET
    scoring = {"scoring_parameters": 0, "scoring_tokens": {}}
    if is_masked(config):
        examples, loss, targets = _noisy_state_examples(config, documents, len(tokenizer), tokenizer.eos_token_id, seed)
        vocab_size = len(tokenizer) + 1  # the router reads masked states
    else:
        examples, scoring = _prefix_examples(config, layout, documents, tokenizer, seed, device)
        loss, targets, vocab_size = router_loss, options["targets"], len(tokenizer)

    torch.manual_seed(seed)
    expert_context = config["expert"]["arch"].get("max_position_embeddings", max_length)
    router = Router(RouterConfig(vocab_size=vocab_size, num_experts=num_clusters,
                                 hidden_size=options["hidden_size"], num_layers=options["num_layers"],
                                 num_heads=options["num_heads"], max_positions=max(expert_context, max_length)))
    train_options = TrainConfig.from_dict({**options["train"], "seed": seed})
    validation = examples["validation"]
    result = train(router, examples["train"], loss, train_options, save_fn=save_router,
                   out_dir=layout.router, checkpoint_dir=layout.checkpoints("router"), log_path=layout.log("router"),
                   val_data=validation if len(validation) else None, resume=resume, desc="router", device=device)
    summary = {"name": "router", "parameters": router.num_parameters, "steps": result.steps, "tokens": result.tokens,
               "targets": targets, **scoring}
    flops = stage_flops(summary)
    summary.update({"scoring_flops": flops - training_flops(router.num_parameters, result.tokens), "flops": flops,
                    "final_loss": result.final_loss, "val_loss": result.val_loss, "seconds": result.seconds})
    if setup_distributed().is_main:
        write_json(layout.summary("router"), summary)
    return summary


def _prefix_examples(config: dict, layout: RunLayout, documents: datasets.DatasetDict, tokenizer,
                     seed: int, device: torch.device | None) -> tuple[dict[str, datasets.Dataset], dict]:
    """The ar router's sequences (one document from BOS) with their per-prefix targets, and what
    the experts' scoring of them cost (bayes targets): the summary's ``scoring_parameters`` (all
    experts') and ``scoring_tokens`` per split, the train split's targets and the validation's
    alike (each document's BOS and tokens: the positions the experts read)."""
    options = config["router"]
    max_length, num_clusters = options["max_length"], config["partition"]["num_clusters"]
    bos_id, eos_id = document_bos(tokenizer), tokenizer.eos_token_id
    splits = {"train": _truncated(documents["train"], options["documents"], max_length, seed),
              "validation": _truncated(documents["validation"], None, max_length, seed)}
    scoring = {"scoring_parameters": 0, "scoring_tokens": {}}
    if options["targets"] == "bayes":
        experts = [load_expert(layout.expert(k), device) for k in range(num_clusters)]
        context = scoring_context(config, experts[0].config.max_position_embeddings)
        priors = json.loads((layout.partition / "stats.json").read_text())["priors"]
        log_prior = torch.tensor(priors, dtype=torch.float64).log()
        targets = {name: bayes_targets(experts, list(split["input_ids"]), log_prior, bos_id=bos_id, eos_id=eos_id,
                                       context=context) for name, split in splits.items()}
        scoring = {"scoring_parameters": sum(num_parameters(e) for e in experts),
                   "scoring_tokens": {name: sum(len(ids) + 1 for ids in split["input_ids"])
                                      for name, split in splits.items()}}
    else:
        targets = {name: cluster_targets(list(split["input_ids"]), list(split["cluster"]), num_clusters)
                   for name, split in splits.items()}
    examples = {name: router_examples(list(split["input_ids"]), targets[name], max_length, bos_id)
                for name, split in splits.items()}
    return examples, scoring


def _noisy_state_examples(config: dict, documents: datasets.DatasetDict, vocab_size: int, eos_id: int, seed: int):
    """The masked router's rows (the experts' document rows with their cluster), its loss on
    noisy states of the run's path (no expert scores them), and the name of its targets."""
    count = config["router"]["documents"]
    chosen = {"train": documents["train"], "validation": documents["validation"]}
    if count is not None and count < len(chosen["train"]):
        chosen["train"] = chosen["train"].shuffle(seed=seed).select(range(count))
    block = config["expert"]["block_size"]
    examples = {name: document_rows(split, block, eos_id, columns=("cluster",)) for name, split in chosen.items()}
    return examples, noisy_router_loss(run_path(config, vocab_size)), "cluster (noisy states)"
