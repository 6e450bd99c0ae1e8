"""The command line against a tiny run: generation, streaming, JSON, and every bad input a user
makes ending in one line on stderr and a non-zero exit (never a traceback).

BAD_INPUTS is the table of cases tried; each row is (case, argv, expected message fragment).
"""

import io
import json
import shutil

import pytest
import torch

from dfm.cli import main
from tests.tiny_config import write_tiny_config


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
    return root


BAD_INPUTS = [
    ("missing run directory", ["generate", "--run", "{tmp}/nope", "--prompt", "x"], "does not exist"),
    ("unknown routing mode", ["generate", "--run", "{run}", "--routing", "best"], "unknown routing mode"),
    ("k larger than K", ["generate", "--run", "{run}", "--routing", "topk", "--k", "9"], "between 1 and the number"),
    ("k zero", ["generate", "--run", "{run}", "--routing", "topk", "--k", "0"], "between 1 and the number"),
    ("exclude every expert", ["generate", "--run", "{run}", "--exclude-expert", "0", "1", "2"], "exclude fewer"),
    ("exclude unknown expert", ["generate", "--run", "{run}", "--exclude-expert", "7"], "numbered"),
    ("oracle without cluster", ["generate", "--run", "{run}", "--routing", "oracle"], "--cluster"),
    ("oracle with a bad cluster", ["generate", "--run", "{run}", "--routing", "oracle", "--cluster", "5"], "not experts"),
    ("max new tokens beyond the context", ["generate", "--run", "{run}", "--max-new-tokens", "500"], "--max-new-tokens"),
    ("negative temperature", ["generate", "--run", "{run}", "--max-new-tokens", "5", "--temperature", "-1"], "temperature"),
    ("top-p out of range", ["generate", "--run", "{run}", "--max-new-tokens", "5", "--top-p", "0"], "top-p"),
    ("centroid with one model", ["generate", "--run", "{run}", "--model", "baseline", "--routing", "centroid"],
     "--model ensemble"),
    ("unknown model", ["generate", "--run", "{run}", "--model", "expert-9"], "not in"),
    ("missing prompt file", ["generate", "--run", "{run}", "--prompt-file", "{tmp}/nope.txt"], "--prompt-file"),
    ("json without data files", ["prepare", "--out", "{tmp}/p1", "--dataset", "json"], "--data-files"),
    ("missing data file", ["prepare", "--out", "{tmp}/p2", "--dataset", "json", "--data-files", "{tmp}/none.jsonl"],
     "not found"),
    ("empty dataset", ["prepare", "--out", "{tmp}/p3", "--dataset", "json", "--data-files", "{files}/empty.jsonl"],
     "empty"),
    ("wrong text column", ["prepare", "--out", "{tmp}/p4", "--dataset", "json", "--data-files", "{files}/docs.jsonl"],
     "--text-column"),
    ("wrong cluster column", ["prepare", "--out", "{tmp}/p5", "--dataset", "json", "--data-files",
                              "{files}/docs.jsonl", "--text-column", "body", "--cluster-column", "topic"], "topic"),
    ("fewer documents than clusters", ["prepare", "--out", "{tmp}/p6", "--dataset", "json", "--data-files",
                                       "{files}/few.jsonl", "--num-clusters", "20"], "fewer documents"),
    ("non-UTF-8 text file", ["prepare", "--out", "{tmp}/p7", "--dataset", "text", "--data-files",
                             "{files}/latin1.txt"], "UTF-8"),
    ("streamed file without the text column", ["prepare", "--out", "{tmp}/p8", "--dataset", "json", "--data-files",
                                               "{files}/docs.jsonl", "--streaming"],
     "--text-column"),
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
    ("train the seed again without --resume", ["train-seed", "--run", "{run}"], "--resume"),
    ("a seed model that does not exist", ["prepare", "--out", "{tmp}/p15", "--init-from", "{tmp}/no-model"], "--init-from"),
    ("block longer than the context", ["prepare", "--out", "{tmp}/p16", "--set", "expert.block_size=4096"],
     "max_position_embeddings"),
    ("shared fraction out of range", ["prepare", "--out", "{tmp}/p17", "--set", "seed_model.shared_fraction=0"],
     "shared_fraction"),
    ("unknown router targets", ["prepare", "--out", "{tmp}/p18", "--set", "router.targets=magic"], "router.targets"),
    ("data files with and without splits", ["prepare", "--out", "{tmp}/p19", "--dataset", "json", "--data-files",
                                            "train={files}/docs.jsonl", "{files}/few.jsonl"], "SPLIT=PATH"),
    ("unknown eval mode", ["eval", "--run", "{run}", "--modes", "magic"], "unknown evaluation mode"),
    ("unknown eval split", ["eval", "--run", "{run}", "--split", "dev"], "no split"),
    ("zero threads", ["--threads", "0", "eval", "--run", "{run}"], "--threads must be a positive"),
    ("sampler steps on an autoregressive run", ["generate", "--run", "{run}", "--steps", "8"], "masked path"),
    ("ELBO draws on an autoregressive run", ["eval", "--run", "{run}", "--elbo-samples", "2"], "masked runs"),
    ("top1 with another k", ["generate", "--run", "{run}", "--routing", "top1", "--k", "2"], "already says k = 1"),
    ("a device this machine lacks", ["run", "--out", "{tmp}/r2", "--device", "cuda:7"], "CUDA"),
    ("train on something that is no device", ["train-expert", "--run", "{run}", "--expert", "0", "--resume",
                                              "--device", "banana"], "not a device"),
    ("unknown path kind", ["prepare", "--out", "{tmp}/p20", "--set", "path.kind=diffusion"], "path.kind"),
    ("a masked mode for an autoregressive run", ["run", "--out", "{tmp}/r1", "--set", "synthetic.num_documents=100",
                                                 "--vocab-size", "300", "--modes", "switch"], "unknown evaluation mode"),
]


