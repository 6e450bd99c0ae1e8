"""Adding an expert later: a new cluster joins a trained tiny run; only expert K and the router
are trained, the other experts' files stay byte for byte (and mtime for mtime) as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import DatasetDict

from dfm.cli import main
from dfm.errors import DfmError
from models.ensemble import Ensemble
from models.partition import Partition
from models.tokenizer import load_tokenizer
from tests.tiny_config import TINY_RUN, write_tiny_config
from training.add_cluster import add_cluster, read_texts
from training.allocation import read_share
from training.data import DataSource, load_saved, packed_rows
from training.layout import RunLayout
from training.prepare import write_shard
from training.synthetic import SyntheticCorpus, SyntheticSpec

K = TINY_RUN["partition"]["num_clusters"]
#: A fourth source: another seed draws other words, so its documents form a topic of their own.
NEW_SOURCE = SyntheticSpec(num_domains=1, num_documents=40, seed=11, mean_length=20)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("add")
    config = write_tiny_config(root)
    assert main(["prepare", "--out", str(root / "run"), "--config", str(config)]) == 0
    assert main(["train-seed-model", "--run", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(prepared, run)
    for k in range(K):
        assert main(["train-expert", "--run", str(run), "--expert", str(k)]) == 0
    assert main(["train-router", "--run", str(run)]) == 0
    assert main(["assemble", "--run", str(run)]) == 0
    return run


def new_texts() -> list[str]:
    return list(SyntheticCorpus(NEW_SOURCE).to_dataset()["text"])


def snapshot(paths: list[Path]) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file under ``paths``."""
    return {str(f): (f.read_bytes(), f.stat().st_mtime_ns) for p in paths for f in sorted(p.rglob("*")) if f.is_file()}


@pytest.mark.slow
def test_add_a_cluster_then_train_only_its_expert_and_the_router(trained, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run, copy_function=shutil.copy2)
    layout = RunLayout.of(run)
    others = [p for k in range(K) for p in (layout.expert(k), layout.shard(k), layout.checkpoints(f"expert-{k}"))]
    before = snapshot(others)
    old_docs = load_saved(layout.documents, "documents")
    texts = new_texts()

    assert add_cluster(run, texts) == K
    config = json.loads(layout.config.read_text())
    assert config["partition"]["num_clusters"] == K + 1
    docs = load_saved(layout.documents, "documents")
    for name in ("train", "validation", "test"):
        old, new = old_docs[name], docs[name]
        assert new.select(range(len(old)))["input_ids"] == old["input_ids"]  # old documents unchanged, in order
        assert set(new.select(range(len(old), len(new)))["cluster"]) == {K}
    added = {name: docs[name].filter(lambda c: c == K, input_columns="cluster") for name in docs}
    assert sum(len(split) for split in added.values()) == len(texts)
    assert all(len(split) >= 1 for split in added.values())  # a held-out share was carved

    partition = Partition.load(layout.partition)
    stats = json.loads((layout.partition / "stats.json").read_text())
    assert partition.num_clusters == K + 1 and partition.sizes[K] == len(added["train"])
    assert stats["sizes"] == partition.sizes and sum(stats["priors"]) == pytest.approx(1.0)
    old_stats = json.loads((trained / "partition" / "stats.json").read_text())
    assert (stats["purity"], stats["nmi"]) == (old_stats["purity"], old_stats["nmi"])  # same labelled documents
    held_out = list(added["validation"]["input_ids"]) + list(added["test"]["input_ids"])
    assert partition.assign(held_out).tolist() == [K] * len(held_out)  # the new centre attracts its kind
    # shard K holds every token of the new training documents and each one's EOS as a target, once
    labels = torch.tensor(load_saved(layout.shard(K), "shard")["train"]["labels"])
    targets = sum(len(ids) + 1 for ids in added["train"]["input_ids"])
    assert int((labels[:, 1:] >= 0).sum()) == targets
    old_targets = sum(read_share(layout, k)["targets"] for k in range(K))  # the old shards' shares unchanged
    assert read_share(layout, K) == {"targets": targets, "all_targets": old_targets + targets, "clusters": K + 1}
    eos = load_tokenizer(layout.tokenizer).eos_token_id
    to_rows = lambda docs: packed_rows(docs, labels.shape[1], eos)  # noqa: E731
    assert write_shard(DatasetDict(added), "cluster", K, to_rows, tmp_path / "shard") == targets
    assert not layout.checkpoints("router").exists()  # a router over K experts cannot be resumed

    assert main(["train-expert", "--run", str(run), "--expert", str(K)]) == 0
    assert main(["assemble", "--run", str(run)]) == 0
    with pytest.raises(DfmError, match="retrain it"):  # the old router routes over K experts only
        Ensemble.from_run(run)
    assert main(["train-router", "--run", str(run)]) == 0
    assert main(["assemble", "--run", str(run)]) == 0

    manifest = json.loads((run / "ensemble.json").read_text())
    assert [e["name"] for e in manifest["experts"]] == [f"expert-{k}" for k in range(K + 1)]
    assert [e["prior"] for e in manifest["experts"]] == stats["priors"]
    ensemble = Ensemble.from_run(run)
    assert ensemble.num_experts == K + 1 and ensemble.router.config.num_experts == K + 1
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--max-new-tokens", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["names"] == [f"expert-{k}" for k in range(K + 1)]
    assert (
        main(
            [
                "generate",
                "--run",
                str(run),
                "--max-new-tokens",
                "3",
                "--routing",
                "oracle",
                "--cluster",
                str(K),
                "--json",
            ]
        )
        == 0
    )
    assert snapshot(others) == before  # the other experts, shards and checkpoints: same bytes, same mtime


