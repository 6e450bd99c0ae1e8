"""expert.allocation: the branch phase's steps split equally, or in proportion to the shards'
training tokens (a big cluster gets the steps the baseline would spend on it); expert.epochs and
seed_model.epochs: steps sized to passes over the data."""

import dataclasses
import json
import math
import random
import shutil

import pytest

from dfm.errors import DfmError
from tests.tiny_config import write_tiny_config
from training.allocation import epoch_steps, expert_steps, read_share, seed_train
from training.config import parse_override, read_run_config, resolve_config
from training.data import load_saved
from training.estimate import remaining_flops
from training.layout import RunLayout
from training.lm_training import TRAINED_FLOPS, train_expert
from training.prepare import prepare, training_targets

SIZES = {"big": 120, "mid": 40, "small": 20}  # documents per domain: 6 : 2 : 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("allocation")
    rng = random.Random(0)
    rows = []
    for domain, count in SIZES.items():
        words = [f"{domain}{i}" for i in range(12)]
        rows += [{"text": " ".join(rng.choices(words, k=30)), "domain": domain} for _ in range(count)]
    rng.shuffle(rows)
    (root / "docs.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    overrides = {
        "data.dataset": "json",
        "data.data_files": [str(root / "docs.jsonl")],
        "data.cluster_column": "domain",
        "seed_model.phase": False,
        "expert.allocation": "tokens",
        "tokenizer.vocab_size": 260,
    }
    config = resolve_config(
        write_tiny_config(root), [parse_override(f"{k}={json.dumps(v)}") for k, v in overrides.items()]
    )
    prepare(config, root / "run")
    return root / "run"


def test_shares_are_the_shards_training_tokens(run):
    layout = RunLayout.of(run)
    shares = [read_share(layout, k) for k in range(3)]
    targets = [training_targets(load_saved(layout.shard(k), "shard")["train"]) for k in range(3)]
    assert [share["targets"] for share in shares] == targets
    assert all(share["all_targets"] == sum(targets) and share["clusters"] == 3 for share in shares)


def test_tokens_split_the_same_total_by_share_and_equal_gives_every_expert_the_steps(run):
    layout = RunLayout.of(run)
    config = read_run_config(run)
    steps = config.expert.train["steps"]
    split = [expert_steps(config, layout, k) for k in range(3)]
    targets = [read_share(layout, k)["targets"] for k in range(3)]
    exact = [3 * steps * t / sum(targets) for t in targets]
    assert all(abs(s - e) <= 0.5 for s, e in zip(split, exact))  # rounded to the nearest step
    big = max(range(3), key=targets.__getitem__)
    assert split[big] > steps > min(split)  # 6 : 2 : 1 documents: the big shard gets the most
    equal = dataclasses.replace(config, expert=dataclasses.replace(config.expert, allocation="equal"))
    assert [expert_steps(equal, layout, k) for k in range(3)] == [steps] * 3


def test_an_expert_trains_its_allotted_steps(run):
    layout = RunLayout.of(run)
    config = read_run_config(run)
    big = max(range(3), key=lambda k: read_share(layout, k)["targets"])
    summary = train_expert(run, big)
    assert summary["steps"] == expert_steps(config, layout, big) > config.expert.train["steps"]


def test_a_run_without_shares_and_a_bad_allocation_are_refused(run, tmp_path):
    config = read_run_config(run)
    stale = RunLayout.of(tmp_path)  # a shard written before the shares were recorded
    stale.shard(0).mkdir(parents=True)
    with pytest.raises(DfmError, match="prepare the run again, or --set expert.allocation=equal"):
        expert_steps(config, stale, 0)
    with pytest.raises(DfmError, match="expert.allocation must be equal or tokens"):
        resolve_config(None, [parse_override("expert.allocation=largest")])


def _with(config, section, **changes):
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def test_epochs_size_each_expert_to_its_own_shard_and_the_expert_trains_them(run, tmp_path):
    layout = RunLayout.of(run)
    config = _with(read_run_config(run), "expert", allocation="equal", epochs=1.5)
    batch = config.expert.train["batch_size"]
    blocks = [load_saved(layout.shard(k), "shard")["train"].num_rows for k in range(3)]
    steps = [expert_steps(config, layout, k) for k in range(3)]
    assert steps == [math.ceil(1.5 * b / batch) for b in blocks]
    assert expert_steps(config, layout, 0, world_size=2) == math.ceil(1.5 * blocks[0] / (2 * batch))
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("experts", "checkpoints", "logs"))
    (copy / "config.json").write_text(json.dumps(config.to_dict()))
    # the time estimate prices each expert's own steps: twice (the expert, and the baseline matched to it)
    parameters = 10_000
    equal = _with(config, "expert", epochs=None)
    row = TRAINED_FLOPS * parameters * batch * config.expert.block_size
    extra = remaining_flops(copy, config, parameters) - remaining_flops(copy, equal, parameters)
    assert extra == pytest.approx(2 * row * (sum(steps) - 3 * config.expert.train["steps"]), rel=1e-9)
    small = min(range(3), key=blocks.__getitem__)
    summary = train_expert(copy, small)
    assert summary["steps"] == steps[small]
    assert summary["tokens"] == steps[small] * batch * config.expert.block_size  # every step read a full batch


def test_epoch_steps_count_every_row_of_a_step_and_round_only_real_remainders():
    assert epoch_steps(1.0, 100, {"batch_size": 4, "grad_accum": 2}, world_size=2) == 7  # 16 rows a step
    assert epoch_steps(1.1, 400, {"batch_size": 8}) == 55  # 1.1 x 400 / 8 is 55.00000000000001 in floats
    assert epoch_steps(3 * 0.1, 10_000, {"batch_size": 8}) == 375  # a rung's budget x epochs
    assert epoch_steps(1e-6, 10, {"batch_size": 8}) == 1


def test_seed_epochs_give_the_steps_of_those_passes_and_a_warm_up_that_fits(run):
    config = read_run_config(run)
    batch, warmup = config.seed_model.train["batch_size"], config.seed_model.train["warmup_steps"]
    assert seed_train(_with(config, "seed_model", epochs=3), 10)["steps"] == math.ceil(3 * 10 / batch)
    short = seed_train(_with(config, "seed_model", epochs=0.5), batch)  # half a batch: one step
    assert (short["steps"], short["warmup_steps"]) == (1, 0) and warmup >= 1  # the warm-up cut to fit


@pytest.mark.parametrize("value", ["0", "-1", '"one"', "true"])
def test_epochs_that_are_not_a_positive_number_are_refused(value):
    for section in ("expert", "seed_model"):
        with pytest.raises(DfmError, match=f"config {section}.epochs must be a positive number"):
            resolve_config(None, [parse_override(f"{section}.epochs={value}")])


def test_epochs_with_a_tokens_allocation_are_refused():
    with pytest.raises(DfmError, match="expert.epochs already sizes every expert by its own shard"):
        resolve_config(None, [parse_override("expert.epochs=1"), parse_override("expert.allocation=tokens")])
