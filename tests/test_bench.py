"""eval/bench.py: correctness of the benchmark's plumbing, never its timings."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dfm.errors import DfmError
from eval import bench
from eval.partition_bench import ASSIGN_BATCH, CLUSTERS, HERE, TOPIC_IDS
from models.ensemble import Ensemble
from models.generation import generate_text
from models.manifest import tokenizer_fingerprint
from models.tokenizer import load_tokenizer
from models.weighers import RouterWeigher
from training.tokenizer_training import save_tokenizer

SECTIONS = {"machine", "peak", "training", "generation", "scaling", "masked", "scoring", "memory", "ratios"}
RATIOS = {
    "trainer_vs_hf_trainer",
    "trainer_vs_plain_loop",
    "top1_vs_generate",
    "switch_vs_generate",
    "mixture_vs_generate",
    "router_share",
    "top1_vs_generate_batch_2",
    "top1_fixed_rows_vs_generate_batch_2",
    "mixture_vs_generate_batch_2",
}


@pytest.fixture(scope="module")
def tokenizer():
    return bench.bench_tokenizer()


def _numbers(tree, path=""):
    """Every (path, number) leaf of a JSON tree (booleans and strings excluded)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_tokenizer_has_one_special_token_and_survives_saving(tokenizer, tmp_path):
    assert len(tokenizer) == bench.VOCAB_SIZE
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == bench.BOS
    assert tokenizer("t5 t2047", add_special_tokens=False)["input_ids"] == [5, 2047]
    save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert tokenizer_fingerprint(loaded.get_vocab()) == tokenizer_fingerprint(tokenizer.get_vocab())


def test_bench_run_directory_loads_and_generates_exactly_n_tokens(tokenizer, tmp_path):
    bench.write_bench_run(tmp_path / "run", 2, tokenizer)
    ensemble = Ensemble.from_run(tmp_path / "run")
    assert ensemble.num_experts == 2 and ensemble.router is not None
    built = bench.bench_ensemble(2, tokenizer)
    for loaded, fresh in zip(ensemble.experts, built.experts):
        for (name, a), b in zip(loaded.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), name
    out = generate_text(ensemble, [[1, 2, 3]], max_new_tokens=7, routing="mixture", temperature=0.0, stop_at_eos=False)
    assert len(out.token_ids[0]) == 7


def test_timed_router_weigher_returns_the_router_weights_and_counts_time(tokenizer):
    ensemble = bench.bench_ensemble(3, tokenizer)
    tokens = torch.tensor([[0, 5, 9, 11, 4]])
    mask = torch.ones_like(tokens)
    plain, timed = RouterWeigher(ensemble.router), bench.TimedRouterWeigher(ensemble.router)
    for t in (3, 4, 5):
        assert torch.equal(plain(tokens[:, :t], mask[:, :t]), timed(tokens[:, :t], mask[:, :t]))
    assert timed.seconds > 0


def test_chunk_seconds_is_the_median_per_step_time_of_chunks_after_warmup():
    # start at 0; the warm-up step ends at 10; then steps end at 11 12 | 14 16 | 17 18
    times = [0.0, 10.0, 11.0, 12.0, 14.0, 16.0, 17.0, 18.0]
    assert bench._chunk_seconds(times, warmup=1, chunk=2) == 1.0  # chunks of 1, 2, 1 s/step
    assert bench._chunk_seconds(times, warmup=1, chunk=3) == 4 / 3  # (14 - 10) / 3 and (18 - 14) / 3
    assert bench._chunk_seconds(times, warmup=3, chunk=2) == 1.5  # (16 - 12) / 2 = 2 and (18 - 16) / 2 = 1


def test_ratios_are_taken_between_figures_of_the_results():
    results = {
        "training": {
            "trainer": {"tokens_per_second": 300.0},
            "plain_loop": {"tokens_per_second": 400.0},
            "hf_trainer": {"tokens_per_second": 200.0},
        },
        "generation": {
            "batch_1": {
                "reference_generate": {"tokens_per_second": 100.0},
                "top1": {"vs_reference": 0.9, "router_share": 0.25},
                "switch": {"vs_reference": 0.8},
                "mixture": {"vs_reference": 0.5},
            }
        },
    }
    assert bench._ratios(results) == {
        "trainer_vs_hf_trainer": 1.5,
        "trainer_vs_plain_loop": 0.75,
        "top1_vs_generate": 0.9,
        "switch_vs_generate": 0.8,
        "mixture_vs_generate": 0.5,
        "router_share": 0.25,
    }
    results["training"]["hf_trainer"] = {"skipped": "pip install accelerate"}
    assert bench._ratios(results)["trainer_vs_hf_trainer"] is None


def test_peak_flops_are_positive():
    peak = bench.measure_peak(64, repeats=2)
    assert peak["fp32"] > 0
    assert peak["bf16"] is None or peak["bf16"] > 0


