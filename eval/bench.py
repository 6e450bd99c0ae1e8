"""`dfm bench`: speed and memory of training, decoding and scoring, side by side with references.

Every model is random-initialised (the default expert architecture with a 2048-token
vocabulary, a default router), so no trained run is needed: speed does not depend on the
weights, with one exception worth knowing: a random router flips its top-1 choice often, so in
sparse modes lagging experts catch up on the tokens they missed far more than behind a trained
router (each mode reports expert forward passes per step and expert tokens per generated token
to show it; ``top1_route_on_prompt`` is the no-flip case; eval/run_bench.py times a trained run,
its own router included). Everything runs on one device
(``--device``: the CPU on the threads torch has, which `dfm --threads` sets, every usable core by
default, or a CUDA GPU, where inference weights are bf16 and training runs under bf16 autocast,
every timed region ending in a ``torch.cuda.synchronize``); the memory section measures CPU
processes either way.

Each figure is the median of several timed repetitions after warm-up, and every ratio is taken
between figures of the same process run; a decoding mode's ratio to transformers ``generate`` is
the median over repetitions of its speed over that of a reference run timed just before it.
Generation never stops at EOS, so every run produces exactly the requested tokens (transformers:
``eos_token_id=None``; dfm: ``stop_at_eos=False``), and decoding is greedy on both sides (switch
routing still samples its expert).
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from dfm.atomic import write_json
from dfm.masked_path import MaskedPath
from dfm.mixing import uniform_log_prior
from dfm.progress import progress as progress_bar
from dfm.schedulers import scheduler
from dfm.tensors import autocast_for, inference_dtype
from eval.measured import run_measured
from eval.perplexity import mixed_token_log_probs
from models.ar_kind import lm_loss
from models.ensemble import Ensemble
from models.expert import build_expert, expert_config, num_parameters, save_expert
from models.generation import generate_text
from models.manifest import ExpertEntry, Manifest, tokenizer_fingerprint
from models.masked_ensemble import MaskedEnsemble
from models.masked_expert import build_masked_expert, masked_expert_config
from models.masked_generation import generate_masked_text
from models.router import Router, RouterConfig
from models.scoring import expert_token_log_probs, router_log_weights, token_log_probs
from models.weighers import OracleWeigher, RouterWeigher
from training.tokenizer_training import END_OF_TEXT, save_tokenizer
from training.trainer import TrainConfig, train

VOCAB_SIZE = 2048
BOS = 0  # the tokenizer's one special token: BOS, EOS and padding
PROMPT_TOKENS = 16
SEQ_LEN = 128
TRAIN_BATCH = 16
LR = 3e-3


@dataclass(frozen=True)
class Settings:
    """How much work each section does (full bench vs --quick)."""

    repeats: int  # timed repetitions per figure (median reported)
    peak_size: int  # square matmul size
    peak_repeats: int
    train_steps: tuple[int, int]  # project trainer: short and long run, timed as a difference
    train_chunk: int  # plain loop / HF Trainer: steps per timed chunk
    train_warmup: int  # steps before the first timed chunk
    new_tokens: int  # generated tokens per sequence
    batches: tuple[int, ...]  # generation batch sizes
    num_experts: int  # K of the generation section
    scaling: tuple[int, ...]  # K of the scaling section
    score_docs: int
    score_tokens: int  # tokens per scored document


FULL = Settings(
    repeats=5,
    peak_size=1024,
    peak_repeats=10,
    train_steps=(5, 25),
    train_chunk=20,
    train_warmup=3,
    new_tokens=200,
    batches=(1, 8),
    num_experts=4,
    scaling=(2, 4, 8),
    score_docs=32,
    score_tokens=200,
)
QUICK = Settings(
    repeats=2,
    peak_size=512,
    peak_repeats=5,
    train_steps=(1, 3),
    train_chunk=2,
    train_warmup=1,
    new_tokens=32,
    batches=(1, 2),
    num_experts=4,
    scaling=(2, 4),
    score_docs=8,
    score_tokens=100,
)

#: Generation modes of the ensemble: name -> generate_text keyword arguments.
MODES: dict[str, dict[str, Any]] = {
    "top1": {"routing": "topk", "k": 1},
    "switch": {"routing": "switch"},
    "mixture": {"routing": "mixture"},
    "bayes": {"routing": "bayes"},
    "top1_route_on_prompt": {"routing": "topk", "k": 1, "route_on": "prompt"},
    # rows of a batch on different experts that keep them (see mode_figures): row routing's case
    "top1_fixed_rows": {"routing": "topk", "k": 1},
}


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[bench {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def _median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- models -----------------------------------------------------------------------------------
def bench_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer ``<|endoftext|> t1 .. t{V-1}``: a real saved/loadable tokenizer, no training."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {END_OF_TEXT: BOS, **{f"t{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=END_OF_TEXT))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
    )


def bench_expert(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """The default expert architecture, random-initialised with ``seed``."""
    config = expert_config(
        len(tokenizer),
        bos_token_id=BOS,
        eos_token_id=BOS,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer.get_vocab()),
    )
    return build_expert(config, seed=seed)


CPU = torch.device("cpu")


def bench_ensemble(num_experts: int, tokenizer: PreTrainedTokenizerFast, device: torch.device = CPU) -> Ensemble:
    """K random default experts (in the inference dtype of ``device``), a random default router and
    uniform priors, on ``device``."""
    dtype = inference_dtype("auto", device)
    experts = [bench_expert(tokenizer, seed=k).eval().to(device, dtype) for k in range(num_experts)]
    torch.manual_seed(10_000 + num_experts)
    router = Router(RouterConfig(vocab_size=len(tokenizer), num_experts=num_experts)).eval().to(device)
    return Ensemble(experts, uniform_log_prior(num_experts), router=router, tokenizer=tokenizer)


def _sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock read after it times the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(batch: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB_SIZE, (batch, PROMPT_TOKENS), generator=g).tolist()


# --- machine and peak -------------------------------------------------------------------------
def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: other work on the machine skews every figure."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def measure_peak(size: int, repeats: int, device: torch.device = CPU) -> dict[str, float | None]:
    """Matmul FLOP/s (2 n^3 / median seconds) on ``device`` in fp32 and, where it runs, bf16."""
    out: dict[str, float | None] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=g).to(device, dtype)
        b = torch.randn(size, size, generator=g).to(device, dtype)

        def multiply() -> None:
            torch.mm(a, b)
            _sync(device)

        try:
            seconds = _median_seconds(multiply, repeats, warmup=2)
        except RuntimeError:
            out[name] = None
            continue
        out[name] = 2 * size**3 / seconds
    return out


# --- training ---------------------------------------------------------------------------------
def _train_data(rows: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB_SIZE, (rows, SEQ_LEN), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def _project_trainer_seconds_per_step(
    tokenizer, data: datasets.Dataset, settings: Settings, device: torch.device
) -> float:
    """Steady-state seconds per step of ``training.trainer.train``: two runs of different lengths,
    timed whole, differenced; setup, the final checkpoint and the save cancel out."""

    def run(steps: int) -> float:
        model = bench_expert(tokenizer)
        config = TrainConfig(
            steps=steps, batch_size=TRAIN_BATCH, lr=LR, checkpoint_every=0, log_every=0, eval_every=0, warmup_steps=1
        )
        # the trainer's progress bar would interleave with the bench's own lines: it goes to a buffer
        with tempfile.TemporaryDirectory() as tmp, redirect_stderr(io.StringIO()):
            start = time.perf_counter()
            train(
                model,
                data,
                lm_loss,
                config,
                save_fn=save_expert,
                out_dir=Path(tmp) / "out",
                checkpoint_dir=Path(tmp) / "checkpoints",
                log_path=Path(tmp) / "log.jsonl",
                desc="bench trainer",
                device=device,
            )
            return time.perf_counter() - start

    short, long = settings.train_steps
    run(short)  # warm-up: first-call costs (allocator, kernels) stay out of the figures
    per_step = []
    for _ in range(settings.repeats):
        per_step.append((run(long) - run(short)) / (long - short))
    return statistics.median(per_step)


def _chunk_seconds(times: Sequence[float], warmup: int, chunk: int) -> float:
    """Median seconds per step over consecutive chunks of ``chunk`` steps, after ``warmup`` steps.
    ``times[i]`` is the clock when step i ended (``times[0]`` when training started)."""
    ends = list(range(warmup, len(times) - 1, chunk))
    chunks = [(times[e + chunk] - times[e]) / chunk for e in ends if e + chunk < len(times)]
    return statistics.median(chunks)


def _plain_loop_seconds_per_step(tokenizer, data: datasets.Dataset, settings: Settings, device: torch.device) -> float:
    """A minimal loop: forward with labels (under the trainer's autocast), backward, AdamW step, zero_grad."""
    model = bench_expert(tokenizer).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.tensor(data["input_ids"], device=device)
    steps = settings.train_warmup + settings.repeats * settings.train_chunk
    times = [time.perf_counter()]
    for step in range(steps):
        rows = torch.arange(step * TRAIN_BATCH, (step + 1) * TRAIN_BATCH, device=device) % len(ids)
        batch = ids[rows]
        with autocast_for(device):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter())
    return _chunk_seconds(times, settings.train_warmup, settings.train_chunk)


