"""A pretrained tokenizer with a BOS of its own (Llama, Mistral) starts every document with it: in
the training rows, in scoring and in generation; a tokenizer with one token for both keeps EOS."""

import json

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dfm.cli import main
from dfm.errors import DfmError
from models.ensemble import Ensemble
from models.expert import load_expert
from models.generation import generate_text, single_model
from models.scoring import document_bos, token_log_probs
from models.tokenizer import load_tokenizer
from tests.tiny_config import TINY_ARCH, write_tiny_config
from training.data import load_saved, pack_blocks
from training.layout import RunLayout
from training.router_training import bayes_targets, router_examples
from training.tokenizer_training import train_bpe

TEXTS = [f"{'cats purr' if i % 2 else 'dogs bark'} loudly at number {i} every day" for i in range(120)]
UNK, BOS, EOS = 0, 1, 2  # Llama's layout: <unk>, <s>, </s>


def llama_style_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama's specials: <s> (BOS) and </s> (EOS) are two tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = {k: v for k, v in TINY_ARCH.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, bos_token_id=BOS, eos_token_id=EOS, **fields))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`dfm run --init-from` a tiny pretrained model whose tokenizer has its own BOS (as test_seed fakes one)."""
    root = tmp_path_factory.mktemp("bos")
    tokenizer = llama_style_tokenizer(TEXTS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
    pretrained = root / "pretrained"
    tokenizer.save_pretrained(pretrained)
    tiny_llama(len(tokenizer)).save_pretrained(pretrained)
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    out = root / "run"
    assert (
        main(
            [
                "run",
                "--out",
                str(out),
                "--config",
                str(write_tiny_config(root)),
                "--dataset",
                "json",
                "--data-files",
                str(data),
                "--num-clusters",
                "2",
                "--init-from",
                str(pretrained),
            ]
        )
        == 0
    )
    return out


def test_document_bos_is_the_bos_or_else_the_eos():
    assert document_bos(llama_style_tokenizer(TEXTS)) == BOS
    dfm_own = train_bpe(TEXTS, vocab_size=270)  # one <|endoftext|> for BOS, EOS and padding: kept
    assert document_bos(dfm_own) == dfm_own.eos_token_id == dfm_own.bos_token_id == 0
    no_bos = llama_style_tokenizer(TEXTS)
    no_bos.bos_token = None  # as Qwen's tokenizer: no BOS, documents start from EOS
    assert no_bos.bos_token_id is None and document_bos(no_bos) == EOS
    no_bos.eos_token = None
    with pytest.raises(DfmError, match="neither a BOS nor an EOS"):
        document_bos(no_bos)


def test_packed_rows_open_every_document_with_its_bos():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    blocks = pack_blocks(datasets.Dataset.from_dict({"input_ids": docs}), block_size=8, eos_id=EOS, bos_id=BOS)
    stream = [BOS, 5, 6, 7, EOS, BOS, 8, 9, EOS, BOS, 10, 11, 12, 13, EOS]
    assert [list(row) for row in blocks["input_ids"]] == [stream[:8], stream[7:]]  # overlapping by one token
    assert list(blocks["position_ids"][0]) == [0, 1, 2, 3, 4, 0, 1, 2]
    # every token but a BOS (which would be predicted from the previous document's EOS) is a target once
    targets = [t for row in blocks["labels"] for t in row[1:] if t != -100]
    assert targets == [t for t in stream[1:] if t != BOS]


def test_training_rows_start_documents_with_bos(run):
    layout = RunLayout.of(run)
    tokenizer = load_tokenizer(layout.tokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)
    rows = load_saved(layout.shard(0), "shard 0")["train"]
    assert rows[0]["input_ids"][0] == BOS
    for row in rows:
        ids, positions, labels = row["input_ids"], row["position_ids"], row["labels"]
        for i, token in enumerate(ids):
            assert (positions[i] == 0) == (i == 0 or token == BOS)  # documents restart at their BOS only
            if token == BOS:
                assert labels[i] == -100 and (i == 0 or ids[i - 1] == EOS)
    expert = load_expert(layout.expert(0))
    assert (expert.config.bos_token_id, expert.config.eos_token_id) == (BOS, EOS)


def test_eval_scores_documents_read_from_bos(run):
    """The report's baseline NLL is that of BOS + text + EOS by a plain forward; read from EOS it differs."""
    layout = RunLayout.of(run)
    report = json.loads((layout.eval / "report.json").read_text())
    docs = [list(ids) for ids in load_saved(layout.documents, "documents")["test"]["input_ids"]]
    assert max(len(ids) for ids in docs) + 1 <= report["context"]  # one window each: a plain forward reads the same
    baseline = load_expert(layout.baseline)

    def mean_nll(first: int) -> float:
        total, tokens = 0.0, 0
        with torch.no_grad():
            for ids in docs:
                seq = torch.tensor([[first, *ids, EOS]])
                log_probs = torch.log_softmax(baseline(seq).logits[0, :-1].double(), -1)
                total -= float(log_probs.gather(-1, seq[0, 1:, None]).sum())
                tokens += len(ids) + 1
        return total / tokens

    assert report["models"]["baseline"]["nll"] == pytest.approx(mean_nll(BOS), rel=1e-5)
    assert abs(mean_nll(EOS) - mean_nll(BOS)) > 1e-3  # negative control: the first token matters
    scored = token_log_probs(baseline, docs[:1], bos_id=BOS, eos_id=EOS, context=report["context"])[0]
    assert scored.numel() == len(docs[0]) + 1  # every token and the final EOS, predicted from BOS on


def test_router_targets_and_sequences_read_from_bos(run):
    layout = RunLayout.of(run)
    experts = [load_expert(layout.expert(k)) for k in range(2)]
    docs = [[40, 41, 42, 43]]
    log_prior = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    from_bos = bayes_targets(experts, docs, log_prior, bos_id=BOS, eos_id=EOS, context=32)[0]
    with torch.no_grad():
        seq = torch.tensor([[BOS, *docs[0], EOS]])
        lp = torch.stack(
            [torch.log_softmax(e(seq).logits[0, :-1].double(), -1).gather(-1, seq[0, 1:, None])[:, 0] for e in experts]
        )
    by_hand = (log_prior[:, None] + lp.cumsum(1)).softmax(0)[:, :-1].T  # prefix j: evidence of its j tokens
    torch.testing.assert_close(from_bos[1:], by_hand.float(), rtol=1e-4, atol=1e-5)
    examples = router_examples(docs, [from_bos], max_length=8, bos_id=BOS)
    assert list(examples["input_ids"][0][:5]) == [BOS, *docs[0]]


def test_generation_starts_from_bos(run):
    """Prompts are BOS-prefixed, and the first token's log-prob is the model's after BOS + prompt."""
    layout = RunLayout.of(run)
    tokenizer = load_tokenizer(layout.tokenizer)
    out = generate_text(Ensemble.from_run(run), ["", "cats purr"], max_new_tokens=3, temperature=0)
    assert [ids[0] for ids in out.prompt_ids] == [BOS, BOS]
    baseline = load_expert(layout.baseline)
    single = generate_text(single_model(baseline, tokenizer), "cats purr", max_new_tokens=1, temperature=0)
    prompt = tokenizer("cats purr", add_special_tokens=False)["input_ids"]
    assert single.prompt_ids[0] == [BOS, *prompt]
    with torch.no_grad():
        expected = torch.log_softmax(baseline(torch.tensor([[BOS, *prompt]])).logits[0, -1].double(), -1)
    token = single.token_ids[0][0]
    assert token == int(expected.argmax())
    assert single.token_log_probs[0][0] == pytest.approx(float(expected[token]), abs=1e-4)  # float32 engines
