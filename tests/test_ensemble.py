"""The ensemble of real (tiny, randomly initialised) Hugging Face experts as an ExpertPool."""

import pytest
import torch

from dfm import DecodeConfig, DfmError, Routing, generate
from dfm.mixing import uniform_log_prior
from models.ensemble import Ensemble
from models.expert import build_expert, expert_config, load_expert, save_expert
from models.manifest import ExpertEntry, Manifest, resolve_inside, tokenizer_fingerprint
from models.router import Router, RouterConfig

VOCAB = 40
TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def word_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
        eos_token="t0",
        bos_token="t0",
        pad_token="t0",
    )


FINGERPRINT = tokenizer_fingerprint(word_tokenizer().get_vocab())


def tiny_expert(seed, vocab=VOCAB, fingerprint=FINGERPRINT):
    config = expert_config(vocab, bos_token_id=0, eos_token_id=0, tokenizer_fingerprint=fingerprint, arch=TINY)
    return build_expert(config, seed=seed).eval()


def tiny_ensemble(k=3, engine="auto"):
    router = Router(
        RouterConfig(vocab_size=VOCAB, num_experts=k, hidden_size=16, num_layers=1, num_heads=2, max_positions=64)
    ).eval()
    return Ensemble([tiny_expert(s) for s in range(k)], uniform_log_prior(k), router=router, engine=engine)


ENGINES = pytest.mark.parametrize("engine", ["auto", "hf"])


def batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    tokens[1, :3] = 0
    return tokens, mask


def full_log_probs(model, tokens, mask):
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return torch.log_softmax(model(tokens, attention_mask=mask, position_ids=pos).logits, -1)


@ENGINES
def test_cached_decoding_equals_a_full_forward(engine):
    ens = tiny_ensemble(engine=engine)
    tokens, mask = batch()
    full = [full_log_probs(e, tokens, mask) for e in ens.experts]
    for t in range(4, tokens.shape[1] + 1):  # prefill 4 columns, then one column at a time
        got = ens.next_token_log_probs(tokens[:, :t], mask[:, :t], [0, 1, 2])
        for e in range(3):
            torch.testing.assert_close(got[:, e], full[e][:, t - 1], atol=1e-5, rtol=0)


@ENGINES
def test_sparse_experts_catch_up_in_one_forward(engine):
    ens = tiny_ensemble(engine=engine)
    tokens, mask = batch()
    ens.next_token_log_probs(tokens[:, :4], mask[:, :4], [0])
    for t in range(5, 9):
        ens.next_token_log_probs(tokens[:, :t], mask[:, :t], [0])
    late = ens.next_token_log_probs(tokens, mask, [1])  # expert 1 never ran: one prefill of all 9 columns
    torch.testing.assert_close(late[:, 0], full_log_probs(ens.experts[1], tokens, mask)[:, -1], atol=1e-5, rtol=0)
    assert ens.forward_passes == [5, 1, 0]
    assert ens.tokens_processed == [2 * 8, 2 * 9, 0]


@ENGINES
def test_prefix_log_likelihood_matches_full_forward(engine):
    ens = tiny_ensemble(engine=engine)
    tokens, mask = batch()
    got = ens.prefix_log_likelihood(tokens, mask, [0, 1, 2])
    for e in range(3):
        lp = full_log_probs(ens.experts[e], tokens, mask)
        picked = lp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1) * mask[:, :-1] * mask[:, 1:]
        torch.testing.assert_close(got[:, e], picked.sum(-1).double(), atol=1e-4, rtol=0)
    with pytest.raises(DfmError, match="reset"):
        ens.prefix_log_likelihood(tokens, mask, [0])


