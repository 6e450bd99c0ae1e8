"""The comparison's own negative control: a baseline trained before the router spends less than
the decentralized side, and must come out as "unmatched", never as an ensemble that wins."""

import json

from dfm.cli import main
from eval.matching_check import check_matching, matching_problem
from tests.tiny_config import write_tiny_config


def test_a_baseline_trained_before_the_router_gets_no_verdict(tmp_path, capsys):
    config = write_tiny_config(tmp_path)
    run = str(tmp_path / "run")
    assert main(["prepare", "--out", run, "--config", str(config)]) == 0
    assert main(["train-seed-model", "--run", run]) == 0
    for k in range(3):
        assert main(["train-expert", "--run", run, "--expert", str(k)]) == 0
    capsys.readouterr()
    assert main(["train-baseline", "--run", run]) == 0  # charged for the experts only
    assert "the router is not trained yet" in capsys.readouterr().err
    assert main(["train-router", "--run", run]) == 0
    assert main(["assemble", "--run", run]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", run, "--modes", "mixture", "bayes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dfm: error: the baseline spent") and "not compute-matched" in err[-1]
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert {r["verdict"] for r in report["equivalence_by_mode"].values()} == {"unmatched"}
    assert report["equivalence"]["verdict"] == "unmatched"
    assert report["compute"]["matching"]["baseline_over_decentralized"] < 1
    assert "No verdict" in (tmp_path / "run" / "eval" / "report.md").read_text()


def test_the_check_flags_only_a_baseline_that_spent_less():
    assert matching_problem({"baseline_flops": 100, "decentralized_flops": 100}) is None
    assert matching_problem({"baseline_flops": 130, "decentralized_flops": 100}) is None  # harder, still fair
    assert "0.990x" in matching_problem({"baseline_flops": 99, "decentralized_flops": 100})
    assert matching_problem({"baseline_flops": 0, "decentralized_flops": 100}) is None  # nothing to check
    report = {
        "compute": {"matching": {"baseline_flops": 50, "decentralized_flops": 100}},
        "equivalence_by_mode": {"mixture": {"verdict": "better"}},
        "equivalence": {"verdict": "better"},
    }
    assert check_matching(report)["equivalence"]["verdict"] == "unmatched"
    assert report["equivalence_by_mode"]["mixture"]["verdict"] == "unmatched"
