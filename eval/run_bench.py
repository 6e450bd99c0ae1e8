"""`dfm bench --run RUN`: decoding speed of a trained run, on prompts cut from its test split.

`dfm bench` times the code on random-init models; this times what a user of the run gets: its
trained experts and router (how often a trained router changes its mind decides what sparse
routing costs), its tokenizer, and held-out text, against the run's central baseline decoding
the same prompts with transformers ``generate`` on the same device (paired per repetition, as in
eval/bench.py). Decoding is greedy and never stops at EOS, so every run produces the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dfm.atomic import write_json
from dfm.errors import DfmError
from dfm.tensors import inference_dtype
from eval.bench import MODES, generate_reference, machine_info, mode_figures
from eval.report import held_out
from models.ensemble import Ensemble
from models.expert import load_expert
from models.manifest import Manifest
from models.scoring import document_bos
from training.config import read_run_config
from training.layout import RunLayout

#: The routing modes timed on a trained run (its own router, not the bench's fixed rows).
RUN_MODES = ("top1", "switch", "mixture", "bayes", "top1_route_on_prompt")


def run_prompts(run_dir: str | Path, count: int, tokens: int) -> list[list[int]]:
    """``count`` prompts of ``tokens`` token ids each: the openings of test documents spread evenly
    over the split (so every cluster is asked), skipping documents shorter than ``tokens``."""
    config = read_run_config(run_dir)
    docs = [d for d in held_out(RunLayout.of(run_dir), config, "test", None)[0] if len(d) >= tokens]
    if len(docs) < count:
        raise DfmError(
            f"the test split of {run_dir} has {len(docs)} documents of at least {tokens} tokens, "
            f"{count} needed: evaluate on a larger test split"
        )
    step = len(docs) / count
    return [docs[int(i * step)][:tokens] for i in range(count)]


def bench_run(
    run_dir: str | Path,
    *,
    batches: Sequence[int] = (1, 8),
    new_tokens: int = 100,
    prompt_tokens: int = 32,
    repeats: int = 3,
    device: torch.device = torch.device("cpu"),
    compiled: bool = False,
    out: Path | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> dict:
    """Tokens/s of every mode in ``RUN_MODES`` at each batch size and its ratio to the baseline's
    ``generate``; ``compiled``: the ensemble decodes with its compiled step. Written atomically to ``out``."""
    if read_run_config(run_dir).is_masked:
        raise DfmError(f"{run_dir} is a masked run: `dfm bench --run` times autoregressive decoding")
    manifest = Manifest.load(run_dir)
    if manifest.baseline is None:
        raise DfmError(
            f"{run_dir} has no baseline, the reference of `dfm bench --run`: train it with `dfm train-baseline`"
        )
    started = time.perf_counter()
    dtype = inference_dtype("auto", device)
    ensemble = Ensemble.from_run(run_dir, device=device, dtype=dtype)
    context = ensemble.experts[0].config.max_position_embeddings
    if 1 + prompt_tokens + new_tokens > context:
        raise DfmError(
            f"BOS, {prompt_tokens} prompt tokens and {new_tokens} new tokens exceed the experts' context "
            f"of {context}: use --quick (16 + 32 tokens)"
        )
    prompts = run_prompts(run_dir, max(batches), prompt_tokens)
    if compiled:
        ensemble.compile()
    baseline = manifest.load_model(run_dir, manifest.baseline, load_expert, device, dtype)
    bos = document_bos(ensemble.tokenizer)
    results: dict[str, Any] = {
        "run": str(run_dir),
        "machine": machine_info(device),
        "compiled": compiled,
        "num_experts": ensemble.num_experts,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "reference": "the run's baseline through generate",
    }
    for batch in batches:
        reference = generate_reference(baseline, prompts[:batch], new_tokens, bos=bos)
        row: dict[str, Any] = {}
        for name in RUN_MODES:
            row[name] = figures = mode_figures(ensemble, prompts[:batch], new_tokens, repeats, MODES[name], reference)
            say(
                f"batch {batch}: {name} {figures['tokens_per_second']:.0f} tok/s "
                f"({figures['vs_reference']:.2f}x baseline generate at {figures['reference_tokens_per_second']:.0f})"
            )
        results[f"batch_{batch}"] = row
    results["seconds"] = time.perf_counter() - started
    if out is not None:
        write_json(out, results)
    return results


def format_run_table(results: dict) -> str:
    """One line per batch size and mode: tokens/s, ratio to the baseline's generate, expert work."""
    step = ", compiled step" if results["compiled"] else ""
    lines = [
        f"dfm bench --run {results['run']}: K={results['num_experts']}, {results['prompt_tokens']}-token prompts "
        f"from its test split, {results['new_tokens']} new tokens, greedy{step}",
        f"{'batch / mode':<28} {'tok/s':>8}  vs baseline generate, expert tokens per generated token",
    ]
    for key, modes in results.items():
        if key.startswith("batch_"):
            for name, figures in modes.items():
                lines.append(
                    f"{key[6:] + ' ' + name:<28} {figures['tokens_per_second']:>8,.0f}  "
                    f"{figures['vs_reference']:.2f}x, {figures['expert_tokens_per_token']:.2f}"
                )
    return "\n".join(lines)
