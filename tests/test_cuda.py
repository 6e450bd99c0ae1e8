"""CUDA: the stacked engine, decoding, training and the bench on a GPU (skipped without one).

Figures on a GPU come from `dfm bench --device cuda`; these tests check that every CUDA path runs
and agrees with the CPU: in float32 up to kernel differences, in bfloat16 (the CUDA default for
inference) up to bf16 rounding, as transformers' own bf16 forward is.
"""

import json

import pytest
import torch

from dfm.cli import main
from dfm.mixing import uniform_log_prior
from models.ensemble import Ensemble
from models.generation import generate_text
from tests.test_generation import ROW_PROMPTS, K, tiny_expert, tiny_router, word_tokenizer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = torch.device("cuda")


def ensemble(device, dtype=torch.float32, engine="auto"):
    experts = [tiny_expert(s).to(device, dtype) for s in range(K)]
    return Ensemble(
        experts, uniform_log_prior(K), router=tiny_router(K).to(device), tokenizer=word_tokenizer(), engine=engine
    )


@pytest.mark.parametrize("routing,k", [("mixture", None), ("topk", 1), ("topk", 2)])
def test_float32_decoding_on_the_gpu_gives_the_cpu_tokens(routing, k):
    """Greedy, float32 (TF32 matmuls are off by default): the same tokens as on the CPU, log-probs
    within 1e-3 (kernels sum in other orders)."""
    options = dict(routing=routing, k=k, max_new_tokens=16, temperature=0, stop_at_eos=False)
    cpu = generate_text(ensemble(torch.device("cpu")), ROW_PROMPTS, **options)
    gpu = generate_text(ensemble(GPU), ROW_PROMPTS, **options)
    assert gpu.token_ids == cpu.token_ids
    for a, b in zip(gpu.token_log_probs, cpu.token_log_probs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_compiled_decoding_step_on_the_gpu_gives_the_eager_tokens():
    """``Ensemble.compile`` on the GPU (Triton kernels): the eager GPU tokens, log-probs within 1e-3."""
    eager, compiled = ensemble(GPU), ensemble(GPU)
    compiled.compile()
    for routing, k in (("mixture", None), ("topk", 1)):
        options = dict(routing=routing, k=k, max_new_tokens=16, temperature=0, stop_at_eos=False)
        ours, theirs = generate_text(compiled, ROW_PROMPTS, **options), generate_text(eager, ROW_PROMPTS, **options)
        assert ours.token_ids == theirs.token_ids
        for a, b in zip(ours.token_log_probs, theirs.token_log_probs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-3, rtol=0)


def test_bfloat16_stacked_engine_on_the_gpu_errs_like_transformers_bfloat16():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 40, (3, 10), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0

    def log_probs(device, dtype, engine):
        pool = ensemble(device, dtype, engine)
        return torch.stack(
            [
                pool.next_token_log_probs(tokens[:, :t].to(device), mask[:, :t].to(device), [0, 1, 2]).float().cpu()
                for t in range(5, 11)
            ]
        )

    exact = log_probs(torch.device("cpu"), torch.float32, "hf")
    ours, theirs = log_probs(GPU, torch.bfloat16, "auto"), log_probs(GPU, torch.bfloat16, "hf")
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max()


def test_sampling_draws_on_the_gpu_and_repeats_with_the_seed():
    pool = ensemble(GPU)
    first, second = (generate_text(pool, ROW_PROMPTS, routing="mixture", max_new_tokens=12, seed=3) for _ in range(2))
    assert first.token_ids == second.token_ids


@pytest.mark.slow
def test_a_run_trains_evaluates_and_generates_on_the_gpu(tmp_path, capsys):
    from tests.tiny_config import write_tiny_config

    run = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--out",
                str(run),
                "--config",
                str(write_tiny_config(tmp_path)),
                "--modes",
                "mixture",
                "top1",
                "--device",
                "cuda",
            ]
        )
        == 0
    )
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["models"]["mixture"]["bpb"] > 0
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--device", "cuda", "--max-new-tokens", "8", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"][0]) <= 8


@pytest.mark.slow
def test_quick_bench_on_the_gpu(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cuda", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["machine"]["device"].startswith("cuda") and results["machine"]["gpu"]
    assert results["training"]["precision"] == "bf16 autocast"
    assert results["ratios"]["top1_vs_generate"] > 0
