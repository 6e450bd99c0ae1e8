"""`dfm scaling`: the pipeline over a ladder of training budgets and numbers of experts on one
corpus, so that the equivalence is measured as a function of compute (README, "Scaling").

A rung is (seed, K, budget). Its budget is a multiple of the configured branch phase: ``budget x
expert.train.steps x partition.num_clusters`` optimizer steps in all, split over the rung's K
experts as ``expert.allocation`` says (evenly by default), or, when the configuration sizes
experts in ``expert.epochs``, ``budget x epochs`` passes over each expert's shard; either way
every K of one budget spends the same branch compute and K = 1 is one expert on all the data,
the baseline's twin. The baseline is compute-matched to each rung as `dfm run` matches it.
Shared work is done once:

- ``OUT/prepared/seedS-kK``: the documents, the partition and the shards for K clusters (made
  once per seed and K). The one for the configured K trains the tokenizer and the seed model;
  the others reuse that tokenizer, and every rung of the seed branches from that seed model.
- ``OUT/rungs/seedS-kK-bB``: one run directory per rung (its data and seed model linked, the
  rest its own), which `dfm eval`, `dfm generate` and `dfm bench --run` accept.
- ``OUT/study.json``: the configuration and the rungs asked for so far (a resumed study may add
  rungs); ``OUT/scaling.json``, ``scaling.md`` and ``scaling.png`` are rewritten after every rung.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dfm.atomic import write_json
from dfm.errors import DfmError
from dfm.progress import progress
from eval.pipeline import Say, StageClock, evaluate, minutes, train_stages, write_evaluation
from eval.report import check_modes
from eval.scaling_report import summarize, write_study_report
from training.allocation import with_steps
from training.config import read_run_config
from training.layout import RunLayout
from training.lm_training import train_seed_model
from training.prepare import prepare
from training.run_config import RunConfig

STUDY_FORMAT = "dfm-scaling"
#: What each rung scores by default on the autoregressive path (centroid's tf-idf pass is slow).
STUDY_MODES = ("mixture", "top1", "bayes", "oracle")


@dataclass(frozen=True)
class Rung:
    seed: int
    experts: int
    budget: float

    @property
    def name(self) -> str:
        return f"seed{self.seed}-k{self.experts}-b{self.budget:g}"

    def to_dict(self) -> dict:
        return {"seed": self.seed, "experts": self.experts, "budget": self.budget}


@dataclass(frozen=True)
class Ladder:
    """Budgets (multiples of the branch phase) x numbers of experts x seeds."""

    budgets: tuple[float, ...]
    experts: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)

    def validate(self) -> None:
        for flag, values in (("--budgets", self.budgets), ("--experts", self.experts), ("--seeds", self.seeds)):
            if not values:
                raise DfmError(f"{flag} is empty: give at least one value, e.g. {flag} 1")
            if flag != "--seeds" and list(values) != sorted(set(values)):
                given = " ".join(f"{v:g}" for v in values)
                raise DfmError(f"{flag} {given} is not increasing: list each value once, smallest first")
            if len(set(values)) != len(values):
                raise DfmError(f"{flag} repeats a value: list each value once")
        if min(self.budgets) <= 0:
            raise DfmError(f"--budgets must be positive multiples of the branch phase, got {min(self.budgets):g}")
        if min(self.experts) < 1:
            raise DfmError(f"--experts must be at least 1 (K = 1 is the control), got {min(self.experts)}")

    def rungs(self) -> list[Rung]:
        """Cheapest first within a seed, so the first figures come early."""
        return [Rung(s, k, b) for s in self.seeds for b in self.budgets for k in self.experts]


def expert_train(config: RunConfig, rung: Rung) -> dict:
    """The training options of each of the rung's experts: its share of ``budget`` branch phases."""
    train = config.expert.train
    return with_steps(train, max(1, round(rung.budget * train["steps"] * config.partition.num_clusters / rung.experts)))


def rung_expert(config: RunConfig, rung: Rung) -> dict:
    """What the rung changes in the expert section: ``expert_train``'s steps, or, when the study
    sizes experts in ``expert.epochs``, ``budget`` times those passes over each expert's own shard
    (the same total for every K)."""
    if config.expert.epochs is not None:
        return {"epochs": rung.budget * config.expert.epochs}
    return {"train": expert_train(config, rung)}


