"""The router's training rows: Bayes rows where the experts scored, the cluster beyond; windows from
inside long documents; the options that choose them refused when wrong."""

import datasets
import pytest
import torch

from dfm.errors import DfmError
from models.router import Router, RouterConfig
from training.config import resolve_config
from training.router_training import _windows, extended_targets, router_examples


def test_bayes_rows_then_the_cluster_for_the_unscored_prefixes() -> None:
    scored = [torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.1, 0.9]])]  # BOS and the first two tokens scored
    rows = extended_targets(scored, [[7, 8, 9, 10]], [0], 2)[0]
    assert rows.shape == (5, 2)  # one row per prefix: BOS + 4 tokens
    assert torch.equal(rows[:3], scored[0]) and torch.equal(rows[3:], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_windows_start_inside_long_documents_without_bos() -> None:
    docs = datasets.Dataset.from_dict(
        {"input_ids": [list(range(100, 120)), list(range(5)), list(range(200, 208))], "cluster": [1, 0, 2]}
    )
    windows = _windows(docs, max_length=8, num_clusters=3, seed=0, bos_id=0)
    assert len(windows) == 2  # the 5-token document is shorter than a window
    first = windows[0]["input_ids"]
    assert 101 <= first[0] <= 112 and first == list(range(first[0], first[0] + 8))  # 8 tokens from inside, no BOS
    assert windows[1]["input_ids"][: windows[1]["length"]] == list(range(201, 208))  # as long as a window: from token 1
    assert torch.tensor(windows[0]["targets"]).argmax(-1).tolist() == [1] * 8
    assert _windows(docs, 8, 3, seed=0, bos_id=0)["input_ids"] == windows["input_ids"]  # seeded


def test_starts_replace_bos() -> None:
    rows = router_examples([[5, 6]], [torch.eye(2)[[0, 0, 0]]], 4, bos_id=0, starts=[9])
    assert rows[0]["input_ids"] == [9, 5, 6, 0] and rows[0]["length"] == 3


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("init", "pretrained", "router.init"),
        ("temperature", 2.0, "router.temperature"),
        ("windows", "yes", "router.windows"),
        ("label_documents", -1, "router.label_documents"),
        ("scored_length", 0, "router.scored_length"),
        ("dropout", 1.5, "dropout"),
    ],
)
def test_bad_router_options_are_refused(key, value, match) -> None:
    with pytest.raises(DfmError, match=match):
        resolve_config(overrides=[{"router": {key: value}}])


def test_seed_embedding_keeps_the_seed_geometry() -> None:
    """Projected on its top principal directions, a rank-2 embedding keeps its pairwise distances
    up to one common scale."""
    torch.manual_seed(0)
    seed = torch.randn(30, 2) @ torch.randn(2, 16)
    router = Router(RouterConfig(vocab_size=30, num_experts=2, hidden_size=8, num_layers=1, num_heads=2))
    router.init_token_embedding(seed)
    exact = "donot_use_mm_for_euclid_dist"
    weight = router.token_embedding.weight.detach().double()
    got, want = (
        torch.cdist(weight, weight, compute_mode=exact),
        torch.cdist(seed.double(), seed.double(), compute_mode=exact),
    )
    ratio = got[~torch.eye(30, dtype=torch.bool)] / want[~torch.eye(30, dtype=torch.bool)]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)  # float32 weights
    with pytest.raises(DfmError, match="rows"):
        router.init_token_embedding(seed[:10])


def test_default_router_trains_on_clusters_at_no_scoring_cost_and_keeps_its_temperature(tmp_path) -> None:
    """A tiny default run: cluster targets (nothing scored, nothing charged for scoring), the seed's
    embedding, windows, and a fitted temperature that the saved router reloads with."""
    import json

    from dfm.cli import main
    from tests.tiny_config import write_tiny_config
    from training.layout import RunLayout

    run = tmp_path / "run"
    assert main(["prepare", "--out", str(run), "--config", str(write_tiny_config(tmp_path))]) == 0
    for stage in (["train-seed-model"], *[["train-expert", "--expert", str(k)] for k in range(3)], ["train-router"]):
        assert main([*stage, "--run", str(run)]) == 0
    summary = RunLayout.of(run).read_summary("router")
    assert summary["targets"] == "cluster" and summary["scoring_flops"] == 0 and summary["scoring_tokens"] == {}
    assert summary["flops"] == 6 * summary["parameters"] * summary["tokens"]
    assert summary["kl_train"] >= 0 and summary["kl_validation"] >= 0
    saved = json.loads((run / "router" / "config.json").read_text())
    assert saved["temperature"] == summary["temperature"] != 1
    assert Router.from_pretrained(run / "router").config.temperature == summary["temperature"]
