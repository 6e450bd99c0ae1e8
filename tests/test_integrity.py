"""Integrity of what training and assembling leave behind: a resume refuses checkpoints it cannot
trust and data other than its own, fsdp refuses a single process, and ensemble.json covers the
partition, missing files and manifests without hashes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset

from dfm.atomic import write_json
from dfm.cli import main
from dfm.errors import DfmError
from models.ensemble import Ensemble
from models.expert import save_expert
from models.manifest import MANIFEST, Manifest
from models.partition import Partition
from tests.test_ensemble import VOCAB, tiny_expert, word_tokenizer
from tests.test_trainer import VOCAB as LLAMA_VOCAB
from tests.test_trainer import assert_same_weights, crash_after, random_blocks, run, tiny_llama
from training.assemble import assemble
from training.checkpoint import checkpoint_dirs
from training.trainer import FINGERPRINT_ROWS, TrainConfig, data_fingerprint

CONFIG = TrainConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2)


# --- 1. a resume whose checkpoints are all damaged --------------------------------------------------
def test_a_resume_with_every_checkpoint_damaged_is_refused_naming_them(tmp_path: Path) -> None:
    data = random_blocks(12)
    run(tmp_path, tiny_llama(), data, CONFIG)
    ckpt = tmp_path / "ckpt"
    newest, older = [path for _, path in reversed(checkpoint_dirs(ckpt))]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (older / "state.json").write_text("{not json")
    shutil.rmtree(tmp_path / "out")
    with pytest.raises(DfmError) as err:
        run(tmp_path, tiny_llama(), data, CONFIG, resume=True)
    message = str(err.value)
    assert "\n" not in message
    assert f"every checkpoint in {ckpt} is damaged" in message
    assert "step-0000004: sha256 mismatch for model.safetensors" in message and "step-0000002: " in message
    assert f"delete {ckpt} and run again without --resume to start over" in message
    assert not (tmp_path / "out").exists()  # nothing was trained from step 0


def test_a_resume_without_any_checkpoint_trains_from_step_zero(tmp_path: Path) -> None:
    """Kept as it was: --resume on a model never trained before is a fresh run."""
    data = random_blocks(12)
    fresh, resumed = tiny_llama(), tiny_llama()
    run(tmp_path / "fresh", fresh, data, CONFIG)
    run(tmp_path / "resumed", resumed, data, CONFIG, resume=True)
    assert_same_weights(resumed, fresh)


# --- 2. the data fingerprint covers every row -----------------------------------------------------
def _sharing_the_old_sampled_rows(data: Dataset) -> Dataset:
    """``data`` with one row changed that is neither the first, the middle nor the last (the
    only rows the fingerprint used to read)."""
    rows = list(data["input_ids"])
    rows[1] = [(token + 1) % LLAMA_VOCAB for token in rows[1]]
    return Dataset.from_dict({"input_ids": rows})


def test_the_fingerprint_tells_apart_data_that_shares_the_first_middle_and_last_rows(tmp_path: Path) -> None:
    data = random_blocks(2 * FINGERPRINT_ROWS + 3)  # three batches of rows, the last one short
    other = _sharing_the_old_sampled_rows(data)
    for i in (0, len(data) // 2, len(data) - 1):
        assert other[i] == data[i]
    assert data_fingerprint(other) != data_fingerprint(data)
    assert data_fingerprint(data.shuffle(seed=0)) != data_fingerprint(data)  # same files, other order

    # the same rows read back from disk, or as two concatenated pieces, or torch-formatted: the same data
    data.save_to_disk(str(tmp_path / "saved"))
    loaded = datasets.load_from_disk(str(tmp_path / "saved"))
    assert loaded.cache_files
    pieces = datasets.concatenate_datasets([loaded.select(range(5)), data.select(range(5, len(data)))])
    for same in (loaded, pieces, loaded.with_format("torch")):
        assert data_fingerprint(same) == data_fingerprint(data)


def test_a_resume_onto_data_that_shares_the_sampled_rows_is_refused(tmp_path: Path) -> None:
    config = TrainConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2)
    data = random_blocks(12)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, tiny_llama(), data, config, loss_fn=crash_after(3))
    assert [step for step, _ in checkpoint_dirs(tmp_path / "ckpt")] == [2]
    with pytest.raises(DfmError, match="training data changed since the checkpoint was written"):
        run(tmp_path, tiny_llama(), _sharing_the_old_sampled_rows(data), config, resume=True)


def test_a_checkpoint_without_the_data_sha256_resumes_with_a_warning(tmp_path: Path) -> None:
    """A checkpoint written before the fingerprint covered every row cannot be checked: resumed,
    but not silently."""
    data = random_blocks(12)
    reference = tiny_llama()
    run(tmp_path / "ref", reference, data, CONFIG)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, tiny_llama(), data, CONFIG, loss_fn=crash_after(3))
    state_path = tmp_path / "ckpt" / "step-0000002" / "state.json"
    state = json.loads(state_path.read_text())
    state["extra"].pop("data_sha256", None)
    state_path.write_text(json.dumps(state))
    resumed = tiny_llama(seed=7)
    with pytest.warns(UserWarning, match="predates the sha256 of all its training data"):
        run(tmp_path, resumed, data, CONFIG, resume=True)
    assert_same_weights(resumed, reference)


# --- 4. fsdp without torchrun ---------------------------------------------------------------------
def test_fsdp_in_a_single_process_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, fsdp=True)
    with pytest.raises(
        DfmError,
        match=r"fsdp shards over torchrun ranks and this is a single process: run under "
        r"torchrun --nproc_per_node N or drop fsdp",
    ):
        run(tmp_path, tiny_llama(), random_blocks(8), config, desc="expert-0")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


# --- 3. ensemble.json ------------------------------------------------------------------------------
@pytest.fixture
def assembled(tmp_path: Path) -> Path:
    """A run directory that `dfm assemble` accepts (tokenizer, two untrained experts, a partition
    with its stats), assembled."""
    run_dir = tmp_path / "run"
    word_tokenizer().save_pretrained(run_dir / "tokenizer")
    for k in range(2):
        save_expert(tiny_expert(k), run_dir / "experts" / f"expert-{k}")
    centres = torch.nn.functional.normalize(torch.rand(2, VOCAB, generator=torch.Generator().manual_seed(0)), dim=1)
    Partition(centres=centres, idf=torch.ones(VOCAB), projection=None, assignments=torch.tensor([0, 1, 1])).save(
        run_dir / "partition"
    )
    write_json(run_dir / "partition" / "stats.json", {"priors": [1 / 3, 2 / 3]})
    write_json(run_dir / "config.json", {})
    assemble(run_dir)
    return run_dir


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dfm: error: "), stderr
    return lines[0]


def centroid_generate(run_dir: Path) -> int:
    return main(
        [
            "generate",
            "--run",
            str(run_dir),
            "--routing",
            "centroid",
            "--prompt",
            "t3 t4",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
        ]
    )


def test_assemble_records_the_partition_and_centroid_routing_verifies_it(assembled: Path, capsys) -> None:
    recorded = Manifest.load(assembled).sha256
    assert {"partition/centres.safetensors", "partition/partition.json", "partition/stats.json"} <= set(recorded)
    assert centroid_generate(assembled) == 0
    capsys.readouterr()

    centres = assembled / "partition" / "centres.safetensors"
    data = bytearray(centres.read_bytes())
    data[-1] ^= 1  # a centre's last byte: the partition still loads, but is not the one assembled
    centres.write_bytes(bytes(data))
    Partition.load(assembled / "partition")
    with pytest.raises(DfmError, match="differs from the file `dfm assemble` recorded"):
        Manifest.load(assembled).load_partition(assembled)
    assert centroid_generate(assembled) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{centres.resolve()} differs from the file `dfm assemble` recorded in {MANIFEST}" in line


def test_a_partition_a_manifest_does_not_cover_is_refused(assembled: Path, capsys) -> None:
    """A version 2 manifest written before partitions were hashed verifies nothing of it: refused."""
    path = assembled / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["sha256"] = {k: v for k, v in manifest["sha256"].items() if not k.startswith("partition/")}
    path.write_text(json.dumps(manifest))
    assert centroid_generate(assembled) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{MANIFEST} records no sha256 of partition" in line and f"re-run `dfm assemble --run {assembled}`" in line


@pytest.mark.parametrize(
    "listed", ["partition/stats.json", "experts/expert-1/generation_config.json", "tokenizer/tokenizer_config.json"]
)
def test_a_listed_file_that_is_missing_is_refused(assembled: Path, listed: str) -> None:
    """Files the loaders do not need (so they fail on nothing) but `dfm assemble` recorded."""
    assert listed in Manifest.load(assembled).sha256
    (assembled / listed).unlink()
    load = (
        (lambda: Manifest.load(assembled).load_partition(assembled))
        if listed.startswith("partition")
        else (lambda: Ensemble.from_run(assembled))
    )
    with pytest.raises(DfmError) as err:
        load()
    message = str(err.value)
    assert f"{(assembled / listed).resolve()} is listed in {MANIFEST} but missing" in message
    assert f"re-run `dfm assemble --run {assembled}`" in message and "\n" not in message


def test_a_version_2_manifest_without_hashes_is_refused(assembled: Path, capsys) -> None:
    path = assembled / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "sha256": {}}))
    with pytest.raises(
        DfmError,
        match=f"has format version 2 but records no sha256 of its artifacts.*re-run `dfm assemble --run {assembled}`",
    ):
        Ensemble.from_run(assembled)
    assert main(["generate", "--run", str(assembled), "--max-new-tokens", "2", "--routing", "bayes"]) == 2
    assert "records no sha256" in one_error_line(capsys.readouterr().err)


def test_a_version_1_manifest_loads_with_a_one_line_warning(assembled: Path, capsys) -> None:
    path = assembled / MANIFEST
    old = json.loads(path.read_text())
    del old["sha256"]
    path.write_text(json.dumps({**old, "format_version": 1}))
    weights = assembled / "experts" / "expert-1" / "model.safetensors"
    shutil.copyfile(assembled / "experts" / "expert-0" / "model.safetensors", weights)  # nothing to refuse it by
    with pytest.warns(
        UserWarning,
        match=f"{path} has format version 1, without the sha256 of its artifacts: nothing it names is verified",
    ):
        Ensemble.from_run(assembled)
    assert main(["generate", "--run", str(assembled), "--max-new-tokens", "2", "--routing", "bayes"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dfm: warning:")]
    assert len(warnings) == 1 and "format version 1" in warnings[0], warnings