def _hf_trainer_seconds_per_step(
    tokenizer, data: datasets.Dataset, settings: Settings, device: torch.device
) -> tuple[float, str] | None:
    """``transformers.Trainer`` with the same model, batch and precision, and the optimizer it picked;
    a callback stamps every step. None when ``accelerate`` (which Trainer needs) is missing."""
    try:
        import accelerate  # noqa: F401  (Trainer needs it)
    except ImportError:
        return None
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter())

    steps = settings.train_warmup + settings.repeats * settings.train_chunk
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=TRAIN_BATCH,
            learning_rate=LR,
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            warmup_steps=1,
            lr_scheduler_type="cosine",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=device.type == "cuda",
            use_cpu=device.type == "cpu",
            bf16=device.type == "cuda",
            seed=0,
        )
        trainer = Trainer(model=bench_expert(tokenizer), args=args, train_dataset=data, callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
        trainer.train()
    return _chunk_seconds(clock.times, settings.train_warmup, settings.train_chunk), str(args.optim.value)


def bench_training(
    tokenizer, settings: Settings, peak: float, say: Callable[[str], None], device: torch.device = CPU
) -> dict:
    """Tokens/s and MFU (against ``peak``: fp32 matmul FLOP/s on the CPU, bf16 on CUDA) of the
    project trainer, a plain PyTorch loop and transformers.Trainer."""
    params = num_parameters(bench_expert(tokenizer))
    rows = TRAIN_BATCH * max(settings.train_steps[1], settings.train_warmup + settings.repeats * settings.train_chunk)
    data = _train_data(rows)
    tokens_per_step = TRAIN_BATCH * SEQ_LEN

    def figures(seconds_per_step: float, timing: str, optimizer: str) -> dict:
        tokens_per_second = tokens_per_step / seconds_per_step
        return {
            "tokens_per_second": tokens_per_second,
            "seconds_per_step": seconds_per_step,
            "mfu": 6 * params * tokens_per_second / peak,
            "timing": timing,
            "optimizer": optimizer,
        }

    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    out: dict[str, Any] = {
        "parameters": params,
        "batch_size": TRAIN_BATCH,
        "seq_len": SEQ_LEN,
        "precision": precision,
        "mfu_formula": f"6 * parameters * tokens_per_second / peak {precision.split()[0]}",
    }
    say("training: project trainer")
    short, long = settings.train_steps
    out["trainer"] = figures(
        _project_trainer_seconds_per_step(tokenizer, data, settings, device),
        f"(time of a {long}-step run - time of a {short}-step run) / {long - short}",
        "training.trainer: AdamW, grad clipping, warmup + cosine schedule",
    )
    say(f"training: trainer {out['trainer']['tokens_per_second']:.0f} tok/s; plain loop")
    chunked = f"per-step clock after {settings.train_warmup} warm-up steps, chunks of {settings.train_chunk} steps"
    out["plain_loop"] = figures(
        _plain_loop_seconds_per_step(tokenizer, data, settings, device),
        chunked,
        "torch.optim.AdamW defaults, no clipping, constant lr",
    )
    say(f"training: plain loop {out['plain_loop']['tokens_per_second']:.0f} tok/s; transformers.Trainer")
    hf = _hf_trainer_seconds_per_step(tokenizer, data, settings, device)
    out["hf_trainer"] = (
        {"skipped": "pip install accelerate"}
        if hf is None
        else figures(
            hf[0], chunked + " (TrainerCallback.on_step_end)", f"{hf[1]}, grad clipping, warmup + cosine schedule"
        )
    )
    return out


# --- generation -------------------------------------------------------------------------------
class TimedRouterWeigher(RouterWeigher):
    """The router weigher, adding up the wall time spent inside its calls."""

    def __init__(self, router: Router) -> None:
        super().__init__(router)
        self.seconds = 0.0

    def __call__(self, tokens, attention_mask):
        start = time.perf_counter()
        try:
            return super().__call__(tokens, attention_mask)
        finally:
            self.seconds += time.perf_counter() - start


class FixedRowsWeigher(TimedRouterWeigher):
    """Runs the router as a trained one would (and is timed like it), but routes row i to expert
    i mod K: the steady state of a trained router, which rarely changes its choice."""

    def __init__(self, router: Router, rows: int, num_experts: int) -> None:
        super().__init__(router)
        self.fixed = OracleWeigher([i % num_experts for i in range(rows)], num_experts)

    def __call__(self, tokens, attention_mask):
        super().__call__(tokens, attention_mask)
        return self.fixed(tokens, attention_mask)


def generate_reference(
    model: PreTrainedModel, prompts: list[list[int]], new_tokens: int, bos: int = BOS
) -> Callable[[], float]:
    """One model through transformers ``generate`` (KV cache, greedy, no EOS stop) on ``prompts``
    of equal length after ``bos``: a function that runs it once and returns its tokens/s."""
    ids = torch.tensor([[bos, *p] for p in prompts], device=model.device)

    def run() -> float:
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=bos,
        )
        _sync(model.device)
        return out[:, ids.shape[1] :].numel() / (time.perf_counter() - start)

    return run