@pytest.mark.parametrize("case,argv,expected", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_line_and_non_zero(case, argv, expected, run, files, tmp_path, capsys):
    argv = [a.format(run=run, tmp=tmp_path, files=files) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0, case
    assert "Traceback" not in "\n".join(err)
    message = [line for line in err if line.startswith("dfm: error:")]
    assert len(message) == 1 and expected in message[0], err


def test_incompatible_manifest_version(run, tmp_path, capsys):
    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "ensemble.json").read_text())
    manifest["format_version"] = 99
    (copy / "ensemble.json").write_text(json.dumps(manifest))
    assert main(["generate", "--run", str(copy), "--prompt", "x"]) == 2
    assert "format version 99" in capsys.readouterr().err


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
    assert main(["generate", "--run", str(copy), "--max-new-tokens", "3", "--allow-missing", "--routing", "centroid",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(len(w) == 2 for w in out["weights"][0])
    assert main(["eval", "--run", str(copy)]) == 2
    assert "expert-1" in capsys.readouterr().err
    assert main(["eval", "--run", str(copy), "--allow-missing"]) == 0
    report = json.loads((copy / "eval" / "report.json").read_text())
    assert "expert-1" not in report["models"] and "oracle" not in report["models"]
    assert report["models"]["mixture"]["bpb"] > 0 and report["models"]["centroid"]["bpb"] > 0


def test_missing_baseline_is_named(run, tmp_path, capsys):
    copy = tmp_path / "no-baseline"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "baseline")
    assert main(["eval", "--run", str(copy), "--modes", "mixture"]) == 0
    err = capsys.readouterr().err
    assert "dfm: warning: no baseline at" in err and "dfm train-baseline" in err
    report = json.loads((copy / "eval" / "report.json").read_text())
    assert "baseline" not in report["models"] and report["models"]["mixture"]["bpb"] > 0


def test_bayes_and_centroid_generate_without_a_router(run, tmp_path, capsys):
    copy = tmp_path / "no-router"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "router")
    for routing in ("bayes", "centroid"):
        assert main(["generate", "--run", str(copy), "--routing", routing, "--max-new-tokens", "3", "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["token_ids"][0]) == 3
    assert main(["generate", "--run", str(copy), "--routing", "mixture", "--max-new-tokens", "3"]) == 2
    assert "router directory" in capsys.readouterr().err


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


def test_threads_option_sets_torch_threads(run, capsys):
    import os

    import torch

    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "generate", "--run", str(run), "--max-new-tokens", "2"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["generate", "--run", str(run), "--max-new-tokens", "2"]) == 0
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))  # the default: this process's cores
    finally:
        torch.set_num_threads(before)


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


def test_resumed_run_adds_to_the_stage_timings(run, tmp_path):
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    before = json.loads((copy / "logs" / "timings.json").read_text())
    assert set(before) >= {"prepare", "seed", "expert-0", "router", "baseline", "eval"}
    assert main(["run", "--out", str(copy), "--config", str(write_tiny_config(tmp_path)), "--resume",
                 "--modes", "mixture"]) == 0
    after = json.loads((copy / "logs" / "timings.json").read_text())
    assert set(after) == set(before)
    # every stage ran again, briefly (a finished training stage returns at once), and added its seconds
    assert all(after[name] >= before[name] for name in before), (before, after)
    assert after["eval"] > before["eval"] and sum(after.values()) > sum(before.values())


