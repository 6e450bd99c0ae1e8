"""The claim dfm exists for, asserted end to end: experts branched from a shared seed, combined by
the learned router, score within a margin of the compute-matched central baseline; the same
experts mixed without routing (prior weights) do not, so the assertion can fail."""

import json

import pytest

from dfm.cli import main
from eval.perplexity import mixed_token_log_probs, summarize
from models.ensemble import Ensemble
from models.scoring import expert_token_log_probs
from training.data import load_saved
from training.layout import RunLayout

#: Three synthetic domains, a seed phase, three experts, a Bayes-distilled router and the
#: compute-matched baseline, small enough for about a minute on two cores.
CONFIG = {
    "synthetic": {"num_domains": 3, "num_documents": 900, "seed": 0, "mean_length": 60},
    "tokenizer": {"vocab_size": 512},
    "partition": {"num_clusters": 3},
    "seed_model": {"train": {"steps": 200, "batch_size": 8, "warmup_steps": 10, "checkpoint_every": 0}},
    "expert": {
        "arch": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 192,
            "max_position_embeddings": 128,
        },
        "block_size": 128,
        "train": {"steps": 60, "batch_size": 8, "warmup_steps": 5, "checkpoint_every": 0},
    },
    "router": {
        "max_length": 128,
        "documents": 400,
        "train": {"steps": 100, "batch_size": 16, "warmup_steps": 5, "checkpoint_every": 0},
    },
}
#: The margin, as a fraction of the baseline's bits per byte. At this test's scale (60 steps per
#: expert) routed experts measured 1.074x the baseline and prior-weighted ones 1.398x: 15% lies
#: between them with room on both sides. The 2% claim of `dfm eval` is measured at the default
#: scale (README), not here.
MARGIN = 0.15


@pytest.mark.slow
def test_routed_experts_match_the_central_baseline_and_prior_weights_do_not(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--config", str(config)]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    baseline = report["models"]["baseline"]["bpb"]
    mixture = report["models"]["mixture"]["bpb"]
    assert mixture <= baseline * (1 + MARGIN), (mixture, baseline)

    # negative control: the same experts, mixed with the priors instead of the router
    ensemble = Ensemble.from_run(run)
    test = load_saved(RunLayout.of(run).documents, "documents")["test"]
    docs = list(test["input_ids"])
    expert_lps = expert_token_log_probs(
        ensemble.experts,
        docs,
        bos_id=ensemble.tokenizer.eos_token_id,
        context=report["context"],
        stride=report["stride"],
    )
    prior = [ensemble.log_prior.expand(len(d) + 1, -1) for d in docs]
    uniform = summarize([-lp for lp in mixed_token_log_probs(expert_lps, prior)], list(test["num_bytes"]))
    assert uniform["bpb"] > baseline * (1 + MARGIN), (uniform["bpb"], baseline)