@pytest.mark.slow
def test_an_interrupted_addition_is_redone_cleanly(prepared, tmp_path) -> None:
    once, twice = tmp_path / "once", tmp_path / "twice"
    shutil.copytree(prepared, once)
    shutil.copytree(prepared, twice)
    texts = new_texts()
    assert add_cluster(once, texts) == K
    config = (twice / "config.json").read_text()
    assert add_cluster(twice, texts) == K
    (twice / "config.json").write_text(config)  # interrupted just before the commit ...
    (twice / "partition" / "stats.json").unlink()  # ... or even earlier
    assert add_cluster(twice, texts) == K  # ... and run again
    for name in ("config.json", "partition/stats.json"):
        assert (once / name).read_text() == (twice / name).read_text()
    a, b = Partition.load(once / "partition"), Partition.load(twice / "partition")
    assert torch.equal(a.centres, b.centres) and torch.equal(a.assignments, b.assignments)
    for name, split in load_saved(once / "data" / "documents", "documents").items():
        other = load_saved(twice / "data" / "documents", "documents")[name]
        assert split["input_ids"] == other["input_ids"] and split["cluster"] == other["cluster"]
    assert (
        load_saved(once / "data" / f"expert-{K}", "s")["train"]["input_ids"]
        == load_saved(twice / "data" / f"expert-{K}", "s")["train"]["input_ids"]
    )


@pytest.mark.slow
def test_texts_from_local_files_and_bad_input(prepared, tmp_path) -> None:
    files = tmp_path / "new.jsonl"
    files.write_text("\n".join(json.dumps({"body": text}) for text in new_texts()[:12]))
    texts = read_texts(DataSource(dataset="json", data_files=[str(files)], text_column="body"))
    assert sorted(texts) == sorted(new_texts()[:12])
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    before = snapshot([run])
    for bad, message in (
        (texts[:2], "too few"),
        ([], "no non-empty"),
        (["", " "], "no non-empty"),
        ("one string", "list of strings"),
    ):
        with pytest.raises(DfmError, match=message):
            add_cluster(run, bad)
    assert snapshot([run]) == before  # refused before anything was written
    with pytest.raises(DfmError, match="dfm prepare"):
        add_cluster(tmp_path / "nothing", texts)
    assert add_cluster(run, texts) == K
    with pytest.raises(DfmError, match="added before"):  # the same documents again
        add_cluster(run, texts)
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text("\n".join(json.dumps({"body": text}) for text in [*texts, None]))
    with pytest.raises(DfmError, match="column 'body' of split 'train' has 1 of 13 rows whose value is null"):
        read_texts(DataSource(dataset="json", data_files=[str(nulls)], text_column="body"))


@pytest.mark.slow
def test_add_expert_prints_k_alone_on_stdout(prepared, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    files = tmp_path / "new.jsonl"
    files.write_text("\n".join(json.dumps({"text": text}) for text in new_texts()))
    capsys.readouterr()
    assert main(["add-expert", "--run", str(run), "--dataset", "json", "--data-files", str(files)]) == 0
    assert capsys.readouterr().out == f"{K}\n"
