"""`dfm run --set path.kind=masked` end to end on a tiny corpus: masked seed, experts, noisy-state
router and baseline through the shared trainer; the ELBO report; the N-step sampler from the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

from dfm.cli import main
from dfm.errors import DfmError
from eval.masked_report import masked_nats
from models.masked_ensemble import MaskedEnsemble
from tests.resume import resumes_bit_identically
from tests.tiny_config import TINY_RUN
from training.config import resolve_config
from training.layout import RunLayout

TINY_MASKED_ARCH = {
    "model_type": "modernbert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("masked")
    config = copy.deepcopy(TINY_RUN)
    config["path"] = {"kind": "masked", "scheduler": "cosine"}
    config["expert"]["arch"] = TINY_MASKED_ARCH
    (root / "masked.json").write_text(json.dumps(config))
    assert main(["run", "--out", str(root / "run"), "--config", str(root / "masked.json")]) == 0
    return root / "run"


@pytest.mark.slow
def test_masked_run_writes_an_elbo_report_for_every_mode(masked_run, capsys):
    report = json.loads((masked_run / "eval" / "report.json").read_text())
    assert report["path"] == "masked" and report["bound"] == "elbo"
    assert set(report["models"]) == {
        "baseline",
        "expert-0",
        "expert-1",
        "expert-2",
        "mixture",
        "top1",
        "top2",
        "switch",
        "oracle",
    }
    assert report["equivalence"]["verdict"] in ("equivalent", "better", "worse", "inconclusive")
    assert report["compute"]["matching"]["baseline_over_decentralized"] == pytest.approx(1.0, abs=0.1)
    assert "ELBO bound" in (masked_run / "eval" / "report.md").read_text()
    manifest = json.loads((masked_run / "ensemble.json").read_text())
    assert manifest["extra"]["path"] == {"kind": "masked", "scheduler": "cosine"}
    # every model is a plain Hugging Face masked LM over the tokenizer plus the mask symbol
    expert = AutoModelForMaskedLM.from_pretrained(masked_run / "experts" / "expert-0")
    tokens = len(json.loads((masked_run / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    assert expert.config.model_type == "modernbert" and expert.config.vocab_size == expert.config.mask_token_id + 1
    assert expert.config.mask_token_id == tokens
    summaries = {name: RunLayout.of(masked_run).read_summary(name) for name in ("expert-0", "router", "baseline")}
    assert summaries["expert-0"]["branched_from"] == "seed"
    assert summaries["router"]["targets"] == "cluster (noisy states)" and summaries["router"]["scoring_flops"] == 0


@pytest.mark.slow
def test_eval_scores_all_models_on_the_same_draws(masked_run):
    """One expert alone in the ensemble: mixture, top1, switch and the expert itself see the same
    masked draws, so their ELBOs are equal to the last bit; the oracle of another cluster is not
    the same model, and differs (negative control)."""
    ensemble = MaskedEnsemble.from_run(masked_run)
    docs = [[5, 6, 7, 8, 9] * 3, [10, 11, 12]]
    one = MaskedEnsemble(
        [ensemble.experts[1]], None, tokenizer=ensemble.tokenizer, names=["expert-1"], path=ensemble.path
    )
    nats = masked_nats(
        one,
        None,
        docs,
        [0, 0],
        eos_id=ensemble.tokenizer.eos_token_id,
        block_size=32,
        modes=["mixture", "top1", "switch", "oracle"],
        samples=4,
        batch_size=2,
        seed=0,
    )
    for mode in ("mixture", "top1", "switch", "oracle"):
        assert torch.equal(nats[mode], nats["expert-1"])
    other = masked_nats(
        ensemble,
        None,
        docs,
        [0, 0],
        eos_id=ensemble.tokenizer.eos_token_id,
        block_size=32,
        modes=["oracle"],
        samples=4,
        batch_size=2,
        seed=0,
    )
    assert torch.equal(other["oracle"], other["expert-0"]) and not torch.equal(other["oracle"], other["expert-1"])
    again = masked_nats(
        ensemble,
        None,
        docs,
        [0, 0],
        eos_id=ensemble.tokenizer.eos_token_id,
        block_size=32,
        modes=["oracle"],
        samples=4,
        batch_size=2,
        seed=0,
    )
    assert torch.equal(again["oracle"], other["oracle"])  # seeded: the same report twice


@pytest.mark.slow
def test_every_mode_is_scored_on_the_same_draws_whatever_the_others(masked_run):
    """Documents over several rows and batches: mixture's ELBO is the same whether switch (which
    draws experts) is scored beside it or not; an oracle-only score needs no router."""
    ensemble = MaskedEnsemble.from_run(masked_run)
    eos = ensemble.tokenizer.eos_token_id
    docs, clusters = [list(range(5, 19)), [10, 11, 12], list(range(20, 31))], [0, 1, 2]
    options = dict(eos_id=eos, block_size=4, samples=3, batch_size=1, seed=1)
    alone = masked_nats(ensemble, None, docs, clusters, modes=["mixture"], **options)
    together = masked_nats(ensemble, None, docs, clusters, modes=["switch", "mixture", "top1", "oracle"], **options)
    assert torch.equal(alone["mixture"], together["mixture"])
    assert not torch.equal(together["mixture"], together["top1"])  # K = 3 experts really mix
    no_router = MaskedEnsemble.from_run(masked_run, load_router=False)
    oracle = masked_nats(no_router, None, docs, clusters, modes=["oracle"], **options)
    assert torch.equal(oracle["oracle"], together["oracle"])
    for k in range(3):  # the oracle of a document is its cluster's expert
        assert oracle["oracle"][k] == oracle[f"expert-{k}"][k]


@pytest.mark.slow
def test_generate_runs_the_n_step_sampler(masked_run, capsys):
    argv = ["generate", "--run", str(masked_run), "--prompt", "the", "--max-new-tokens", "12", "--json"]
    outputs = []
    for extra in (
        [],
        [],
        ["--seed", "5"],
        ["--routing", "switch", "--sampler-steps", "4"],
        ["--routing", "top1"],
        ["--routing", "oracle", "--cluster", "2"],
        ["--model", "expert-1", "--device", "cpu"],
    ):
        assert main(argv + extra) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == {**outputs[1], "seconds": outputs[0]["seconds"]}  # same seed, same text
    assert outputs[0]["token_ids"] != outputs[2]["token_ids"]
    assert outputs[3]["steps"] == 4 and outputs[0]["steps"] == 64
    for out in outputs:
        assert 1 <= len(out["token_ids"][0]) <= 12 and out["prompt_ids"] == outputs[0]["prompt_ids"]
    assert main(argv + ["--routing", "oracle", "--cluster", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] != outputs[5]["token_ids"]  # another expert
    assert (
        main(["generate", "--run", str(masked_run), "--max-new-tokens", "8", "--sampler-steps", "3", "--show-steps"])
        == 0
    )
    err = capsys.readouterr().err
    assert "step 1/3:" in err and "step 3/3:" in err and "_" in err.split("step 1/3:")[1].splitlines()[0]


MASKED_BAD_INPUTS = [
    (["generate", "--routing", "bayes"], "not available on the masked path"),
    (["generate", "--routing", "oracle"], "--cluster"),
    (["generate", "--top-p", "0.5"], "autoregressive runs only"),
    (["generate", "--sampler-steps", "0", "--max-new-tokens", "4"], "at least 1 step"),
    (["generate", "--max-new-tokens", "500"], "context"),
    (["generate", "--model", "baseline"], "--model baseline"),
    (["eval", "--modes", "bayes"], "not available on the masked path"),
    (["eval", "--stride", "4"], "--stride is for autoregressive runs"),
    (["eval", "--elbo-samples", "0"], "at least 1 sample"),
    (["generate", "--temperature", "-1"], "--temperature"),
    (["generate", "--temperature", "inf"], "--temperature"),
    (["generate", "--routing", "top1", "--k", "2"], "already says k = 1"),
    (["generate", "--compile"], "drop it for this masked run"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv,expected", MASKED_BAD_INPUTS, ids=[" ".join(a) for a, _ in MASKED_BAD_INPUTS])
def test_masked_bad_input_is_one_line(masked_run, argv, expected, capsys):
    assert main([argv[0], "--run", str(masked_run), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize(
    "override,expected",
    [
        ({"path": {"kind": "diffusion"}}, "path.kind"),
        ({"path": {"kind": "masked", "scheduler": "magic"}}, "unknown scheduler"),
        ({"path": {"kind": "masked"}, "expert": {"arch": {"model_type": "llama"}}}, "masked LM"),
        ({"path": {"kind": "masked"}, "seed_model": {"init_from": "gpt2"}}, "--init-from"),
        ({"expert": {"arch": {"model_type": "modernbert"}}}, "causal LM"),
        ({"path": {"kind": "masked"}, "router": {"targets": "bayes"}}, "learns the cluster from noisy states"),
        ({"path": {"kind": "masked"}, "router": {"temperature": "fit"}}, "router.temperature=null"),
    ],
)
def test_path_config_is_checked(override, expected):
    with pytest.raises(DfmError, match=expected):
        resolve_config(overrides=[override])


def test_masked_defaults_use_a_bidirectional_expert():
    config = resolve_config(overrides=[{"path": {"kind": "masked"}}, {"expert": {"arch": {"hidden_size": 64}}}])
    assert config.expert.arch["model_type"] == "modernbert" and config.expert.arch["hidden_size"] == 64
    assert config.expert.arch["local_attention"] == 8  # the neighbour prior (models.masked_expert)
    assert config.seed_model.train["lr"] == config.expert.train["lr"] == 1e-3
    ar = resolve_config()
    assert ar.expert.arch["model_type"] == "llama" and ar.expert.train["lr"] == 3e-3


@pytest.mark.slow
def test_masked_expert_resumes_bit_identically(masked_run, tmp_path):
    """Interrupted after its step-3 checkpoint, a masked expert resumes to the same weights: the
    masking draws come from the checkpointed generator."""
    assert resumes_bit_identically(masked_run, tmp_path, 2, "model.safetensors")
