"""Data loading, tokenizer, packing, and the whole `dfm run` on a tiny configuration."""

import json

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfm.cli import main
from dfm.errors import DfmError
from tests.tiny_config import write_tiny_config
from training import data
from training.config import parse_override, read_run_config, resolve_config
from training.data import DataSource, load_documents, pack_blocks, tokenize
from training.estimate import remaining_flops
from training.tokenizer_training import train_bpe

TEXTS = [f"document number {i} talks about {'cats' if i % 2 else 'dogs'} and more words {i * 7}" for i in range(40)]


def test_json_files_load_with_carved_splits(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "topic": i % 2}) for i, t in enumerate(TEXTS)))
    source = DataSource(
        dataset="json", data_files=[str(path)], text_column="body", validation_fraction=0.1, test_fraction=0.1
    )
    splits = load_documents(source)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [32, 4, 4]
    every = sorted([*splits["train"]["body"], *splits["validation"]["body"], *splits["test"]["body"]])
    assert every == sorted(TEXTS)
    again = load_documents(source)
    assert list(again["test"]["body"]) == list(splits["test"]["body"])


def test_text_files_load_one_document_per_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    splits = load_documents(DataSource(dataset="text", data_files=[str(path)]))
    assert sum(len(s) for s in splits.values()) == len(TEXTS)


def test_load_from_disk_and_existing_splits(tmp_path):
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": TEXTS[:30]}),
            "validation": datasets.Dataset.from_dict({"text": TEXTS[30:35]}),
            "test": datasets.Dataset.from_dict({"text": TEXTS[35:]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    splits = load_documents(DataSource(dataset=str(tmp_path / "saved")))
    assert list(splits["validation"]["text"]) == TEXTS[30:35]


def test_bad_data_sources_give_actionable_errors(tmp_path):
    with pytest.raises(DfmError, match="--data-files"):
        load_documents(DataSource(dataset="json"))
    with pytest.raises(DfmError, match="not found"):
        load_documents(DataSource(dataset="json", data_files=[str(tmp_path / "missing.jsonl")]))
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS))
    with pytest.raises(DfmError, match="--text-column"):
        load_documents(DataSource(dataset="json", data_files=[str(path)]))
    with pytest.raises(DfmError, match="--text-column"):
        load_documents(
            DataSource(dataset="json", data_files=[str(path)], text_column="nope", streaming=True), tmp_path / "scratch"
        )


def test_streaming_reads_up_to_the_cap_or_everything(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    splits = load_documents(
        DataSource(dataset="json", data_files=[str(path)], streaming=True, max_documents=20), tmp_path / "a"
    )
    assert sum(len(s) for s in splits.values()) == 20
    # without a cap the whole stream is written to disk, split exactly as the file read in memory is
    streamed = load_documents(DataSource(dataset="json", data_files=[str(path)], streaming=True), tmp_path / "b")
    loaded = load_documents(DataSource(dataset="json", data_files=[str(path)]))
    assert {n: s["text"][:] for n, s in streamed.items()} == {n: s["text"][:] for n, s in loaded.items()}
    assert all(f["filename"].startswith(str(tmp_path / "b")) for f in streamed["train"].cache_files)


def test_tokenizer_round_trip_and_determinism(tmp_path):
    tok = train_bpe(TEXTS, vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in TEXTS[:5] + ["unseen wörds ✓"]:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    assert train_bpe(TEXTS, vocab_size=300).get_vocab() == tok.get_vocab()
    assert loaded.eos_token == loaded.bos_token == loaded.pad_token == "<|endoftext|>"


def test_packing_keeps_every_token_once():
    docs = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [], [6, 7, 8, 9, 10, 11, 12]]})
    blocks = pack_blocks(docs, block_size=4, eos_id=0)
    stream = [0, 1, 2, 3, 0, 4, 5, 0, 0, 6, 7, 8, 9, 10, 11, 12, 0]
    targets = [t for row in list(blocks["labels"]) for t in row[1:] if t != -100]
    assert targets == stream[1:]  # every token after the first EOS is predicted exactly once
    rows = list(blocks["input_ids"])
    assert all(len(row) == 4 for row in rows)
    for a, b in zip(rows, rows[1:]):
        assert a[-1] == b[0]  # consecutive blocks overlap by one token


