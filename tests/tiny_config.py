"""A run configuration small enough for tests: seconds, not minutes."""

TINY_ARCH = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}

TINY_RUN = {
    "synthetic": {"num_domains": 3, "num_documents": 150, "seed": 0, "mean_length": 20},
    "tokenizer": {"vocab_size": 300},
    "partition": {"num_clusters": 3},
    "seed_model": {"train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 2}},
    "expert": {
        "arch": TINY_ARCH,
        "block_size": 32,
        "train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 2},
    },
    "router": {
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "max_length": 32,
        "train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 3, "log_every": 2},
    },
}


def write_tiny_config(directory):
    """Write TINY_RUN as ``directory/tiny.json`` (for --config) and return its path."""
    import json
    from pathlib import Path

    path = Path(directory) / "tiny.json"
    path.write_text(json.dumps(TINY_RUN))
    return path
