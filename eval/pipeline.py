"""The stages of a run as a library: prepare, seed model, every expert, router, baseline,
assemble, eval; with resume, the seconds of every stage (``RUN/logs/timings.json``) and the ETA.

`dfm run` calls ``run_pipeline``; `dfm eval` calls ``evaluate``; the benchmarks and any study
that trains runs (a scaling ladder, a server that loads one) call the same functions.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dfm.atomic import write_json
from dfm.errors import DfmError
from eval.masked_report import evaluate_masked_run
from eval.matching_check import check_matching
from eval.plots import write_plots
from eval.report import check_modes, evaluate_run, write_report
from models.ar_kind import AR_MODES
from models.generation_request import GenerationRequest
from training.assemble import assemble
from training.config import read_run_config
from training.estimate import remaining_seconds
from training.layout import RunLayout
from training.lm_training import train_baseline, train_expert, train_seed_model
from training.prepare import prepare
from training.router_training import train_router

Say = Callable[[str], None]


def loss_text(value: float | None, unit: str = " nats/token") -> str:
    """A validation loss as the logs print it, with its ``unit``."""
    return "n/a (no validation data)" if value is None else f"{value:.4f}{unit}"


def minutes(seconds: float) -> str:
    """``seconds`` as a person reads a duration: seconds under two minutes, else minutes."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class StageClock:
    """Seconds per stage, written to ``RUN/logs/timings.json`` after every stage; a resumed run adds
    to what the interrupted ones spent."""

    def __init__(self, run_dir: str | Path, resume: bool, say: Say):
        self.path = RunLayout.of(run_dir).timings
        self.say = say
        self.timings: dict[str, float] = {}
        if resume and self.path.is_file():
            try:
                self.timings = json.loads(self.path.read_text())
            except (OSError, ValueError):
                warnings.warn(f"{self.path} is unreadable: the stage timings restart from zero", stacklevel=1)

    def stage(self, name: str, fn: Callable[[], object]) -> object:
        """Run ``fn`` as the stage ``name``, adding its seconds to the timings."""
        self.say(f"{name} ...")
        start = time.perf_counter()
        result = fn()
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 2)
        write_json(self.path, self.timings)
        return result

    @property
    def total(self) -> float:
        return sum(self.timings.values())


@dataclass
class RunResult:
    """What ``run_pipeline`` leaves besides the run directory: the report and the stage seconds."""

    report: dict
    timings: dict[str, float]


def evaluate(run_dir: str | Path, **options) -> dict:
    """The evaluation report of a run on either path (``elbo_samples`` is for masked runs,
    ``stride`` for autoregressive ones; the other options go to both)."""
    samples, stride = options.pop("elbo_samples", None), options.pop("stride", None)
    if read_run_config(run_dir).is_masked:
        if stride is not None:
            raise DfmError(
                "--stride is for autoregressive runs: a masked run scores each document in the rows it trained on"
            )
        return check_matching(evaluate_masked_run(run_dir, samples=8 if samples is None else samples, **options))
    if samples is not None:
        raise DfmError("--elbo-samples is for masked runs: an autoregressive run's likelihood is exact")
    return check_matching(
        evaluate_run(run_dir, stride=stride, **{**options, "modes": options.get("modes") or AR_MODES})
    )


def write_evaluation(report: dict, run_dir: str | Path) -> list[Path]:
    """report.json, report.md and the plots into ``RUN/eval``; returns the plots written."""
    out = RunLayout.of(run_dir).eval
    write_report(report, out)
    return write_plots(report, out)


def train_stages(
    run_dir: str | Path, clock: StageClock, resume: bool, device: torch.device, seed_model: bool = True
) -> None:
    """Seed model (when the run has one and ``seed_model``; a study that shares one seed model
    among runs passes False), every expert, the router (K > 1), the baseline, assemble; the ETA
    after the first training stage."""
    config = read_run_config(run_dir)
    seed_model = seed_model and config.seed_model.trained
    say = clock.say

    def estimate(first: dict, experts_done: int) -> None:
        rest = remaining_seconds(run_dir, config, first, experts_done)
        say(
            f"estimated: about {minutes(rest)} more of training, {minutes(clock.total + rest)} in all "
            f"(from this stage's speed; evaluation not counted)"
        )

    if seed_model:
        summary = clock.stage("seed", lambda: train_seed_model(run_dir, resume=resume, device=device))
        say(f"seed: val loss {loss_text(summary['val_loss'])}")
        estimate(summary, 0)
    for k in range(config.partition.num_clusters):
        summary = clock.stage(f"expert-{k}", lambda k=k: train_expert(run_dir, k, resume=resume, device=device))
        say(f"expert-{k}: val loss {loss_text(summary['val_loss'])}, unigram entropy {summary['unigram_entropy']:.4f}")
        if k == 0 and not seed_model:
            estimate(summary, 1)
    if config.partition.num_clusters > 1:
        summary = clock.stage("router", lambda: train_router(run_dir, resume=resume, device=device))
        say(f"router: val loss {loss_text(summary['val_loss'], '')}")
    summary = clock.stage("baseline", lambda: train_baseline(run_dir, resume=resume, device=device))
    say(f"baseline: val loss {loss_text(summary['val_loss'])}")
    clock.stage("assemble", lambda: assemble(run_dir))


def run_pipeline(
    run_dir: str | Path,
    config: Callable[[], dict],
    *,
    resume: bool = False,
    overwrite: bool = False,
    modes: Sequence[str] | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    say: Say = lambda message: None,
) -> RunResult:
    """Every stage of a run into ``run_dir``. ``config`` is called only when the run is prepared
    (a resumed run keeps the configuration it was prepared with)."""
    device = torch.device("cpu") if device is None else device
    clock = StageClock(run_dir, resume, say)
    if resume and (Path(run_dir) / "config.json").is_file():
        say(f"prepare: resuming, {run_dir} stays as prepared")  # preparing again would replace what is trained
    else:
        clock.stage("prepare", lambda: say(f"data: {json.dumps(prepare(config(), run_dir, overwrite))}"))
    check_modes(modes or (), read_run_config(run_dir).kind)  # before minutes of training, not after
    train_stages(run_dir, clock, resume, device)
    report = clock.stage("eval", lambda: evaluate(run_dir, modes=modes, device=device, dtype=dtype))
    write_evaluation(report, run_dir)
    return RunResult(report, clock.timings)


def sample_text(run_dir: str | Path, seed: int, device: torch.device, dtype: torch.dtype | None) -> str:
    """60 tokens of the mixture-routed ensemble from an empty prompt (64 sampler steps on the masked path)."""
    kind = read_run_config(run_dir).kind
    ensemble = kind.load_ensemble(run_dir, device, dtype=dtype)
    return kind.generate(ensemble, "", GenerationRequest(max_new_tokens=60, seed=seed)).texts[0]
