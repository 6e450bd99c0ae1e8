"""Per-token log-probabilities of held-out documents under causal LMs and the router, windowed.

**What is scored.** Document d with token ids ``ids`` is read as ``[BOS] + ids + [EOS]``, as it
was trained (``document_bos``: the tokenizer's BOS; dfm's own tokenizer has one ``<|endoftext|>``
token, so there BOS and EOS are the same id). Every document token and the final EOS is
predicted, from the first token on: ``len(ids) + 1`` predictions per document. Prediction j
(0-based) is the probability of ``s[j + 1]`` given the prefix ``s[:j + 1]``.

**Long documents.** The model reads ``s[:-1]`` (n + 1 input positions). Window i covers input
positions ``[i * stride, i * stride + context)`` and scores only the predictions that no earlier
window scored, so every token is scored exactly once, with between ``context - stride + 1`` and
``context`` tokens of context (``stride == context``: independent blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dfm.errors import DfmError
from dfm.progress import progress
from models.stacked import StackedLlama
from models.stacked import supports as supports_stacking

Docs = Sequence[Sequence[int]]
#: (input_ids (B, T), attention_mask (B, T), targets (B, T)) -> per-position values (B, T, ...)
WindowFn = Callable[[Tensor, Tensor, Tensor], Tensor]
#: documents done out of all, rate in documents per second (a window of a document cut into w counts 1/w)
_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} docs [{elapsed}<{remaining}, {rate_fmt}]"


def document_bos(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id every document starts with, in training rows, scoring and generation: the tokenizer's
    BOS (Llama, Mistral), or its EOS when it has none (dfm's own tokenizer and GPT-2's have one
    token for both; Qwen's has no BOS)."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is None:
        raise DfmError("the tokenizer has neither a BOS nor an EOS token: dfm needs one to start and end documents")
    return tokenizer.eos_token_id


def windows(num_inputs: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` for every window over ``num_inputs`` input positions.

    Window i reads inputs ``[start, end)`` = ``[i * stride, min(i * stride + context, num_inputs))``
    and scores the predictions at positions ``[first_scored, end)``; together they cover
    ``[0, num_inputs)`` exactly once.
    """
    if context < 1:
        raise DfmError(f"evaluation context must be >= 1 token, got {context}")
    if not 1 <= stride <= context:
        raise DfmError(f"evaluation stride must be between 1 and the context ({context}), got {stride}")
    out, start, scored = [], 0, 0
    while scored < num_inputs:
        end = min(start + context, num_inputs)
        out.append((start, end, scored))
        scored, start = end, start + stride
    return out


