"""Trying to break decentralized training: compute islands, SIGKILL at random moments, two
trainers of one model, damaged and malicious checkpoints, non-finite losses, impossible tokens,
and unsafe loading.

Fault injection: every kill in FAST_KILLS and SLOW_KILLS SIGKILLs a real `python -m dfm.cli`
training process of one stage (train-expert, train-router, train-baseline, train-seed) at a
seeded random point of the kind named; KILL_POINTS counts them. After the kills, `--resume` must
finish with weights, training log and summary bit-identical to an uninterrupted run of that
stage from the same start (CPU, one thread on both sides).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfm.cli import main
from dfm.decode import DecodeConfig, generate
from dfm.errors import DfmError
from dfm.routing import Routing
from models.ensemble import Ensemble
from models.manifest import ExpertEntry, Manifest, artifact_hashes, tokenizer_fingerprint
from models.tokenizer import load_tokenizer
from tests.tiny_config import TINY_RUN, write_tiny_config
from training.lock import lock_path, training_lock

REPO = Path(__file__).resolve().parents[1]
EXPERT = 1
STEPS = 40  # of expert 1
ROUTER_STEPS = 16
SEED_STEPS = 16
#: Steps of every expert that the router and the baseline start from; compute matching gives the
#: baseline as many (3 experts x EXPERTS_STEPS).
EXPERTS_STEPS = 8
#: Crash runs checkpoint after every step, so a kill often lands in a checkpoint write; dropout
#: makes the result depend on the restored RNG state too.
CRASH_SETTINGS = [
    f"expert.train.steps={STEPS}",
    f"router.train.steps={ROUTER_STEPS}",
    f"seed_model.train.steps={SEED_STEPS}",
    "expert.arch.attention_dropout=0.1",
    *(
        f"{section}.train.{option}=1"
        for section in ("expert", "router", "seed_model")
        for option in ("checkpoint_every", "log_every")
    ),
]


@dataclass(frozen=True)
class Stage:
    """One training command of the kill campaign: where it writes in a run, the fixture of the run
    it starts from (``start``) and of that run after the command ran uninterrupted (``reference``)."""

    name: str  # of its checkpoints, training log and summary
    command: tuple[str, ...]  # the dfm subcommand, then its options besides --run
    final: str  # run-relative directory of its final model
    start: str
    reference: str

    def args(self, run: Path, resume: bool = False) -> list[str]:
        return [self.command[0], "--run", str(run), *self.command[1:], *(["--resume"] if resume else [])]

    def model_dir(self, run: Path) -> Path:
        return run / self.final

    def checkpoints(self, run: Path) -> Path:
        return run / "checkpoints" / self.name

    def log(self, run: Path) -> Path:
        return run / "logs" / f"{self.name}.jsonl"

    def summary(self, run: Path) -> dict:
        return json.loads((run / "logs" / f"{self.name}.summary.json").read_text())

    def steps(self, run: Path) -> int:
        """The optimizer steps of this stage in a run where it finished."""
        return self.summary(run)["steps"]

    def save_leftovers(self, run: Path) -> set[str]:
        """What a final save (dfm.atomic.atomic_dir) leaves beside the model while it runs: .NAME.*.tmp, .NAME.old."""
        return {path.name for path in self.model_dir(run).parent.glob(f".{self.model_dir(run).name}.*")}


STAGES = (
    Stage(
        f"expert-{EXPERT}",
        ("train-expert", "--expert", str(EXPERT)),
        f"experts/expert-{EXPERT}",
        "prepared",
        "reference",
    ),
    Stage("router", ("train-router",), "router", "experts", "router_reference"),  # its experts score documents first
    Stage("baseline", ("train-baseline",), "baseline", "experts", "baseline_reference"),  # matched to the experts
    Stage("seed", ("train-seed-model",), "seed", "unseeded", "prepared"),
)
EXPERT_STAGE, ROUTER_STAGE, BASELINE_STAGE, SEED_STAGE = STAGES

KILL_SEED = 20240607
#: Kinds of kill points per stage; each entry is one SIGKILLed process. The fast test runs
#: FAST_KILLS, the slow one SLOW_KILLS (a fresh run of the stage each time). Step targets are
#: drawn with a seeded RNG, one in each of as many equal slices of the run as there are
#: step-based kills, in order.
FAST_KILLS = {
    f"expert-{EXPERT}": ("checkpoint-write", "after-step"),
    "router": ("checkpoint-write",),
    "baseline": ("final-save",),
    "seed": ("checkpoint-write",),
}
SLOW_KILLS = {
    f"expert-{EXPERT}": (
        "while-starting",
        "after-checkpoint",
        "checkpoint-write",
        "after-step",
        "checkpoint-write",
        "final-save",
    ),
    "router": ("while-starting", "after-step", "checkpoint-write", "final-save"),
    "baseline": ("while-starting", "after-checkpoint", "checkpoint-write", "after-step"),
    "seed": ("while-starting", "after-checkpoint", "after-step", "final-save"),
}
KILL_POINTS = sum(map(len, FAST_KILLS.values())) + sum(map(len, SLOW_KILLS.values()))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def set_train_option(run: Path, **options) -> None:
    """Edit the expert training options in a run's config.json, as a user may."""
    config = json.loads((run / "config.json").read_text())
    config["expert"]["train"].update(options)
    (run / "config.json").write_text(json.dumps(config))