def test_tokenize_adds_ids_and_bytes():
    tok = train_bpe(TEXTS, vocab_size=300)
    out = tokenize(datasets.Dataset.from_dict({"text": ["héllo", ""]}), tok, "text")
    assert list(out["num_bytes"]) == [6, 0] and list(out["input_ids"][1]) == []


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"expert": {"train": {"steps": 7}}, "partition": {"num_clusters": 2}}))
    config = resolve_config(path, [parse_override("expert.train.lr=0.01"), parse_override("data.max_documents=9")])
    assert config.expert.train["steps"] == 7 and config.expert.train["lr"] == 0.01
    assert config.partition.num_clusters == 2 and config.data.max_documents == 9
    assert config.expert.train["batch_size"] == 4  # defaults survive a partial override (synthetic budget)
    real = resolve_config(None, [parse_override("data.dataset=json")])
    assert real.seed_model.train["steps"] == 1200 and real.expert.train["batch_size"] == 8
    assert real.expert.train["steps"] == 150  # a real corpus keeps DEFAULTS; the embedded one gets less
    assert config.seed_model.train["steps"] == 200 and config.expert.train["steps"] == 7
    other = resolve_config(None, [parse_override("expert.arch={model_type: gpt2, n_embd: 64, n_layer: 2, n_head: 4}")])
    assert other.expert.arch == {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4}  # no Llama fields
    same = resolve_config(None, [parse_override("expert.arch={num_hidden_layers: 2}")])
    assert same.expert.arch["num_hidden_layers"] == 2 and same.expert.arch["hidden_size"] == 128
    with pytest.raises(DfmError, match="unknown config key 'partition.clusters'"):
        resolve_config(None, [parse_override("partition.clusters=3")])
    with pytest.raises(DfmError, match="key.sub=value"):
        parse_override("nonsense")


@pytest.mark.slow
def test_tiny_dfm_run_writes_every_artifact(tmp_path, capsys):
    config = write_tiny_config(tmp_path)
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--config", str(config)]) == 0
    for path in [
        "config.json",
        "tokenizer/tokenizer.json",
        "partition/centres.safetensors",
        "partition/stats.json",
        "data/documents/dataset_dict.json",
        "data/expert-0/dataset_dict.json",
        "experts/expert-2/model.safetensors",
        "router/model.safetensors",
        "router/config.json",
        "baseline/model.safetensors",
        "ensemble.json",
        "logs/expert-0.jsonl",
        "logs/timings.json",
        "eval/report.json",
        "eval/report.md",
        "eval/bpb_by_cluster.png",
        "eval/router_accuracy.png",
    ]:
        assert (run / path).exists(), path
    stats = json.loads((run / "partition/stats.json").read_text())
    assert sum(stats["sizes"]) == 150 - 2 * round(150 * 0.05) and stats["purity"] is not None
    manifest = json.loads((run / "ensemble.json").read_text())
    assert manifest["format_version"] == 2 and len(manifest["experts"]) == 3
    assert abs(sum(e["prior"] for e in manifest["experts"]) - 1) < 1e-9
    baseline_log = [json.loads(line) for line in (run / "logs/baseline.jsonl").read_text().splitlines()]
    report = json.loads((run / "eval/report.json").read_text())
    matching = report["compute"]["matching"]  # compute matched: experts + router, rounded up to a whole step
    step_flops = matching["baseline_flops"] / max(r["step"] for r in baseline_log)
    assert 0 <= matching["baseline_flops"] - matching["decentralized_flops"] < step_flops
    report = json.loads((run / "eval/report.json").read_text())
    for name in ["baseline", "expert-0", "mixture", "top1", "top2", "bayes", "centroid", "oracle"]:
        assert set(report["models"][name]) >= {"nll", "ppl", "bpb", "tokens", "documents"}
    assert all(c["mixture"]["bpb"] > 0 for c in report["per_cluster"].values()) and report["entropy_floor_bpb"] > 0
    assert set(report["equivalence"]) >= {"delta_bpb", "ci95", "margin", "verdict"}
    assert set(report["router"]) >= {"accuracy_by_prefix", "kl_to_bayes", "ece"} and "compute" in report
    captured = capsys.readouterr()
    assert "| mixture |" in captured.out
    # the time estimate printed after the seed prices the later stages within 20% of what they spent
    assert "estimated: about" in captured.err
    spent = sum(
        json.loads((run / f"logs/{name}.summary.json").read_text())["flops"]
        for name in ["expert-0", "expert-1", "expert-2", "router", "baseline"]
    )
    seed = json.loads((run / "logs/seed.summary.json").read_text())
    assert 0.8 < remaining_flops(run, read_run_config(run), seed["parameters"]) / spent < 1.2
    # artifacts load with plain Hugging Face calls
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(run / "experts/expert-0")
    assert model.config.vocab_size == len(tok)
    # same seed, same config -> same weights
    again = tmp_path / "again"
    assert main(["run", "--out", str(again), "--config", str(config)]) == 0
    for name in ["experts/expert-1", "baseline"]:
        a = AutoModelForCausalLM.from_pretrained(run / name).state_dict()
        b = AutoModelForCausalLM.from_pretrained(again / name).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_a_single_cluster_runs_end_to_end(tmp_path, capsys):
    """K = 1: no router is trained; evaluation and generation weight the one expert by 1."""
    config = write_tiny_config(tmp_path)
    run = tmp_path / "one"
    assert main(["run", "--out", str(run), "--config", str(config), "--num-clusters", "1"]) == 0
    report = json.loads((run / "eval/report.json").read_text())
    torch.testing.assert_close(report["models"]["mixture"]["nll"], report["models"]["expert-0"]["nll"])
    assert "router" not in report