def test_stacked_engine_is_used_and_matches_experts_run_one_by_one():
    stacked, generic = tiny_ensemble(engine="auto"), tiny_ensemble(engine="hf")
    assert stacked.engine is not None and generic.engine is None
    tokens, mask = batch()
    torch.testing.assert_close(
        stacked.prefix_log_likelihood(tokens[:, :5], mask[:, :5], [0, 1, 2]),
        generic.prefix_log_likelihood(tokens[:, :5], mask[:, :5], [0, 1, 2]),
        atol=1e-5,
        rtol=0,
    )
    for t in range(5, 10):
        torch.testing.assert_close(
            stacked.next_token_log_probs(tokens[:, :t], mask[:, :t], [0, 1, 2]),
            generic.next_token_log_probs(tokens[:, :t], mask[:, :t], [0, 1, 2]),
            atol=1e-5,
            rtol=0,
        )
    assert stacked.forward_passes == generic.forward_passes == [5, 5, 5]
    stacked.reset()
    generic.reset()
    torch.testing.assert_close(
        stacked.prefix_log_likelihood(tokens, mask, [2, 0, 1]),
        generic.prefix_log_likelihood(tokens, mask, [2, 0, 1]),
        atol=1e-5,
        rtol=0,
    )


def test_bfloat16_experts_on_the_stacked_engine_err_like_transformers_own_bfloat16():
    """``--dtype bfloat16`` (the CUDA default): the stacked engine in bf16 is as far from the float32
    experts as transformers' own forward of the same bf16 weights is (bf16 keeps 8 bits of
    mantissa: about 0.1 nats on these peaked tiny models), and not further: rounding, not a
    wrong cast of the rotary tables, caches or norms (which would add errors of order 1)."""
    tokens, mask = batch()

    def log_probs(dtype, engine):
        ensemble = Ensemble([tiny_expert(s).to(dtype) for s in range(3)], uniform_log_prior(3), engine=engine)
        assert (ensemble.engine is not None) == (engine == "auto")
        return torch.stack(
            [ensemble.next_token_log_probs(tokens[:, :t], mask[:, :t], [0, 1, 2]).clone() for t in range(5, 10)]
        )

    exact = log_probs(torch.float32, "hf")
    stacked, theirs = log_probs(torch.bfloat16, "auto"), log_probs(torch.bfloat16, "hf")
    assert stacked.dtype == torch.float32  # log-probs leave the engine in float32
    their_error = (theirs - exact).abs().max()
    assert 0 < (stacked - exact).abs().max() <= 2 * their_error
    assert 0.5 * (stacked.exp() - exact.exp()).abs().sum(-1).max() < 0.05  # total variation per next token


def test_non_llama_experts_use_the_generic_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    experts = [
        GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
        for _ in range(2)
    ]
    ens = Ensemble(experts, uniform_log_prior(2))
    assert ens.engine is None
    tokens = torch.randint(1, VOCAB, (1, 6))
    mask = torch.ones_like(tokens)
    got = ens.next_token_log_probs(tokens, mask, [0, 1])
    with torch.no_grad():
        torch.testing.assert_close(
            got[:, 1], torch.log_softmax(experts[1](tokens).logits[:, -1], -1), atol=1e-5, rtol=0
        )


def test_router_weigher_is_incremental():
    ens = tiny_ensemble()
    tokens, mask = batch()
    weigher = ens.router_weigher()
    with torch.no_grad():
        full = torch.log_softmax(ens.router(tokens, mask).double(), -1)
    for t in range(3, 10):
        torch.testing.assert_close(weigher(tokens[:, :t], mask[:, :t]), full[:, t - 1], atol=1e-5, rtol=0)


def test_greedy_generation_is_deterministic_and_reset_between_batches():
    ens = tiny_ensemble()
    tokens, mask = batch()
    config = DecodeConfig(routing=Routing.MIXTURE, temperature=0.0, max_new_tokens=5)
    outs = []
    for _ in range(2):
        ens.reset()
        outs.append(generate(ens, tokens, mask, config, weigher=ens.router_weigher()).tokens)
    assert torch.equal(outs[0], outs[1])


def test_save_and_load_round_trip(tmp_path):
    expert = tiny_expert(0)
    save_expert(expert, tmp_path / "expert")
    loaded = load_expert(tmp_path / "expert")
    tokens, mask = batch()
    torch.testing.assert_close(
        full_log_probs(loaded, tokens, mask), full_log_probs(expert, tokens, mask), atol=0, rtol=0
    )
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(DfmError, match="no model"):
        load_expert(tmp_path / "missing")