def trained(start: Path, stage: Stage, dst: Path) -> Path:
    """A copy of ``start`` at ``dst`` after ``stage``'s command ran in this process, uninterrupted."""
    run = copy_run(start, dst)
    assert dfm(*stage.args(run)) == 0
    return run


@pytest.fixture(scope="module")
def unseeded(tmp_path_factory) -> Path:
    """A prepared run before its seed phase."""
    root = tmp_path_factory.mktemp("reliability")
    config = write_tiny_config(root)
    overrides = [arg for setting in CRASH_SETTINGS for arg in ("--set", setting)]
    assert dfm("prepare", "--out", str(root / "run"), "--config", str(config), *overrides) == 0
    return root / "run"


@pytest.fixture(scope="module")
def prepared(unseeded, tmp_path_factory) -> Path:
    """The run with its seed model: where every expert starts."""
    return trained(unseeded, SEED_STAGE, tmp_path_factory.mktemp("prepared") / "run")


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> Path:
    """Expert 1 trained in place, in this process, without interruption."""
    return trained(prepared, EXPERT_STAGE, tmp_path_factory.mktemp("reference") / "run")


@pytest.fixture(scope="module")
def experts(prepared, tmp_path_factory) -> Path:
    """Every expert trained, briefly: where the router and the baseline start."""
    run = copy_run(prepared, tmp_path_factory.mktemp("experts") / "run")
    set_train_option(run, steps=EXPERTS_STEPS)
    for k in range(TINY_RUN["partition"]["num_clusters"]):
        assert dfm("train-expert", "--run", str(run), "--expert", str(k)) == 0
    return run


@pytest.fixture(scope="module")
def router_reference(experts, tmp_path_factory) -> Path:
    return trained(experts, ROUTER_STAGE, tmp_path_factory.mktemp("router") / "run")


@pytest.fixture(scope="module")
def baseline_reference(experts, tmp_path_factory) -> Path:
    return trained(experts, BASELINE_STAGE, tmp_path_factory.mktemp("baseline") / "run")


def expert_dir(run: Path) -> Path:
    return EXPERT_STAGE.model_dir(run)


def checkpoint_root(run: Path) -> Path:
    return EXPERT_STAGE.checkpoints(run)


