"""One compute account: every FLOP of the decentralized side is charged (experts, router, the
experts' scoring of the router's training and validation documents), computed in one place
(training.lm_training.compute_matching) from the logged token counts, and shown once in report.json."""

import json
import math

import pytest

from dfm.cli import main
from models.expert import load_expert, num_parameters
from tests.tiny_config import write_tiny_config
from training.config import read_run_config
from training.data import load_saved
from training.layout import RunLayout
from training.lm_training import compute_matching, matched_steps


def _write(logs, name: str, summary: dict) -> None:
    (logs / f"{name}.summary.json").write_text(json.dumps(summary))


def test_the_account_is_the_logged_tokens_times_their_factors(tmp_path):
    """6 per trained parameter and token, 4 per frozen (LoRA base) one, 2 per scoring forward, the
    validation split's scoring included; the seed is reported but charged to neither side."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for k, tokens in enumerate((320, 480)):  # LoRA experts: a frozen base of 1000, an adapter of 10
        _write(
            logs,
            f"expert-{k}",
            {"parameters": 1000, "adapter_parameters": 10, "tokens": tokens, "branched_from": "seed"},
        )
    _write(
        logs,
        "router",
        {
            "parameters": 50,
            "tokens": 96,
            "scoring_parameters": 2 * 1010,
            "scoring_tokens": {"train": 700, "validation": 90},
        },
    )
    _write(logs, "baseline", {"parameters": 1000, "adapter_parameters": 10, "tokens": 1024})
    _write(logs, "seed", {"parameters": 1000, "adapter_parameters": 0, "tokens": 64})
    experts = (4 * 1000 + 6 * 10) * (320 + 480)
    router, scoring = 6 * 50 * 96, 2 * 2020 * (700 + 90)
    baseline = (4 * 1000 + 6 * 10) * 1024
    assert compute_matching(tmp_path, ["expert-0", "expert-1"]) == {
        "experts_flops": experts,
        "router_training_flops": router,
        "router_scoring_flops": scoring,
        "decentralized_flops": experts + router + scoring,
        "baseline_flops": baseline,
        "baseline_over_decentralized": baseline / (experts + router + scoring),
        "seed_flops": 6 * 1000 * 64,
        "seed_from": "seed",
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("accounting")
    assert (
        main(
            [
                "run",
                "--out",
                str(root / "run"),
                "--config",
                str(write_tiny_config(root)),
                "--set",
                "router.targets=bayes",
                "--set",
                "router.documents=1000",
            ]
        )
        == 0
    )  # targets the experts score
    return root / "run"


def _scored_tokens(run, split: str) -> int:
    """What the experts read of the router's ``split``: BOS and each document cut to a router
    sequence (every training document: the tiny run has fewer than ``router.documents``)."""
    config = read_run_config(run)
    documents = load_saved(RunLayout.of(run).documents, "documents")[split]
    assert split == "validation" or len(documents) <= config.router.documents
    return sum(min(len(ids), config.router.max_length - 1) + 1 for ids in documents["input_ids"])


def test_the_router_is_charged_for_scoring_its_validation_documents_too(run):
    layout = RunLayout.of(run)
    router = layout.read_summary("router")
    experts = sum(num_parameters(load_expert(layout.expert(k))) for k in range(3))
    scored = _scored_tokens(run, "train") + _scored_tokens(run, "validation")
    assert router["flops"] == 6 * router["parameters"] * router["tokens"] + 2 * experts * scored
    assert router["scoring_tokens"] == {
        "train": _scored_tokens(run, "train"),
        "validation": _scored_tokens(run, "validation"),
    }


def test_report_has_one_total_and_the_baseline_is_matched_to_it(run):
    layout = RunLayout.of(run)
    config = read_run_config(run)
    names = [f"expert-{k}" for k in range(3)]
    summaries = {name: layout.read_summary(name) for name in [*names, "router", "baseline"]}
    by_hand = sum(6 * summaries[name]["parameters"] * summaries[name]["tokens"] for name in names)
    by_hand += summaries["router"]["flops"]  # checked against its tokens above
    report = json.loads((layout.eval / "report.json").read_text())
    assert set(report["compute"]) == {"matching", "matching_problem", "inference_flops_per_token", "parameters"}
    assert report["compute"]["matching_problem"] is None
    assert report["compute"]["matching"] == compute_matching(run, names)
    assert report["compute"]["matching"]["decentralized_flops"] == by_hand
    # the baseline got the steps that match that total, validation scoring included
    per_step = 6 * summaries["baseline"]["parameters"] * 4 * config.expert.block_size  # batch 4, one rank
    assert config.expert.train["batch_size"] == 4
    assert summaries["baseline"]["steps"] == math.ceil(by_hand / per_step) == matched_steps(run, config, 1)
    without_validation = by_hand - 2 * summaries["router"]["scoring_parameters"] * _scored_tokens(run, "validation")
    assert math.ceil(without_validation / per_step) < summaries["baseline"]["steps"]  # the validation part counts
