"""Training the language models of a run (causal LMs on the ar path, masked LMs on the masked
path): the seed model, expert k on its own shard, and the compute-matched baseline."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import datasets
import torch

from dfm.atomic import write_json
from dfm.errors import DfmError
from models.adapters import adapter_parameters, add_lora
from models.expert import num_parameters, save_expert
from models.tokenizer import load_tokenizer
from training.allocation import expert_train, seed_train
from training.config import read_run_config
from training.data import READ_BATCH, load_saved
from training.distributed import setup_distributed
from training.initial_model import initial_model, run_relative
from training.layout import RunLayout
from training.run_config import RunConfig
from training.trainer import TrainConfig, TrainResult, train

#: Seed offsets of the baseline and the seed model, so neither shares a data order with an expert.
BASELINE_SEED_OFFSET = 10_000
SEED_MODEL_OFFSET = 30_000
#: FLOPs per parameter and token: a trained weight's forward (2), activation gradients (2) and
#: weight gradients (2); a frozen one under an adapter (LoRA's base) has no weight gradients; a
#: scoring forward (the experts' scoring of the router's documents) is the forward alone.
TRAINED_FLOPS, FROZEN_FLOPS, FORWARD_FLOPS = 6, 4, 2


def unigram_entropy(rows: datasets.Dataset) -> float:
    """Entropy (nats/token) of the shard's token frequencies: what a context-free model scores.
    Tokens are the labels of packed blocks, or the real tokens of document rows (masked path);
    counted batch by batch."""
    packed = "labels" in rows.column_names
    counts = torch.zeros(0, dtype=torch.float64)
    columns = ["labels"] if packed else ["input_ids", "attention_mask"]
    for batch in rows.select_columns(columns).with_format("torch").iter(batch_size=READ_BATCH):
        tokens = batch["labels"][batch["labels"] >= 0] if packed else batch["input_ids"][batch["attention_mask"].bool()]
        batch_counts = torch.bincount(tokens, minlength=len(counts)).double()
        batch_counts[: len(counts)] += counts
        counts = batch_counts
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def training_flops(parameters: int, tokens: int, adapter_parameters: int = 0) -> int:
    """FLOPs of training a model on ``tokens``: 6 per parameter and token (full training), or, with an
    adapter, 4 per frozen ``parameters`` and 6 per ``adapter_parameters`` and token."""
    if adapter_parameters == 0:
        return TRAINED_FLOPS * parameters * tokens
    return (FROZEN_FLOPS * parameters + TRAINED_FLOPS * adapter_parameters) * tokens


def stage_flops(summary: dict) -> int:
    """Every FLOP a logged training stage spent, from its logged counts: its training
    (``training_flops``) and, for the router, the experts' forwards scoring its documents
    (``scoring_parameters`` x ``scoring_tokens`` of every split, 2 each)."""
    scored = sum(summary.get("scoring_tokens", {}).values())
    return (
        training_flops(summary["parameters"], summary["tokens"], summary.get("adapter_parameters", 0))
        + FORWARD_FLOPS * summary.get("scoring_parameters", 0) * scored
    )


def compute_matching(run_dir: str | Path, experts: list[str]) -> dict:
    """The compute account of a run (README, "Compute matching"; ``compute.matching`` of
    report.json), all of it from the logged summaries through ``stage_flops``: the decentralized
    side (the ``experts`` named, the router's training and the experts' scoring of its training
    and validation documents) against the baseline; the seed, shared by both, counted on neither.
    A stage not trained yet counts 0."""
    layout = RunLayout.of(run_dir)
    summaries = {name: layout.read_summary(name) or {} for name in [*experts, "router", "baseline", "seed"]}
    flops = {name: stage_flops(summary) if summary else 0 for name, summary in summaries.items()}
    router = summaries["router"]
    router_training = training_flops(router["parameters"], router["tokens"]) if router else 0
    experts_flops = sum(flops[name] for name in experts)
    decentralized = experts_flops + flops["router"]
    return {
        "experts_flops": experts_flops,
        "router_training_flops": router_training,
        "router_scoring_flops": flops["router"] - router_training,
        "decentralized_flops": decentralized,
        "baseline_flops": flops["baseline"],
        "baseline_over_decentralized": flops["baseline"] / decentralized if decentralized else None,
        "seed_flops": flops["seed"],
        "seed_from": summaries[experts[0]].get("branched_from") if experts else None,
    }


def _train_lm(
    run_dir: Path,
    name: str,
    train_data: datasets.Dataset,
    val_data: datasets.Dataset | None,
    train_options: dict,
    seed: int,
    out_dir: Path,
    resume: bool,
    device: torch.device | None,
    adapted: bool = False,
) -> dict:
    """Train one model of the run (the seed model, an expert, the baseline) from where
    ``initial_model`` starts it; ``adapted``: as a LoRA adapter on that start when the run's
    ``expert.adapter`` says so."""
    layout = RunLayout.of(run_dir)
    config = read_run_config(run_dir)
    tokenizer = load_tokenizer(layout.tokenizer)
    model, init = initial_model(run_dir, config, tokenizer, name, seed)
    if adapted and config.expert.adapter == "lora":
        torch.manual_seed(seed)  # the adapter's initialisation
        model = add_lora(model, config.expert.lora, os.path.relpath(init, out_dir))
    options = TrainConfig.from_dict({**train_options, "seed": seed})
    loss = config.kind.loss(config.path.scheduler, len(tokenizer))
    result: TrainResult = train(
        model,
        train_data,
        loss,
        options,
        save_fn=save_expert,
        out_dir=out_dir,
        checkpoint_dir=layout.checkpoints(name),
        log_path=layout.log(name),
        val_data=val_data,
        resume=resume,
        desc=name,
        device=device,
    )
    adapter = adapter_parameters(model)
    parameters = num_parameters(model) - adapter
    summary = {
        "name": name,
        "parameters": parameters,
        "adapter_parameters": adapter,
        "steps": result.steps,
        "tokens": result.tokens,
        "flops": training_flops(parameters, result.tokens, adapter),
        "branched_from": run_relative(init, run_dir),
        "final_loss": result.final_loss,
        "val_loss": result.val_loss,
        "seconds": result.seconds,
        "unigram_entropy": unigram_entropy(train_data),
        "train_blocks": len(train_data),
    }
    if setup_distributed().is_main:
        write_json(layout.summary(name), summary)
    return summary


def train_seed_model(run_dir: str | Path, resume: bool = False, device: torch.device | None = None) -> dict:
    """The seed phase: one model trained centrally on the shared documents of every cluster
    (from ``seed_model.init_from`` when given), saved to RUN/seed for experts and baseline."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if not config.seed_model.trained:
        raise DfmError(
            "this run has no seed phase (seed_model.phase is false, or --init-from names the seed): "
            "train the experts directly"
        )
    layout = RunLayout.of(run_dir)
    shard = load_saved(layout.shared, "the shared documents of the seed phase")
    return _train_lm(
        run_dir,
        "seed",
        shard["train"],
        shard.get("validation"),
        seed_train(config, shard["train"].num_rows, setup_distributed().world_size),
        config.seed + SEED_MODEL_OFFSET,
        layout.seed_model,
        resume,
        device,
    )