def _windowed(
    fn: WindowFn,
    docs: Docs,
    *,
    bos_id: int,
    eos_id: int | None,
    context: int,
    stride: int | None,
    batch_size: int,
    device: torch.device,
    desc: str,
) -> list[Tensor]:
    """Run ``fn`` over the windows of every document (batched, right-padded) and return, per
    document, its values at the n + 1 scored positions in order, on the CPU. A progress bar
    named ``desc`` counts documents (a window of a document cut into w counts 1/w). ``eos_id``
    None: the same id as ``bos_id``."""
    if batch_size < 1:
        raise DfmError(f"evaluation batch size must be >= 1, got {batch_size}")
    stride = context if stride is None else stride
    sequences = [[bos_id, *ids, bos_id if eos_id is None else eos_id] for ids in docs]
    items = [
        (d, w, *span)
        for d, seq in enumerate(sequences)
        for w, span in enumerate(windows(len(seq) - 1, context, stride))
    ]
    items.sort(key=lambda item: item[3] - item[2], reverse=True)  # similar lengths share a batch
    pieces: list[dict[int, Tensor]] = [{} for _ in docs]
    per_doc = [0] * len(docs)
    for d, *_ in items:
        per_doc[d] += 1
    bar = progress(total=len(docs), desc=desc, unit="doc", bar_format=_BAR)
    for first in range(0, len(items), batch_size):
        batch = items[first : first + batch_size]
        width = batch[0][3] - batch[0][2]
        inputs = torch.full((len(batch), width), bos_id, dtype=torch.long)
        targets = torch.full((len(batch), width), bos_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (d, _, start, end, _) in enumerate(batch):
            inputs[row, : end - start] = torch.tensor(sequences[d][start:end])
            targets[row, : end - start] = torch.tensor(sequences[d][start + 1 : end + 1])
            mask[row, : end - start] = 1
        values = fn(inputs.to(device), mask.to(device), targets.to(device)).cpu()
        for row, (d, w, start, end, scored) in enumerate(batch):
            pieces[d][w] = values[row, scored - start : end - start]
        bar.update(sum(1 / per_doc[d] for d, *_ in batch))
    bar.close()
    return [torch.cat([p[w] for w in range(len(p))]) for p in pieces]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.inference_mode()
def token_log_probs(
    model: nn.Module,
    docs: Docs,
    *,
    bos_id: int,
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
    desc: str = "scoring",
    eos_id: int | None = None,
) -> list[Tensor]:
    """Per document, the (n + 1,) float64 log p(token) of a Hugging Face causal LM (see module doc).

    ``stride`` defaults to ``context`` (independent windows); ``eos_id`` to ``bos_id`` (one token for both).
    """

    def score(inputs: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        logits = model(input_ids=inputs, attention_mask=mask).logits.float()
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (picked - logits.logsumexp(-1)).double()

    return _windowed(
        score,
        docs,
        bos_id=bos_id,
        eos_id=eos_id,
        context=context,
        stride=stride,
        batch_size=batch_size,
        device=_device(model),
        desc=desc,
    )


@torch.inference_mode()
def expert_token_log_probs(
    experts: Sequence[nn.Module],
    docs: Docs,
    *,
    bos_id: int,
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
    desc: str = "experts scoring",
    eos_id: int | None = None,
) -> list[Tensor]:
    """Per document, (K, n + 1): each expert's own per-token log-probs.

    Llama experts sharing one configuration are scored together on the stacked engine (one
    batched forward for all K); others one after another.
    """
    if not supports_stacking(experts):
        per_expert = [
            token_log_probs(
                e,
                docs,
                bos_id=bos_id,
                context=context,
                stride=stride,
                batch_size=batch_size,
                desc=f"{desc} ({k + 1}/{len(experts)})",
                eos_id=eos_id,
            )
            for k, e in enumerate(experts)
        ]
        return [torch.stack(rows) for rows in zip(*per_expert)]
    engine = StackedLlama(experts)
    everyone = slice(0, len(experts))

    def score(inputs: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        engine.reset(inputs.shape[0])
        logits = engine.forward(everyone, inputs, mask, all_logits=True).float()  # (K, B, T, V)
        picked = logits.gather(-1, targets.expand(len(experts), -1, -1).unsqueeze(-1)).squeeze(-1)
        return (picked - logits.logsumexp(-1)).permute(1, 2, 0).double()  # (B, T, K)

    scored = _windowed(
        score,
        docs,
        bos_id=bos_id,
        eos_id=eos_id,
        context=context,
        stride=stride,
        batch_size=batch_size,
        device=_device(experts[0]),
        desc=desc,
    )
    return [values.T for values in scored]


@torch.inference_mode()
def router_log_weights(
    router: nn.Module,
    docs: Docs,
    *,
    bos_id: int,
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
    desc: str = "router",
) -> list[Tensor]:
    """Per document, (n + 1, K) float64 log P(k | prefix) for the prefix that predicts each token.

    The router reads the same ``[BOS] + ids`` inputs, windowed like the experts.
    """

    def weigh(inputs: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        return torch.log_softmax(router(inputs, mask).double(), dim=-1)

    return _windowed(
        weigh,
        docs,
        bos_id=bos_id,
        eos_id=None,
        context=context,
        stride=stride,
        batch_size=batch_size,
        device=_device(router),
        desc=desc,
    )