def assert_same_model(run: Path, reference: Path, stage: Stage = EXPERT_STAGE) -> None:
    """The stage's final model in ``run`` has the weights of the one in ``reference``, bit for bit."""
    ours = load_file(stage.model_dir(run) / "model.safetensors")
    theirs = load_file(stage.model_dir(reference) / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def log_records(run: Path, stage: Stage = EXPERT_STAGE) -> list[tuple]:
    """The training log without wall-clock times."""
    lines = stage.log(run).read_text().splitlines()
    return [tuple(sorted((k, v) for k, v in json.loads(line).items() if k != "seconds")) for line in lines]


def summary_without_time(run: Path, stage: Stage = EXPERT_STAGE) -> dict:
    return {key: value for key, value in stage.summary(run).items() if key != "seconds"}


#: Every dfm command here runs on one thread, in this process and in subprocesses alike: runs are
#: compared bit for bit, which holds per thread count, and on a busy 2-core machine two threads
#: drown in synchronisation (a tiny model's step takes ten times as long).
ONE_THREAD = ("--threads", "1")


def dfm(*args: str) -> int:
    """`dfm ARGS` in this process; its exit status."""
    return main([*ONE_THREAD, *args])


def dfm_command(*args: str) -> list[str]:
    """`dfm ARGS` as a command line for a subprocess."""
    return [sys.executable, "-m", "dfm.cli", *ONE_THREAD, *args]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def error_lines(stderr: str) -> list[str]:
    """Lines that are an error message; one glued behind a progress bar does not count."""
    return [line for line in stderr.splitlines() if line.startswith("dfm: error:")]


# --- 1. compute islands ---------------------------------------------------------------------------
ISLAND_FILES = ("config.json", "tokenizer", "seed", f"data/expert-{EXPERT}")


def make_island(run: Path, island: Path, parts: tuple[str, ...] | list[str] = ISLAND_FILES) -> Path:
    """What the coordinator ships to island k: the run config, the tokenizer, the seed model and shard k only."""
    for part in parts:
        source, target = run / part, island / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    return island


def readme_island_parts() -> list[str]:
    """The run-relative paths the README's rsync line ships to island 2 (each follows a `/./`)."""
    line = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("rsync -aR "))
    return [word.split("/./", 1)[1] for word in line.split() if "/./" in word]


