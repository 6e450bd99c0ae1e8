"""Text generation with the routed ensemble: tiny random-init Llama experts, a tiny router."""

import json

import pytest
import torch

from dfm import DfmError, exclude_log_weights, normalize_log_weights, top_k_log_weights
from dfm.mixing import uniform_log_prior
from models.ensemble import Ensemble
from models.expert import build_expert, expert_config
from models.generation import generate_text, single_model
from models.router import Router, RouterConfig
from models.weighers import DEFAULT_TEMPERATURE, CentroidWeigher, OracleWeigher
from training.clustering import from_labels

VOCAB = 40
CONTEXT = 64
K = 3
# initializer_range 0.2 (not 0.02) gives peaked next-token distributions, so greedy choices are
# not decided by float noise between the batched and the single-row paths.
ARCH = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": CONTEXT,
    "initializer_range": 0.2,
}


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", bos_token="t0", pad_token="t0")


def tiny_expert(seed):
    config = expert_config(VOCAB, bos_token_id=0, eos_token_id=0, tokenizer_fingerprint="test", arch=ARCH)
    return build_expert(config, seed=seed).eval()


def tiny_router(k, seed=0):
    torch.manual_seed(seed)
    router = Router(
        RouterConfig(vocab_size=VOCAB, num_experts=k, hidden_size=16, num_layers=1, num_heads=2, max_positions=CONTEXT)
    )
    torch.nn.init.normal_(router.head.weight, std=1.0)  # decisive weights: routing actually changes
    return router.eval()


def tiny_ensemble(k=K):
    return Ensemble(
        [tiny_expert(s) for s in range(k)], uniform_log_prior(k), router=tiny_router(k), tokenizer=word_tokenizer()
    )


def tiny_partition(k=K):
    """Cluster c's documents use tokens 1 + 13c .. 13 + 13c, so tf-idf separates them."""
    g = torch.Generator().manual_seed(0)
    docs = [(1 + 13 * (i % k) + torch.randint(0, 13, (10,), generator=g)).tolist() for i in range(12)]
    return from_labels(docs, [i % k for i in range(12)], VOCAB)


def words(ids):
    return " ".join(f"t{i}" for i in ids)


PROMPTS = [words([3, 7, 12, 5, 30]), words([22, 9])]


def weigher_for(mode, ens, clusters):
    if mode == "centroid":
        return CentroidWeigher(tiny_partition(), bos_id=0)
    if mode == "oracle":
        return OracleWeigher(clusters, ens.num_experts)
    return None


def test_topk_with_every_expert_equals_mixture():
    ens = tiny_ensemble()
    mixture = generate_text(ens, PROMPTS, routing="mixture", temperature=0, max_new_tokens=12)
    topk = generate_text(ens, PROMPTS, routing="topk", k=K, temperature=0, max_new_tokens=12)
    assert topk.token_ids == mixture.token_ids
    assert topk.texts == mixture.texts


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_oracle_equals_the_experts_own_greedy_generation(stop_at_eos):
    ens = tiny_ensemble()
    n = 15
    for c in range(K):
        gen = generate_text(
            ens,
            PROMPTS[0],
            routing="oracle",
            weigher=OracleWeigher([c], K),
            temperature=0,
            max_new_tokens=n,
            stop_at_eos=stop_at_eos,
        )
        ids = torch.tensor(gen.prompt_ids)
        eos = 0 if stop_at_eos else None  # HF stops after EOS like we do, or never
        with torch.no_grad():
            hf = ens.experts[c].generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
            )
        assert gen.token_ids[0] == hf[0, ids.shape[1] :].tolist()
        assert all(step == [c] for step in gen.experts_ran)
        assert [p > 0 for p in gen.forward_passes] == [e == c for e in range(K)]