def write_run(tmp_path, experts, router=None):
    """A minimal run directory: tokenizer, experts, router and ensemble.json."""
    tok = word_tokenizer()
    tok.save_pretrained(tmp_path / "tokenizer")
    entries = []
    for k, expert in enumerate(experts):
        save_expert(expert, tmp_path / "experts" / f"expert-{k}")
        entries.append(ExpertEntry(f"expert-{k}", f"experts/expert-{k}", 1 / len(experts)))
    if router is not None:
        router.save_pretrained(tmp_path / "router")
    Manifest(
        entries, "tokenizer", tokenizer_fingerprint(tok.get_vocab()), VOCAB, router="router" if router else None
    ).with_hashes(tmp_path).save(tmp_path)


def test_ensemble_round_trip_from_run(tmp_path):
    ens = tiny_ensemble()
    write_run(tmp_path, ens.experts, ens.router)
    loaded = Ensemble.from_run(tmp_path)
    tokens, mask = batch()
    torch.testing.assert_close(
        loaded.next_token_log_probs(tokens, mask, [0, 1, 2]),
        ens.next_token_log_probs(tokens, mask, [0, 1, 2]),
        atol=0,
        rtol=0,
    )
    torch.testing.assert_close(
        loaded.router_weigher()(tokens, mask), ens.router_weigher()(tokens, mask), atol=0, rtol=0
    )
    assert loaded.names == ["expert-0", "expert-1", "expert-2"]


def test_mismatched_vocabulary_expert_is_refused(tmp_path):
    with pytest.raises(DfmError, match="different vocabulary"):
        Ensemble([tiny_expert(0), tiny_expert(1, vocab=VOCAB + 1)], uniform_log_prior(2))
    write_run(tmp_path, [tiny_expert(0), tiny_expert(1, vocab=VOCAB + 1)])
    with pytest.raises(DfmError, match="vocabulary of 41"):
        Ensemble.from_run(tmp_path)


def test_expert_with_another_tokenizer_fingerprint_is_refused(tmp_path):
    write_run(tmp_path, [tiny_expert(0, fingerprint="other"), tiny_expert(1, fingerprint="other")])
    with pytest.raises(DfmError, match="different tokenizer"):
        Ensemble.from_run(tmp_path)


def test_missing_expert_is_named_or_left_out(tmp_path):
    ens = tiny_ensemble()
    write_run(tmp_path, ens.experts, ens.router)
    import shutil

    shutil.rmtree(tmp_path / "experts" / "expert-1")
    with pytest.raises(DfmError, match="expert-1"):
        Ensemble.from_run(tmp_path)
    with pytest.warns(UserWarning, match="expert-1"):
        partial = Ensemble.from_run(tmp_path, allow_missing=True)
    assert partial.names == ["expert-0", "expert-2"]
    tokens, mask = batch()
    full = torch.log_softmax(ens.router(tokens, mask).double(), -1)[:, -1, [0, 2]]
    torch.testing.assert_close(partial.router_weigher()(tokens, mask).exp(), full.softmax(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(partial.log_prior.exp(), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_manifest_paths_stay_inside_the_run(tmp_path):
    with pytest.raises(DfmError, match="outside the run directory"):
        resolve_inside(tmp_path, "../elsewhere")
    with pytest.raises(DfmError, match="does not exist"):
        Manifest.load(tmp_path / "nope")


def test_document_separator_embedding_is_learnable():
    """EOS is BOS, separator and pad in dfm: its embedding must not be the frozen zero row that
    Hugging Face gives `pad_token_id` (a zero BOS makes the first prediction uniform)."""
    expert = tiny_expert(0)
    embedding = expert.get_input_embeddings()
    assert embedding.padding_idx is None and expert.config.pad_token_id is None
    assert embedding.weight[0].abs().sum() > 0
    assert expert.generation_config.pad_token_id == 0
