"""`dfm scaling` end to end on tiny models: the files, the K = 1 control, exact compute sharing
between K at one budget, rungs as run directories, resume after a kill, and bad ladders."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dfm.cli import main
from eval.scaling import Rung, rung_expert, rung_result
from eval.scaling_report import crossing, fit_trend, reach, steps_text
from tests.tiny_config import TINY_RUN, write_tiny_config
from training.config import parse_override, resolve_config

LADDER = ["--budgets", "1", "2", "--experts", "1", "2"]
BRANCH_STEPS = TINY_RUN["expert"]["train"]["steps"] * TINY_RUN["partition"]["num_clusters"]


def _study(out: Path, config: Path, *extra: str) -> list[str]:
    return ["--quiet", "scaling", "--out", str(out), "--config", str(config), *LADDER, *extra]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    config = write_tiny_config(root)
    assert main(_study(root / "study", config)) == 0
    return root / "study", config


def _rungs(out: Path) -> dict:
    return {r["name"]: r for r in json.loads((out / "scaling.json").read_text())["rungs"]}


def test_a_study_writes_its_report_and_every_rung_is_a_run(study, capsys):
    out, _ = study
    for name in ("scaling.json", "scaling.md", "scaling.png", "study.json"):
        assert (out / name).stat().st_size > 0
    rungs = _rungs(out)
    assert sorted(rungs) == ["seed0-k1-b1", "seed0-k1-b2", "seed0-k2-b1", "seed0-k2-b2"]
    for r in rungs.values():  # the budget is in total expert steps, split over K
        assert r["expert_steps"] == round(r["budget"] * BRANCH_STEPS / r["experts"])
    # one budget, the same branch compute whatever K (same tokens per step, same architecture)
    for budget in (1, 2):
        k1, k2 = rungs[f"seed0-k1-b{budget}"], rungs[f"seed0-k2-b{budget}"]
        assert k1["flops"]["experts"] == k2["flops"]["experts"]
    # every rung branches from one seed model and reads one tokenizer
    seeds = {(out / "rungs" / name / "seed").resolve() for name in rungs}
    assert len(seeds) == 1
    tokenizers = {(out / "rungs" / name / "tokenizer" / "tokenizer.json").read_bytes() for name in rungs}
    assert len(tokenizers) == 1
    rung = out / "rungs" / "seed0-k2-b1"
    assert main(["generate", "--run", str(rung), "--prompt", "a", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_experts_of_unequal_steps_are_reported_each(study, tmp_path):
    """Under expert.allocation=tokens the experts of one rung train different steps: the rung's
    figures list each expert's, as its logs say, and scaling.md shows them as a/b."""
    out, _ = study
    rung = shutil.copytree(out / "rungs" / "seed0-k2-b1", tmp_path / "rung", symlinks=True)
    summary = rung / "logs" / "expert-1.summary.json"
    logged = json.loads(summary.read_text())
    steps = logged["steps"]
    summary.write_text(json.dumps({**logged, "steps": steps + 7}))
    assert rung_result(Rung(0, 2, 1), rung)["expert_steps"] == [steps, steps + 7]
    assert rung_result(Rung(0, 2, 1), out / "rungs" / "seed0-k2-b1")["expert_steps"] == steps
    assert steps_text([steps, steps + 7]) == f"{steps}/{steps + 7}" and steps_text(steps) == str(steps)


def test_the_one_expert_control_is_the_baselines_twin(study):
    """K = 1 is one expert on all the data against a baseline of the same start, data and steps:
    only the data order's seed differs. Measured 1.001x and 1.004x here, while K = 2 at this scale
    is 1.12-1.14x; 2% separates noise from a real gap."""
    out, _ = study
    rungs = _rungs(out)
    for budget in (1, 2):
        control = rungs[f"seed0-k1-b{budget}"]
        assert control["baseline_steps"] == control["expert_steps"]  # compute matching with no router
        assert control["flops"]["baseline"] == control["flops"]["decentralized"]
        assert abs(control["ratios"]["mixture"] - 1) <= 0.02, control["ratios"]
        assert control["equivalence"]["mixture"]["verdict"] == "equivalent"


