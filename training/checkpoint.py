"""Periodic training checkpoints: ``DIR/step-NNNNNNN/`` holding model, optimizer and RNG state.

Each checkpoint directory is written atomically and lists the sha256 of its files in
``state.json``; loading verifies them and falls back to an older checkpoint when the newest one
is damaged, and refuses to resume when every one is.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from dfm.atomic import atomic_dir, write_json
from dfm.errors import DfmError
from models.manifest import file_sha256
from training.sharding import is_sharded, load_full_states

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.pt"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"step-(\d+)")


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU, and every CUDA device when present)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def checkpoint_dirs(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint directory, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
    *,
    keep: int = 2,
    rng_states: list[dict[str, Any]] | None = None,
    states: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> Path:
    """Write ``directory/step-NNNNNNN`` atomically and delete all but the newest ``keep`` checkpoints.

    ``extra`` must be JSON-serialisable. ``rng_states`` holds one entry per rank (default: this
    process's state only); ``load_latest_checkpoint(..., rank=r)`` restores entry ``r``.
    ``states``: the gathered (model, optimizer) state dicts of a sharded model (FSDP).
    """
    directory = Path(directory)
    for stale in directory.glob(".step-*"):  # temp dirs left behind by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    path = directory / f"step-{step:07d}"
    with atomic_dir(path) as tmp:
        if states is None:
            save_model(_unwrap(model), str(tmp / MODEL_FILE))
        else:
            save_file({name: value.contiguous() for name, value in states[0].items()}, str(tmp / MODEL_FILE))
        torch.save(
            {
                "optimizer": optimizer.state_dict() if states is None else states[1],
                "scheduler": scheduler.state_dict(),
                "rng": rng_states if rng_states is not None else [rng_state()],
            },
            tmp / OPTIM_FILE,
        )
        sha256 = {name: file_sha256(tmp / name) for name in (MODEL_FILE, OPTIM_FILE)}
        write_json(tmp / STATE_FILE, {"step": step, "extra": extra, "sha256": sha256})
    for _, old in checkpoint_dirs(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _read_verified(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state.json, optim.pt payload)`` of an intact checkpoint; raises on any damage."""
    state = json.loads((path / STATE_FILE).read_text())
    for name, expected in state["sha256"].items():
        if file_sha256(path / name) != expected:
            raise ValueError(f"sha256 mismatch for {name}")
    with safe_open(str(path / MODEL_FILE), framework="pt") as handle:
        handle.keys()
    payload = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)
    return state, payload


def load_latest_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    rank: int = 0,
) -> dict[str, Any] | None:
    """Restore the newest intact checkpoint into model, optimizer, scheduler and the RNG.

    Damaged checkpoints (bad hash, truncated file, unreadable state) newer than it are skipped with
    a warning; when every checkpoint is damaged, a DfmError names them. Returns the checkpoint's
    ``state.json`` (``step``, ``extra``, ``sha256``), or None if ``directory`` holds no checkpoint.
    """
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(checkpoint_dirs(directory)):
        try:
            state, payload = _read_verified(path)
        except Exception as exc:  # noqa: BLE001 - any damage means: fall back to the previous one
            damaged.append((path, _first_line(exc)))
            continue
        for bad, why in damaged:
            warnings.warn(f"skipping damaged checkpoint {bad}: {why}", stacklevel=2)
        _restore(path, state, payload, model, optimizer, scheduler, rank, Path(directory))
        return state
    if damaged:
        names = "; ".join(f"{path.name}: {why}" for path, why in damaged)
        raise DfmError(
            f"every checkpoint in {directory} is damaged ({names}): nothing to resume; delete "
            f"{directory} and run again without --resume to start over"
        )
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _restore(
    path: Path,
    state: dict[str, Any],
    payload: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
    directory: Path,
) -> None:
    """Load the verified checkpoint ``path`` into model, optimizer, scheduler and this rank's RNG."""
    if rank >= len(payload["rng"]):
        raise DfmError(
            f"checkpoint {path} was written by {len(payload['rng'])} process(es); "
            "resume with the same number of processes"
        )
    try:
        if is_sharded(model):
            load_full_states(model, optimizer, load_file(str(path / MODEL_FILE)), payload["optimizer"])
        else:
            load_model(_unwrap(model), str(path / MODEL_FILE), strict=True)
            optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise DfmError(
            f"checkpoint {path} does not fit this model or optimizer ({exc}); delete {directory} to start over"
        ) from exc
    set_rng_state(payload["rng"][rank])
