"""The shared training loop: determinism, bit-identical resume, damaged checkpoints, non-finite
losses, learning, and a 2-process torchrun run that matches single-process training."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from dfm.atomic import atomic_dir
from dfm.errors import DfmError
from training.checkpoint import checkpoint_dirs
from training.trainer import TrainConfig, TrainResult, lr_schedule, train

VOCAB, SEQ = 64, 16
REPO = Path(__file__).resolve().parents[1]


def tiny_llama(seed: int = 0, dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        attention_dropout=dropout,
    )
    return LlamaForCausalLM(config)


def random_blocks(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(0, VOCAB, (n, SEQ), generator=g).tolist()})


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def save_pretrained(model: nn.Module, path: Path, state_dict: dict | None = None) -> None:
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)


def run(root: Path, model: nn.Module, data: Dataset, config: TrainConfig, loss_fn=lm_loss, **kwargs) -> TrainResult:
    return train(
        model,
        data,
        loss_fn,
        config,
        save_fn=save_pretrained,
        out_dir=root / "out",
        checkpoint_dir=root / "ckpt",
        log_path=root / "log.jsonl",
        **kwargs,
    )


def read_log(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "log.jsonl").read_text().splitlines()]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def crash_after(calls: int):
    """A loss function that fails on its ``calls``-th call: a simulated crash mid-run."""
    count = 0

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        nonlocal count
        count += 1
        if count == calls:
            raise RuntimeError("simulated crash")
        return lm_loss(model, batch)

    return loss_fn


def test_config_round_trip_and_validation() -> None:
    config = TrainConfig(steps=7, lr=1e-3)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(DfmError, match="unknown training option"):
        TrainConfig.from_dict({"stepz": 3})
    for bad in ({"steps": 0}, {"batch_size": -1}, {"lr": 0.0}, {"min_lr_ratio": 1.5}, {"grad_accum": 1.5}):
        with pytest.raises(DfmError):
            TrainConfig.from_dict(bad)


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    config = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    schedule = lr_schedule(optimizer, config)
    lrs = []
    for _ in range(config.steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:3] == [0.1, 0.2, pytest.approx(0.3)] and lrs[9] == 1.0  # no step trains at lr 0
    assert lrs[59] == pytest.approx(0.55)  # half way through the cosine
    assert lrs[-1] == pytest.approx(0.1) and min(lrs) == pytest.approx(0.1)  # the floor, at the last step
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_same_seed_gives_bit_identical_weights(tmp_path: Path) -> None:
    config = TrainConfig(steps=6, batch_size=4, grad_accum=2, warmup_steps=2, checkpoint_every=3, log_every=2)
    data, val = random_blocks(20), random_blocks(6, seed=1)
    a, b = tiny_llama(dropout=0.1), tiny_llama(dropout=0.1)
    ra = run(tmp_path / "a", a, data, config, val_data=val)
    rb = run(tmp_path / "b", b, data, config, val_data=val)
    assert_same_weights(a, b)
    assert (ra.final_loss, ra.val_loss, ra.tokens) == (rb.final_loss, rb.val_loss, rb.tokens)
    assert ra.tokens == 6 * 8 * SEQ
    assert_same_weights(a, LlamaForCausalLM.from_pretrained(tmp_path / "a" / "out"))
    log = read_log(tmp_path / "a")
    assert [r["step"] for r in log] == [2, 4, 6, 6] and log[-1] == {"step": 6, "val_loss": ra.val_loss}
    assert [r["tokens"] for r in log[:3]] == [2 * 8 * SEQ, 4 * 8 * SEQ, 6 * 8 * SEQ]


def test_resume_after_crash_is_bit_identical(tmp_path: Path) -> None:
    # dropout makes the result depend on the RNG state, so resume must restore it too
    # a log line every 3 steps, a checkpoint every 4: the line of step 6 averages steps 4-6 across the resume
    config = TrainConfig(steps=10, batch_size=4, warmup_steps=2, checkpoint_every=4, log_every=3)
    data = random_blocks(12)  # 10 steps x 4 samples cross epoch boundaries
    reference = tiny_llama(dropout=0.1)
    expected = run(tmp_path / "ref", reference, data, config)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "run", tiny_llama(dropout=0.1), data, config, loss_fn=crash_after(7))
    assert [step for step, _ in checkpoint_dirs(tmp_path / "run" / "ckpt")] == [4]
    assert not (tmp_path / "run" / "out").exists()
    with pytest.raises(DfmError, match="--resume"):
        run(tmp_path / "run", tiny_llama(dropout=0.1), data, config)
    with pytest.raises(DfmError, match=r"\['lr'\] differ"):
        run(
            tmp_path / "run",
            tiny_llama(dropout=0.1),
            data,
            TrainConfig(**{**config.to_dict(), "lr": 1e-3}),
            resume=True,
        )
    with pytest.raises(DfmError, match="training data changed"):  # e.g. the run was prepared again
        run(tmp_path / "run", tiny_llama(dropout=0.1), random_blocks(12, seed=1), config, resume=True)

    resumed = tiny_llama(seed=123, dropout=0.1)  # the checkpoint overrides the initial weights
    result = run(tmp_path / "run", resumed, data, config, resume=True)
    assert_same_weights(resumed, reference)
    assert (result.final_loss, result.tokens) == (expected.final_loss, expected.tokens)

    # the log line of step 6 written before the crash was replaced, not duplicated, and averages
    # the same steps 4-6 as the unbroken run's
    def without_time(root: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in read_log(root)]

    assert without_time(tmp_path / "run") == without_time(tmp_path / "ref")

    # a finished run returns at once without training
    again = run(tmp_path / "run", tiny_llama(dropout=0.1), data, config, loss_fn=crash_after(1), resume=True)
    assert (again.final_loss, again.tokens) == (expected.final_loss, expected.tokens)


def test_damaged_latest_checkpoint_is_skipped(tmp_path: Path) -> None:
    config = TrainConfig(steps=8, batch_size=4, warmup_steps=2, checkpoint_every=2)
    data = random_blocks(16)
    reference = tiny_llama()
    run(tmp_path, reference, data, config)
    ckpt = tmp_path / "ckpt"
    assert [step for step, _ in checkpoint_dirs(ckpt)] == [6, 8]  # keep_checkpoints=2
    weights = ckpt / "step-0000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    save_pretrained(tiny_llama(), tmp_path / "out")  # artifact present, but step 8 is unusable

    resumed = tiny_llama(seed=5)
    with pytest.warns(UserWarning, match="step-0000008"):
        run(tmp_path, resumed, data, config, resume=True)  # falls back to step 6, redoes 7 and 8
    assert_same_weights(resumed, reference)
    assert_same_weights(resumed, LlamaForCausalLM.from_pretrained(tmp_path / "out"))
    assert [step for step, _ in checkpoint_dirs(ckpt)] == [6, 8]


def test_non_finite_loss_stops_without_writing(tmp_path: Path) -> None:
    calls = 0

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        nonlocal calls
        calls += 1
        loss = lm_loss(model, batch)
        return loss * math.nan if calls == 3 else loss

    config = TrainConfig(steps=6, batch_size=4, checkpoint_every=2)
    with pytest.raises(DfmError, match=r"non-finite loss at step 3; last good checkpoint kept at .*step-0000002"):
        run(tmp_path, tiny_llama(), random_blocks(8), config, loss_fn=loss_fn)
    assert not (tmp_path / "out").exists()
    assert [step for step, _ in checkpoint_dirs(tmp_path / "ckpt")] == [2]


def test_loss_decreases_on_a_repeating_pattern(tmp_path: Path) -> None:
    # period-8 cycles with a random phase: every token after the first is predictable
    phases = torch.randint(0, 8, (32,), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ((phases[:, None] + torch.arange(SEQ)) % 8).tolist()})
    config = TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=4, checkpoint_every=0, log_every=1)
    result = run(tmp_path, tiny_llama(), data, config)
    first = read_log(tmp_path)[0]["loss"]
    assert first > 3.5  # about ln(64): untrained
    assert result.final_loss < 0.5


class _Classifier(nn.Module):
    """A router-like custom module: labels from the mean embedding of the ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.embed(input_ids).mean(1))


