"""The one training loop shared by experts, the baseline and the router.

Seeded and deterministic on CPU, resumable bit-identically from its checkpoints, and unchanged
under ``torchrun --nproc_per_node N`` (DistributedDataParallel).

Data order is a pure function of the optimizer step: the samples form an infinite stream of
epochs, epoch ``e`` a permutation seeded by ``(seed, e)``, and optimizer step ``s`` consumes
stream positions ``[s*G, (s+1)*G)`` with ``G = batch_size * grad_accum * world_size``; rank ``r``
takes the contiguous ``r``-th slice of that global batch. Nothing is dropped at epoch ends.

Starting with ``resume=False`` while ``checkpoint_dir`` holds checkpoints is refused with a
DfmError (pass ``resume=True`` or delete the directory): old progress is never silently lost.
So is a second process training the same model while the first holds its lock (training.lock),
from loading the checkpoints to the final save.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

from dfm.atomic import write_text
from dfm.errors import DfmError, reject_unknown_keys
from dfm.loss import LossFn
from dfm.progress import progress
from dfm.tensors import autocast_for
from training.checkpoint import checkpoint_dirs, load_latest_checkpoint, rng_state, save_checkpoint
from training.distributed import DistInfo, setup_distributed
from training.lock import lock_path, training_lock
from training.sharding import full_model_state, full_states, grad_sync, is_sharded, shard_model

# Options that shape the optimisation trajectory: a resumed run must keep them.
_TRAJECTORY = (
    "seed",
    "batch_size",
    "grad_accum",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "fsdp",
)


@dataclass
class TrainConfig:
    """Optimisation settings. ``checkpoint_every``, ``eval_every`` and ``log_every`` of 0 disable
    the periodic action (a final checkpoint is always written); ``grad_clip`` of 0 disables clipping."""

    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    # under torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP2) for a
    # model that does not fit one device; false: replicate it (DDP), the faster choice for small ones
    fsdp: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        reject_unknown_keys(data, {f.name for f in fields(cls)}, "training option(s)")
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise DfmError naming the first invalid option."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise DfmError(f"training option {f.name} must be true or false, got {value!r}")
                continue
            expected = int if f.type in ("int", int) else (int, float)
            if isinstance(value, bool) or not isinstance(value, expected):
                raise DfmError(f"training option {f.name} must be a number of type {f.type}, got {value!r}")
            if not math.isfinite(value):
                raise DfmError(f"training option {f.name} must be a finite number, got {value!r}")
        for name in ("steps", "batch_size", "grad_accum", "lr", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise DfmError(f"training option {name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "checkpoint_every", "eval_every", "log_every"):
            if getattr(self, name) < 0:
                raise DfmError(f"training option {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise DfmError(f"training option min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainResult:
    steps: int
    tokens: int
    final_loss: float
    val_loss: float | None
    seconds: float


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' warmup-cosine schedule: ``config.lr`` times (step + 1) / warmup_steps while
    warming up, then a cosine that reaches ``min_lr_ratio`` at the last of ``config.steps``."""
    return get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.steps,
        min_lr_rate=config.min_lr_ratio,
    )


