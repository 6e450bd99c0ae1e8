"""`dfm train-router`: learn P(cluster | prefix) at every prefix length.

Each training sequence starts at a document of cluster k (EOS, the document, EOS, the next
documents of the same cluster...) up to ``max_length`` tokens, labelled k at every position.
Cross-entropy is a proper scoring rule, so the optimum is the true posterior of each prefix.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfm.atomic import write_json
from dfm.errors import DfmError
from models.ensemble import load_tokenizer
from models.router import Router, RouterConfig
from training.config import read_run_config
from training.data import load_saved
from training.distributed import setup_distributed
from training.layout import RunLayout
from training.trainer import TrainConfig, train

#: The router's seed offset, so it never shares an initialisation with an expert.
ROUTER_SEED_OFFSET = 20_000


def router_examples(docs: list[list[int]], clusters: list[int], max_length: int, eos_id: int) -> datasets.Dataset:
    """One sequence per document: that document and its cluster's following ones, cut at max_length."""
    streams: dict[int, list[int]] = {}
    starts = []
    for ids, k in zip(docs, clusters):
        stream = streams.setdefault(k, [])
        starts.append((k, len(stream)))
        stream.extend([eos_id, *ids])
    for stream in streams.values():
        stream.append(eos_id)
    input_ids, labels = [], []
    for k, start in starts:
        chunk = streams[k][start:start + max_length]
        pad = max_length - len(chunk)
        input_ids.append(chunk + [eos_id] * pad)
        labels.append([k] * len(chunk) + [-100] * pad)
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def router_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


def save_router(model: nn.Module, out_dir: Path) -> None:
    model.save_pretrained(out_dir)


def train_router(run_dir: str | Path, resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    layout = RunLayout.of(run_dir)
    tokenizer = load_tokenizer(layout.tokenizer)
    documents = load_saved(layout.documents, "the tokenized documents")
    options = config["router"]
    max_length = options["max_length"]
    context = config["expert"]["arch"].get("max_position_embeddings", max_length)
    num_clusters = config["partition"]["num_clusters"]
    if num_clusters < 2:
        raise DfmError("a router needs at least 2 experts; with one expert use --routing mixture without a router")

    def examples(split: str) -> datasets.Dataset:
        return router_examples(list(documents[split]["input_ids"]), list(documents[split]["cluster"]), max_length,
                               tokenizer.eos_token_id)

    seed = config["seed"] + ROUTER_SEED_OFFSET
    torch.manual_seed(seed)
    router = Router(RouterConfig(vocab_size=len(tokenizer), num_experts=num_clusters,
                                 hidden_size=options["hidden_size"], num_layers=options["num_layers"],
                                 num_heads=options["num_heads"], max_positions=max(context, max_length)))
    train_options = TrainConfig.from_dict({**options["train"], "seed": seed})
    validation = examples("validation")
    result = train(router, examples("train"), router_loss, train_options, save_fn=save_router,
                   out_dir=layout.router, checkpoint_dir=layout.checkpoints("router"), log_path=layout.log("router"),
                   val_data=validation if len(validation) else None, resume=resume, desc="router")
    summary = {"name": "router", "parameters": router.num_parameters, "steps": result.steps, "tokens": result.tokens,
               "final_loss": result.final_loss, "val_loss": result.val_loss, "seconds": result.seconds}
    if setup_distributed().is_main:
        write_json(layout.summary("router"), summary)
    return summary