def mode_figures(
    ensemble: Ensemble,
    prompts: list[list[int]],
    new_tokens: int,
    repeats: int,
    options: dict[str, Any],
    reference: Callable[[], float],
    fixed_rows: bool = False,
) -> dict:
    """Tokens/s of one routing mode, its router share, the experts' work per generated token, and
    its speed relative to ``reference`` (transformers ``generate``), timed right before every
    repetition so that both see the same machine: this VM's speed drifts by 20% within minutes.
    Greedy decoding and a fixed seed make every repetition produce the same tokens. ``fixed_rows``:
    row i keeps expert i mod K throughout (what a trained router settles into after a few tokens)
    instead of the random-init router, which changes its choice almost every token."""
    uses_router = options["routing"] != "bayes"
    runs: list[tuple[float, float]] = []  # (total, router) seconds of each timed repetition
    references: list[float] = []  # tokens/s of the reference run before each timed repetition
    for attempt in range(1 + repeats):  # the first one warms up
        reference_rate = reference()
        if fixed_rows:
            weigher = FixedRowsWeigher(ensemble.router, len(prompts), ensemble.num_experts)
        else:
            weigher = TimedRouterWeigher(ensemble.router) if uses_router else None
        start = time.perf_counter()
        generation = generate_text(
            ensemble,
            prompts,
            max_new_tokens=new_tokens,
            temperature=0.0,
            seed=0,
            stop_at_eos=False,
            weigher=weigher,
            **options,
        )
        if attempt:
            runs.append((time.perf_counter() - start, weigher.seconds if weigher else 0.0))
            references.append(reference_rate)
    seconds = statistics.median(total for total, _ in runs)
    produced = sum(len(ids) for ids in generation.token_ids)
    figures = {
        "tokens_per_second": produced / seconds,
        "vs_reference": statistics.median(produced / total / rate for (total, _), rate in zip(runs, references)),
        "reference_tokens_per_second": statistics.median(references),
        "forward_passes_per_step": sum(generation.forward_passes) / new_tokens,
        # expert token-forwards (prompt prefill and catch-up included) per generated token
        "expert_tokens_per_token": sum(generation.tokens_processed) / produced,
    }
    if uses_router:
        figures["router_share"] = statistics.median(router / total for total, router in runs)
    return figures