class _SampleStream:
    """Dataset indices of the infinite epoch stream; epoch ``e`` is a permutation seeded by (seed, e)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            key = hashlib.sha256(f"{self.seed}/{epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
            self._perms[epoch] = torch.randperm(self.size, generator=generator)
        return self._perms[epoch]

    def take(self, start: int, count: int) -> Tensor:
        """Indices at stream positions ``[start, start + count)``."""
        pieces, pos, end = [], start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.size)
            n = min(end - pos, self.size - offset)
            pieces.append(self._perm(epoch)[offset : offset + n])
            pos += n
        return torch.cat(pieces)


def _fetch(data: datasets.Dataset, indices: list[int], device: torch.device) -> dict[str, Tensor]:
    """Rows ``indices`` of a torch-formatted dataset as stacked tensors on ``device``.

    Data with a ``length`` column holds right-padded rows for a causal model: every sequence
    column is cut after the longest row of the batch (no real position sees what is cut), and
    ``length`` itself is not passed on.
    """
    batch = {}
    for name, value in data[indices].items():
        if isinstance(value, Tensor):
            batch[name] = value
        elif value and isinstance(value[0], Tensor):
            raise DfmError(f"column {name!r} holds sequences of different lengths; pack it into fixed-length blocks")
    lengths = batch.pop("length", None)
    if lengths is not None:
        width = int(lengths.max())
        batch = {name: value[:, :width] if value.ndim >= 2 else value for name, value in batch.items()}
    if device.type == "cuda":  # page-locked, so the copy runs asynchronously beside the GPU's work
        batch = {name: value.pin_memory() for name, value in batch.items()}
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or embeddings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (CPU and CUDA) replaces a per-parameter Python loop: ~2 ms a step here
    fused = not is_sharded(model) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"]
    )
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.95), fused=fused)


def _append_log(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after ``step`` (written before a crash, about to be redone) and torn lines."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


#: Rows of the training data that ``data_fingerprint`` hashes at a time.
FINGERPRINT_ROWS = 4096


def data_fingerprint(data: datasets.Dataset) -> str:
    """sha256 of the row count and of every row in order, streamed ``FINGERPRINT_ROWS`` at a time
    as Arrow IPC bytes: different whenever the data was prepared again from other documents or
    clusters, whatever rows the two share.

    Rows rather than ``Dataset.cache_files``: the files miss an in-memory table or index mapping
    (a shuffled or selected dataset reads the same files in another order), and reading the rows
    of memory-mapped files costs about what hashing the files does."""
    digest = hashlib.sha256(f"{len(data)} rows\n".encode())
    for batch in data.with_format("arrow").iter(batch_size=FINGERPRINT_ROWS):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_table(batch.combine_chunks())  # the same bytes however the rows are chunked
        digest.update(sink.getvalue())
    return digest.hexdigest()


def _check_resumable(
    state: dict[str, Any], config: TrainConfig, world_size: int, checkpoint_dir: Path, fingerprint: str
) -> None:
    extra = state["extra"]
    hint = f"or delete {checkpoint_dir} to start over"
    recorded = extra.get("data_sha256")
    if recorded is None:
        warnings.warn(
            f"the checkpoint in {checkpoint_dir} predates the sha256 of all its training data: resuming "
            f"without checking that the data is the same",
            stacklevel=3,
        )
    elif recorded != fingerprint:
        raise DfmError(
            f"the training data changed since the checkpoint was written (prepared again?); "
            f"checkpoints of other data cannot be resumed: delete {checkpoint_dir} and run again "
            f"without --resume"
        )
    if extra["world_size"] != world_size:
        raise DfmError(f"checkpoint was written by {extra['world_size']} process(es); resume with as many {hint}")
    changed = [k for k in _TRAJECTORY if extra["config"][k] != getattr(config, k)]
    if changed:
        raise DfmError(f"training options {changed} differ from the checkpointed run; restore them {hint}")
    if state["step"] > config.steps:
        raise DfmError(f"checkpoint is at step {state['step']} > steps={config.steps}; raise steps {hint}")


@torch.no_grad()
def _evaluate(model: nn.Module, data: datasets.Dataset, loss_fn: LossFn, batch_size: int, info: DistInfo) -> float:
    """Row-weighted mean of ``loss_fn`` over ``data``, sharded over ranks and all-reduced."""
    was_training = model.training
    model.eval()
    shard = list(range(info.rank, len(data), info.world_size))
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    for start in range(0, math.ceil(len(data) / info.world_size), batch_size):  # as many batches on every rank
        rows = shard[start : start + batch_size]
        weight = len(rows)  # a rank out of rows still joins the forward (FSDP gathers in it), at weight 0
        with autocast_for(info.device):
            loss = loss_fn(model, _fetch(data, rows or [0], info.device))
        total[0] += loss.double() * weight
        total[1] += weight
    if info.world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    if info.world_size == 1:
        return [rng_state()]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, rng_state())
    return states


def _non_finite(what: str, step: int, checkpoint_dir: Path) -> DfmError:
    saved = checkpoint_dirs(checkpoint_dir)
    where = saved[-1][1] if saved else f"none ({checkpoint_dir} holds no checkpoint yet)"
    return DfmError(f"non-finite {what} at step {step}; last good checkpoint kept at {where}")


def train(
    model: nn.Module,
    train_data: datasets.Dataset,
    loss_fn: LossFn,
    config: TrainConfig,
    *,
    save_fn: Callable[[nn.Module, Path], None],
    out_dir: Path,
    checkpoint_dir: Path,
    log_path: Path,
    val_data: datasets.Dataset | None = None,
    resume: bool = False,
    desc: str = "train",
    tokens_per_sample: int | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_data`` and save it with ``save_fn(model, out_dir)``
    (under FSDP: ``save_fn(model, out_dir, full_state_dict)``).

    ``loss_fn(model, batch)`` returns the mean loss of a batch (a dict of stacked column tensors);
    under DDP it receives the wrapped model. With ``resume=True`` training continues from the
    newest intact checkpoint, and a run that already finished (final checkpoint and ``out_dir``
    present) returns at once. A non-finite loss or gradient raises DfmError before any state
    derived from it is written. ``device``: where a single process trains (default: CUDA if
    available, else CPU; under torchrun every rank's own device). ``desc`` names the model in the
    progress bar and in the DfmError that refuses a second trainer of ``checkpoint_dir`` at once.
    """
    config.validate()
    out_dir, checkpoint_dir, log_path = Path(out_dir), Path(checkpoint_dir), Path(log_path)
    if len(train_data) == 0:
        raise DfmError("the training set is empty; check the data preparation step")
    if val_data is not None and len(val_data) == 0:
        raise DfmError("the validation set is empty; pass none or a non-empty one")
    if tokens_per_sample is None and "input_ids" not in train_data.column_names:
        raise DfmError("training data has no input_ids column; pass tokens_per_sample")
    info = setup_distributed(device)
    if config.fsdp and info.world_size == 1:
        raise DfmError(
            f"{desc}: fsdp shards over torchrun ranks and this is a single process: run under "
            f"torchrun --nproc_per_node N or drop fsdp"
        )
    with _main_rank_lock(info, checkpoint_dir, desc):
        return _train(
            model,
            train_data,
            loss_fn,
            config,
            info,
            save_fn=save_fn,
            out_dir=out_dir,
            checkpoint_dir=checkpoint_dir,
            log_path=log_path,
            val_data=val_data,
            resume=resume,
            desc=desc,
            tokens_per_sample=tokens_per_sample,
        )