@pytest.mark.slow
def test_quick_bench_writes_every_section_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    results = bench.run_bench(quick=True, out=out, progress=False)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(results))
    # the bench runs on the threads it was given (`dfm --threads`; this worker's one) and leaves them
    assert written["machine"]["torch_threads"] == torch.get_num_threads() == 1
    assert SECTIONS <= set(written)
    assert set(written["ratios"]) == RATIOS
    assert all(written["ratios"][name] is not None for name in RATIOS)
    assert "tokens_per_second" in written["training"]["hf_trainer"]  # accelerate is in the test extra
    for mode in bench.MODES:
        assert written["generation"]["batch_1"][mode]["tokens_per_second"] > 0
    assert {f"k_{k}" for k in bench.QUICK.scaling} <= set(written["scaling"])
    assert set(written["masked"]["batch_1"]) == {
        f"{mode}_n{n}" for mode in ("mixture", "switch") for n in bench.MASKED_STEPS
    }
    numbers = {path: value for path, value in _numbers(written) if not path.startswith(".machine.load_average")}
    bad = {path: value for path, value in numbers.items() if not (math.isfinite(value) and value > 0)}
    assert not bad
    assert written["peak"]["bf16_flops"] is None or written["peak"]["bf16_flops"] > 0
    table = bench.format_table(results)
    for label in (
        "peak matmul fp32",
        "dfm trainer",
        "transformers.Trainer",
        "top1",
        "mixture",
        "scoring",
        "memory",
        "ratio router_share",
        "masked b=1 K=4 N=256: switch",
    ):
        assert label in table


@pytest.mark.slow
def test_prepare_bench_measures_fresh_processes(tmp_path):
    from eval.prepare_bench import bench_prepare, format_prepare_table

    results = bench_prepare([300, 200], tmp_path / "prepare.json")
    first, second = results["prepare"]
    assert (first["documents"], second["documents"]) == (200, 300)  # smallest first
    assert sum(second["cluster_sizes"]) == 300 - 2 * round(300 * 0.05)  # the child really prepared them
    assert 0 < first["peak_anonymous_mb"] <= first["peak_rss_mb"]
    assert second["rss_growth_vs_previous"] == second["peak_rss_mb"] / first["peak_rss_mb"]
    assert json.loads((tmp_path / "prepare.json").read_text()) == results
    assert len(format_prepare_table(results).splitlines()) == 4
    assert results["machine"]["source"] == str(HERE)  # the measured dfm is this checkout by default
    with pytest.raises(DfmError, match="at least 100"):
        bench_prepare([50])


@pytest.mark.slow
def test_prepare_vocab_bench_fits_and_assigns_in_fresh_processes(tmp_path):
    from eval.prepare_bench import bench_prepare, format_prepare_table
    from training.clustering import fit_kmeans

    results = bench_prepare([150, 100], tmp_path / "partition.json", vocab=CLUSTERS * TOPIC_IDS)
    assert json.loads((tmp_path / "partition.json").read_text()) == results
    assert [run["documents"] for run in results["partition"]] == [100, 150]  # smallest first
    for run in results["partition"]:
        fit, batch = run["fit"], run["batch"]
        # the fit child really partitioned them, within the default balance cap
        assert sum(fit["sizes"]) == run["documents"] and len(fit["sizes"]) == CLUSTERS
        balance = inspect.signature(fit_kmeans).parameters["balance"].default
        assert max(fit["sizes"]) <= math.ceil(balance * run["documents"] / CLUSTERS)
        assert 0 < fit["start_rss_mb"] <= fit["peak_rss_mb"] and 0 < batch["start_rss_mb"] <= batch["peak_rss_mb"]
        assert batch["documents"] == ASSIGN_BATCH and batch["assign_seconds"] > 0 and batch["log_weights_seconds"] > 0
        assert 0 <= fit["nmi"] <= 1 and 0 < batch["purity"] <= 1
        assert Path(run["module"]).is_relative_to(HERE) and run["scikit_learn"] is not None
    assert len(format_prepare_table(results).splitlines()) == 4
    with pytest.raises(DfmError, match="vocabulary of at least"):
        bench_prepare([100], vocab=100)


@pytest.mark.slow
def test_prepare_source_measures_the_checkout_it_is_given(tmp_path):
    from eval.partition_bench import check_source, measure_partition

    checkout = tmp_path / "checkout"
    for package in ("dfm", "models", "training"):
        shutil.copytree(HERE / package, checkout / package, ignore=shutil.ignore_patterns("__pycache__"))
    run = measure_partition(100, CLUSTERS * TOPIC_IDS, tmp_path / "work", check_source(checkout))
    assert Path(run["module"]) == (checkout / "training" / "clustering.py").resolve()
    with pytest.raises(DfmError, match="not a dfm checkout"):
        check_source(tmp_path / "work")


def test_prepare_options_need_prepare(tmp_path, capsys):
    from dfm.cli import main

    assert main(["bench", "--prepare-vocab", "150000", "--out", str(tmp_path / "b.json")]) != 0
    assert "--prepare-vocab and --prepare-source modify --prepare" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