def _rung_size(config: RunConfig, rung: Rung) -> str:
    if config.expert.epochs is not None:
        return f"{rung.budget * config.expert.epochs:g} epoch(s) of its shard per expert"
    split = " on average, split by training tokens" if config.expert.allocation == "tokens" else ""
    return f"{expert_train(config, rung)['steps']} steps per expert{split}"


class Study:
    """Where a study lives and what it has done (module docstring)."""

    def __init__(self, out: str | Path, config: RunConfig, say: Say):
        self.out = Path(out)
        self.config = config
        self.say = say

    def prepared(self, seed: int, experts: int) -> Path:
        return self.out / "prepared" / f"seed{seed}-k{experts}"

    def home(self, seed: int) -> Path:
        """Where the seed's tokenizer and seed model are made: the prepared run of the configured K."""
        return self.prepared(seed, self.config.partition.num_clusters)

    def rung_dir(self, rung: Rung) -> Path:
        return self.out / "rungs" / rung.name

    def _config_for(self, seed: int, experts: int) -> RunConfig:
        data = self.config.to_dict()
        data["seed"] = seed
        data["partition"]["num_clusters"] = experts
        if experts != self.config.partition.num_clusters:
            data["tokenizer"]["path"] = str(RunLayout.of(self.home(seed)).tokenizer.resolve())
        return RunConfig.from_dict(data)

    def prepare(self, seed: int, experts: int) -> Path:
        """The prepared documents, partition and shards of ``experts`` clusters (once)."""
        path = self.prepared(seed, experts)
        if not RunLayout.of(path).config.is_file():
            self.say(f"prepare: seed {seed}, {experts} cluster(s) ...")
            try:
                summary = prepare(self._config_for(seed, experts), path, overwrite=True)
            except DfmError as err:  # the study's K is an --experts value
                raise DfmError(f"--experts {experts}: {str(err).replace('--num-clusters', '--experts')}") from err
            self.say(f"prepare: sizes {summary['sizes']}, purity {summary['purity']:.3f}")
        return path

    def seed_model(self, seed: int, device: torch.device) -> None:
        """The seed model every rung of ``seed`` branches from (once; resumable)."""
        home = self.home(seed)
        if read_run_config(home).seed_model.trained and RunLayout.of(home).read_summary("seed") is None:
            self.say(f"seed model of seed {seed} ...")
            summary = train_seed_model(home, resume=True, device=device)
            self.say(f"seed model: {summary['steps']} steps in {minutes(summary['seconds'])}")

    def make_rung(self, rung: Rung) -> Path:
        """The rung's run directory: data linked from its prepared run, the seed model from the
        seed's home, tokenizer and partition copied, and its own config.json (written last)."""
        path = self.rung_dir(rung)
        layout = RunLayout.of(path)
        if layout.config.is_file():
            return path
        base = RunLayout.of(self.prepared(rung.seed, rung.experts))
        home = RunLayout.of(self.home(rung.seed))
        path.mkdir(parents=True, exist_ok=True)
        links = [(base.root / "data", path / "data")]
        if home.seed_model.is_dir():
            links.append((home.seed_model, layout.seed_model))
            layout.summary("seed").parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(home.summary("seed"), layout.summary("seed"))
        for target, link in links:
            if not link.is_symlink():
                link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
        for source, copy in ((base.tokenizer, layout.tokenizer), (base.partition, layout.partition)):
            shutil.copytree(source, copy, dirs_exist_ok=True)
        config = read_run_config(base.root).to_dict()
        config["expert"].update(rung_expert(self.config, rung))
        write_json(layout.config, config)
        return path


def _study_config(out: Path, config: Callable[[], RunConfig], resume: bool, overwrite: bool, say: Say) -> tuple:
    """The study's configuration and the rungs it asked for before (none for a new study)."""
    record = out / "study.json"
    if record.is_file() and resume:
        saved = json.loads(record.read_text())
        if saved.get("format") != STUDY_FORMAT:
            raise DfmError(f"{record} is not a dfm scaling study: choose another --out")
        say(f"resuming {out}: the configuration stays as the study started it; new rungs are added")
        return RunConfig.from_dict(saved["config"]), [Rung(**r) for r in saved["rungs"]]
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DfmError(
                f"{out} is not empty: pass --resume to continue the study there (or add rungs to it), "
                f"--overwrite to start it again, or choose another --out"
            )
        shutil.rmtree(out)
    return config(), []