def bench_generation(
    tokenizer, settings: Settings, say: Callable[[str], None], device: torch.device = CPU, compiled: bool = False
) -> dict:
    """Per batch size, every routing mode against one expert through transformers ``generate``
    (the reference figure: the median over modes of the median of its runs paired with each mode);
    ``compiled``: the ensemble decodes with its compiled step (compiling happens in the warm-up runs)."""
    ensemble = bench_ensemble(settings.num_experts, tokenizer, device)
    if compiled:
        ensemble.compile()
    out: dict[str, Any] = {
        "compiled": compiled,
        "num_experts": settings.num_experts,
        "new_tokens": settings.new_tokens,
        "prompt_tokens": PROMPT_TOKENS,
        "decoding": "greedy",
        "ratios": "median over repetitions of (mode tokens/s / reference tokens/s just before)",
    }
    for batch in settings.batches:
        prompts = _prompts(batch)
        reference = generate_reference(ensemble.experts[0], prompts, settings.new_tokens)
        row: dict[str, Any] = {}
        for name, options in MODES.items():
            fixed = name == "top1_fixed_rows"
            row[name] = figures = mode_figures(
                ensemble, prompts, settings.new_tokens, settings.repeats, options, reference, fixed_rows=fixed
            )
            say(
                f"generation batch {batch}: {name} {figures['tokens_per_second']:.0f} tok/s "
                f"({figures['vs_reference']:.2f}x generate at {figures['reference_tokens_per_second']:.0f})"
            )
        rates = [figures["reference_tokens_per_second"] for figures in row.values()]
        out[f"batch_{batch}"] = {"reference_generate": {"tokens_per_second": statistics.median(rates)}, **row}
    return out


