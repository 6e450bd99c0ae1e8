"""Interrupt-and-resume of one expert of a finished run, for the bit-identity tests."""

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.layout import RunLayout
from training.lm_training import train_expert


def resumes_bit_identically(run: Path, scratch: Path, k: int, weights_file: str) -> bool:
    """Expert ``k`` of a copy of ``run``, as if interrupted after its step-3 checkpoint (later
    checkpoints and the saved model gone) and resumed: are its ``weights_file`` tensors those of ``run``?"""
    copy_run = scratch / "run"
    shutil.copytree(run, copy_run)
    layout = RunLayout.of(copy_run)
    shutil.rmtree(layout.expert(k))
    for step_dir in layout.checkpoints(f"expert-{k}").iterdir():
        if not step_dir.name.endswith("3"):
            shutil.rmtree(step_dir)
    train_expert(copy_run, k, resume=True)
    resumed = load_file(layout.expert(k) / weights_file)
    reference = load_file(RunLayout.of(run).expert(k) / weights_file)
    return resumed.keys() == reference.keys() and all(torch.equal(resumed[name], reference[name]) for name in reference)