def test_sparse_top1_runs_one_expert_per_step_and_catches_up():
    ens = Ensemble(
        [tiny_expert(s) for s in range(4)],
        uniform_log_prior(4),
        router=tiny_router(4, seed=1),
        tokenizer=word_tokenizer(),
    )
    ens.router.head.bias.data[3] = -30.0  # expert 3 is never selected
    gen = generate_text(ens, PROMPTS[0], routing="topk", k=1, max_new_tokens=30, seed=0, stop_at_eos=False)
    prompt_len = len(gen.prompt_ids[0])
    assert all(len(step) == 1 for step in gen.experts_ran)
    # replay the schedule: an expert selected at step s has seen prompt_len + s columns afterwards
    seen, passes, processed, last = [0] * 4, [0] * 4, [0] * 4, {}
    for s, (e,) in enumerate(gen.experts_ran):
        processed[e] += prompt_len + s - seen[e]
        passes[e] += 1
        seen[e] = prompt_len + s
        last[e] = s
    assert gen.forward_passes == passes
    assert gen.tokens_processed == processed
    catch_up = sum(last.values())  # tokens generated before each expert's last step
    assert sum(gen.tokens_processed) == prompt_len * len(last) + catch_up
    assert gen.forward_passes[3] == 0 and gen.tokens_processed[3] == 0
    # the schedule is a real test: the selected expert changed, so some expert had to catch up
    assert any(gen.experts_ran[s] != gen.experts_ran[s - 1] for s in range(1, len(gen.experts_ran)))