def bench_scaling(
    tokenizer, settings: Settings, generation: dict, say: Callable[[str], None], device: torch.device = CPU
) -> dict:
    """Batch-1 decoding for several K: top1 should stay flat, mixture grows with K. The K of the
    generation section is taken from ``generation``, measured in the same run."""
    prompts = _prompts(1)
    batch_1 = generation["batch_1"]
    out: dict[str, Any] = {"reference_generate": batch_1["reference_generate"]}
    for k in settings.scaling:
        if k == generation["num_experts"]:
            row = {name: batch_1[name] for name in ("top1", "mixture")}
        else:
            ensemble = bench_ensemble(k, tokenizer, device)
            reference = generate_reference(ensemble.experts[0], prompts, settings.new_tokens)
            row = {
                name: mode_figures(ensemble, prompts, settings.new_tokens, settings.repeats, MODES[name], reference)
                for name in ("top1", "mixture")
            }
        out[f"k_{k}"] = row
        say(
            f"scaling K={k}: top1 {row['top1']['tokens_per_second']:.0f}, "
            f"mixture {row['mixture']['tokens_per_second']:.0f} tok/s"
        )
    return out


# --- masked path ------------------------------------------------------------------------------
#: Euler steps of the masked sampler the bench times (N of issue 11's table).
MASKED_STEPS = (16, 64, 256)


def bench_masked_ensemble(
    num_experts: int, tokenizer: PreTrainedTokenizerFast, device: torch.device = CPU
) -> MaskedEnsemble:
    """K random default masked experts (ModernBERT, in the inference dtype of ``device``) and a
    random noisy-state router over V + 1 symbols, on ``device``."""
    config = masked_expert_config(
        len(tokenizer), eos_token_id=BOS, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer.get_vocab())
    )
    dtype = inference_dtype("auto", device)
    experts = [build_masked_expert(config, seed=k).eval().to(device, dtype) for k in range(num_experts)]
    torch.manual_seed(20_000 + num_experts)
    router = Router(RouterConfig(vocab_size=len(tokenizer) + 1, num_experts=num_experts)).eval().to(device)
    return MaskedEnsemble(experts, router, tokenizer=tokenizer, path=MaskedPath(len(tokenizer), scheduler("linear")))