@pytest.mark.slow
def test_readme_island_command_ships_what_an_island_needs(prepared, tmp_path) -> None:
    """The README's rsync line, run as written where rsync exists (else the same copy by hand),
    ships exactly ISLAND_FILES for expert 2; asked for expert 1, that island says which files it needs."""
    parts = readme_island_parts()
    assert parts == [part.replace(f"expert-{EXPERT}", "expert-2") for part in ISLAND_FILES]
    island = tmp_path / "island"
    if shutil.which("rsync"):
        demo = tmp_path / "runs" / "demo"
        shutil.copytree(prepared, demo)
        subprocess.run(
            ["rsync", "-aR", *[f"runs/demo/./{part}" for part in parts], f"{island}/"], cwd=tmp_path, check=True
        )
    else:
        make_island(prepared, island, parts)
    assert [p.name for p in (island / "data").iterdir()] == ["expert-2"]
    assert sorted(p.name for p in island.iterdir()) == ["config.json", "data", "seed", "tokenizer"]
    proc = subprocess.run(
        dfm_command("train-expert", "--run", str(island), "--expert", str(EXPERT)),
        env=subprocess_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (message,) = error_lines(proc.stderr)
    assert f"data shard of expert {EXPERT} not found" in message and f"data/expert-{EXPERT}/" in message


@pytest.mark.slow
def test_island_training_is_bit_identical_to_training_in_place(prepared, reference, tmp_path) -> None:
    island = make_island(prepared, tmp_path / "island")
    assert sorted(p.name for p in island.iterdir()) == ["config.json", "data", "seed", "tokenizer"]
    assert [p.name for p in (island / "data").iterdir()] == [f"expert-{EXPERT}"]
    proc = subprocess.run(
        dfm_command("train-expert", "--run", str(island), "--expert", str(EXPERT)),
        env=subprocess_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    home = copy_run(prepared, tmp_path / "home")  # back on the coordinator: copy the expert in
    shutil.copytree(expert_dir(island), expert_dir(home))
    assert_same_model(home, reference)
    for name in ("config.json", "model.safetensors"):  # the files themselves, not only the tensors
        assert (expert_dir(home) / name).read_bytes() == (expert_dir(reference) / name).read_bytes(), name
    assert log_records(island) == log_records(reference)


@pytest.mark.slow
def test_island_under_torchrun_writes_the_expert(prepared, tmp_path) -> None:
    """torchrun's own parser takes `--run` for its `--run-path`: the `--` separator is required."""
    island = make_island(prepared, tmp_path / "island")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dfm.cli",
        "--",
        "train-expert",
        "--run",
        str(island),
        "--expert",
        str(EXPERT),
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_file(expert_dir(island) / "model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    state = json.loads(max(checkpoint_root(island).glob("step-*/state.json")).read_text())
    assert state["step"] == STEPS and state["extra"]["world_size"] == 2


# --- 2. crash and resume ------------------------------------------------------------------------
def _temp_dirs(directory: Path, prefix: str) -> set[str]:
    try:
        return {n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".tmp")}
    except FileNotFoundError:
        return set()


def _checkpoint_steps(run: Path, stage: Stage = EXPERT_STAGE) -> list[int]:
    root = stage.checkpoints(run)
    return sorted(int(p.name[5:]) for p in root.glob("step-*")) if root.is_dir() else []


def _logged_step(run: Path, stage: Stage = EXPERT_STAGE) -> int:
    path = stage.log(run)
    step = 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                step = max(step, json.loads(line).get("step", 0))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return step


STEP_KINDS = ("after-step", "after-checkpoint", "checkpoint-write")


def plan_kills(kinds: tuple[str, ...], seed: int, steps: int) -> list[tuple[str, float]]:
    """(kind, target) per kill in a run of ``steps`` steps: a step for step-based kinds, seconds
    after launch for while-starting, nothing for final-save (there is only one final save)."""
    rng = random.Random(seed)
    slices = sum(kind in STEP_KINDS for kind in kinds)
    width = (steps - 1) // slices if slices else 0
    plan, used = [], 0
    for kind in kinds:
        if kind in STEP_KINDS:
            plan.append((kind, rng.randint(used * width + 1, (used + 1) * width)))
            used += 1
        else:
            plan.append((kind, rng.uniform(0.2, 1.5) if kind == "while-starting" else 0))
    return plan


class Trigger:
    """The moment of one kill point in a run of ``stage``; ``fire`` kills the process when it has come."""

    def __init__(self, kind: str, target: float, run: Path, stage: Stage, steps: int) -> None:
        self.kind, self.run, self.stage = kind, run, stage
        # a step target lies beyond the newest checkpoint and any step the killed run logged after it
        done = max([*_checkpoint_steps(run, stage), _logged_step(run, stage)])
        self.target = max(target, done + 1) if kind in STEP_KINDS else target
        assert self.target < steps or kind not in STEP_KINDS, "kill plan leaves no room"
        self.stale = self._temps()
        self.started = time.monotonic()

    def _temps(self) -> set[str]:
        """Temp dirs of checkpoints, or for final-save those of the final model."""
        if self.kind == "final-save":
            return {name for name in self.stage.save_leftovers(self.run) if name.endswith(".tmp")}
        return _temp_dirs(self.stage.checkpoints(self.run), ".step-")

    def _new_temp(self) -> str | None:
        """A temp dir of a checkpoint (at or after the target step) or of the final model being written now."""
        fresh = self._temps() - self.stale
        if self.kind != "final-save":
            fresh = {name for name in fresh if int(name[6:13]) >= self.target}
        return min(fresh, default=None)

    def fire(self, proc: subprocess.Popen) -> str | None:
        """Kill ``proc`` if this is the moment; returns a description of where it was hit."""
        if self.kind == "while-starting":
            if time.monotonic() - self.started >= self.target:
                step = _logged_step(self.run, self.stage)
                return self._kill(proc, f"{self.target:.2f}s after launch, logged step {step}")
        elif self.kind == "after-step":
            if _logged_step(self.run, self.stage) >= self.target:
                return self._kill(proc, f"after logging step {self.target}")
        elif self.kind == "after-checkpoint":
            if self.target in _checkpoint_steps(self.run, self.stage):
                return self._kill(proc, f"after checkpoint step {self.target}")
        elif self._new_temp() is not None:  # a write in progress: freeze it, make sure, then kill
            proc.send_signal(signal.SIGSTOP)
            _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once it is really stopped
            if not os.WIFSTOPPED(status):  # it exited just before
                proc.returncode = os.waitstatus_to_exitcode(status)
                return None
            temp = self._new_temp()
            if temp is not None:
                return self._kill(proc, f"while writing {temp}")
            proc.send_signal(signal.SIGCONT)  # the write finished in between: wait for the next one
        return None

    @staticmethod
    def _kill(proc: subprocess.Popen, where: str) -> str:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return where


def start_training(run: Path, stage: Stage, log: Path, resume: bool) -> subprocess.Popen:
    with open(log, "a") as handle:
        return subprocess.Popen(
            dfm_command(*stage.args(run, resume)), env=subprocess_env(), stdout=handle, stderr=handle, cwd=run.parent
        )


def kill_and_resume(
    run: Path, stage: Stage, kinds: tuple[str, ...], seed: int, steps: int, tmp: Path, attempts: int = 3
) -> list[str]:
    """SIGKILL ``stage``'s training once per kind, each time resuming the previous run, then resume
    to the end. A kill point the run finished without reaching is retried from a copy of the state
    before it. Every resume starts despite the lock file its killed predecessor left: no stale
    lock. The last resume runs in this process. Returns where each kill landed."""
    hits, log = [], tmp / "stderr.log"
    for number, (kind, target) in enumerate(plan_kills(kinds, seed, steps)):
        snapshot = copy_run(run, tmp / f"before-kill-{number}")
        for _ in range(attempts):
            trigger = Trigger(kind, target, run, stage, steps)
            proc = start_training(run, stage, log, resume=number > 0)
            where = None
            while where is None and proc.poll() is None:
                where = trigger.fire(proc)
                time.sleep(0.0005)
            if where is not None:
                assert proc.returncode == -signal.SIGKILL
                if kind != "while-starting":  # its lock file stays, its flock died with it: the next run goes on
                    assert lock_path(stage.checkpoints(run)).read_text().startswith(f"pid {proc.pid} ")
                hits.append(f"{kind}: {where}")
                break
            assert proc.returncode == 0, log.read_text()[-3000:]
            shutil.rmtree(run)  # finished before the kill point: retry from the same state
            copy_run(snapshot, run)
        else:
            pytest.fail(f"kill point {kind} never reached in {attempts} attempts: {hits}")
        shutil.rmtree(snapshot)
    print(f"{stage.name}:", *hits, sep="\n  ")  # where the kills landed (pytest -rP shows it)
    assert "Traceback" not in log.read_text()
    assert dfm(*stage.args(run, resume=True)) == 0  # in this process: a process start saved
    return hits


def assert_matches_reference(run: Path, reference: Path, stage: Stage = EXPERT_STAGE) -> None:
    """``stage`` ended in ``run`` as in its uninterrupted ``reference``, and left no partial writes."""
    assert_same_model(run, reference, stage)
    assert log_records(run, stage) == log_records(reference, stage)  # no lost, duplicated or torn log lines
    assert summary_without_time(run, stage) == summary_without_time(reference, stage)
    steps = stage.steps(reference)
    assert _checkpoint_steps(run, stage) == _checkpoint_steps(reference, stage) == [steps - 1, steps]
    # partial checkpoints and partial models of killed writers were cleaned up
    assert not _temp_dirs(stage.checkpoints(run), ".step-")
    assert not stage.save_leftovers(run)


def run_campaign(stage: Stage, kills: dict[str, tuple[str, ...]], seed: int, request, tmp: Path) -> None:
    """Kill a fresh run of ``stage`` at ``kills[stage.name]``, resume it, compare with the reference."""
    reference = request.getfixturevalue(stage.reference)
    run = copy_run(request.getfixturevalue(stage.start), tmp / "run")
    kinds = kills[stage.name]
    hits = kill_and_resume(run, stage, kinds, seed, stage.steps(reference), tmp)
    assert [hit.split(":")[0] for hit in hits] == list(kinds), hits
    assert_matches_reference(run, reference, stage)


def test_the_kill_campaign_covers_every_stage_and_write() -> None:
    """KILL_POINTS counts what the two tests below run: every stage, each killed in a checkpoint
    write and in its final save at least once."""
    assert list(FAST_KILLS) == list(SLOW_KILLS) == [stage.name for stage in STAGES]
    assert KILL_POINTS >= 20
    for stage in STAGES:
        assert {"checkpoint-write", "final-save"} <= {*FAST_KILLS[stage.name], *SLOW_KILLS[stage.name]}, stage.name
        for kills in (FAST_KILLS, SLOW_KILLS):  # a final save ends the run: nothing is left to kill after it
            assert "final-save" not in kills[stage.name][:-1], stage.name


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_sigkill_during_training_then_resume_is_bit_identical(stage, request, tmp_path) -> None:
    run_campaign(stage, FAST_KILLS, KILL_SEED + 2 * STAGES.index(stage), request, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_many_sigkills_then_resume_is_bit_identical(stage, request, tmp_path) -> None:
    run_campaign(stage, SLOW_KILLS, KILL_SEED + 2 * STAGES.index(stage) + 1, request, tmp_path)


def resume_in_process(run: Path, capsys) -> tuple[int, list[str]]:
    shutil.rmtree(expert_dir(run))
    code = dfm("train-expert", "--run", str(run), "--expert", str(EXPERT), "--resume")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("dfm: warning:")]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated weights", "flipped weight byte", "garbage state.json"])
def test_damaged_checkpoint_is_skipped_with_a_warning(reference, tmp_path, capsys, damage) -> None:
    run = copy_run(reference, tmp_path / "run")
    newest = checkpoint_root(run) / f"step-{STEPS:07d}"
    weights = newest / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flipped weight byte":  # header intact, so only the checksum can tell
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0x10
        weights.write_bytes(bytes(data))
    else:
        (newest / "state.json").write_text("{not json")
    code, warnings = resume_in_process(run, capsys)
    assert code == 0
    assert len(warnings) == 1 and f"skipping damaged checkpoint {newest}" in warnings[0], warnings
    assert_same_model(run, reference)  # redone from step 39, not loaded from the damaged step 40


@pytest.mark.slow
def test_malicious_optimizer_pickle_is_not_executed(reference, tmp_path, capsys) -> None:
    run = copy_run(reference, tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    newest = checkpoint_root(run) / f"step-{STEPS:07d}"
    torch.save({"optimizer": Payload()}, newest / "optim.pt")
    state = json.loads((newest / "state.json").read_text())  # a forger updates the checksum too
    state["sha256"]["optim.pt"] = hashlib.sha256((newest / "optim.pt").read_bytes()).hexdigest()
    (newest / "state.json").write_text(json.dumps(state))
    code, warnings = resume_in_process(run, capsys)
    assert code == 0 and not marker.exists()
    assert len(warnings) == 1 and "skipping damaged checkpoint" in warnings[0]
    assert_same_model(run, reference)


# --- 3. one trainer per model -------------------------------------------------------------------
def wait_for(condition, proc: subprocess.Popen, log: Path) -> None:
    """Poll until ``condition()`` holds while ``proc`` keeps running."""
    while not condition():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.01)


@pytest.mark.slow
def test_a_second_trainer_of_the_same_model_is_refused(unseeded, prepared, tmp_path) -> None:
    """A second `train-seed` on a run whose seed is in training (even with --resume) exits with one
    line naming the lock; the first, never interleaved with it, ends as an undisturbed run does."""
    run, log = copy_run(unseeded, tmp_path / "run"), tmp_path / "first.log"
    first = start_training(run, SEED_STAGE, log, resume=False)
    try:
        wait_for(lambda: _logged_step(run, SEED_STAGE) >= 1, first, log)
        first.send_signal(signal.SIGSTOP)  # frozen mid-training, holding the lock, whatever the second takes
        second = subprocess.run(
            dfm_command(*SEED_STAGE.args(run, resume=True)),
            env=subprocess_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    (message,) = error_lines(second.stderr)
    lock = lock_path(SEED_STAGE.checkpoints(run))
    assert f"dfm: error: seed is being trained by pid {first.pid} on " in message and str(lock) in message, message
    assert "wait for it to finish or stop it" in message
    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert_matches_reference(run, prepared, SEED_STAGE)


def test_the_lock_is_exclusive_and_released_on_exit(tmp_path) -> None:
    """Two opens of one lock file conflict even within a process (flock locks open files, not processes)."""
    path = tmp_path / "checkpoints" / "model.lock"
    with training_lock(path, "model"):
        with pytest.raises(DfmError, match=f"model is being trained by pid {os.getpid()} on .*{re.escape(str(path))}"):
            with training_lock(path, "model"):
                pass
    with training_lock(path, "model"):  # free again
        assert path.read_text().startswith(f"pid {os.getpid()} ")


# --- 4. numerical faults ------------------------------------------------------------------------
@pytest.mark.slow
def test_exploding_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(prepared, tmp_path, capsys) -> None:
    run = copy_run(prepared, tmp_path / "run")
    set_train_option(run, lr=1e30, warmup_steps=0)  # finite, accepted, and ruinous: step 2's loss is NaN
    for args in ([], ["--resume"]):  # resuming from the kept checkpoint reproduces the fault, never hides it
        assert dfm("train-expert", "--run", str(run), "--expert", str(EXPERT), *args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        kept = checkpoint_root(run) / "step-0000001"
        assert error_lines(err) == [f"dfm: error: non-finite loss at step 2; last good checkpoint kept at {kept}"]
    assert _checkpoint_steps(run) == [1] and not expert_dir(run).exists()
    assert all(torch.isfinite(t).all() for t in load_file(kept / "model.safetensors").values())


@pytest.mark.slow
def test_non_finite_learning_rate_is_refused_before_training(prepared, tmp_path, capsys) -> None:
    """An infinite lr used to pass validation and leave a checkpoint of inf weights called 'good'."""
    config = write_tiny_config(tmp_path)
    code = dfm("prepare", "--out", str(tmp_path / "p"), "--config", str(config), "--set", "expert.train.lr=.inf")
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "lr" in error_lines(err)[0], err
    run = copy_run(prepared, tmp_path / "run")
    set_train_option(run, lr=float("inf"))  # a hand-edited config.json
    assert dfm("train-expert", "--run", str(run), "--expert", str(EXPERT)) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "lr" in error_lines(err)[0], err
    for step_dir in checkpoint_root(run).glob("step-*"):  # whatever was kept must be finite
        assert all(torch.isfinite(t).all() for t in load_file(step_dir / "model.safetensors").values()), step_dir


class ImpossibleTokens:
    """A pool of fixed experts over 6 tokens; expert k gives token k probability 0 (and expert 0
    also token 5), so every token stays possible under the mixture of all of them."""

    num_experts = 3

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(self.num_experts, 6, generator=g, dtype=torch.float64)
        logits[torch.arange(3), torch.arange(3)] = float("-inf")
        logits[0, 5] = float("-inf")
        self.log_probs = torch.log_softmax(logits, -1)

    def next_token_log_probs(self, tokens, attention_mask, experts, rows=None):
        return self.log_probs[list(experts)].expand(tokens.shape[0], -1, -1)

    def prefix_log_likelihood(self, tokens, attention_mask, experts):
        return torch.zeros(tokens.shape[0], len(experts), dtype=torch.float64)


@pytest.mark.parametrize("routing", [Routing.MIXTURE, Routing.TOPK, Routing.BAYES, Routing.SWITCH])
def test_generation_survives_experts_that_rule_tokens_out(routing) -> None:
    pool = ImpossibleTokens()
    log_prior = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    tokens, mask = torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long)
    config = DecodeConfig(routing=routing, k=2, max_new_tokens=30)
    result = generate(
        pool,
        tokens,
        mask,
        config,
        weigher=lambda t, m: log_prior.expand(t.shape[0], -1),
        log_prior=log_prior,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.isfinite(result.token_log_probs).all()  # never samples a token of probability 0
    assert not result.weights.isnan().any()
    assert torch.allclose(result.weights.sum(-1), torch.ones_like(result.weights[..., 0]))
    if routing is Routing.BAYES:  # an expert that ruled out a generated token keeps weight 0 from then on
        ruled_out = torch.stack([pool.log_probs[:, new[:-1]].isinf().any(-1) for new in result.new_tokens])
        assert torch.equal(result.weights[:, -1] == 0, ruled_out)  # the last weights precede the last token
        assert ruled_out.any()


# --- safe loading -------------------------------------------------------------------------------
PACKAGES = ("dfm", "models", "training", "eval")


def _calls(tree: ast.AST):
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_no_unsafe_loading_in_the_package() -> None:
    unsafe = []
    files = [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 20
    for path in files:
        for call in _calls(ast.parse(path.read_text(), filename=str(path))):
            func = ast.unparse(call.func)
            where = f"{path.relative_to(REPO)}:{call.lineno}: {func}"
            weights_only = _keyword(call, "weights_only")
            if func == "torch.load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                unsafe.append(f"{where} without weights_only=True")
            if func in ("pickle.load", "pickle.loads", "load_pickle"):
                unsafe.append(where)
            remote = _keyword(call, "trust_remote_code")
            if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
                unsafe.append(f"{where} with trust_remote_code={ast.unparse(remote)}")
    assert not unsafe, unsafe


def fake_run(prepared: Path, root: Path, expert_path: str, *, tokenizer: str = "tokenizer") -> Path:
    """A run directory whose ensemble.json names one expert at ``expert_path`` (and records the
    sha256 of the tokenizer only: the expert may not exist yet, or lie outside the run)."""
    run = root / "run"
    shutil.copytree(prepared / "tokenizer", run / "tokenizer")
    vocab = load_tokenizer(run / "tokenizer").get_vocab()
    Manifest(
        experts=[ExpertEntry("expert-0", expert_path, 1.0)],
        tokenizer=tokenizer,
        tokenizer_fingerprint=tokenizer_fingerprint(vocab),
        vocab_size=len(vocab),
        sha256=artifact_hashes(run, ["tokenizer"]),
    ).save(run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("field,path", [("expert", "../../etc"), ("expert", "/etc"), ("tokenizer", "../tokenizer")])
def test_manifest_paths_cannot_escape_the_run_directory(prepared, tmp_path, capsys, field, path) -> None:
    shutil.copytree(prepared / "tokenizer", tmp_path / "tokenizer")  # a real tokenizer right outside
    run = fake_run(
        prepared,
        tmp_path,
        path if field == "expert" else "experts/expert-0",
        tokenizer=path if field == "tokenizer" else "tokenizer",
    )
    with pytest.raises(DfmError, match="outside the run directory") as err:
        Ensemble.from_run(run)
    assert str(run.resolve()) in str(err.value)
    assert dfm("generate", "--run", str(run), "--prompt", "x", "--max-new-tokens", "2") == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "outside the run directory" in lines[0] and str(run.resolve()) in lines[0]


@pytest.mark.slow
def test_weights_only_from_safetensors(prepared, tmp_path, capsys) -> None:
    """An expert directory holding only pytorch_model.bin (a pickle) is refused, and never unpickled."""
    run = fake_run(prepared, tmp_path, "experts/expert-0")
    expert = run / "experts" / "expert-0"
    expert.mkdir(parents=True)
    (expert / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 300,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"model.embed_tokens.weight": Payload()}, expert / "pytorch_model.bin")
    with pytest.raises(DfmError, match="expert-0"):
        Ensemble.from_run(run)
    assert dfm("generate", "--run", str(run), "--prompt", "x", "--max-new-tokens", "2") == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "expert-0" in lines[0], lines
    assert not marker.exists()


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_artifacts_honour_the_umask(tmp_path, umask, file_mode, dir_mode) -> None:
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the artifacts must end up as a plain
    write would leave them, so a teammate or a server under another user can read a run."""
    from dfm.atomic import atomic_dir, write_json

    previous = os.umask(umask)
    try:
        write_json(tmp_path / "config.json", {"a": 1})
        with atomic_dir(tmp_path / "model") as tmp:
            write_json(tmp / "inner.json", {})
            (tmp / "weights.bin").write_bytes(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "model").stat().st_mode & 0o777 == dir_mode
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "model").iterdir()} == {
        "inner.json": file_mode,
        "weights.bin": file_mode,
    }


@pytest.mark.slow
def test_a_prepared_run_is_readable_by_others(prepared) -> None:
    for path in (
        prepared / "config.json",
        prepared / "tokenizer",
        prepared / "seed" / "model.safetensors",
        prepared / "partition" / "stats.json",
    ):
        assert path.stat().st_mode & 0o004, f"{path} is not world-readable under umask 022"