@pytest.mark.slow
def test_a_killed_study_resumes_rung_by_rung_to_the_same_figures(study, tmp_path):
    """SIGKILL while the third rung trains; --resume keeps the finished rungs (never retrained)
    and ends with the figures of the study that was never interrupted."""
    whole, config = study
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-m", "dfm.cli", *_study(out, config)], env=env)
    third = out / "rungs" / "seed0-k1-b2" / "logs" / "expert-0.jsonl"
    deadline = time.monotonic() + 600
    while not third.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "the study ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = {n: (out / "rungs" / n / "eval" / "report.json").stat().st_mtime_ns for n in ("seed0-k1-b1",)}
    assert main(_study(out, config, "--resume")) == 0
    for name, mtime in finished.items():
        assert (out / "rungs" / name / "eval" / "report.json").stat().st_mtime_ns == mtime
    again, before = _rungs(out), _rungs(whole)
    for name in before:
        assert again[name]["ratios"] == before[name]["ratios"], name
        assert again[name]["flops"] == before[name]["flops"], name


def _error(capsys, argv) -> str:
    code = main(argv)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines ([dfm] ...), then the error
    errors = [line for line in err if not line.startswith("[dfm] ")]
    assert len(errors) == 1 and errors[0] == err[-1] and err[-1].startswith("dfm: error: "), err
    return err[-1]


def test_bad_ladders_are_refused_with_one_line(study, tmp_path, capsys):
    _, config = study
    base = ["scaling", "--out", str(tmp_path / "s"), "--config", str(config)]
    assert "not increasing" in _error(capsys, [*base, "--budgets", "2", "1"])
    assert "not increasing" in _error(capsys, [*base, "--experts", "2", "2"])
    assert "positive" in _error(capsys, [*base, "--budgets", "0", "1"])
    assert "--experts, not --num-clusters" in _error(capsys, [*base, "--num-clusters", "3"])
    assert "--seeds, not --seed" in _error(capsys, [*base, "--seed", "3"])
    message = _error(capsys, [*base, "--budgets", "1", "--experts", "500"])
    assert "--experts 500" in message and "at most" in message
    taken = _error(capsys, ["scaling", "--out", str(study[0]), "--config", str(config), "--budgets", "1"])
    assert "--resume" in taken
    for argv in ([*base, "--budgets"], [*base, "--no-such-option"]):  # argparse: usage, then one error line
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("dfm")


def test_a_rung_scales_epochs_by_its_budget_for_every_k_and_steps_by_budget_over_k(tmp_path):
    config = write_tiny_config(tmp_path)
    steps = resolve_config(config, [])
    assert rung_expert(steps, Rung(0, 2, 4))["train"]["steps"] == 4 * BRANCH_STEPS // 2
    epochs = resolve_config(config, [parse_override("expert.epochs=0.5")])
    assert rung_expert(epochs, Rung(0, 2, 4)) == rung_expert(epochs, Rung(0, 1, 4)) == {"epochs": 2.0}


def test_the_trend_and_its_crossings_are_exact_on_a_straight_line():
    xs = [10.0, 11.0, 12.0]
    fit = fit_trend(xs, [1.10 - 0.05 * (x - 10) for x in xs])
    assert fit["slope"] == pytest.approx(-0.05, abs=1e-12) and fit["slope_se"] == pytest.approx(0, abs=1e-9)
    assert reach(fit, 1.00)["log10_flops"] == pytest.approx(12.0, abs=1e-9)
    assert reach(fit, 0.97)["log10_flops"] == pytest.approx(12.6, abs=1e-9)
    assert reach(fit, 0.97)["status"] == "extrapolated"
    rising = fit_trend(xs, [1.0, 1.01, 1.02])
    assert reach(rising, 1.0)["status"] == "not reached"
    assert fit_trend([10.0], [1.0]) is None and reach(None, 1.0)["status"] == "no trend"
    groups = [
        {"total_flops": 10.0**x, "budget": 2**i, "ratios": {"mixture": {"mean": 1.05 - 0.05 * i}}}
        for i, x in enumerate(xs)
    ]
    measured = crossing(groups, fit, "mixture", 1.00)
    assert measured["status"] == "measured" and measured["budget"] == 2 and math.isclose(measured["flops"], 1e11)


def test_the_trends_uncertainty_grows_with_the_scatter():
    xs = [10.0, 11.0, 12.0, 13.0]
    tight = fit_trend(xs, [1.10, 1.05, 1.00, 0.95])
    loose = fit_trend(xs, [1.12, 1.03, 1.02, 0.93])
    assert tight["slope_se"] < 1e-9 < loose["slope_se"]
    assert reach(loose, 1.0)["log10_flops_se"] > 0