def test_preparing_again_over_trained_models_needs_overwrite(run, tmp_path, capsys):
    copy = tmp_path / "trained"
    shutil.copytree(run, copy)
    before = {str(f): f.read_bytes() for f in sorted(copy.rglob("*")) if f.is_file()}
    config = str(write_tiny_config(tmp_path))
    for argv in (["prepare", "--out", str(copy), "--config", config, "--vocab-size", "280"],
                 ["run", "--out", str(copy), "--config", config]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "already holds trained artifacts (seed, experts, router, baseline" in err and "--overwrite" in err
    assert {str(f): f.read_bytes() for f in sorted(copy.rglob("*")) if f.is_file()} == before  # untouched
    assert main(["prepare", "--out", str(copy), "--config", config, "--vocab-size", "280", "--overwrite"]) == 0
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", "data", "partition", "tokenizer"]


def test_assemble_refuses_experts_of_another_tokenizer(run, tmp_path, capsys):
    copy = tmp_path / "foreign"
    shutil.copytree(run, copy)
    config_path = copy / "experts" / "expert-1" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "dfm_tokenizer_fingerprint": "another tokenizer"}))
    assert main(["assemble", "--run", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "expert-1 of" in err and "another tokenizer" in err and "dfm train-expert" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "generate", "--run", str(tmp_path / "nope")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_generate_streams_and_reports_json(run, capsys):
    assert main(["generate", "--run", str(run), "--prompt", "", "--max-new-tokens", "5", "--seed", "3"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", "--run", str(run), "--prompt", "", "--max-new-tokens", "5", "--seed", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "weights", "experts_ran", "forward_passes", "tokens_processed", "names"}
    assert streamed.rstrip("\n") == out["text"]  # same seed, same text, streamed or not
    assert len(out["weights"][0]) == len(out["token_ids"][0])


def test_generate_modes_exclusion_and_baseline(run, capsys):
    for extra in (["--routing", "switch", "--exclude-expert", "1"], ["--routing", "bayes"],
                  ["--routing", "centroid", "--k", "2"], ["--routing", "oracle", "--cluster", "2"],
                  ["--routing", "topk", "--route-on", "prompt"], ["--model", "baseline"], ["--model", "expert-0"]):
        assert main(["generate", "--run", str(run), "--max-new-tokens", "4", "--json", *extra]) == 0, extra
        out = json.loads(capsys.readouterr().out)
        if "--exclude-expert" in extra:
            assert all(1 not in step for step in out["experts_ran"])


def test_eval_mode_names_work_in_generate(run, capsys):
    """`--routing top2` (a `dfm eval` mode name) is top-k routing with k = 2: the same tokens."""
    outputs = []
    for extra in (["--routing", "top2"], ["--routing", "topk", "--k", "2"]):
        assert main(["generate", "--run", str(run), "--max-new-tokens", "6", "--json", "--seed", "3", *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("name,expected", [("banana", "not a device"), ("mps", "dfm runs on"),
                                           ("cuda:99", "CUDA")])
def test_device_option_is_checked(run, name, expected, capsys):
    for argv in (["eval", "--run", str(run)], ["generate", "--run", str(run), "--max-new-tokens", "3"]):
        assert main([*argv, "--device", name]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


def test_cpu_and_auto_devices_give_the_same_text_on_this_machine(run, capsys):
    outputs = []
    for device in ("cpu", "auto"):
        assert main(["generate", "--run", str(run), "--max-new-tokens", "5", "--json", "--device", device]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    if not torch.cuda.is_available():
        assert outputs[0] == outputs[1]
    assert main(["eval", "--run", str(run), "--max-documents", "3", "--modes", "mixture", "--device", "cpu"]) == 0


def test_long_prompt_is_truncated_with_a_warning(run, capsys):
    assert main(["generate", "--run", str(run), "--prompt", "ka " * 200, "--max-new-tokens", "4", "--json"]) == 0
    captured = capsys.readouterr()
    assert "truncated from the left" in captured.err
    assert json.loads(captured.out)["truncated"] == [True]


@pytest.mark.parametrize(("piped", "prompt"), [("ka ka", "ka ka"), ("ka ka\n", "ka ka"), ("ka\nka\n\n", "ka\nka\n")])
def test_prompt_from_stdin(run, capsys, monkeypatch, piped, prompt):
    """A piped prompt loses the one final newline that `echo` adds, nothing else."""
    monkeypatch.setattr("sys.stdin", io.StringIO(piped))
    assert main(["generate", "--run", str(run), "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == prompt


def test_show_routing_lists_every_token(run, capsys):
    args = ["generate", "--run", str(run), "--max-new-tokens", "6", "--seed", "1"]
    assert main([*args, "--json"]) == 0
    generated = len(json.loads(capsys.readouterr().out)["token_ids"][0])
    assert main([*args, "--show-routing"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [i for i, line in enumerate(lines) if "weights (expert-0, expert-1, expert-2)" in line]
    assert len(header) == 1 and len(lines) - header[0] - 1 == generated