def test_custom_module_sees_every_sample_once_per_epoch(tmp_path: Path) -> None:
    seen: list[int] = []

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        seen.extend(batch["idx"].tolist())
        return nn.functional.cross_entropy(model(batch["input_ids"]), batch["labels"])

    n = 10
    data = Dataset.from_dict(
        {
            "idx": list(range(n)),
            "input_ids": torch.randint(0, VOCAB, (n, 4)).tolist(),
            "labels": [i % 3 for i in range(n)],
        }
    )
    config = TrainConfig(steps=7, batch_size=3, checkpoint_every=0)
    model = _Classifier()
    result = train(
        model,
        data,
        loss_fn,
        config,
        save_fn=lambda m, path: torch.save(m.state_dict(), path),
        out_dir=tmp_path / "out.pt",
        checkpoint_dir=tmp_path / "ckpt",
        log_path=tmp_path / "log.jsonl",
        tokens_per_sample=1,
    )
    assert len(seen) == 21 and result.tokens == 21
    assert sorted(seen[:10]) == sorted(seen[10:20]) == list(range(n))  # epochs cross batch boundaries
    assert seen[:10] != seen[10:20]  # each epoch has its own permutation


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from tests.test_trainer import random_blocks, run, tiny_llama
from training.trainer import TrainConfig

