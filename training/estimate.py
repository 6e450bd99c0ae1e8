"""How long the rest of `dfm run` will take, from the speed of its first training stage.

Every later stage is priced in FLOPs as compute matching counts them (6 x parameters x tokens for
training, 2 x for the experts' scoring of the router's training and validation documents; the
baseline gets as many as the experts and the router together) and divided by the FLOP rate the
first stage reached. An estimate: LoRA experts (4 FLOPs per frozen parameter) and evaluation are
not priced.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow.compute as pc

from models.router import Router, RouterConfig
from training.allocation import expert_train
from training.layout import RunLayout
from training.lm_training import FORWARD_FLOPS, TRAINED_FLOPS
from training.run_config import RunConfig


def _lm_flops(parameters: int, train: dict, tokens_per_row: int) -> float:
    rows = train["steps"] * train["batch_size"] * train.get("grad_accum", 1)
    return float(TRAINED_FLOPS) * parameters * rows * tokens_per_row


def _documents(layout: RunLayout, split: str) -> tuple[int, float]:
    """How many documents ``split`` has, and their mean length in tokens with BOS."""
    documents = datasets.load_from_disk(str(layout.documents))[split]
    lengths = pc.list_value_length(documents.data.column("input_ids"))
    return len(documents), float(pc.mean(lengths).as_py() or 0.0) + 1


def remaining_flops(run_dir: str | Path, config: RunConfig, parameters: int, experts_done: int = 0) -> float:
    """Training FLOPs of the experts not trained yet, the router and the baseline of a run whose
    experts have ``parameters`` parameters."""
    layout = RunLayout.of(run_dir)
    clusters = config.partition.num_clusters
    experts = [
        _lm_flops(parameters, expert_train(config, layout, k), config.expert.block_size) for k in range(clusters)
    ]
    router = 0.0
    if clusters > 1:
        options = config.router
        count, mean_tokens = _documents(layout, "train")
        tokens = min(mean_tokens, options.max_length)
        documents = min(options.documents or count, count)
        validation, validation_tokens = _documents(layout, "validation")
        validation = min(options.validation_documents or validation, validation)
        length = options.scored_length or options.max_length  # what the experts read of each
        scored = documents * min(tokens, length) + validation * min(validation_tokens, options.max_length, length)
        scored_by_experts = options.targets == "bayes"  # cluster targets (and every masked router's) are free
        scoring = float(FORWARD_FLOPS) * parameters * clusters * scored if scored_by_experts else 0.0
        size = Router(
            RouterConfig(
                vocab_size=config.tokenizer.vocab_size,
                num_experts=clusters,
                hidden_size=options.hidden_size,
                num_layers=options.num_layers,
                num_heads=options.num_heads,
                max_positions=options.max_length,
            )
        ).num_parameters
        router = scoring + _lm_flops(size, options.train, int(tokens))
    baseline = sum(experts) + router
    return sum(experts[experts_done:]) + router + baseline


def remaining_seconds(run_dir: str | Path, config: RunConfig, first: dict, experts_done: int = 0) -> float:
    """Seconds the training stages after ``first`` (a stage summary with parameters, flops and
    seconds) should take at its FLOP rate."""
    rate = first["flops"] / max(first["seconds"], 1e-9)
    return remaining_flops(run_dir, config, first["parameters"], experts_done) / rate