@contextmanager
def _main_rank_lock(info: DistInfo, checkpoint_dir: Path, name: str) -> Iterator[None]:
    """The training lock of ``name`` (training.lock), held by the main rank alone: it is the only
    rank that writes checkpoints, logs and the model, and the ranks of one job must not refuse
    each other. Under torchrun every rank raises the main rank's refusal, so none is left waiting
    in a collective for a rank that has gone."""
    with ExitStack() as stack:
        refusal = None
        if info.is_main:
            try:
                stack.enter_context(training_lock(lock_path(checkpoint_dir), name))
            except DfmError as err:
                refusal = str(err)
        if info.world_size > 1:
            shared = [refusal]
            dist.broadcast_object_list(shared, src=0)
            refusal = shared[0]
        if refusal is not None:
            raise DfmError(refusal)
        yield


def _train(
    model: nn.Module,
    train_data: datasets.Dataset,
    loss_fn: LossFn,
    config: TrainConfig,
    info: DistInfo,
    *,
    save_fn: Callable[..., None],
    out_dir: Path,
    checkpoint_dir: Path,
    log_path: Path,
    val_data: datasets.Dataset | None,
    resume: bool,
    desc: str,
    tokens_per_sample: int | None,
) -> TrainResult:
    """``train`` once its arguments are checked and the lock is held."""
    torch.manual_seed(config.seed + info.rank)
    model.to(info.device)
    model.train()
    sharded = config.fsdp  # train() refused it in a single process
    if sharded:
        shard_model(model)
    optimizer = _make_optimizer(model, config)
    scheduler = lr_schedule(optimizer, config)

    start_step, tokens, seconds_before, final_loss, val_loss = 0, 0, 0.0, math.nan, None
    window_loss, window_steps = 0.0, 0  # the losses since the last log line, averaged into the next one
    fingerprint = data_fingerprint(train_data)
    if resume:
        state = load_latest_checkpoint(checkpoint_dir, model, optimizer, scheduler, rank=info.rank)
        if state is not None:
            _check_resumable(state, config, info.world_size, checkpoint_dir, fingerprint)
            extra = state["extra"]
            start_step, tokens, seconds_before = state["step"], extra["tokens"], extra["seconds"]
            final_loss, val_loss = extra["loss"], extra.get("val_loss")
            window_loss, window_steps = extra.get("window", (0.0, 0))  # so the next log line matches an unbroken run
            if start_step == config.steps and out_dir.exists():
                return TrainResult(config.steps, tokens, final_loss, val_loss, seconds_before)
    elif checkpoint_dirs(checkpoint_dir):
        raise DfmError(f"{checkpoint_dir} holds checkpoints of an earlier run; resume it (--resume) or delete it")
    if info.is_main:
        _truncate_log(log_path, start_step)

    net: nn.Module = model
    if info.world_size > 1 and not sharded:
        net = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    data = train_data.with_format("torch")
    val = val_data.with_format("torch") if val_data is not None else None
    stream = _SampleStream(len(train_data), config.seed)
    per_rank = config.batch_size * config.grad_accum
    started = time.perf_counter()

    def run_state(**more: Any) -> dict[str, Any]:
        seconds = seconds_before + time.perf_counter() - started
        base = {
            "tokens": tokens,
            "seconds": seconds,
            "loss": final_loss,
            "world_size": info.world_size,
            "data_sha256": fingerprint,
        }
        return {**base, "config": config.to_dict(), **more}

    def checkpoint(step: int, **more: Any) -> None:
        rng_states = _gather_rng(info)
        states = full_states(model, optimizer) if sharded else None  # gathered by every rank
        if info.is_main:
            save_checkpoint(
                checkpoint_dir,
                step,
                model,
                optimizer,
                scheduler,
                run_state(**more),
                keep=config.keep_checkpoints,
                rng_states=rng_states,
                states=states,
            )

    bar = progress(total=config.steps, initial=start_step, desc=desc, enabled=info.is_main)
    try:
        for step in range(start_step, config.steps):
            indices = stream.take(step * per_rank * info.world_size + info.rank * per_rank, per_rank).tolist()
            step_loss = torch.zeros((), device=info.device)
            step_tokens = 0
            for micro in range(config.grad_accum):
                batch = _fetch(data, indices[micro * config.batch_size : (micro + 1) * config.batch_size], info.device)
                last = micro == config.grad_accum - 1
                if sharded:
                    grad_sync(model, last)
                with net.no_sync() if info.world_size > 1 and not sharded and not last else nullcontext():
                    with autocast_for(info.device):
                        loss = loss_fn(net, batch)
                    (loss / config.grad_accum).backward()
                step_loss += loss.detach().float() / config.grad_accum
                step_tokens += (
                    tokens_per_sample * config.batch_size if tokens_per_sample else batch["input_ids"].numel()
                )
            if info.world_size > 1:
                dist.all_reduce(step_loss)
                step_loss /= info.world_size
            loss_value = step_loss.item()
            if not math.isfinite(loss_value):
                raise _non_finite("loss", step + 1, checkpoint_dir)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(grad_norm):
                raise _non_finite("gradient", step + 1, checkpoint_dir)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            tokens += step_tokens * info.world_size
            final_loss = loss_value
            window_loss, window_steps = window_loss + loss_value, window_steps + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            if info.is_main and config.log_every and (done % config.log_every == 0 or done == config.steps):
                seconds = seconds_before + time.perf_counter() - started
                record = {
                    "step": done,
                    "loss": window_loss / window_steps,
                    "lr": lr,
                    "tokens": tokens,
                    "seconds": seconds,
                }
                _append_log(log_path, record)
                window_loss, window_steps = 0.0, 0
            if val is not None and config.eval_every and done % config.eval_every == 0 and done < config.steps:
                step_val = _evaluate(model, val, loss_fn, config.batch_size, info)
                if info.is_main:
                    _append_log(log_path, {"step": done, "val_loss": step_val})
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                checkpoint(done, window=[window_loss, window_steps])
    finally:
        bar.close()  # end the bar's line, so an error message starts on a line of its own

    if start_step < config.steps:
        if val is not None:
            val_loss = _evaluate(model, val, loss_fn, config.batch_size, info)
            if info.is_main:
                _append_log(log_path, {"step": config.steps, "val_loss": val_loss})
        checkpoint(config.steps, val_loss=val_loss)
    if sharded:
        state = full_model_state(model)  # gathered by every rank
        if info.is_main:
            save_fn(model, out_dir, state)
    elif info.is_main:
        save_fn(model, out_dir)
    if info.world_size > 1:
        dist.barrier()
    return TrainResult(config.steps, tokens, final_loss, val_loss, seconds_before + time.perf_counter() - started)