def train_expert(run_dir: str | Path, k: int, resume: bool = False, device: torch.device | None = None) -> dict:
    """Train expert k from its own shard, the tokenizer, config.json and the seed alone (a compute island)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    num_clusters = config.partition.num_clusters
    if not 0 <= k < num_clusters:
        raise DfmError(f"--expert must be between 0 and {num_clusters - 1} for this run, got {k}")
    layout = RunLayout.of(run_dir)
    shard = load_saved(
        layout.shard(k),
        f"the data shard of expert {k}",
        f"run `dfm prepare` first, or, on a compute island, copy config.json, tokenizer/, seed/ "
        f"and data/expert-{k}/ of the run here (README, Compute islands)",
    )
    return _train_lm(
        run_dir,
        f"expert-{k}",
        shard["train"],
        shard.get("validation"),
        expert_train(config, layout, k, setup_distributed().world_size),
        config.seed + k,
        layout.expert(k),
        resume,
        device,
        adapted=True,
    )


def matched_steps(run_dir: str | Path, config: RunConfig, world_size: int) -> int:
    """Compute matching: the baseline's optimizer steps so that its training FLOPs equal those of
    every expert plus the router (its training and the experts' scoring of its documents), as
    ``compute_matching`` counts them.

    FLOPs come from the logged token counts, so world size and gradient accumulation are counted
    on both sides; the seed phase is shared by both and counted on neither. The baseline trains as
    an expert does (architecture, start, adapter), hence an expert's FLOPs per token.
    """
    layout = RunLayout.of(run_dir)
    num_clusters = config.partition.num_clusters
    experts = [layout.read_summary(f"expert-{k}") for k in range(num_clusters)]
    missing = [f"expert-{k}" for k, summary in enumerate(experts) if summary is None]
    if missing:
        raise DfmError(
            f"{', '.join(missing)} not trained yet: compute matching counts what every expert spent, "
            f"so train the baseline last"
        )
    router = layout.read_summary("router")
    if router is None and num_clusters > 1:
        warnings.warn("the router is not trained yet: the baseline is not charged for its compute", stacklevel=2)
    flops = compute_matching(run_dir, [f"expert-{k}" for k in range(num_clusters)])["decentralized_flops"]
    options = config.expert.train
    tokens_per_step = options["batch_size"] * options.get("grad_accum", 1) * config.expert.block_size * world_size
    per_token = stage_flops(experts[0]) / max(experts[0]["tokens"], 1)
    return max(1, math.ceil(flops / (per_token * tokens_per_step)))


def train_baseline(run_dir: str | Path, resume: bool = False, device: torch.device | None = None) -> dict:
    """The centrally trained model: one expert's architecture, start and settings, on the union of
    shards, for as much compute as the decentralized side spent (``matched_steps``)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    layout = RunLayout.of(run_dir)
    shards = [
        load_saved(layout.shard(k), f"the data shard of expert {k}") for k in range(config.partition.num_clusters)
    ]
    train_data = datasets.concatenate_datasets([s["train"] for s in shards])
    validation = [s["validation"] for s in shards if "validation" in s]
    val_data = datasets.concatenate_datasets(validation) if validation else None
    options = {**config.expert.train, "steps": matched_steps(run_dir, config, setup_distributed().world_size)}
    return _train_lm(
        run_dir,
        "baseline",
        train_data,
        val_data,
        options,
        config.seed + BASELINE_SEED_OFFSET,
        layout.baseline,
        resume,
        device,
        adapted=True,
    )