def bench_masked(
    tokenizer, settings: Settings, generation: dict, say: Callable[[str], None], device: torch.device = CPU
) -> dict:
    """Tokens/s of the masked sampler filling ``new_tokens`` positions after the bench prompt, for
    N in MASKED_STEPS, mixture and switch, at batch 1; against the autoregressive modes of
    ``generation`` (same run, same prompt, same length). Batch 1 only: every step runs the experts
    on the whole sequence, so N = 256 at batch 8 alone would take minutes per repetition here."""
    ensemble = bench_masked_ensemble(settings.num_experts, tokenizer, device)
    out: dict[str, Any] = {
        "num_experts": settings.num_experts,
        "new_tokens": settings.new_tokens,
        "steps": list(MASKED_STEPS),
    }
    for batch in settings.batches[:1]:
        prompts = _prompts(batch)
        ar = generation[f"batch_{batch}"]
        row: dict[str, Any] = {}
        for steps in MASKED_STEPS:
            for routing in ("mixture", "switch"):

                def run() -> None:
                    generate_masked_text(ensemble, prompts, length=settings.new_tokens, steps=steps, routing=routing)

                rate = batch * settings.new_tokens / _median_seconds(run, settings.repeats)
                row[f"{routing}_n{steps}"] = {
                    "tokens_per_second": rate,
                    "vs_ar_same_mode": rate / ar[routing]["tokens_per_second"],
                }
                say(
                    f"masked batch {batch} N={steps}: {routing} {rate:.0f} tok/s "
                    f"({row[f'{routing}_n{steps}']['vs_ar_same_mode']:.2f}x autoregressive {routing})"
                )
        out[f"batch_{batch}"] = row
    return out


# --- scoring ----------------------------------------------------------------------------------
def bench_scoring(tokenizer, settings: Settings, say: Callable[[str], None], device: torch.device = CPU) -> dict:
    """Evaluation tokens/s: the mixture (every expert + router + mixing) vs one expert (the scores
    come back to the host, which waits for the device)."""
    ensemble = bench_ensemble(settings.num_experts, tokenizer, device)
    g = torch.Generator().manual_seed(1)
    docs = torch.randint(1, VOCAB_SIZE, (settings.score_docs, settings.score_tokens), generator=g).tolist()
    context = ensemble.experts[0].config.max_position_embeddings
    scored = sum(len(d) + 1 for d in docs)

    def one_expert() -> None:
        token_log_probs(ensemble.experts[0], docs, bos_id=BOS, context=context)

    def mixture() -> None:
        experts = expert_token_log_probs(ensemble.experts, docs, bos_id=BOS, context=context)
        weights = router_log_weights(ensemble.router, docs, bos_id=BOS, context=context)
        mixed_token_log_probs(experts, weights)

    single = scored / _median_seconds(one_expert, settings.repeats)
    mixed = scored / _median_seconds(mixture, settings.repeats)
    say(f"scoring: one expert {single:.0f}, mixture {mixed:.0f} tok/s")
    return {
        "documents": len(docs),
        "tokens": scored,
        "num_experts": settings.num_experts,
        "one_expert": {"tokens_per_second": single},
        "mixture": {"tokens_per_second": mixed, "vs_one_expert": mixed / single},
    }


# --- memory -----------------------------------------------------------------------------------
def write_bench_run(run_dir: Path, num_experts: int, tokenizer: PreTrainedTokenizerFast) -> None:
    """A minimal run directory that ``Ensemble.from_run`` loads: tokenizer, experts, router, manifest."""
    ensemble = bench_ensemble(num_experts, tokenizer)
    save_tokenizer(tokenizer, run_dir / "tokenizer")
    entries = []
    for k, expert in enumerate(ensemble.experts):
        save_expert(expert, run_dir / "experts" / f"expert-{k}")
        entries.append(ExpertEntry(f"expert-{k}", f"experts/expert-{k}", 1 / num_experts))
    ensemble.router.save_pretrained(run_dir / "router")
    Manifest(
        experts=entries,
        tokenizer="tokenizer",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer.get_vocab()),
        vocab_size=len(tokenizer),
        router="router",
    ).with_hashes(run_dir).save(run_dir)