root = Path(sys.argv[1])
config = TrainConfig(**json.loads(sys.argv[2]))
result = run(root, tiny_llama(), random_blocks(20), config, val_data=random_blocks(5, seed=1),
             resume=len(sys.argv) > 3)
if dist.get_rank() == 0:
    (root / "result.json").write_text(json.dumps({"val_loss": result.val_loss, "tokens": result.tokens}))
dist.destroy_process_group()
"""


def _torchrun(tmp_path: Path, root: Path, options: dict, *extra: str) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(root),
        json.dumps(options),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_single_process(tmp_path: Path, sharding: str) -> None:
    common = {"steps": 6, "warmup_steps": 2, "checkpoint_every": 3}
    # 2 ranks x 2 micro-batches x 2 rows = the same global batch of 8 rows as one process x 8 rows
    _torchrun(tmp_path, tmp_path / "ddp", {**common, "batch_size": 2, "grad_accum": 2, "fsdp": sharding == "fsdp"})
    ddp_model = LlamaForCausalLM.from_pretrained(tmp_path / "ddp" / "out")
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())

    single_model = tiny_llama()
    single = run(
        tmp_path / "single",
        single_model,
        random_blocks(20),
        TrainConfig(**common, batch_size=8),
        val_data=random_blocks(5, seed=1),
    )
    assert ddp["tokens"] == single.tokens
    # Identical maths; only float32 summation order differs (per-rank means averaged by DDP vs one
    # mean over 8 rows), ~1e-7 relative per gradient. Adam can amplify that on near-zero gradient
    # entries; after six steps we measured <= 4e-6. Batches that did not line up would differ by
    # about one Adam step (~lr = 3e-3), so 5e-5 still tells the two cases apart.
    for (name, a), b in zip(ddp_model.state_dict().items(), single_model.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=5e-5), name
    assert ddp["val_loss"] == pytest.approx(single.val_loss, abs=5e-5)


@pytest.mark.slow
def test_fsdp_resumes_from_a_gathered_checkpoint_bit_identically(tmp_path: Path) -> None:
    """Sharded training writes full (gathered) checkpoints; resumed from step 3 under FSDP it ends
    on the weights of the unbroken run, bit for bit."""
    options = {"steps": 6, "warmup_steps": 2, "checkpoint_every": 3, "batch_size": 2, "fsdp": True}
    _torchrun(tmp_path, tmp_path / "whole", options)
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "out")
    shutil.rmtree(tmp_path / "cut" / "ckpt" / "step-0000006")
    _torchrun(tmp_path, tmp_path / "cut", options, "--resume")
    whole = LlamaForCausalLM.from_pretrained(tmp_path / "whole" / "out").state_dict()
    cut = LlamaForCausalLM.from_pretrained(tmp_path / "cut" / "out").state_dict()
    assert all(torch.equal(whole[name], cut[name]) for name in whole)


def test_dfm_path_loss_trains_the_same_weights_as_transformers_loss(tmp_path: Path) -> None:
    """Experts train through dfm.loss on the AR path; on packed blocks with per-document positions
    and a padded last block, the weights match transformers' own label loss bit for bit.

    The two losses are the same mean cross-entropy summed in different orders (transformers'
    loss over every position with -100 labels, dfm's over the shifted ones), so their float32
    values may differ in the last bits: the rounding error of a sum of n positive terms is at most
    n * eps relative, n the targets of the step's batch (the weights come out exactly equal: each
    logit's gradient depends on its own row only)."""
    from models.ar_kind import lm_loss as dfm_path_loss
    from training.data import pack_blocks

    g = torch.Generator().manual_seed(3)
    docs = Dataset.from_dict(
        {
            "input_ids": [
                torch.randint(1, VOCAB, (int(n),), generator=g).tolist()
                for n in torch.randint(3, 20, (26,), generator=g)
            ]
        }
    )
    blocks = pack_blocks(docs, SEQ, eos_id=0)
    assert (torch.tensor(blocks["labels"]) == -100).any()  # the padded last block is covered

    def transformers_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(
            input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"], use_cache=False
        ).loss

    config = TrainConfig(steps=5, batch_size=4, warmup_steps=1, checkpoint_every=0)
    a, b = tiny_llama(), tiny_llama()
    ra = run(tmp_path / "a", a, blocks, config, loss_fn=dfm_path_loss)
    rb = run(tmp_path / "b", b, blocks, config, loss_fn=transformers_loss)
    assert_same_weights(a, b)
    targets = config.batch_size * SEQ
    assert abs(ra.final_loss - rb.final_loss) <= targets * torch.finfo(torch.float32).eps * abs(rb.final_loss)
