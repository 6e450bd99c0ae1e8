"""The command line against a tiny run: generation, streaming, JSON, and every bad input a user
makes ending in one line on stderr and a non-zero exit (never a traceback), leaving the run as it was.

BAD_INPUTS is the table of cases tried; each row is (case, argv, expected message fragment). Bad
inputs that need a damaged run (truncated weights, a swapped file, an edited manifest) have tests of
their own on one shared copy of the run, each restoring what it damaged.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dfm.cli import main
from tests.tiny_config import TINY_RUN, write_tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = write_tiny_config(root)
    assert main(["run", "--out", str(root / "run"), "--config", str(config)]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "empty.jsonl").write_text("")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"body": f"words {i} here"}) for i in range(40)))
    (root / "few.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(12)))
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 20)
    (root / "bad.yaml").write_text("expert: [unclosed\n")
    (root / "nulls.jsonl").write_text("\n".join(json.dumps({"text": None if i % 2 else f"doc {i}"}) for i in range(40)))
    (root / "numbers.jsonl").write_text("\n".join(json.dumps({"text": i}) for i in range(40)))
    # 2 validation and 2 test documents are carved out: 26 training documents
    (root / "thirty.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} of thirty"}) for i in range(30)))
    return root


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_error_line(err: str) -> str:
    """The one `dfm: error:` line of ``err`` (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("dfm: error:")]
    assert len(lines) == 1, err
    return lines[0]