def bench_memory(tokenizer, settings: Settings, say: Callable[[str], None]) -> dict:
    """Peak RSS of loading a K-expert run and generating, against a process that only imports libraries."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        write_bench_run(run_dir, settings.num_experts, tokenizer)
        what = "the memory benchmark's child process"
        baseline = run_measured("imports", what=what)["peak_rss_kib"] / 1024
        ensemble = run_measured("generate", str(run_dir), str(settings.new_tokens), what=what)["peak_rss_kib"] / 1024
    say(f"memory: imports {baseline:.0f} MB, ensemble {ensemble:.0f} MB")
    return {
        "num_experts": settings.num_experts,
        "new_tokens": settings.new_tokens,
        "routing": "mixture",
        "import_torch_transformers_mb": baseline,
        "load_and_generate_mb": ensemble,
        "difference_mb": ensemble - baseline,
    }


# --- the whole bench --------------------------------------------------------------------------
def _ratios(results: dict) -> dict[str, float | None]:
    training, gen = results["training"], results["generation"]["batch_1"]
    trainer = training["trainer"]["tokens_per_second"]
    hf = training["hf_trainer"].get("tokens_per_second")
    ratios = {
        "trainer_vs_hf_trainer": trainer / hf if hf else None,
        "trainer_vs_plain_loop": trainer / training["plain_loop"]["tokens_per_second"],
        "top1_vs_generate": gen["top1"]["vs_reference"],
        "switch_vs_generate": gen["switch"]["vs_reference"],
        "mixture_vs_generate": gen["mixture"]["vs_reference"],
        "router_share": gen["top1"]["router_share"],
    }
    largest = max((key for key in results["generation"] if key.startswith("batch_")), key=lambda key: int(key[6:]))
    if largest != "batch_1":
        big = results["generation"][largest]
        for name in ("top1", "top1_fixed_rows", "mixture"):
            ratios[f"{name}_vs_generate_{largest}"] = big[name]["vs_reference"]
    return ratios


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers warnings or progress bars (model saving draws one) while the bench runs."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def run_bench(
    quick: bool = False,
    out: Path | None = None,
    progress: bool = True,
    device: torch.device = CPU,
    compiled: bool = False,
) -> dict:
    """Run every section (see the module doc) on ``device``, write the results atomically as JSON to ``out``;
    ``compiled``: the generation section decodes with the engine's compiled step (``Ensemble.compile``)."""
    with _quiet_transformers():
        results = _run_sections(QUICK if quick else FULL, progress, device, compiled)
    results["quick"] = quick
    if out is not None:
        write_json(out, results)
    return results


def machine_info(device: torch.device = CPU) -> dict[str, Any]:
    """What the figures of a bench depend on: cores, threads, versions, platform, device, load at the start."""
    gpu = (
        {"gpu": torch.cuda.get_device_name(device), "cuda_version": torch.version.cuda} if device.type == "cuda" else {}
    )
    return {
        **gpu,
        "os_cpu_count": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": str(device),
        "load_average_start": _load_average(),
    }


def _run_sections(settings: Settings, progress: bool, device: torch.device, compiled: bool) -> dict:
    say = _Progress(progress)
    tokenizer = bench_tokenizer()
    started = time.perf_counter()

    say(f"peak matmul FLOP/s (n={settings.peak_size})")
    peak = measure_peak(settings.peak_size, settings.peak_repeats, device)
    say(f"peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s" + (f", bf16 {peak['bf16'] / 1e9:.0f}" if peak["bf16"] else ""))
    results: dict[str, Any] = {
        "machine": {**machine_info(device), "peak_flops": peak},
        "peak": {"matmul_size": settings.peak_size, "fp32_flops": peak["fp32"], "bf16_flops": peak["bf16"]},
    }
    sections: dict[str, Callable[[], dict]] = {
        "training": lambda: bench_training(
            tokenizer, settings, peak["bf16" if device.type == "cuda" else "fp32"], say, device
        ),
        "generation": lambda: bench_generation(tokenizer, settings, say, device, compiled),
        "scaling": lambda: bench_scaling(tokenizer, settings, results["generation"], say, device),
        "masked": lambda: bench_masked(tokenizer, settings, results["generation"], say, device),
        "scoring": lambda: bench_scoring(tokenizer, settings, say, device),
        "memory": lambda: bench_memory(tokenizer, settings, say),
    }
    with progress_bar(total=len(sections), desc="bench", unit="section", enabled=progress) as bar:
        for name, section in sections.items():
            bar.set_postfix_str(name)
            results[name] = section()
            bar.update()
    results["ratios"] = _ratios(results)
    results["machine"]["load_average_end"] = _load_average()
    results["seconds"] = time.perf_counter() - started
    say(f"done in {results['seconds']:.0f}s")
    return results


