"""Router: incremental decoding, left-padding invariance, causality, persistence, config checks."""

from __future__ import annotations

import json

import pytest
import torch

from dfm.errors import DfmError
from models.router import Router, RouterConfig

VOCAB, K = 50, 3
ATOL = 1e-5  # float32 reductions in a different order (cache concatenation, extra masked keys)


def make_router(seed: int = 0, **overrides) -> Router:
    torch.manual_seed(seed)
    config = RouterConfig(vocab_size=VOCAB, num_experts=K, hidden_size=32, num_heads=4, max_positions=64, **overrides)
    return Router(config).eval()


def tokens(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def decode_in_chunks(
    router: Router, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int, chunk: int
) -> torch.Tensor:
    """Prefill ``prompt_len`` tokens, then feed the rest ``chunk`` tokens at a time."""
    cache = router.new_cache()
    outputs = [router(ids[:, :prompt_len], mask[:, :prompt_len], cache)]
    for start in range(prompt_len, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        outputs.append(router(ids[:, start:end], mask[:, :end], cache))
        assert cache.length == end
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_decoding_matches_full_forward(chunk: int) -> None:
    router = make_router()
    ids = tokens(1, 2, 20)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        full = router(ids)
        incremental = decode_in_chunks(router, ids, mask, prompt_len=7, chunk=chunk)
    assert incremental.shape == (2, 20, K)
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_left_padding_invariance(chunk: int | None) -> None:
    router = make_router()
    long_row, short_row = tokens(2, 1, 16), tokens(3, 1, 10)
    pad = long_row.shape[1] - short_row.shape[1]
    ids = torch.cat([long_row, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_row], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.inference_mode():
        alone_long, alone_short = router(long_row), router(short_row)
        if chunk is None:
            batched = router(ids, mask)
        else:
            batched = decode_in_chunks(router, ids, mask, prompt_len=pad + 2, chunk=chunk)
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[0], alone_long[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1, pad:], alone_short[0], atol=ATOL, rtol=0)


def test_padding_keeps_outputs_finite_and_padding_values_irrelevant() -> None:
    router = make_router()
    ids = tokens(4, 3, 12)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0  # a single real token
    other = ids.clone()
    other[mask == 0] = 7
    with torch.inference_mode():
        logits, logits_other = router(ids, mask), router(other, mask)
    assert torch.isfinite(logits).all()
    real = mask.bool()
    assert torch.equal(logits[real], logits_other[real])


def test_causality_later_tokens_do_not_change_earlier_logits() -> None:
    router = make_router()
    ids = tokens(5, 2, 15)
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    with torch.inference_mode():
        before, after = router(ids), router(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.equal(before[:, 9:], after[:, 9:])


def test_positions_beyond_max_positions_raise() -> None:
    router = make_router()
    with torch.inference_mode():
        router(tokens(6, 1, 64))
        with pytest.raises(DfmError, match="truncate"):
            router(tokens(6, 1, 65))
        # Left padding does not count: 64 real tokens behind 4 pads are fine.
        mask = torch.ones(1, 68, dtype=torch.long)
        mask[0, :4] = 0
        assert torch.isfinite(router(tokens(7, 1, 68), mask)).all()
        cache = router.new_cache()
        router(tokens(8, 1, 64), cache=cache)
        with pytest.raises(DfmError, match="truncate"):
            router(tokens(9, 1, 1), cache=cache)
    assert cache.length == 64  # the failed call left the cache untouched


def test_mask_shape_mismatch_raises() -> None:
    router = make_router()
    cache = router.new_cache()
    with torch.inference_mode():
        router(tokens(10, 2, 5), cache=cache)
        with pytest.raises(DfmError, match="attention_mask"):
            router(tokens(11, 2, 1), torch.ones(2, 1), cache)


def test_save_load_round_trip_is_exact(tmp_path) -> None:
    router = make_router(seed=3, num_layers=3)
    router.save_pretrained(tmp_path / "router")
    config = json.loads((tmp_path / "router" / "config.json").read_text())
    assert config["model_type"] == "dfm-router" and config["num_layers"] == 3
    loaded = Router.from_pretrained(tmp_path / "router")
    assert loaded.config == router.config and not loaded.training
    assert next(loaded.parameters()).device.type == "cpu"
    ids = tokens(12, 2, 11)
    with torch.inference_mode():
        assert torch.equal(loaded(ids), router(ids))
    router.save_pretrained(tmp_path / "router")  # overwriting an existing directory works
    assert sorted(p.name for p in (tmp_path / "router").iterdir()) == ["config.json", "model.safetensors"]


def test_from_pretrained_errors(tmp_path) -> None:
    with pytest.raises(DfmError, match="does not exist"):
        Router.from_pretrained(tmp_path / "missing")
    directory = tmp_path / "router"
    make_router().save_pretrained(directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DfmError, match="corrupt"):
        Router.from_pretrained(directory)
    # Valid weights that do not fit the config.
    make_router().save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(DfmError, match="do not match") as caught:
        Router.from_pretrained(directory)
    assert "\n" not in str(caught.value) and "size mismatch for" in str(caught.value)  # one line of torch's list
    assert "dfm train-router" in str(caught.value)
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(DfmError, match="not a dfm-router"):
        Router.from_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(DfmError, match="lacks"):
        Router.from_pretrained(directory)


@pytest.mark.parametrize(
    "overrides",
    [
        {"vocab_size": 0},
        {"num_experts": 0},
        {"hidden_size": -8},
        {"num_layers": 0},
        {"num_heads": 0},
        {"max_positions": 0},
        {"hidden_size": 30, "num_heads": 4},
        {"dropout": 1.0},
        {"hidden_size": 64.0},
    ],
)
def test_bad_config_raises(overrides: dict) -> None:
    with pytest.raises(DfmError):
        RouterConfig.from_dict({"vocab_size": VOCAB, "num_experts": K, **overrides})


def test_config_dict_round_trip_and_unknown_keys() -> None:
    config = RouterConfig(vocab_size=VOCAB, num_experts=K, dropout=0.1)
    assert RouterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(DfmError, match="unknown"):
        RouterConfig.from_dict({**config.to_dict(), "hiden_size": 8})
    with pytest.raises(DfmError, match="missing"):
        RouterConfig.from_dict({"vocab_size": VOCAB})


def test_seeded_construction_is_deterministic() -> None:
    a, b = make_router(seed=4), make_router(seed=4)
    ids = tokens(13, 1, 6)
    with torch.inference_mode():
        assert torch.equal(a(ids), b(ids))