def test_packing_streams_across_read_batches(monkeypatch):
    docs = datasets.Dataset.from_dict({"input_ids": [[i] * (i % 7) for i in range(1, 60)]})
    whole = pack_blocks(docs, block_size=5, eos_id=0).to_dict()
    monkeypatch.setattr(data, "READ_BATCH", 3)  # blocks that span batches carry over exactly
    assert pack_blocks(docs, block_size=5, eos_id=0).to_dict() == whole


def _prepared(tmp_path, name: str, **sections) -> tuple:
    from training.prepare import prepare

    config = resolve_config(
        write_tiny_config(tmp_path), [parse_override(f"{k}={json.dumps(v)}") for k, v in sections.items()]
    )
    run = tmp_path / name
    prepare(config, run)
    documents = datasets.load_from_disk(str(run / "data" / "documents"))
    return run, documents, json.loads((run / "partition" / "partition.json").read_text())


def test_tokenizer_and_partition_fit_on_samples_then_assign_every_document(tmp_path):
    from models.partition import Partition

    run, documents, meta = _prepared(
        tmp_path, "sampled", **{"partition.sample_documents": 40, "tokenizer.sample_documents": 30}
    )
    train = documents["train"]
    partition = Partition.load(run / "partition")
    assert meta["num_documents"] == len(train) > 40
    for split in documents.values():  # every document, sampled or not, sits at its nearest centre
        assert list(split["cluster"]) == partition.assign(list(split["input_ids"])).tolist()
    assert partition.assignments.tolist() == list(train["cluster"])
    assert sum(json.loads((run / "partition" / "stats.json").read_text())["sizes"]) == len(train)
    full_vocab = AutoTokenizer.from_pretrained(str(_prepared(tmp_path, "full")[0] / "tokenizer")).get_vocab()
    assert AutoTokenizer.from_pretrained(str(run / "tokenizer")).get_vocab() != full_vocab  # fitted on 30 texts
    assert not list(run.glob("**/.scratch")) and not list(run.glob("**/.rows-*"))  # scratch files removed


def test_label_partition_fit_on_a_sample_keeps_every_label(tmp_path):
    run, documents, meta = _prepared(
        tmp_path, "labels", **{"partition.sample_documents": 5, "data.cluster_column": "domain"}
    )
    values = meta["label_values"]
    assert values == [0, 1, 2]
    for split in documents.values():
        assert list(split["cluster"]) == [values.index(d) for d in split["domain"]]