# --- table ------------------------------------------------------------------------------------
def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_table(results: dict) -> str:
    """The bench results as a plain-text table (one line per figure)."""
    lines: list[str] = []

    def row(what: str, figure: str, note: str = "") -> None:
        lines.append(f"{what:<44} {figure:>14}  {note}".rstrip())

    machine = results["machine"]
    lines.append(
        f"dfm bench{' --quick' if results.get('quick') else ''}: torch {machine['torch_version']}, "
        f"transformers {machine['transformers_version']}, {machine['usable_cores']} cores "
        f"({machine['torch_threads']} threads), {machine['platform']}"
    )
    if machine.get("load_average_start") is not None:
        lines.append(
            f"load average (1 min) at start {machine['load_average_start'][0]:.2f}, "
            f"at end {machine['load_average_end'][0]:.2f}: figures are only comparable on an idle machine"
        )
    row("section / what", "figure", "note")
    peak = results["peak"]
    row("peak matmul fp32", f"{peak['fp32_flops'] / 1e9:,.1f}", f"GFLOP/s, n={peak['matmul_size']}")
    if peak.get("bf16_flops"):
        row("peak matmul bf16", f"{peak['bf16_flops'] / 1e9:,.1f}", "GFLOP/s")
    training = results["training"]
    for name, label in (
        ("trainer", "training: dfm trainer"),
        ("plain_loop", "training: plain PyTorch loop"),
        ("hf_trainer", "training: transformers.Trainer"),
    ):
        figures = training[name]
        if "skipped" in figures:
            row(label, "skipped", figures["skipped"])
        else:
            row(label, _rate(figures["tokens_per_second"]), f"tok/s, MFU {figures['mfu']:.1%}")
    generation = results["generation"]
    for key, modes in generation.items():
        if not key.startswith("batch_"):
            continue
        batch = key.split("_")[1]
        row(
            f"generate b={batch}: transformers generate (1 expert)",
            _rate(modes["reference_generate"]["tokens_per_second"]),
            "tok/s (reference)",
        )
        for name in MODES:
            figures = modes[name]
            note = (
                f"tok/s, {figures['vs_reference']:.2f}x ref, {figures['forward_passes_per_step']:.2f} fwd/step, "
                f"{figures['expert_tokens_per_token']:.2f} expert tok/token"
            )
            if "router_share" in figures:
                note += f", router {figures['router_share']:.0%}"
            step = ", compiled" if generation["compiled"] else ""
            row(
                f"generate b={batch} K={generation['num_experts']}: {name}{step}",
                _rate(figures["tokens_per_second"]),
                note,
            )
    for key, modes in results["scaling"].items():
        if key.startswith("k_"):
            for name, figures in modes.items():
                row(
                    f"scaling b=1 K={key[2:]}: {name}",
                    _rate(figures["tokens_per_second"]),
                    f"tok/s, {figures['vs_reference']:.2f}x ref",
                )
    masked = results["masked"]
    for key, modes in masked.items():
        if key.startswith("batch_"):
            for name, figures in modes.items():
                routing, steps = name.rsplit("_n", 1)
                row(
                    f"masked b={key.split('_')[1]} K={masked['num_experts']} N={steps}: {routing}",
                    _rate(figures["tokens_per_second"]),
                    f"tok/s, {figures['vs_ar_same_mode']:.2f}x ar {routing}",
                )
    scoring = results["scoring"]
    row("scoring: one expert", _rate(scoring["one_expert"]["tokens_per_second"]), "tok/s")
    row(
        f"scoring: mixture K={scoring['num_experts']}",
        _rate(scoring["mixture"]["tokens_per_second"]),
        f"tok/s, {scoring['mixture']['vs_one_expert']:.2f}x one expert",
    )
    memory = results["memory"]
    row("memory: import torch + transformers", f"{memory['import_torch_transformers_mb']:,.0f}", "MB peak RSS")
    row(
        f"memory: load K={memory['num_experts']} run + generate",
        f"{memory['load_and_generate_mb']:,.0f}",
        f"MB peak RSS (+{memory['difference_mb']:,.0f} MB)",
    )
    for name, value in results["ratios"].items():
        row(f"ratio {name}", "-" if value is None else f"{value:.3f}")
    return "\n".join(lines)