CASES = [
    dict(routing="mixture"),
    dict(routing="mixture", exclude=[2]),
    dict(routing="topk", k=2),
    dict(routing="topk", k=1, route_on="prompt"),
    dict(routing="switch"),
    dict(routing="bayes"),
    dict(routing="bayes", route_on="prompt"),
    dict(routing="centroid"),
    dict(routing="centroid", k=2),
    dict(routing="oracle"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_cached_decoding_equals_recomputation_from_scratch(case):
    """Every generated token's weights and mixture log-prob, recomputed from the full prefix."""
    ens = tiny_ensemble()
    mode, k, exclude = case["routing"], case.get("k"), case.get("exclude", [])
    prompts = PROMPTS[:1] if mode == "switch" else PROMPTS  # batch 1: experts_ran names the switched expert
    clusters = [1, 2]
    gen = generate_text(
        ens, prompts, max_new_tokens=8, seed=3, weigher=weigher_for(mode, ens, clusters[: len(prompts)]), **case
    )
    partition = tiny_partition()
    for i, prompt in enumerate(gen.prompt_ids):
        for t, token in enumerate(gen.token_ids[i]):
            seq = torch.tensor([prompt + gen.token_ids[i][:t]])
            mask = torch.ones_like(seq)
            routed_on = seq[:, : len(prompt)] if case.get("route_on") == "prompt" else seq
            ens.reset()
            if mode == "bayes":
                ll = ens.prefix_log_likelihood(routed_on, torch.ones_like(routed_on), list(range(K)))
                raw = ens.log_prior + ll
                ens.reset()
            elif mode == "centroid":
                raw = partition.log_weights([routed_on[0, 1:]], DEFAULT_TEMPERATURE).double()
            elif mode == "oracle":
                raw = torch.full((1, K), float("-inf"), dtype=torch.float64)
                raw[0, clusters[i]] = 0.0
            else:
                with torch.no_grad():
                    raw = torch.log_softmax(ens.router(routed_on).double(), -1)[:, -1]
            routed = exclude_log_weights(normalize_log_weights(raw), exclude)
            torch.testing.assert_close(gen.weights[i][t], routed[0].exp(), atol=1e-5, rtol=0)
            if mode == "switch":
                used = torch.full_like(routed, float("-inf"))
                used[0, gen.experts_ran[t][0]] = 0
            elif k is not None:
                used = top_k_log_weights(routed, k)
            else:
                used = routed
            active = torch.isfinite(used[0]).nonzero().flatten().tolist()
            if mode != "switch":
                assert set(active) <= set(gen.experts_ran[t])  # experts_ran is over the batch
            log_probs = ens.next_token_log_probs(seq, mask, active)[0, :, token]
            expected = torch.logsumexp(log_probs.double() + used[0, active], 0)
            assert abs(gen.token_log_probs[i][t] - float(expected)) < 1e-5


def test_seeds_and_exclusion():
    ens = tiny_ensemble()
    a = generate_text(ens, PROMPTS, max_new_tokens=10, seed=1, stop_at_eos=False)
    b = generate_text(ens, PROMPTS, max_new_tokens=10, seed=1, stop_at_eos=False)
    c = generate_text(ens, PROMPTS, max_new_tokens=10, seed=2, stop_at_eos=False)
    assert a.texts == b.texts and a.token_log_probs == b.token_log_probs
    assert a.texts != c.texts
    for routing, k in [("mixture", None), ("topk", 1), ("switch", None), ("bayes", None)]:
        gen = generate_text(ens, PROMPTS, routing=routing, k=k, exclude=[1], max_new_tokens=10, stop_at_eos=False)
        assert all(bool((w[:, 1] == 0).all()) for w in gen.weights)
        assert all(1 not in step for step in gen.experts_ran)
        assert gen.forward_passes[1] == 0  # an opted-out expert never runs, not even on the prompt under bayes
    kept = [e for e in range(K) if e != 1]
    without = Ensemble([tiny_expert(s) for s in kept], uniform_log_prior(K - 1), tokenizer=word_tokenizer())
    opted_out = generate_text(ens, PROMPTS, routing="bayes", exclude=[1], temperature=0, max_new_tokens=10)
    assert opted_out.texts == generate_text(without, PROMPTS, routing="bayes", temperature=0, max_new_tokens=10).texts


def test_batched_prompts_equal_generating_each_alone():
    ens = tiny_ensemble()
    prompts = ["", words([5]), words([3, 7, 12, 5, 30, 8, 8]), words([22, 9])]
    batched = generate_text(ens, prompts, temperature=0, max_new_tokens=20)
    for i, prompt in enumerate(prompts):
        alone = generate_text(ens, prompt, temperature=0, max_new_tokens=20)
        assert alone.token_ids[0] == batched.token_ids[i]
        assert alone.prompt_ids[0] == batched.prompt_ids[i]
        torch.testing.assert_close(
            torch.tensor(alone.token_log_probs[0]), torch.tensor(batched.token_log_probs[i]), atol=1e-5, rtol=0
        )


ROW_PROMPTS = ["", words([5]), words([3, 7, 12, 5, 30, 8, 8]), words([22, 9]), words([17, 2, 2])]


@pytest.mark.parametrize("routing,k", [("topk", 1), ("topk", 2), ("switch", None), ("oracle", None)])
def test_row_routing_runs_each_expert_on_its_own_rows(routing, k):
    """Rows that route to different experts: the stacked engine runs every expert on the rows that
    weight it only, and gives the tokens and log-probs of the generic path, which runs every
    selected expert on the whole batch."""
    experts = [tiny_expert(s) for s in range(K)]
    stacked, generic = (
        Ensemble(experts, uniform_log_prior(K), router=tiny_router(K), tokenizer=word_tokenizer(), engine=engine)
        for engine in ("auto", "hf")
    )
    options = dict(routing=routing, k=k, max_new_tokens=20, seed=5, stop_at_eos=False)
    if routing == "oracle":
        options["weigher"] = OracleWeigher([0, 1, 2, 0, 1], K)
    ours = generate_text(stacked, ROW_PROMPTS, **options)
    if routing == "oracle":
        options["weigher"] = OracleWeigher([0, 1, 2, 0, 1], K)
    theirs = generate_text(generic, ROW_PROMPTS, **options)
    assert ours.token_ids == theirs.token_ids
    for a, b in zip(ours.token_log_probs, theirs.token_log_probs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    # the batch really splits: some step gives rows different experts
    top = torch.stack([w.argmax(-1) for w in ours.weights])  # (rows, steps)
    assert any(len(set(top[:, s].tolist())) > 1 for s in range(top.shape[1]))
    if routing == "oracle":  # every row keeps its expert: each expert reads its own rows only, and after
        # one prefill per expert every step is a single forward of all pairs
        prompt_columns = max(len(p) for p in ours.prompt_ids)
        assert ours.tokens_processed == [rows * (prompt_columns + 19) for rows in (2, 2, 1)]
        assert ours.forward_passes == [20, 20, 20] and theirs.forward_passes == [20, 20, 20]
        assert theirs.tokens_processed == [5 * (prompt_columns + 19)] * 3


class _ScheduledRows:
    """Oracle routing whose per-row experts change at given steps: settle, switch, settle again."""

    def __init__(self, schedule):
        self.schedule, self.calls = schedule, 0  # [(first step, clusters of every row)]

    def __call__(self, tokens, attention_mask):
        clusters = [c for first, c in self.schedule if first <= self.calls][-1]
        self.calls += 1
        return OracleWeigher(clusters, K)(tokens, attention_mask)


def test_row_routing_that_settles_switches_and_settles_again():
    """Pairs that keep their expert read contiguous caches built on their second step in a row; a
    change of expert drops them and later rebuilds them: tokens and log-probs stay those of the
    generic path throughout."""
    experts = [tiny_expert(s) for s in range(K)]
    stacked, generic = (
        Ensemble(experts, uniform_log_prior(K), router=tiny_router(K), tokenizer=word_tokenizer(), engine=engine)
        for engine in ("auto", "hf")
    )
    schedule = [(0, [0, 1, 2, 0, 1]), (6, [2, 1, 0, 0, 2]), (9, [1, 1, 1, 2, 0]), (10, [0, 1, 2, 0, 1])]
    built = []
    original = stacked.engine._steady_pairs

    def watch(*args):
        cache = original(*args)
        built.append(cache is not None)
        return cache

    stacked.engine._steady_pairs = watch
    options = dict(routing="oracle", max_new_tokens=20, seed=5, stop_at_eos=False)
    ours = generate_text(stacked, ROW_PROMPTS, weigher=_ScheduledRows(schedule), **options)
    theirs = generate_text(generic, ROW_PROMPTS, weigher=_ScheduledRows(schedule), **options)
    assert ours.token_ids == theirs.token_ids
    for a, b in zip(ours.token_log_probs, theirs.token_log_probs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert True in built and False in built[built.index(True) :]  # used, dropped, ...
    assert built[-1]  # ... and rebuilt once the rows settled again


def test_token_prompts_streaming_and_json():
    ens = tiny_ensemble()
    streamed = []
    gen = generate_text(
        ens,
        [[3, 7, 12], [22]],
        max_new_tokens=6,
        stop_at_eos=False,
        on_token=lambda step, tokens: streamed.append((step, tokens)),
    )
    assert gen.prompt_ids == [[0, 3, 7, 12], [0, 22]]
    assert [s for s, _ in streamed] == list(range(6))
    assert [list(row) for row in zip(*[tokens for _, tokens in streamed])] == gen.token_ids
    assert gen.texts == [words(ids) for ids in gen.token_ids]
    data = json.loads(json.dumps(gen.to_json()))
    assert data["names"] == ens.names and data["token_ids"] == gen.token_ids
    assert torch.tensor(data["weights"][1]).shape == (6, K)


def test_eos_ends_a_row_and_is_stripped_from_the_text():
    ens = tiny_ensemble()
    gen = generate_text(ens, PROMPTS, max_new_tokens=40, seed=0, temperature=2.0)
    for ids, text in zip(gen.token_ids, gen.texts):
        assert 0 not in ids[:-1]
        assert text == words(ids[:-1] if ids[-1] == 0 else ids)
    assert any(ids[-1] == 0 and len(ids) < 40 for ids in gen.token_ids)  # temperature 2 makes EOS likely


def test_single_model_takes_the_same_path():
    expert = tiny_expert(0)
    model = single_model(expert, word_tokenizer())
    ids = torch.tensor([[0, 3, 7, 12]])
    with torch.no_grad():
        hf = expert.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 4:].tolist()
    for routing in ["mixture", "topk", "switch", "bayes"]:
        gen = generate_text(model, [[3, 7, 12]], routing=routing, temperature=0, max_new_tokens=10, stop_at_eos=False)
        assert gen.token_ids == [hf]
        assert gen.forward_passes == [10]  # bayes scores the prompt in the pass that predicts token 1
        assert gen.tokens_processed == [4 + 9]
    for routing in ["oracle", "centroid"]:
        with pytest.raises(DfmError, match=f"{routing} routing needs"):
            generate_text(model, "t3", routing=routing)


def test_errors():
    ens = tiny_ensemble()
    with pytest.raises(DfmError, match="unknown routing mode"):
        generate_text(ens, "t3", routing="nope")
    with pytest.raises(DfmError, match="--k must be between 1 and the number of experts"):
        generate_text(ens, "t3", routing="topk", k=K + 1)
    with pytest.raises(DfmError, match="exclude fewer"):
        generate_text(ens, "t3", exclude=list(range(K)))
    with pytest.raises(DfmError, match="centroid routing needs the partition"):
        generate_text(ens, "t3", routing="centroid")
    with pytest.raises(DfmError, match="oracle routing got 1 clusters for 2 prompts"):
        generate_text(ens, PROMPTS, routing="oracle", weigher=OracleWeigher([0], K), max_new_tokens=4)
    with pytest.raises(DfmError, match="lower --max-new-tokens"):
        generate_text(ens, "t3", max_new_tokens=CONTEXT)
    with pytest.raises(DfmError, match="outside the vocabulary"):
        generate_text(ens, [[3, VOCAB]], max_new_tokens=4)
    with pytest.raises(DfmError, match="--k applies to topk and centroid"):
        generate_text(ens, "t3", routing="mixture", k=2)


def test_empty_prompt_is_just_bos():
    gen = generate_text(tiny_ensemble(), "", max_new_tokens=4, stop_at_eos=False)
    assert gen.prompt_ids == [[0]] and len(gen.token_ids[0]) == 4 and gen.truncated == [False]


def test_over_long_prompt_is_truncated_from_the_left():
    ens = tiny_ensemble()
    ids = [1 + i % (VOCAB - 1) for i in range(70)]
    with pytest.warns(UserWarning, match="prompt of 70 tokens truncated from the left to 54 to fit the context of 64"):
        gen = generate_text(ens, [words(ids), "t5"], max_new_tokens=10, stop_at_eos=False)
    assert gen.prompt_ids[0] == [0] + ids[-54:] and gen.prompt_ids[1] == [0, 5]
    assert gen.truncated == [True, False]
    assert len(gen.token_ids[0]) == 10  # BOS + 54 + 9 fed tokens = the whole context


def test_centroid_weigher_matches_the_partition():
    partition = tiny_partition()
    weigher = CentroidWeigher(partition, bos_id=0)
    prefixes = [[14, 15, 20], [30, 31, 27, 40 - 1], [2, 3, 14], []]
    width = 1 + max(map(len, prefixes))
    tokens = torch.zeros(len(prefixes), width, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, p in enumerate(prefixes):  # left-padded, BOS first
        tokens[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) - 1 :] = 1
    log_weights = weigher(tokens, mask)
    assert log_weights.dtype == torch.float64 and log_weights.shape == (4, K)
    torch.testing.assert_close(log_weights.exp().sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert log_weights[:3].argmax(-1).tolist() == partition.assign(prefixes[:3]).tolist() == [1, 2, 0]
    torch.testing.assert_close(
        log_weights[3].exp(), torch.full((K,), 1 / K, dtype=torch.float64), atol=1e-6, rtol=0
    )  # an empty prefix is equally far from every centre
    with pytest.raises(DfmError, match="temperature"):
        CentroidWeigher(partition, temperature=0)


@pytest.mark.slow
def test_compiled_decoding_step_gives_the_eager_tokens():
    """``Ensemble.compile``: one-token steps run the engine's layers through torch.compile (mixture:
    all experts stacked; top1/top2: rows of different experts, padded prompts, pair caches). Same
    tokens as eager decoding; log-probs within 1e-4, since fused kernels sum in another order."""
    from torch._dynamo.utils import counters

    experts = [tiny_expert(s) for s in range(K)]
    eager, compiled = (
        Ensemble(experts, uniform_log_prior(K), router=tiny_router(K), tokenizer=word_tokenizer()) for _ in range(2)
    )
    compiled.compile()
    graphs = counters["stats"]["unique_graphs"]
    for routing, k in (("mixture", None), ("topk", 1), ("topk", 2)):
        options = dict(routing=routing, k=k, max_new_tokens=12, temperature=0, stop_at_eos=False)
        ours, theirs = generate_text(compiled, ROW_PROMPTS, **options), generate_text(eager, ROW_PROMPTS, **options)
        assert ours.token_ids == theirs.token_ids
        for a, b in zip(ours.token_log_probs, theirs.token_log_probs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled step really ran
    with pytest.raises(DfmError, match="stacked engine"):
        Ensemble(experts, uniform_log_prior(K), engine="hf").compile()
