"""Seed models, honest packing, Bayes router targets and compute matching."""

import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dfm.cli import main
from dfm.errors import DfmError
from dfm.posterior import bayes_log_posterior, prefix_log_posteriors
from models.ar_kind import lm_loss
from models.expert import branch_from
from models.manifest import tokenizer_fingerprint
from tests.tiny_config import TINY_ARCH, write_tiny_config
from training.data import pack_blocks
from training.lm_training import matched_steps
from training.router_training import bayes_targets, router_examples, router_loss
from training.tokenizer_training import save_tokenizer, train_bpe


def _tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = {k: v for k, v in TINY_ARCH.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **fields))


def test_packed_documents_never_attend_to_each_other():
    """The loss of a packed block equals the losses of its documents read alone from BOS."""
    docs = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    blocks = pack_blocks(datasets.Dataset.from_dict({"input_ids": docs}), block_size=13, eos_id=0)
    assert len(blocks) == 1 and list(blocks["position_ids"][0]) == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0]
    model = _tiny_llama(20).eval()
    batch = {name: torch.tensor(blocks[name]) for name in ("input_ids", "labels", "position_ids")}
    packed = lm_loss(model, batch) * 12  # mean over the 12 targets of the block
    alone = 0.0
    for ids in docs:
        seq = torch.tensor([[0, *ids, 0]])
        alone += model(input_ids=seq, labels=seq).loss * (len(ids) + 1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # negative control: without per-document positions the later documents see the earlier ones
    leaky = lm_loss(model, {k: v for k, v in batch.items() if k != "position_ids"}) * 12
    assert abs((leaky - alone).item()) > 1e-3


def test_prefix_posteriors_are_the_one_shot_posterior_of_every_prefix():
    torch.manual_seed(0)
    token_log_probs = torch.randn(3, 9, dtype=torch.float64).clamp(max=0) - 0.5
    log_prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    rows = prefix_log_posteriors(token_log_probs, log_prior)
    assert rows.shape == (9, 3)
    torch.testing.assert_close(rows[0], log_prior, rtol=0, atol=1e-12)
    for t in range(1, 9):
        one_shot = bayes_log_posterior(log_prior, token_log_probs[None, :, :t])[0]
        torch.testing.assert_close(rows[t], one_shot, rtol=0, atol=1e-12)


def test_bayes_targets_and_router_loss():
    """Targets are the experts' posterior; the soft loss is the cross-entropy to it on real positions."""
    experts = [_tiny_llama(20, seed=s).eval() for s in range(2)]
    docs = [[3, 4, 5, 6, 7], [8, 9]]
    log_prior = torch.tensor([0.25, 0.75], dtype=torch.float64).log()
    targets = bayes_targets(experts, docs, log_prior, eos_id=0, context=16)
    assert [t.shape for t in targets] == [(6, 2), (3, 2)]
    torch.testing.assert_close(targets[0][0], log_prior.exp().float())
    torch.testing.assert_close(targets[1].sum(-1), torch.ones(3))
    with torch.no_grad():
        seq = torch.tensor([[0, *docs[0], 0]])
        lp = [torch.log_softmax(e(seq).logits[0, :-1], -1).gather(-1, seq[0, 1:, None])[:, 0] for e in experts]
    by_hand = (log_prior[:, None] + torch.stack(lp).double().cumsum(1)).softmax(0)  # column t: evidence of s <= t
    torch.testing.assert_close(targets[0][1:], by_hand[:, :-1].T.float(), rtol=1e-4, atol=1e-5)

    examples = router_examples(docs, targets, max_length=4, bos_id=0).with_format("torch")[:]
    assert examples["targets"].shape == (2, 4, 2) and float(examples["targets"][1, 3].sum()) == 0.0  # padding
    logits = torch.randn(2, 4, 2)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids):
            return logits

    loss = router_loss(Fixed(), {"input_ids": examples["input_ids"], "targets": examples["targets"]})
    rows = torch.cat([examples["targets"][0], examples["targets"][1, :3]])
    expected = -(rows * torch.log_softmax(torch.cat([logits[0], logits[1, :3]]), -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)


def test_compute_matching_counts_experts_router_and_world_size(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    from training.run_config import ExpertOptions, PartitionOptions, RunConfig

    config = RunConfig(
        partition=PartitionOptions(num_clusters=2), expert=ExpertOptions(block_size=8, train={"batch_size": 4})
    )
    for k in range(2):
        (logs / f"expert-{k}.summary.json").write_text(
            json.dumps({"flops": 6 * 100 * 320, "tokens": 320, "parameters": 100})
        )
    with pytest.warns(UserWarning, match="router is not trained"):
        assert matched_steps(tmp_path, config, world_size=1) == 20  # 640 tokens / 32 per step
    (logs / "router.summary.json").write_text(json.dumps({"parameters": 100, "tokens": 32 * 3}))  # 6 * 100 * 96 FLOPs
    assert matched_steps(tmp_path, config, world_size=1) == 23
    assert matched_steps(tmp_path, config, world_size=2) == 12  # ceil(736 / 64)
    (logs / "expert-1.summary.json").unlink()
    with pytest.raises(DfmError, match="expert-1 not trained yet"):
        matched_steps(tmp_path, config, world_size=1)


def _pretrained(tmp_path, texts):
    """A tiny 'public pretrained model': a causal LM and its tokenizer in one save_pretrained directory."""
    tokenizer = train_bpe(texts, vocab_size=270)  # what this small corpus fills (no shortfall warning)
    directory = tmp_path / "pretrained"
    save_tokenizer(tokenizer, directory)
    model = _tiny_llama(len(tokenizer) + 5)  # padded embeddings, as many public checkpoints have
    model.save_pretrained(directory)
    return directory, tokenizer


def test_branch_from_a_pretrained_directory(tmp_path):
    texts = [f"some words number {i} and more" for i in range(50)]
    directory, tokenizer = _pretrained(tmp_path, texts)
    model = branch_from(directory, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, tokenizer_fingerprint="f")
    original = AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.vocab_size == len(tokenizer) and model.config.dfm_tokenizer_fingerprint == "f"
    torch.testing.assert_close(
        model.get_input_embeddings().weight, original.get_input_embeddings().weight[: len(tokenizer)]
    )
    with pytest.raises(DfmError, match="embeddings but the tokenizer has"):
        branch_from(directory, vocab_size=len(tokenizer) + 6, bos_token_id=0, eos_token_id=0, tokenizer_fingerprint="f")
    with pytest.raises(DfmError, match="cannot load the seed model"):
        branch_from(tmp_path / "nowhere", vocab_size=10, bos_token_id=0, eos_token_id=0, tokenizer_fingerprint="f")


@pytest.mark.slow
def test_run_with_init_from_uses_the_seed_and_its_tokenizer(tmp_path, capsys):
    texts = [f"{'cats purr' if i % 2 else 'dogs bark'} loudly at number {i} every day" for i in range(120)]
    directory, tokenizer = _pretrained(tmp_path, texts)
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    run = tmp_path / "run"
    argv = [
        "run",
        "--out",
        str(run),
        "--config",
        str(write_tiny_config(tmp_path)),
        "--dataset",
        "json",
        "--data-files",
        str(data),
        "--num-clusters",
        "2",
        "--init-from",
        str(directory),
    ]
    assert main(argv) == 0
    assert not (run / "seed").exists()  # the pretrained model is the seed: no seed phase
    saved = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert tokenizer_fingerprint(saved.get_vocab()) == tokenizer_fingerprint(tokenizer.get_vocab())
    for name in ("expert-0", "expert-1", "baseline"):
        summary = json.loads((run / "logs" / f"{name}.summary.json").read_text())
        assert summary["branched_from"] == str(directory)
    assert "| mixture |" in capsys.readouterr().out