def run_study(
    out: str | Path,
    config: Callable[[], RunConfig],
    ladder: Ladder,
    *,
    resume: bool = False,
    overwrite: bool = False,
    modes: Sequence[str] | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    say: Say = lambda message: None,
) -> dict:
    """Every rung of ``ladder`` into ``out``, finished rungs kept; returns the study's summary."""
    ladder.validate()
    out = Path(out)
    device = torch.device("cpu") if device is None else device
    base, earlier = _study_config(out, config, resume, overwrite, say)
    base.validate()
    if modes is None and not base.is_masked:
        modes = STUDY_MODES
    check_modes(modes or (), base.kind)
    rungs = list(dict.fromkeys([*earlier, *ladder.rungs()]))
    study = Study(out, base, say)
    write_json(
        out / "study.json",
        {"format": STUDY_FORMAT, "version": 1, "config": base.to_dict(), "rungs": [r.to_dict() for r in rungs]},
    )
    for seed in sorted({r.seed for r in rungs}):  # every partition before any training: bad K fails early
        study.prepare(seed, base.partition.num_clusters)
        for k in sorted({r.experts for r in rungs if r.seed == seed}):
            study.prepare(seed, k)
    results = [rung_result(r, study.rung_dir(r)) for r in rungs if _finished(study.rung_dir(r))]
    todo = [r for r in rungs if not _finished(study.rung_dir(r))]
    say(f"{len(rungs)} rung(s): {len(results)} finished, {len(todo)} to train")
    bar = progress(total=sum(r.budget for r in todo), desc="scaling ladder", unit="branch phase")
    with bar:
        for rung in todo:
            study.seed_model(rung.seed, device)
            path = study.make_rung(rung)
            say(f"rung {rung.name}: {_rung_size(base, rung)}")
            started = time.perf_counter()
            clock = StageClock(path, resume=True, say=lambda message, name=rung.name: say(f"{name}: {message}"))
            train_stages(path, clock, resume=True, device=device, seed_model=False)
            report = clock.stage("eval", lambda path=path: evaluate(path, modes=modes, device=device, dtype=dtype))
            write_evaluation(report, path)
            results.append(rung_result(rung, path))
            say(f"rung {rung.name} done in {minutes(time.perf_counter() - started)}")
            write_study_report(summarize(results, base.partition.num_clusters), out)
            bar.update(rung.budget)
    summary = summarize(results, base.partition.num_clusters)
    write_study_report(summary, out)
    return summary


def _finished(path: Path) -> bool:
    return (RunLayout.of(path).eval / "report.json").is_file()


def rung_result(rung: Rung, path: Path) -> dict:
    """One rung's figures from its report.json, logs and timings."""
    layout = RunLayout.of(path)
    report = json.loads((layout.eval / "report.json").read_text())
    baseline = report["models"]["baseline"]["bpb"]
    matching = report["compute"]["matching"]
    steps = [(layout.read_summary(f"expert-{e}") or {}).get("steps") for e in range(rung.experts)]
    timings = json.loads(layout.timings.read_text()) if layout.timings.is_file() else {}
    return {
        **rung.to_dict(),
        "name": rung.name,
        "run": str(path),
        "expert_steps": steps[0] if len(set(steps)) == 1 else steps,  # a list when allocation split them
        "baseline_steps": (layout.read_summary("baseline") or {}).get("steps"),
        "flops": {
            "seed": matching["seed_flops"],
            "experts": matching["experts_flops"],
            "decentralized": matching["decentralized_flops"],
            "baseline": matching["baseline_flops"],
            "total": matching["seed_flops"] + matching["decentralized_flops"],
        },
        "baseline_bpb": baseline,
        "ratios": {
            name: model["bpb"] / baseline
            for name, model in report["models"].items()
            if name != "baseline" and not name.startswith("expert-")
        },
        "equivalence": {
            mode: {key: value[key] for key in ("verdict", "delta_bpb", "ci95", "margin")}
            for mode, value in report.get("equivalence_by_mode", {}).items()
        },
        "seconds": round(sum(timings.values()), 1),
    }
