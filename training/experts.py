"""Training causal LMs of a run: expert k on its own shard, and the compute-matched baseline."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from torch import Tensor, nn

from dfm.atomic import write_json
from dfm.errors import DfmError
from models.ensemble import load_tokenizer
from models.expert import build_expert, expert_config, num_parameters, save_expert
from models.manifest import tokenizer_fingerprint
from training.config import read_run_config
from training.data import load_saved
from training.distributed import setup_distributed
from training.layout import RunLayout
from training.trainer import TrainConfig, TrainResult, train

#: The baseline's seed offset, so it never shares an initialisation with an expert.
BASELINE_SEED_OFFSET = 10_000


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Next-token cross-entropy (the DFM loss of the AR path), ignoring padded labels."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def unigram_entropy(blocks: datasets.Dataset) -> float:
    """Entropy (nats/token) of the shard's token frequencies: what a context-free model scores."""
    labels = torch.tensor(list(blocks["labels"])).flatten()
    counts = torch.bincount(labels[labels >= 0]).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def _train_lm(run_dir: Path, name: str, train_data: datasets.Dataset, val_data: datasets.Dataset | None,
              train_options: dict, seed: int, out_dir: Path, resume: bool) -> dict:
    layout = RunLayout.of(run_dir)
    config = read_run_config(run_dir)
    tokenizer = load_tokenizer(layout.tokenizer)
    model_config = expert_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 tokenizer_fingerprint=tokenizer_fingerprint(tokenizer.get_vocab()),
                                 arch=config["expert"]["arch"])
    model = build_expert(model_config, seed=seed)
    options = TrainConfig.from_dict({**train_options, "seed": seed})
    result: TrainResult = train(model, train_data, lm_loss, options, save_fn=save_expert, out_dir=out_dir,
                                checkpoint_dir=layout.checkpoints(name), log_path=layout.log(name),
                                val_data=val_data, resume=resume, desc=name)
    summary = {"name": name, "parameters": num_parameters(model), "steps": result.steps, "tokens": result.tokens,
               "final_loss": result.final_loss, "val_loss": result.val_loss, "seconds": result.seconds,
               "unigram_entropy": unigram_entropy(train_data), "train_blocks": len(train_data)}
    if setup_distributed().is_main:
        write_json(layout.summary(name), summary)
    return summary


def train_expert(run_dir: str | Path, k: int, resume: bool = False) -> dict:
    """Train expert k from its own shard, the tokenizer and config.json alone (a compute island)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    num_clusters = config["partition"]["num_clusters"]
    if not 0 <= k < num_clusters:
        raise DfmError(f"--expert must be between 0 and {num_clusters - 1} for this run, got {k}")
    layout = RunLayout.of(run_dir)
    shard = load_saved(layout.shard(k), f"the data shard of expert {k}")
    return _train_lm(run_dir, f"expert-{k}", shard["train"], shard.get("validation"), config["expert"]["train"],
                     config["seed"] + k, layout.expert(k), resume)


def baseline_steps(config: dict) -> int:
    """Compute matching: the baseline sees as many tokens as all experts together."""
    return config["expert"]["train"]["steps"] * config["partition"]["num_clusters"]


def train_baseline(run_dir: str | Path, resume: bool = False) -> dict:
    """The centrally trained model: one expert's architecture and settings, on the union of shards."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    layout = RunLayout.of(run_dir)
    shards = [load_saved(layout.shard(k), f"the data shard of expert {k}")
              for k in range(config["partition"]["num_clusters"])]
    train_data = datasets.concatenate_datasets([s["train"] for s in shards])
    validation = [s["validation"] for s in shards if "validation" in s]
    val_data = datasets.concatenate_datasets(validation) if validation else None
    options = {**config["expert"]["train"], "steps": baseline_steps(config)}
    return _train_lm(run_dir, "baseline", train_data, val_data, options,
                     config["seed"] + BASELINE_SEED_OFFSET, layout.baseline, resume)