BAD_INPUTS = [
    ("missing run directory", ["generate", "--run", "{tmp}/nope", "--prompt", "x"], "does not exist"),
    ("unknown routing mode", ["generate", "--run", "{run}", "--routing", "best"], "unknown routing mode"),
    ("k larger than K", ["generate", "--run", "{run}", "--routing", "topk", "--k", "9"], "between 1 and the number"),
    ("k zero", ["generate", "--run", "{run}", "--routing", "topk", "--k", "0"], "between 1 and the number"),
    ("exclude every expert", ["generate", "--run", "{run}", "--exclude-expert", "0", "1", "2"], "exclude fewer"),
    ("exclude unknown expert", ["generate", "--run", "{run}", "--exclude-expert", "7"], "numbered"),
    ("oracle without cluster", ["generate", "--run", "{run}", "--routing", "oracle"], "--cluster"),
    (
        "oracle with a bad cluster",
        ["generate", "--run", "{run}", "--routing", "oracle", "--cluster", "5"],
        "not experts",
    ),
    (
        "max new tokens beyond the context",
        ["generate", "--run", "{run}", "--max-new-tokens", "500"],
        "--max-new-tokens",
    ),
    (
        "negative temperature",
        ["generate", "--run", "{run}", "--max-new-tokens", "5", "--temperature", "-1"],
        "temperature",
    ),
    ("top-p out of range", ["generate", "--run", "{run}", "--max-new-tokens", "5", "--top-p", "0"], "top-p"),
    (
        "centroid with one model",
        ["generate", "--run", "{run}", "--model", "baseline", "--routing", "centroid"],
        "--model ensemble",
    ),
    ("unknown model", ["generate", "--run", "{run}", "--model", "expert-9"], "not in"),
    ("missing prompt file", ["generate", "--run", "{run}", "--prompt-file", "{tmp}/nope.txt"], "--prompt-file"),
    ("json without data files", ["prepare", "--out", "{tmp}/p1", "--dataset", "json"], "--data-files"),
    (
        "missing data file",
        ["prepare", "--out", "{tmp}/p2", "--dataset", "json", "--data-files", "{tmp}/none.jsonl"],
        "not found",
    ),
    (
        "empty dataset",
        ["prepare", "--out", "{tmp}/p3", "--dataset", "json", "--data-files", "{files}/empty.jsonl"],
        "empty",
    ),
    (
        "wrong text column",
        ["prepare", "--out", "{tmp}/p4", "--dataset", "json", "--data-files", "{files}/docs.jsonl"],
        "--text-column",
    ),
    (
        "wrong cluster column",
        [
            "prepare",
            "--out",
            "{tmp}/p5",
            "--dataset",
            "json",
            "--data-files",
            "{files}/docs.jsonl",
            "--text-column",
            "body",
            "--cluster-column",
            "topic",
        ],
        "topic",
    ),
    (
        "fewer documents than clusters",
        [
            "prepare",
            "--out",
            "{tmp}/p6",
            "--dataset",
            "json",
            "--data-files",
            "{files}/few.jsonl",
            "--num-clusters",
            "20",
        ],
        "fewer documents",
    ),
    (
        "non-UTF-8 text file",
        ["prepare", "--out", "{tmp}/p7", "--dataset", "text", "--data-files", "{files}/latin1.txt"],
        "UTF-8",
    ),
    (
        "streamed file without the text column",
        ["prepare", "--out", "{tmp}/p8", "--dataset", "json", "--data-files", "{files}/docs.jsonl", "--streaming"],
        "--text-column",
    ),
    ("zero steps", ["prepare", "--out", "{tmp}/p9", "--steps", "0"], "steps must be positive"),
    ("non-finite learning rate", ["prepare", "--out", "{tmp}/p15", "--set", "expert.train.lr=.inf"], "finite"),
    ("negative clusters", ["prepare", "--out", "{tmp}/p10", "--num-clusters", "-2"], "num_clusters"),
    ("unknown config key", ["prepare", "--out", "{tmp}/p11", "--set", "expert.depth=3"], "unknown config key"),
    ("malformed override", ["prepare", "--out", "{tmp}/p12", "--set", "expert"], "key.sub=value"),
    ("missing config file", ["prepare", "--out", "{tmp}/p13", "--config", "{tmp}/none.yaml"], "not found"),
    ("invalid config file", ["prepare", "--out", "{tmp}/p14", "--config", "{files}/bad.yaml"], "not valid YAML"),
    ("train an expert before prepare", ["train-expert", "--run", "{tmp}/nothing", "--expert", "0"], "dfm prepare"),
    ("expert index out of range", ["train-expert", "--run", "{run}", "--expert", "7"], "between 0 and 2"),
    ("train again without --resume", ["train-expert", "--run", "{run}", "--expert", "0"], "--resume"),
    ("assemble before prepare", ["assemble", "--run", "{tmp}/nothing"], "dfm prepare"),
    ("train the seed again without --resume", ["train-seed-model", "--run", "{run}"], "--resume"),
    (
        "a seed model that does not exist",
        ["prepare", "--out", "{tmp}/p15", "--init-from", "{tmp}/no-model"],
        "--init-from",
    ),
    (
        "block longer than the context",
        ["prepare", "--out", "{tmp}/p16", "--set", "expert.block_size=4096"],
        "max_position_embeddings",
    ),
    (
        "shared fraction out of range",
        ["prepare", "--out", "{tmp}/p17", "--set", "seed_model.shared_fraction=0"],
        "shared_fraction",
    ),
    ("unknown router targets", ["prepare", "--out", "{tmp}/p18", "--set", "router.targets=magic"], "router.targets"),
    (
        "data files with and without splits",
        [
            "prepare",
            "--out",
            "{tmp}/p19",
            "--dataset",
            "json",
            "--data-files",
            "train={files}/docs.jsonl",
            "{files}/few.jsonl",
        ],
        "SPLIT=PATH",
    ),
    ("unknown eval mode", ["eval", "--run", "{run}", "--modes", "magic"], "unknown evaluation mode"),
    ("unknown eval split", ["eval", "--run", "{run}", "--split", "dev"], "no split"),
    ("zero threads", ["--threads", "0", "eval", "--run", "{run}"], "--threads must be a positive"),
    ("sampler steps on an autoregressive run", ["generate", "--run", "{run}", "--sampler-steps", "8"], "masked path"),
    ("ELBO draws on an autoregressive run", ["eval", "--run", "{run}", "--elbo-samples", "2"], "masked runs"),
    ("top1 with another k", ["generate", "--run", "{run}", "--routing", "top1", "--k", "2"], "already says k = 1"),
    ("a device this machine lacks", ["run", "--out", "{tmp}/r2", "--device", "cuda:7"], "CUDA"),
    ("an inference dtype dfm does not run", ["generate", "--run", "{run}", "--dtype", "float16"], "--dtype"),
    (
        "bench on a device this machine lacks",
        ["bench", "--quick", "--device", "cuda:7", "--out", "{tmp}/b.json"],
        "CUDA",
    ),
    (
        "train on something that is no device",
        ["train-expert", "--run", "{run}", "--expert", "0", "--resume", "--device", "banana"],
        "not a device",
    ),
    ("unknown path kind", ["prepare", "--out", "{tmp}/p20", "--set", "path.kind=diffusion"], "path.kind"),
    (
        "a masked mode for an autoregressive run",
        [
            "run",
            "--out",
            "{tmp}/r1",
            "--set",
            "synthetic.num_documents=100",
            "--vocab-size",
            "300",
            "--modes",
            "switch",
        ],
        "unknown evaluation mode",
    ),
    # sampling options out of range: seeds outside [0, 2^63 - 1], NaN and inf
    (
        "negative sampling seed",
        ["generate", "--run", "{run}", "--seed", "-1"],
        "--seed must be an integer from 0 to 2^63",
    ),
    ("sampling seed beyond 64 bits", ["generate", "--run", "{run}", "--seed", str(2**64)], "--seed must be an integer"),
    (
        "NaN temperature",
        ["generate", "--run", "{run}", "--temperature", "nan"],
        "--temperature must be a finite number",
    ),
    ("infinite temperature", ["generate", "--run", "{run}", "--temperature", "inf"], "--temperature must be a finite"),
    ("NaN top-p", ["generate", "--run", "{run}", "--top-p", "nan"], "--top-p must lie in (0, 1]"),
    (
        "an expert excluded twice",
        ["generate", "--run", "{run}", "--exclude-expert", "1", "1"],
        "--exclude-expert names expert 1 more than once",
    ),
    ("negative run seed", ["prepare", "--out", "{tmp}/p21", "--seed", "-1"], "config seed (--seed) must be an integer"),
    ("run seed beyond 64 bits", ["run", "--out", "{tmp}/r3", "--seed", str(2**64)], "from 0 to 2^63 - 1"),
    # text columns that do not hold text
    (
        "null texts",
        ["prepare", "--out", "{tmp}/p22", "--dataset", "json", "--data-files", "{files}/nulls.jsonl"],
        "column 'text' of split 'train' has 20 of 40 rows whose value is null or not a string",
    ),
    (
        "numbers as texts",
        ["prepare", "--out", "{tmp}/p23", "--dataset", "json", "--data-files", "{files}/numbers.jsonl"],
        "has 40 of 40 rows whose value is null or not a string",
    ),
    # model settings that transformers would accept and then build something else, or fail on later
    (
        "misspelt architecture field",
        ["prepare", "--out", "{tmp}/p24", "--set", "expert.arch.hiden_size=64"],
        "hiden_size (did you mean hidden_size?)",
    ),
    (
        "hidden size the heads do not divide",
        ["prepare", "--out", "{tmp}/p25", "--set", "expert.arch.hidden_size=66"],
        "hidden_size (66) must be divisible by num_attention_heads (4)",
    ),
    (
        "odd head size under rotary embeddings",
        ["prepare", "--out", "{tmp}/p26", "--set", "path.kind=masked", "--set", "expert.arch.hidden_size=100"],
        "must be even for rotary",
    ),
    (
        "block longer than a masked expert's context",
        ["prepare", "--out", "{tmp}/p27", "--set", "path.kind=masked", "--set", "expert.block_size=512"],
        "expert.block_size (512) exceeds the model context expert.arch.max_position_embeddings (256)",
    ),
    (
        "block longer than the seed's context",
        ["prepare", "--out", "{tmp}/p28", "--init-from", "{run}/seed", "--set", "expert.block_size=128"],
        "max_position_embeddings of --init-from",
    ),
    (
        "router sequences longer than the context",
        ["prepare", "--out", "{tmp}/p29", "--set", "router.max_length=512"],
        "router.max_length (512) exceeds the experts' context",
    ),
    (
        "more clusters than synthetic domains",
        ["prepare", "--out", "{tmp}/p30", "--set", "synthetic.num_domains=1"],
        "partition.num_clusters (4) exceeds synthetic.num_domains (1)",
    ),
    (
        "25 clusters from 26 documents",
        [
            "prepare",
            "--out",
            "{tmp}/p31",
            "--dataset",
            "json",
            "--data-files",
            "{files}/thirty.jsonl",
            "--num-clusters",
            "25",
        ],
        "only 26 training documents for 25 clusters",
    ),
    # the other subcommands
    ("train the seed before prepare", ["train-seed-model", "--run", "{tmp}/nothing"], "dfm prepare"),
    ("train the router before prepare", ["train-router", "--run", "{tmp}/nothing"], "dfm prepare"),
    ("train the router again without --resume", ["train-router", "--run", "{run}"], "--resume"),
    ("train the baseline before prepare", ["train-baseline", "--run", "{tmp}/nothing"], "dfm prepare"),
    ("train the baseline again without --resume", ["train-baseline", "--run", "{run}"], "--resume"),
    (
        "add an expert to a run not prepared",
        ["add-expert", "--run", "{tmp}/nothing", "--dataset", "json", "--data-files", "{files}/few.jsonl"],
        "dfm prepare",
    ),
    (
        "add an expert from a missing file",
        ["add-expert", "--run", "{run}", "--dataset", "json", "--data-files", "{tmp}/none.jsonl"],
        "not found",
    ),
    (
        "add an expert of null texts",
        ["add-expert", "--run", "{run}", "--dataset", "json", "--data-files", "{files}/nulls.jsonl"],
        "whose value is null or not a string",
    ),
    ("evaluate a run not prepared", ["eval", "--run", "{tmp}/nothing"], "dfm prepare"),
    ("zero evaluation batch", ["eval", "--run", "{run}", "--batch-size", "0"], "batch size must be >= 1"),
    ("NaN equivalence margin", ["eval", "--run", "{run}", "--margin", "nan"], "margin fraction must be >= 0"),
    (
        "bench output inside a file",
        ["bench", "--prepare", "100", "--out", "{run}/config.json/bench.json"],
        "is a file, not a directory",
    ),
    ("bench corpus too small", ["bench", "--prepare", "10", "--out", "{tmp}/bench.json"], "at least 100 documents"),
    (
        "bench of a corpus and a run at once",
        ["bench", "--prepare", "100", "--run", "{run}", "--out", "{tmp}/b.json"],
        "are different benchmarks: pass one of them",
    ),
    ("bench of a missing run", ["bench", "--run", "{tmp}/nope", "--out", "{tmp}/b.json"], "not found"),
    (
        "bench of a run whose context is too short",
        ["bench", "--run", "{run}", "--out", "{tmp}/b.json"],
        "exceed the experts' context of 64",
    ),
    ("convergence with zero steps", ["convergence", "--sampler-steps", "0", "--out", "{tmp}/c.json"], "steps >= 1"),
    (
        "convergence with a NaN router error",
        ["convergence", "--eps", "nan", "--out", "{tmp}/c.json"],
        "eps must be in [0, 1]",
    ),
    (
        "convergence with an unknown scheduler",
        ["convergence", "--scheduler", "magic", "--out", "{tmp}/c.json"],
        "unknown scheduler",
    ),
    (
        "convergence output inside a file",
        ["convergence", "--out", "{run}/config.json/c.json"],
        "is a file, not a directory",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,argv,expected", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_line_and_non_zero(case, argv, expected, run, files, tmp_path, capsys):
    argv = [a.format(run=run, tmp=tmp_path, files=files) for a in argv]
    before = snapshot(run)
    code = main(argv)
    assert code != 0, case
    assert expected in one_error_line(capsys.readouterr().err)
    assert snapshot(run) == before  # nothing the run holds was lost, changed or added


@pytest.mark.slow
def test_incompatible_manifest_version(run, tmp_path, capsys):
    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "ensemble.json").read_text())
    manifest["format_version"] = 99
    (copy / "ensemble.json").write_text(json.dumps(manifest))
    assert main(["generate", "--run", str(copy), "--prompt", "x"]) == 2
    assert "format version 99" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_expert_named_or_skipped(run, tmp_path, capsys):
    copy = tmp_path / "partial"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "experts" / "expert-1")
    assert main(["generate", "--run", str(copy), "--max-new-tokens", "3"]) == 2
    assert "expert-1" in capsys.readouterr().err
    assert main(["generate", "--run", str(copy), "--max-new-tokens", "3", "--allow-missing", "--json"]) == 0
    captured = capsys.readouterr()
    assert "dfm: warning: expert-1 left out" in captured.err
    out = json.loads(captured.out)
    assert out["names"] == ["expert-0", "expert-2"]
    assert (
        main(
            [
                "generate",
                "--run",
                str(copy),
                "--max-new-tokens",
                "3",
                "--allow-missing",
                "--routing",
                "centroid",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert all(len(w) == 2 for w in out["weights"][0])
    assert main(["eval", "--run", str(copy)]) == 2
    assert "expert-1" in capsys.readouterr().err
    assert main(["eval", "--run", str(copy), "--allow-missing"]) == 0
    report = json.loads((copy / "eval" / "report.json").read_text())
    assert "expert-1" not in report["models"] and "oracle" not in report["models"]
    assert report["models"]["mixture"]["bpb"] > 0 and report["models"]["centroid"]["bpb"] > 0


@pytest.mark.slow
def test_bench_of_a_run_times_every_mode_against_its_baseline(run, tmp_path, capsys):
    from eval.run_bench import RUN_MODES

    out = tmp_path / "run-bench.json"
    assert main(["bench", "--run", str(run), "--quick", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["reference"] == "the run's baseline through generate" and results["prompt_tokens"] == 16
    for batch in ("batch_1", "batch_2"):
        assert set(results[batch]) == set(RUN_MODES)
        assert all(f["tokens_per_second"] > 0 and f["vs_reference"] > 0 for f in results[batch].values())
    # routed once on the prompt, one expert reads BOS + 16 prompt tokens, then 31 of the 32 it generates
    assert results["batch_1"]["top1_route_on_prompt"]["expert_tokens_per_token"] == (1 + 16 + 31) / 32
    assert results["batch_1"]["mixture"]["expert_tokens_per_token"] == 3 * (1 + 16 + 31) / 32  # K = 3
    assert "top1_route_on_prompt" in capsys.readouterr().out


@pytest.mark.slow
def test_missing_baseline_is_named(run, tmp_path, capsys):
    """No baseline, no verdict: the scores are written, then one line says so and exits non-zero,
    unless --no-baseline accepts a report without a verdict."""
    copy = tmp_path / "no-baseline"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "baseline")
    assert main(["eval", "--run", str(copy), "--modes", "mixture"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no baseline at" in line and "dfm train-baseline" in line and "--no-baseline" in line
    report = json.loads((copy / "eval" / "report.json").read_text())
    assert "baseline" not in report["models"] and report["models"]["mixture"]["bpb"] > 0 and "equivalence" not in report
    assert "No baseline in this run: no equivalence verdict" in (copy / "eval" / "report.md").read_text()
    shutil.rmtree(copy / "eval")
    assert main(["eval", "--run", str(copy), "--modes", "mixture", "--no-baseline"]) == 0
    assert "dfm: error" not in capsys.readouterr().err
    assert json.loads((copy / "eval" / "report.json").read_text())["models"] == report["models"]


@pytest.mark.slow
def test_bayes_and_centroid_generate_without_a_router(run, tmp_path, capsys):
    copy = tmp_path / "no-router"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "router")
    for routing in ("bayes", "centroid"):
        assert main(["generate", "--run", str(copy), "--routing", routing, "--max-new-tokens", "3", "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["token_ids"][0]) == 3
    assert main(["generate", "--run", str(copy), "--routing", "mixture", "--max-new-tokens", "3"]) == 2
    assert "router directory" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("size", [0, 100])
def test_a_corrupt_expert_is_a_missing_one(run, tmp_path, capsys, size):
    copy = tmp_path / "corrupt"
    shutil.copytree(run, copy)
    weights = copy / "experts" / "expert-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:size])  # empty, or cut off in its header
    assert main(["generate", "--run", str(copy), "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "expert-1" in err and "retrain or re-copy it" in err and "Traceback" not in err
    assert main(["generate", "--run", str(copy), "--max-new-tokens", "3", "--allow-missing", "--json"]) == 0
    captured = capsys.readouterr()
    assert "dfm: warning: expert-1 left out" in captured.err
    assert json.loads(captured.out)["names"] == ["expert-0", "expert-2"]


@pytest.mark.slow
def test_threads_option_sets_torch_threads(run, capsys, monkeypatch):
    import os

    import torch

    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "generate", "--run", str(run), "--max-new-tokens", "2"]) == 0
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert main(["generate", "--run", str(run), "--max-new-tokens", "2"]) == 0
        assert torch.get_num_threads() == 1  # the environment's choice
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert main(["generate", "--run", str(run), "--max-new-tokens", "2"]) == 0
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))  # the default: this process's cores
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_eval_checks_its_output_before_scoring(run, tmp_path, capsys):
    copy = tmp_path / "blocked"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "eval", ignore_errors=True)
    (copy / "eval").write_text("not a directory")
    assert main(["eval", "--run", str(copy)]) == 2
    captured = capsys.readouterr()
    assert "is a file, not a directory" in captured.err and "bits/byte" not in captured.out  # nothing was scored
    assert main(["eval", "--run", str(tmp_path / "nowhere")]) == 2  # a missing run is reported as such, not created
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.slow
def test_resumed_run_adds_to_the_stage_timings(run, tmp_path):
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    before = json.loads((copy / "logs" / "timings.json").read_text())
    assert set(before) >= {"prepare", "seed", "expert-0", "router", "baseline", "eval"}
    assert (
        main(
            ["run", "--out", str(copy), "--config", str(write_tiny_config(tmp_path)), "--resume", "--modes", "mixture"]
        )
        == 0
    )
    after = json.loads((copy / "logs" / "timings.json").read_text())
    assert set(after) == set(before)
    # every stage ran again, briefly (a finished training stage returns at once), and added its seconds
    assert all(after[name] >= before[name] for name in before), (before, after)
    assert after["eval"] > before["eval"] and sum(after.values()) > sum(before.values())


@pytest.mark.slow
def test_preparing_again_over_trained_models_needs_overwrite(run, tmp_path, capsys):
    copy = tmp_path / "trained"
    shutil.copytree(run, copy)
    before = {str(f): f.read_bytes() for f in sorted(copy.rglob("*")) if f.is_file()}
    config = str(write_tiny_config(tmp_path))
    for argv in (
        ["prepare", "--out", str(copy), "--config", config, "--vocab-size", "280"],
        ["run", "--out", str(copy), "--config", config],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "already holds trained artifacts (seed, experts, router, baseline" in err and "--overwrite" in err
    assert {str(f): f.read_bytes() for f in sorted(copy.rglob("*")) if f.is_file()} == before  # untouched
    assert main(["prepare", "--out", str(copy), "--config", config, "--vocab-size", "280", "--overwrite"]) == 0
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", "data", "partition", "tokenizer"]


@pytest.mark.slow
def test_assemble_refuses_experts_of_another_tokenizer(run, tmp_path, capsys):
    copy = tmp_path / "foreign"
    shutil.copytree(run, copy)
    config_path = copy / "experts" / "expert-1" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "dfm_tokenizer_fingerprint": "another tokenizer"}))
    assert main(["assemble", "--run", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "expert-1 of" in err and "another tokenizer" in err and "dfm train-expert" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug", "generate", "--run", "{nope}"],
        ["generate", "--run", "{nope}", "--debug"],
        ["generate", "--debug", "--run", "{nope}"],
    ],
)
def test_debug_shows_the_traceback(tmp_path, capsys, argv):
    """--debug before the command or anywhere after it."""
    assert main([a.format(nope=tmp_path / "nope") for a in argv]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["generate", "--run", str(tmp_path / "nope")]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_generate_streams_and_reports_json(run, capsys):
    assert main(["generate", "--run", str(run), "--prompt", "", "--max-new-tokens", "5", "--seed", "3"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", "--run", str(run), "--prompt", "", "--max-new-tokens", "5", "--seed", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "weights", "experts_ran", "forward_passes", "tokens_processed", "names"}
    assert streamed.rstrip("\n") == out["text"]  # same seed, same text, streamed or not
    assert len(out["weights"][0]) == len(out["token_ids"][0])


@pytest.mark.slow
def test_generate_modes_exclusion_and_baseline(run, capsys):
    for extra in (
        ["--routing", "switch", "--exclude-expert", "1"],
        ["--routing", "bayes"],
        ["--routing", "centroid", "--k", "2"],
        ["--routing", "oracle", "--cluster", "2"],
        ["--routing", "topk", "--route-on", "prompt"],
        ["--model", "baseline"],
        ["--model", "expert-0"],
    ):
        assert main(["generate", "--run", str(run), "--max-new-tokens", "4", "--json", *extra]) == 0, extra
        out = json.loads(capsys.readouterr().out)
        if "--exclude-expert" in extra:
            assert all(1 not in step for step in out["experts_ran"])


@pytest.mark.slow
def test_eval_mode_names_work_in_generate(run, capsys):
    """`--routing top2` (a `dfm eval` mode name) is top-k routing with k = 2: the same tokens."""
    outputs = []
    for extra in (["--routing", "top2"], ["--routing", "topk", "--k", "2"]):
        assert main(["generate", "--run", str(run), "--max-new-tokens", "6", "--json", "--seed", "3", *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outputs[0] == outputs[1]


@pytest.mark.slow
@pytest.mark.parametrize("name,expected", [("banana", "not a device"), ("mps", "dfm runs on"), ("cuda:99", "CUDA")])
def test_device_option_is_checked(run, name, expected, capsys):
    for argv in (["eval", "--run", str(run)], ["generate", "--run", str(run), "--max-new-tokens", "3"]):
        assert main([*argv, "--device", name]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


@pytest.mark.slow
def test_cpu_and_auto_devices_give_the_same_text_on_this_machine(run, capsys):
    outputs = []
    for device in ("cpu", "auto"):
        assert main(["generate", "--run", str(run), "--max-new-tokens", "5", "--json", "--device", device]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    if not torch.cuda.is_available():
        assert outputs[0] == outputs[1]
    assert main(["eval", "--run", str(run), "--max-documents", "3", "--modes", "mixture", "--device", "cpu"]) == 0


@pytest.mark.slow
def test_bfloat16_inference_runs_on_the_cpu_too(run, capsys):
    """--dtype bfloat16 (auto's choice on CUDA) works on any device: the experts' and the baseline's
    weights in bf16, the router in float32. Greedy tokens may differ from float32's wherever two
    candidates are nearly tied (how near depends on the CPU's bf16 kernels), so what is compared is
    what the math bounds: the first greedy token's log-prob is the maximum of the distribution after
    BOS, and a maximum moves no more than the log-probs do (bf16 moves them by about 1e-3 here)."""
    first = {}
    for dtype in ("float32", "bfloat16"):
        assert (
            main(
                [
                    "generate",
                    "--run",
                    str(run),
                    "--max-new-tokens",
                    "8",
                    "--temperature",
                    "0",
                    "--json",
                    "--dtype",
                    dtype,
                ]
            )
            == 0
        )
        out = json.loads(capsys.readouterr().out)
        first[dtype] = out["token_log_probs"][0][0]
    assert first["bfloat16"] == pytest.approx(first["float32"], abs=1e-2)
    assert main(["eval", "--run", str(run), "--max-documents", "3", "--modes", "mixture", "--dtype", "bfloat16"]) == 0
    assert "Equivalence" in capsys.readouterr().out


@pytest.mark.slow
def test_long_prompt_is_truncated_with_a_warning(run, capsys):
    assert main(["generate", "--run", str(run), "--prompt", "ka " * 200, "--max-new-tokens", "4", "--json"]) == 0
    captured = capsys.readouterr()
    assert "truncated from the left" in captured.err
    assert json.loads(captured.out)["truncated"] == [True]


@pytest.mark.slow
@pytest.mark.parametrize(("piped", "prompt"), [("ka ka", "ka ka"), ("ka ka\n", "ka ka"), ("ka\nka\n\n", "ka\nka\n")])
def test_prompt_from_stdin(run, capsys, monkeypatch, piped, prompt):
    """A piped prompt loses the one final newline that `echo` adds, nothing else."""
    monkeypatch.setattr("sys.stdin", io.StringIO(piped))
    assert main(["generate", "--run", str(run), "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == prompt


@pytest.mark.slow
def test_show_routing_lists_every_token(run, capsys):
    args = ["generate", "--run", str(run), "--max-new-tokens", "6", "--seed", "1"]
    assert main([*args, "--json"]) == 0
    generated = len(json.loads(capsys.readouterr().out)["token_ids"][0])
    assert main([*args, "--show-routing"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [i for i, line in enumerate(lines) if "weights (expert-0, expert-1, expert-2)" in line]
    assert len(header) == 1 and len(lines) - header[0] - 1 == generated


@pytest.mark.slow
def test_a_prompt_file_is_one_prompt_a_line_decoded_in_batches(run, tmp_path, capsys):
    """Several prompts: one JSON line each, in file order; greedy texts do not depend on the batch
    they were decoded in (each equals the prompt generated alone); blank lines are skipped."""
    prompts = ["ka", "", "la mada ka", "ma"]
    path = tmp_path / "prompts.txt"
    path.write_text("ka\n\n\nla mada ka\nma\n")
    base = ["generate", "--run", str(run), "--max-new-tokens", "6", "--temperature", "0", "--routing", "top1", "--json"]
    assert main([*base, "--prompt-file", str(path), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["prompt"] for row in rows] == [p for p in prompts if p] and [row["index"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert main([*base, "--prompt", row["prompt"]]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert alone["token_ids"][0] == row["token_ids"] and alone["text"] == row["text"]
    assert main([*base[:-1], "--prompt-file", str(path), "--batch-size", "3"]) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    assert [block.strip("\n") for block in blocks[:3]] == [row["prompt"] + row["text"] for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize(
    "content,flag,expected",
    [
        ("\n\n", [], "holds no prompt"),
        ("a\nb\n", ["--show-routing"], "--json"),
        ("a\n", ["--batch-size", "0"], "--batch-size"),
    ],
)
def test_prompt_file_mistakes_are_one_line(run, tmp_path, capsys, content, flag, expected):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    assert main(["generate", "--run", str(run), "--prompt-file", str(path), *flag]) == 2
    assert expected in one_error_line(capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_goes_before_or_after_the_command(run, capsys, where):
    from dfm.progress import quiet

    command = ["generate", "--run", str(run), "--max-new-tokens", "2"]
    assert main(command) == 0 and not quiet()
    assert main(["--quiet", *command] if where == "before" else [*command, "--quiet"]) == 0
    assert quiet()  # no bar, even on a terminal
    assert main(command) == 0 and not quiet()  # one command's choice, not the next one's


@pytest.mark.slow
def test_a_binary_prompt_on_stdin_is_refused(run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe\x00binary")))
    assert main(["generate", "--run", str(run), "--max-new-tokens", "2"]) == 2
    assert "not UTF-8" in one_error_line(capsys.readouterr().err)


def test_a_vocabulary_bpe_cannot_reach_is_one_warning_when_asked_for(tmp_path, capsys):
    """The tiny corpus fills far fewer than the default 2048 tokens: quiet by default (the default run
    is like that), one warning with the size reached when the size was asked for."""
    config = tmp_path / "default-vocab.json"
    config.write_text(json.dumps({key: value for key, value in TINY_RUN.items() if key != "tokenizer"}))
    assert main(["prepare", "--out", str(tmp_path / "quiet"), "--config", str(config)]) == 0
    assert "stopped at" not in capsys.readouterr().err
    assert main(["prepare", "--out", str(tmp_path / "asked"), "--config", str(config), "--vocab-size", "2048"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "stopped at" in line]
    summary = json.loads(next(line for line in err if line.startswith("[dfm] prepared")).split(": ", 1)[1])
    assert len(warned) == 1 and warned[0].startswith(
        f"dfm: warning: the BPE tokenizer stopped at {summary['vocab_size']} tokens of the 2048 asked"
    ), err


# --- damaged runs: one shared copy; each test puts back what it damaged, and checks it did ---------
@pytest.fixture(scope="module")
def copy(run, tmp_path_factory):
    target = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(run, target)
    return target


@contextmanager
def damaging(root: Path, *paths: Path):
    """Put back the bytes of ``paths`` on exit, then check that every file under ``root`` is as before."""
    before = snapshot(root)
    saved = {path: path.read_bytes() for path in paths}
    try:
        yield
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
    assert snapshot(root) == before


def call(root: Path, argv: list[str]) -> int:
    """``dfm COMMAND --run root ARGS...`` for argv = [COMMAND, *ARGS]."""
    return main([argv[0], "--run", str(root), *argv[1:]])


@pytest.mark.slow
@pytest.mark.parametrize("size", ["empty", "cut"])
@pytest.mark.parametrize(
    "weights,argv,expected",
    [
        (
            "router/model.safetensors",
            ["generate", "--max-new-tokens", "3"],
            "retrain the router with `dfm train-router`",
        ),
        ("baseline/model.safetensors", ["eval", "--modes", "mixture"], "baseline"),
        ("baseline/model.safetensors", ["generate", "--model", "baseline", "--max-new-tokens", "3"], "baseline"),
        (
            "seed/model.safetensors",
            ["train-expert", "--expert", "0", "--resume"],
            "retrain it with `dfm train-seed-model --run",
        ),
        ("experts/expert-0/model.safetensors", ["assemble"], "then run `dfm assemble` again"),
    ],
)
def test_unreadable_weights_are_named(copy, capsys, weights, argv, expected, size):
    """Empty or cut-off weights of a router, baseline, seed or expert (an expert's in generate and
    eval: test_a_corrupt_expert_is_a_missing_one) are one line naming them and what to do."""
    path = copy / weights
    with damaging(copy, path):
        path.write_bytes(path.read_bytes()[: 0 if size == "empty" else path.stat().st_size // 2])
        assert call(copy, argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert expected in line and str(Path(weights).parent) in line, line


@pytest.mark.slow
def test_a_damaged_tokenizer_is_named(copy, capsys):
    tokenizer = copy / "tokenizer" / "tokenizer.json"
    with damaging(copy, tokenizer):
        tokenizer.write_bytes(tokenizer.read_bytes()[:500])
        for argv in (["generate", "--max-new-tokens", "3"], ["train-router", "--resume"]):
            assert call(copy, argv) == 2
            line = one_error_line(capsys.readouterr().err)
            assert f"{tokenizer.resolve()} is damaged" in line and f"re-copy {(copy / 'tokenizer').resolve()}" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda m: m["experts"][0].update(prior="0.25"), "the prior of expert-0 must be a number in (0, 1]"),
        (lambda m: m["experts"].append(dict(m["experts"][1])), "lists the expert name expert-1 more than once"),
        (
            lambda m: m["experts"].append({**m["experts"][1], "name": "expert-3"}),
            "lists the expert path experts/expert-1 more than once",
        ),
    ],
)
def test_a_manifest_with_a_bad_prior_or_a_repeated_expert_is_refused(copy, capsys, edit, expected):
    path = copy / "ensemble.json"
    with damaging(copy, path):
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
        for argv in (["generate", "--max-new-tokens", "3"], ["eval"]):
            assert call(copy, argv) == 2
            line = one_error_line(capsys.readouterr().err)
            assert expected in line and f"re-run `dfm assemble --run {copy}`" in line


@pytest.mark.slow
def test_a_router_that_does_not_match_its_config_is_one_line(copy, capsys):
    config = copy / "router" / "config.json"
    with damaging(copy, config):
        config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 32}))
        assert call(copy, ["generate", "--max-new-tokens", "3"]) == 2
        err = capsys.readouterr().err
        line = one_error_line(err)
        assert len(err.strip().splitlines()) == 1  # not torch's list of every mismatched tensor
        assert "size mismatch" in line and f"re-copy {(copy / 'router').resolve()}" in line
        assert "retrain the router with `dfm train-router`" in line


@pytest.mark.slow
def test_swapped_weights_are_refused_until_assembled_again(copy, capsys):
    """Another expert's weights (same size, same config) in expert-1's place: refused by its sha256
    wherever it loads, until `dfm assemble` records the change as intended."""
    manifest, weights = copy / "ensemble.json", copy / "experts" / "expert-1" / "model.safetensors"
    recorded = json.loads(manifest.read_text())["sha256"]
    assert {
        "tokenizer/tokenizer.json",
        "experts/expert-1/model.safetensors",
        "router/model.safetensors",
        "baseline/model.safetensors",
    } <= set(recorded)
    with damaging(copy, manifest, weights):
        shutil.copyfile(copy / "experts" / "expert-2" / "model.safetensors", weights)
        for argv in (
            ["generate", "--max-new-tokens", "3"],
            ["generate", "--model", "expert-1", "--max-new-tokens", "3"],
            ["eval", "--modes", "mixture"],
        ):
            assert call(copy, argv) == 2
            line = one_error_line(capsys.readouterr().err)
            assert f"{weights.resolve()} differs from the file `dfm assemble` recorded" in line
            assert f"re-run `dfm assemble --run {copy}` if the change was intended" in line
        assert call(copy, ["generate", "--max-new-tokens", "3", "--allow-missing", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["names"] == ["expert-0", "expert-2"]
        assert call(copy, ["assemble"]) == 0
        assert call(copy, ["generate", "--max-new-tokens", "3"]) == 0


@pytest.mark.slow
def test_a_changed_baseline_is_refused_by_eval(copy, capsys):
    """dfm eval verifies the baseline it compares against, as generate does (the last byte of its
    weights flipped: still loadable, but not the model `dfm assemble` recorded)."""
    manifest, weights = copy / "ensemble.json", copy / "baseline" / "model.safetensors"
    with damaging(copy, manifest, weights):
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        for argv in (["eval", "--modes", "mixture"], ["generate", "--model", "baseline", "--max-new-tokens", "3"]):
            assert call(copy, argv) == 2
            assert f"{weights.resolve()} differs from the file" in one_error_line(capsys.readouterr().err)
        assert call(copy, ["assemble"]) == 0  # the change recorded as intended
        assert call(copy, ["generate", "--model", "baseline", "--max-new-tokens", "3"]) == 0


@pytest.mark.slow
def test_a_manifest_of_format_version_1_loads_without_verifying(copy, capsys):
    manifest, weights = copy / "ensemble.json", copy / "experts" / "expert-1" / "model.safetensors"
    with damaging(copy, manifest, weights):
        old = json.loads(manifest.read_text())
        del old["sha256"]
        manifest.write_text(json.dumps({**old, "format_version": 1}))
        shutil.copyfile(copy / "experts" / "expert-2" / "model.safetensors", weights)  # nothing recorded to refuse it
        assert call(copy, ["generate", "--max-new-tokens", "3"]) == 0


@contextmanager
def read_only(root: Path):
    """``root`` and everything in it unwritable: by permissions, or, for root (whom permissions do
    not stop), by the immutable attribute; skips where neither makes it so."""
    if os.geteuid() != 0:
        modes = {path: path.stat().st_mode for path in [root, *root.rglob("*")]}
        for path, mode in modes.items():
            path.chmod(mode & ~0o222)

        def undo() -> None:
            for path, mode in modes.items():
                path.chmod(mode)
    else:
        if shutil.which("chattr") is None:
            pytest.skip("no chattr to make a directory read-only for root")

        def undo() -> None:
            subprocess.run(["chattr", "-R", "-i", str(root)], check=True, capture_output=True)

        made = subprocess.run(["chattr", "-R", "+i", str(root)], capture_output=True).returncode == 0
        if not made:
            undo()
            pytest.skip("this file system has no immutable attribute")
    try:
        try:
            (root / ".probe").touch()
        except OSError:
            pass
        else:
            (root / ".probe").unlink()
            pytest.skip("the run stays writable here")
        yield
    finally:
        undo()


@pytest.mark.slow
def test_a_read_only_run_is_named(copy, capsys):
    before = snapshot(copy)
    with read_only(copy):
        for argv, expected in (
            (["eval", "--modes", "mixture"], f"{copy / 'eval'} is not writable"),
            (["assemble"], f"cannot write {copy}"),
        ):
            assert call(copy, argv) == 2
            line = one_error_line(capsys.readouterr().err)
            assert expected in line and "copy the run to a writable place and use the copy" in line
    assert snapshot(copy) == before


@pytest.mark.parametrize(
    "old, new",
    [
        (["convergence", "--steps", "1", "2"], ["convergence", "--sampler-steps", "1", "2"]),
        (["prepare", "--split", "train"], ["prepare", "--train-split", "train"]),
        (["prepare", "--seed-steps", "5"], ["prepare", "--seed-model-steps", "5"]),
    ],
)
def test_a_renamed_option_still_parses_with_a_warning(old, new):
    from dfm.cli import DeprecatedName, build_parser

    with pytest.warns(DeprecatedName, match=f"{old[1]} is deprecated and will be removed: use {new[1]}"):
        before = build_parser().parse_args(old)
    assert vars(before) == vars(build_parser().parse_args(new))


def test_the_seed_model_command_keeps_its_old_name(tmp_path, capsys):
    assert main(["train-seed", "--run", str(tmp_path / "nothing")]) == 2  # it runs: the run is not prepared
    err = capsys.readouterr().err
    assert "dfm: warning: train-seed is deprecated and will be removed: use train-seed-model" in err
    assert "dfm prepare" in err
