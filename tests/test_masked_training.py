"""Masked experts (a Hugging Face bidirectional masked LM) train through the shared trainer on the
masked path's ELBO: one document per row, reproducible, and they learn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset

from dfm.errors import DfmError
from dfm.loss import masked_dfm_loss
from dfm.masked_path import MaskedPath
from dfm.schedulers import scheduler
from models.expert import save_expert
from models.masked_expert import build_masked_expert, clean_logits, load_masked_expert, masked_expert_config
from models.masked_kind import masked_loss
from training.data import document_rows
from training.trainer import TrainConfig, train

V, EOS, BLOCK = 12, 0, 8
ARCH = {
    "model_type": "modernbert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": BLOCK,
}


def tiny_masked(seed: int = 0):
    return build_masked_expert(
        masked_expert_config(V, eos_token_id=EOS, tokenizer_fingerprint="test", arch=ARCH), seed=seed
    )


def patterned_docs(n: int, seed: int) -> Dataset:
    """Documents that repeat one random token: any revealed token fixes all the others."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for start, length in zip(torch.randint(1, V, (n,), generator=g), torch.randint(3, 12, (n,), generator=g)):
        docs.append([int(start)] * int(length))
    return Dataset.from_dict({"input_ids": docs})


def test_document_rows_never_mix_documents():
    docs = Dataset.from_dict({"input_ids": [[1, 2], list(range(1, 11))], "cluster": [3, 5]})
    rows = document_rows(docs, 4, EOS, columns=("cluster",))
    # every document ends with its EOS (a real token), then padding that attention ignores
    assert rows["input_ids"] == [[1, 2, EOS, EOS], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, EOS, EOS]]
    assert rows["attention_mask"] == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert rows["cluster"] == [3, 5, 5, 5]


def test_config_adds_the_mask_symbol_and_round_trips(tmp_path: Path):
    model = tiny_masked()
    assert model.config.vocab_size == V + 1 and model.config.mask_token_id == V
    x = torch.tensor([[1, V, 3, V]])
    assert clean_logits(model.eval(), x).shape == (1, 4, V)
    save_expert(model, tmp_path / "m")
    again = load_masked_expert(tmp_path / "m")
    assert torch.equal(clean_logits(again, x), clean_logits(model, x))
    with pytest.raises(DfmError, match="unknown masked expert model_type 'nope'"):
        masked_expert_config(V, eos_token_id=EOS, tokenizer_fingerprint="x", arch={"model_type": "nope"})


def _held_out_bound(model, rows: Dataset, path: MaskedPath) -> float:
    """Monte-Carlo ELBO per token on fixed draws of t and masks (the same for every model)."""
    g = torch.Generator().manual_seed(123)
    x1 = torch.tensor(rows["input_ids"]).repeat(8, 1)
    attention = torch.tensor(rows["attention_mask"]).repeat(8, 1)
    t = torch.rand(x1.shape[0], generator=g, dtype=torch.float64)
    xt = torch.where(attention.bool(), path.sample(x1, t, generator=g), x1)
    with torch.no_grad():
        return float(masked_dfm_loss(clean_logits(model.eval(), xt, attention), x1, xt, t, path, attention))


def test_masked_expert_learns_and_is_reproducible(tmp_path: Path):
    path = MaskedPath(V, scheduler("cosine"))
    train_rows = document_rows(patterned_docs(200, 0), BLOCK, EOS)
    held_out = document_rows(patterned_docs(40, 1), BLOCK, EOS)
    config = TrainConfig(steps=300, batch_size=16, lr=3e-3, warmup_steps=10, checkpoint_every=0, log_every=50)
    models = [tiny_masked(), tiny_masked()]
    untrained = _held_out_bound(tiny_masked(), held_out, path)
    for name, model in zip("ab", models, strict=True):
        train(
            model.train(),
            train_rows,
            masked_loss(path),
            config,
            save_fn=save_expert,
            out_dir=tmp_path / name / "out",
            checkpoint_dir=tmp_path / name / "ckpt",
            log_path=tmp_path / name / "log.jsonl",
        )
    for (key, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    trained = _held_out_bound(models[0], held_out, path)
    # untrained: about log(12) = 2.5 nats per token; the exact model pays log(11) = 2.4 for the
    # first revealed token only, about 0.4 per token at these lengths: far below half of 2.5
    assert untrained > 2.0 and trained < 0.5 * untrained, (untrained, trained)
