"""The `dfm` command line: the one composition root. Subcommands import what they need lazily."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from dfm.errors import DfmError

#: Old spellings of options and commands, each accepted with a warning naming the new one.
RENAMED = {
    "--split": "--train-split",
    "--seed-steps": "--seed-model-steps",
    "--steps": "--sampler-steps",
    "train-seed": "train-seed-model",
}


class DeprecatedName(UserWarning):
    """An option or command used under its old name."""


def _renamed(old: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed: use {RENAMED[old]}", DeprecatedName, stacklevel=2)


class _Renamed(argparse.Action):
    """An option's old spelling: stores into the new option's destination, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _renamed(option_string)
        setattr(namespace, self.dest, values)


def _add_renamed(group, old: str, dest: str, **options) -> None:
    group.add_argument(old, dest=dest, action=_Renamed, default=None, help=argparse.SUPPRESS, **options)


#: Shortcut flags of the pipeline commands and the config key each one sets.
CONFIG_FLAGS: dict[str, tuple[str, dict]] = {
    "--dataset": (
        "data.dataset",
        {
            "help": "hub name, json|csv|parquet|text (with --data-files), or a save_to_disk dir; "
            "default: the embedded synthetic corpus"
        },
    ),
    "--dataset-config": ("data.config_name", {"help": "hub dataset configuration name"}),
    "--train-split": ("data.split", {"help": "split to train on (validation/test are carved from it if absent)"}),
    "--data-files": (
        "data.data_files",
        {
            "nargs": "+",
            "help": "local files for --dataset json|csv|parquet|text; "
            "SPLIT=PATH names the split of a file (train=a.jsonl test=b.jsonl)",
        },
    ),
    "--text-column": ("data.text_column", {"help": "column holding the text (default: text)"}),
    "--cluster-column": ("data.cluster_column", {"help": "use this label column as the partition instead of k-means"}),
    "--label-column": ("data.label_column", {"help": "reference label for purity/NMI of the partition"}),
    "--streaming": (
        "data.streaming",
        {
            "action": "store_const",
            "const": True,
            "help": "stream the dataset from the hub or files, writing it to disk as it is read "
            "(no --max-documents needed)",
        },
    ),
    "--max-documents": ("data.max_documents", {"type": int, "help": "read at most this many documents"}),
    "--tokenizer": ("tokenizer.path", {"help": "use this saved tokenizer instead of training a BPE one"}),
    "--vocab-size": ("tokenizer.vocab_size", {"type": int, "help": "BPE vocabulary size (default 2048)"}),
    "--num-clusters": ("partition.num_clusters", {"type": int, "help": "number of clusters = experts (default 4)"}),
    "--init-from": (
        "seed_model.init_from",
        {
            "help": "branch experts and baseline from this pretrained causal LM (hub "
            "name or local dir); its tokenizer is used and no seed is trained"
        },
    ),
    "--shared-column": (
        "seed_model.shared_column",
        {
            "help": "boolean column marking the documents the seed model may "
            "train on (default: a fraction of every cluster)"
        },
    ),
    "--seed-model-steps": (
        "seed_model.train.steps",
        {
            "type": int,
            "help": "optimizer steps of the seed model (default 1200; 200 on the embedded synthetic corpus; "
            "--set seed_model.epochs=E sizes them in passes over the shared documents instead)",
        },
    ),
    "--steps": (
        "expert.train.steps",
        {
            "type": int,
            "help": "optimizer steps per expert (the baseline gets as much "
            "compute as all experts and the router together; --set expert.epochs=E sizes them in passes "
            "over each expert's shard instead)",
        },
    ),
    "--router-steps": ("router.train.steps", {"type": int, "help": "optimizer steps of the router"}),
    "--seed": (
        "seed",
        {"type": int, "help": "random seed of everything: data order, initialisations, sampling (default 0)"},
    ),
    "--num-proc": ("num_proc", {"type": int, "help": "processes for tokenization (Dataset.map)"}),
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (every key of the config can also be set with --set)")
    group.add_argument("--config", help="YAML or JSON config file")
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set expert.train.lr=1e-3 (repeatable)",
    )
    for flag, (key, options) in CONFIG_FLAGS.items():
        if "action" not in options:
            options = {"metavar": flag[2:].upper().replace("-", "_"), **options}
        group.add_argument(flag, dest="cfg:" + key, default=None, **options)
    _add_renamed(group, "--split", "cfg:data.split")
    _add_renamed(group, "--seed-steps", "cfg:seed_model.train.steps", type=int)


def _resolved_config(args: argparse.Namespace) -> dict:
    from training.config import load_config_file, parse_override, resolve_config

    overrides = [parse_override(text) for text in args.set]
    for name, value in vars(args).items():
        if name.startswith("cfg:") and value is not None:
            override: object = value
            for part in reversed(name[4:].split(".")):
                override = {part: override}
            overrides.append(override)
    config = resolve_config(args.config, overrides)
    layers = ([load_config_file(args.config)] if args.config is not None else []) + overrides
    if not any(isinstance(layer.get("tokenizer"), dict) and "vocab_size" in layer["tokenizer"] for layer in layers):
        from training.tokenizer_training import VocabularyShortfall

        # the default vocabulary is more than a small corpus fills (the default run's reaches ~900 of
        # 2048): say so only to whoever asked for a size (main() scopes this filter to one command)
        warnings.filterwarnings("ignore", category=VocabularyShortfall)
    return config


def _add_eval_flags(parser: argparse.ArgumentParser, with_run: bool = True) -> None:
    if with_run:
        parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--split", default="test", help="held-out split to score (default: test)")
    parser.add_argument(
        "--modes",
        nargs="+",
        metavar="MODE",
        help="ensemble modes to score: mixture top1 top2 bayes centroid oracle (default: all); "
        "masked runs: mixture top1 top2 switch oracle",
    )
    parser.add_argument("--max-documents", type=int, help="score only the first N documents")
    parser.add_argument(
        "--stride",
        type=int,
        help="sliding-window stride for documents longer than the context (default: half the context)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="documents per forward pass (default 8)")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="score without missing or corrupt experts (router weights renormalised) instead of failing",
    )
    _add_device_flag(parser)
    _add_dtype_flag(parser)
    parser.add_argument(
        "--elbo-samples",
        type=int,
        help="masked runs: masked draws per row of the ELBO (default 8); more draws, less noise",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.02,
        help="equivalence margin as a fraction of the baseline's bits per byte (default 0.02)",
    )


def _add_compile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the stacked engine's one-token decoding step (Llama experts): seconds of "
        "compiling per new shape; meant for GPUs, slower on a CPU (README, Performance)",
    )


def _add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")


def _add_pipeline_flags(parser: argparse.ArgumentParser, modes_help: str) -> None:
    """What every command that runs the pipeline takes: --modes, --device, --dtype and the configuration."""
    parser.add_argument("--modes", nargs="+", metavar="MODE", help=modes_help)
    _add_device_flag(parser)
    _add_dtype_flag(parser)
    _add_config_flags(parser)


def _add_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default="auto",
        help="precision of the weights at inference: auto (bfloat16 on CUDA, float32 on the CPU), float32 or bfloat16",
    )


def _device(args: argparse.Namespace):
    """The torch device --device names (checked: a CUDA device this machine lacks is refused)."""
    from dfm.tensors import resolve_device

    return resolve_device(args.device)


def _dtype(args: argparse.Namespace, device):
    """The inference dtype --dtype names for ``device``."""
    from dfm.tensors import inference_dtype

    return inference_dtype(args.dtype, device)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"dfm: warning: {message}", file=sys.stderr)


def _say(message: str) -> None:
    print(f"[dfm] {message}", file=sys.stderr, flush=True)


def _quiet_libraries(quiet: bool) -> None:
    """Library logs off; dfm's own bars (and datasets' map/filter bars) only on a terminal, unless quiet."""
    import datasets
    from transformers.utils import logging as hf_logging

    from dfm.progress import set_quiet, shown

    set_quiet(quiet)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if shown():
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


# --- subcommands ------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> dict:
    from training.prepare import prepare

    summary = prepare(_resolved_config(args), args.out, overwrite=args.overwrite)
    _say(f"prepared {args.out}: {json.dumps(summary)}")
    return summary


def cmd_train_seed_model(args: argparse.Namespace) -> dict:
    from eval.pipeline import loss_text
    from training.lm_training import train_seed_model

    summary = train_seed_model(args.run, resume=args.resume, device=_device(args))
    _say(f"seed: val loss {loss_text(summary['val_loss'])} in {summary['seconds']:.1f}s")
    return summary


def cmd_train_expert(args: argparse.Namespace) -> dict:
    from eval.pipeline import loss_text
    from training.lm_training import train_expert

    summary = train_expert(args.run, args.expert, resume=args.resume, device=_device(args))
    from training.distributed import setup_distributed

    if not setup_distributed().is_main:
        return summary
    _say(
        f"expert-{args.expert}: val loss {loss_text(summary['val_loss'])} "
        f"(unigram entropy {summary['unigram_entropy']:.3f}) in {summary['seconds']:.1f}s"
    )
    return summary


def cmd_add_expert(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from training.add_cluster import add_cluster, read_texts
    from training.config import read_run_config
    from training.prepare import data_source

    config = read_run_config(args.run)
    data = replace(
        config.data,
        dataset=args.dataset,
        config_name=args.dataset_config,
        split=args.split,
        data_files=args.data_files,
        text_column=args.text_column,
        streaming=args.streaming,
        max_documents=args.max_documents,
    )
    k = add_cluster(args.run, read_texts(data_source(replace(config, data=data))))
    _say(
        f"added cluster {k} to {args.run}; next: dfm train-expert --run {args.run} --expert {k} && "
        f"dfm train-router --run {args.run} && dfm assemble --run {args.run}"
    )
    print(k)  # stdout carries K alone, for K=$(dfm add-expert ...)
    return k


def cmd_train_router(args: argparse.Namespace) -> dict:
    from eval.pipeline import loss_text
    from training.router_training import train_router

    summary = train_router(args.run, resume=args.resume, device=_device(args))
    _say(f"router: val loss {loss_text(summary['val_loss'], '')} in {summary['seconds']:.1f}s")
    return summary


def cmd_train_baseline(args: argparse.Namespace) -> dict:
    from eval.pipeline import loss_text
    from training.lm_training import train_baseline

    summary = train_baseline(args.run, resume=args.resume, device=_device(args))
    _say(f"baseline: val loss {loss_text(summary['val_loss'])} in {summary['seconds']:.1f}s")
    return summary


def cmd_assemble(args: argparse.Namespace) -> None:
    from training.assemble import assemble

    manifest = assemble(args.run)
    _say(
        f"wrote {args.run}/ensemble.json: {len(manifest.experts)} experts, router: {manifest.router}, "
        f"baseline: {manifest.baseline}"
    )


def cmd_run(args: argparse.Namespace) -> None:
    from eval.pipeline import run_pipeline, sample_text
    from eval.report import markdown
    from training.config import read_run_config

    device = _device(args)  # checked before any work
    dtype = _dtype(args, device)
    result = run_pipeline(
        args.out,
        lambda: _resolved_config(args),
        resume=args.resume,
        overwrite=args.overwrite,
        modes=args.modes,
        device=device,
        dtype=dtype,
        say=_say,
    )
    print(markdown(result.report))
    config = read_run_config(args.out)
    print(f"Sample (mixture routing, 60 tokens max):\n  {sample_text(args.out, config.seed, device, dtype)}\n")
    _say(f"more: dfm generate --run {args.out} --prompt TEXT --routing " + config.kind.generate_hint)
    _say(f"done in {sum(result.timings.values()):.0f}s: {json.dumps(result.timings)}; report in {args.out}/eval/")


def cmd_scaling(args: argparse.Namespace) -> None:
    from eval.scaling import Ladder, run_study
    from eval.scaling_report import markdown

    for flag, key, instead in (
        ("--num-clusters", "partition.num_clusters", "--experts"),
        ("--seed", "seed", "--seeds"),
    ):
        if getattr(args, f"cfg:{key}") is not None:
            raise DfmError(f"dfm scaling takes {instead}, not {flag}: every rung sets its own")
    ladder = Ladder(tuple(args.budgets), tuple(args.experts), tuple(args.seeds))
    ladder.validate()  # before the corpus loads
    device = _device(args)
    summary = run_study(
        args.out,
        lambda: _resolved_config(args),
        ladder,
        resume=args.resume,
        overwrite=args.overwrite,
        modes=args.modes,
        device=device,
        dtype=_dtype(args, device),
        say=_say,
    )
    print(markdown(summary))
    _say(f"study in {args.out}: scaling.json, scaling.md, scaling.png; each rung's run under {args.out}/rungs/")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn  # noqa: F401

        from eval.serve_app import Server, serve
    except ImportError as err:
        raise DfmError(f"dfm serve needs the serve extra ({err.name} is missing): pip install 'dfm[serve]'") from err
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        warnings.warn(
            f"serving on {args.host} without --api-key: anyone who can reach this port can use the models",
            stacklevel=1,
        )
    server = Server(args.run, device=_device(args), max_batch=args.max_batch, api_key=args.api_key, threaded=False)
    _say(f"serving {', '.join(server.models())} on http://{args.host}:{args.port}/v1 (Ctrl-C or SIGTERM to stop)")
    serve(server, args.host, args.port)


def cmd_eval(args: argparse.Namespace) -> dict:
    from dfm.atomic import check_writable
    from eval.pipeline import evaluate, write_evaluation
    from eval.report import markdown, require_baseline, require_matched
    from training.layout import RunLayout

    out = RunLayout.of(args.run).eval
    check_writable(out)  # before minutes of scoring, not after
    device = _device(args)
    report = evaluate(
        args.run,
        split=args.split,
        modes=args.modes,
        max_documents=args.max_documents,
        stride=args.stride,
        batch_size=args.batch_size,
        margin=args.margin,
        allow_missing=args.allow_missing,
        elbo_samples=args.elbo_samples,
        device=device,
        dtype=_dtype(args, device),
    )
    plots = write_evaluation(report, args.run)
    print(markdown(report))
    _say(f"wrote {out}/report.json, report.md and {', '.join(p.name for p in plots)}")
    if not args.no_baseline:
        require_baseline(report, args.run)  # the scores are kept; a report without a verdict is not a success
    require_matched(report, args.run)
    return report


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt; else --prompt-file, one prompt a line (blank lines skipped); else stdin as one
    prompt (`echo TEXT |` adds one newline, which is dropped); else one empty prompt (BOS only)."""
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as handle:
                prompts = [line.rstrip("\r\n") for line in handle if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise DfmError(f"cannot read --prompt-file {args.prompt_file}: {err}") from err
        if not prompts:
            raise DfmError(f"--prompt-file {args.prompt_file} holds no prompt: write one prompt a line")
        return prompts
    if sys.stdin is not None and not sys.stdin.isatty():
        try:
            text = sys.stdin.buffer.read().decode("utf-8") if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        except UnicodeDecodeError as err:
            raise DfmError(
                f"the prompt on stdin is not UTF-8 text (byte {err.start}): pipe text, or pass --prompt / --prompt-file"
            ) from err
        return [text[:-1] if text.endswith("\n") else text]
    return [""]


def _load_generator(args: argparse.Namespace, kind):
    """The ensemble of the run's path, or the baseline / one expert as a one-expert ensemble (same code path)."""
    device = _device(args)
    dtype = _dtype(args, device)
    if args.model == "ensemble":
        # bayes and centroid weigh the experts without the router: a run without one still generates
        return kind.load_ensemble(
            args.run, device, allow_missing=args.allow_missing, load_router=args.routing.uses_router, dtype=dtype
        )
    return kind.load_model(args.run, args.model, device, dtype)


def _routing_view(generation, tokenizer, colour: bool) -> str:
    """One line per generated token: the token, the experts that ran, and the routing weights."""
    palette = ["\033[31m", "\033[32m", "\033[34m", "\033[35m", "\033[36m", "\033[33m"]
    lines = [f"{'token':>16}  ran        weights ({', '.join(generation.names)})"]
    for step, token in enumerate(generation.token_ids[0]):
        weights = generation.weights[0][step]
        ran = generation.experts_ran[step]
        text = repr(tokenizer.decode([token]))[:16]
        if colour:
            top = int(weights.argmax())
            text = f"{palette[top % len(palette)]}{text:>16}\033[0m"
        cells = " ".join(f"{w:.2f}" for w in weights.tolist())
        lines.append(f"{text:>16}  {','.join(map(str, ran)):<9}  {cells}")
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace) -> None:
    from dfm.progress import progress
    from dfm.routing import Routing
    from models.generation_request import GenerationRequest
    from models.manifest import Manifest
    from models.path_kinds import path_kind

    kind = path_kind(Manifest.load(args.run).path_kind)
    args.routing, args.k = _routing_and_k(args)  # fail on a typo before loading anything
    if args.batch_size < 1:
        raise DfmError(f"--batch-size must be a positive number of prompts, got {args.batch_size}")
    if args.show_steps and kind.streams_tokens:
        raise DfmError(f"--show-steps shows the masked sampler's steps; this run is on the {kind.name} path")
    if args.show_routing and not kind.streams_tokens:
        raise DfmError(f"--show-routing shows the router's weight per token; on the {kind.name} path use --show-steps")
    prompts = _read_prompts(args)
    if len(prompts) > 1 and (args.show_routing or args.show_steps):
        raise DfmError(
            f"--show-routing and --show-steps follow one prompt; --prompt-file holds {len(prompts)} prompts: "
            f"use --json for every prompt's record"
        )
    partition = None
    if args.routing is Routing.CENTROID:
        if args.model != "ensemble":
            raise DfmError("--routing centroid routes between experts: use it with --model ensemble")
        partition = Manifest.load(args.run).load_partition(args.run)  # verified against its sha256
    model = _load_generator(args, kind)
    if args.compile:
        if not hasattr(model, "compile"):
            raise DfmError(f"--compile compiles the autoregressive decoding step; drop it for this {kind.name} run")
        model.compile()

    def request(count: int) -> GenerationRequest:
        return GenerationRequest(
            max_new_tokens=args.max_new_tokens,
            routing=args.routing,
            k=args.k,
            temperature=args.temperature,
            seed=args.seed,
            exclude=tuple(args.exclude_expert),
            clusters=None if args.cluster is None else [args.cluster] * count,
            top_p=args.top_p,
            top_k=args.top_k,
            route_on=args.route_on,
            partition=partition,
            centroid_temperature=args.centroid_temperature,
            sampler_steps=args.sampler_steps,
        )

    if len(prompts) == 1:
        return _generate_one(args, kind, model, prompts[0], request(1))
    bar = progress(total=len(prompts), desc="generate", unit="prompt")
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first : first + args.batch_size]
        generation = kind.generate(model, batch, request(len(batch)))
        record = generation.to_json()
        rows = [key for key in PER_PROMPT if key in record]
        for i, prompt in enumerate(batch):
            if args.json:  # one JSON object a line, per prompt, in the order of the file
                row = {key: record[key][i] for key in rows}
                print(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "text": row.pop("texts"),
                            "index": first + i,
                            **row,
                            "names": record["names"],
                        }
                    )
                )
            else:  # one block per prompt: the prompt, its continuation, a blank line
                print(f"{prompt}{generation.texts[i]}\n", flush=True)
        bar.update(len(batch))
    bar.close()
    _say(f"{len(prompts)} prompts in batches of {args.batch_size}")


#: The fields of a generation's record that hold one entry per prompt (`dfm generate --json` with a prompt file).
PER_PROMPT = ("texts", "token_ids", "prompt_ids", "weights", "token_log_probs", "truncated")


def _generate_one(args: argparse.Namespace, kind, model, prompt: str, request) -> None:
    """One prompt: tokens stream to stdout as they are produced, or each sampler step goes to stderr
    with --show-steps (or one JSON object)."""
    from models.generation_request import DEFAULT_SAMPLER_STEPS

    tokenizer = model.tokenizer
    streamed: list[int] = []
    printed = ""

    def stream(step: int, tokens: list[int]) -> None:
        nonlocal printed
        streamed.append(tokens[0])
        text = tokenizer.decode([t for t in streamed if t != tokenizer.eos_token_id])
        if text.endswith("\ufffd"):
            return  # wait for the rest of a multi-byte character
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text

    def show(step: int, texts: list[str]) -> None:
        _say(f"step {step + 1}/{generation_steps}: {texts[0]}")

    generation_steps = request.sampler_steps or DEFAULT_SAMPLER_STEPS
    watch = None
    if not args.json:
        watch = stream if kind.streams_tokens else (show if args.show_steps else None)
    generation = kind.generate(model, prompt, request, on_progress=watch)
    if args.json:
        print(json.dumps({"prompt": prompt, "text": generation.texts[0], **generation.to_json()}))
        return
    if kind.streams_tokens:
        sys.stdout.write("\n")
    else:
        print(generation.texts[0])
    if args.show_routing:
        print(_routing_view(generation, tokenizer, colour=sys.stdout.isatty()))
    _say(generation.summary())


def _routing_and_k(args: argparse.Namespace):
    """--routing and --k as (Routing, k): topN (the names dfm eval uses) is topk with k = N; an
    oracle without --cluster is refused before anything loads."""
    from dfm.routing import parse_mode

    routing, top = parse_mode(args.routing)
    if top is not None and args.k is not None and args.k != top:
        raise DfmError(f"--routing {args.routing} already says k = {top}: drop --k {args.k}")
    if routing.value == "oracle" and args.cluster is None:
        raise DfmError("oracle routing needs the true cluster: pass --cluster K")
    return routing, top if top is not None else args.k


def cmd_convergence(args: argparse.Namespace) -> dict:
    from dfm.atomic import check_writable
    from eval.convergence import DEFAULT_EPS, DEFAULT_STEPS, convergence_study, plot_convergence, write_study

    for out in (args.out, args.plot):
        if out is not None:
            check_writable(Path(out).parent)  # before the study, not after
    study = convergence_study(
        args.sampler_steps or DEFAULT_STEPS, args.eps or DEFAULT_EPS, scheduler_name=args.scheduler
    )
    write_study(study, args.out)
    if args.plot:
        plot_convergence(study, args.plot)
    for mode, result in study["modes"].items():
        exact = result["tv"]["eps"].index(0.0)
        tv = dict(zip(result["tv"]["steps"], (row[exact] for row in result["tv"]["values"])))
        shown = ", ".join(f"N={n}: {tv[n]:.4f}" for n in (1, 8, 64) if n in tv)
        print(
            f"{mode}: TV at eps=0 {shown}; TV ~ N^-{result['rate_in_steps']:.3f}, "
            f"excess TV ~ eps^{result['rate_in_eps']:.3f}"
        )
    _say(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return study


def cmd_bench(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from dfm.atomic import check_writable

    check_writable(Path(args.out).parent)  # before minutes of measuring, not after
    if sum(bool(x) for x in (args.prepare, args.run, args.serve)) > 1:
        raise DfmError("--prepare, --run and --serve are different benchmarks: pass one of them")
    if args.clients and args.serve is None:
        raise DfmError("--clients is for --serve RUN: the numbers of concurrent clients of the serving benchmark")
    if not args.prepare and (args.prepare_vocab is not None or args.prepare_source is not None):
        raise DfmError("--prepare-vocab and --prepare-source modify --prepare N [N ...]: give the corpus sizes too")
    if args.prepare:
        from eval.prepare_bench import bench_prepare, format_prepare_table

        results = bench_prepare(
            args.prepare, Path(args.out), say=_say, vocab=args.prepare_vocab, source=args.prepare_source
        )
        print(format_prepare_table(results))
        _say(f"wrote {args.out} in {results['seconds']:.0f}s")
        return results
    if args.serve is not None:
        from eval.serve_bench import bench_serve, format_serve_table

        quick = (
            dict(concurrency=(1, 4), prompts_per_round=8, prompt_tokens=8, new_tokens=8, repeats=2)
            if args.quick
            else {}
        )
        if args.clients:
            quick["concurrency"] = tuple(args.clients)
        results = bench_serve(args.serve, device=_device(args), out=Path(args.out), say=_say, **quick)
        print(format_serve_table(results))
        _say(f"wrote {args.out} in {results['seconds']:.0f}s")
        return results
    if args.run is not None:
        from eval.run_bench import bench_run, format_run_table

        quick = dict(batches=(1, 2), prompt_tokens=16, new_tokens=32, repeats=1) if args.quick else {}
        results = bench_run(
            args.run, device=_device(args), compiled=args.compile, out=Path(args.out), say=_say, **quick
        )
        print(format_run_table(results))
        _say(f"wrote {args.out} in {results['seconds']:.0f}s")
        return results
    from eval.bench import format_table, run_bench

    results = run_bench(quick=args.quick, out=Path(args.out), device=_device(args), compiled=args.compile)
    print(format_table(results))
    _say(f"wrote {args.out} in {results['seconds']:.0f}s")
    return results


# --- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfm",
        description="Decentralized autoregressive generation: train one expert per data cluster in isolation, "
        "combine them token by token with a router (discrete flow matching).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (they appear only when stderr is a terminal anyway)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the cores this process "
        "may use); give each of "
        "several dfm processes on one machine its share, e.g. --threads 1 twice on 2 cores",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str, handler: Callable, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=list(aliases))
        p.set_defaults(handler=handler)
        # --debug and --quiet after the command too; SUPPRESS leaves the value before it alone when absent here
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        return p

    p = add("run", "the whole pipeline: prepare, seed model, every expert, router, baseline, assemble, eval", cmd_run)
    p.add_argument("--out", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: keep its prepared data, resume training stages from checkpoints",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run directory that already holds trained models")
    _add_pipeline_flags(
        p,
        "ensemble modes the final evaluation scores: mixture top1 top2 bayes centroid oracle (default: all); "
        "masked runs: mixture top1 top2 switch oracle",
    )
    p = add(
        "scaling",
        "the pipeline over a ladder of budgets and numbers of experts on one corpus: the ensemble's ratio "
        "to the compute-matched baseline as compute grows (OUT/scaling.json, scaling.md, scaling.png)",
        cmd_scaling,
    )
    p.add_argument("--out", default="runs/scaling", help="study directory (default: runs/scaling)")
    p.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=[1.0, 2.0, 4.0, 8.0],
        metavar="B",
        help="training budgets as multiples of the branch phase (expert.train.steps x num_clusters expert "
        "steps, split over each rung's K experts; with expert.epochs, B x E passes over each expert's shard), "
        "increasing (default: 1 2 4 8)",
    )
    p.add_argument(
        "--experts",
        nargs="+",
        type=int,
        default=[4],
        metavar="K",
        help="numbers of experts, increasing; K = 1 is the control, the baseline's twin (default: 4)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S", help="random seeds repeating every rung")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed study, or add rungs to a finished one: finished rungs are kept, never retrained",
    )
    p.add_argument("--overwrite", action="store_true", help="delete the study directory and start again")
    _add_pipeline_flags(p, "modes every rung scores (default: mixture top1 bayes oracle; masked runs: all of theirs)")
    p = add(
        "serve",
        "serve a run behind the OpenAI completions API (POST /v1/completions, GET /v1/models, /health, /metrics) "
        "with continuous batching across requests; needs the serve extra",
        cmd_serve,
    )
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together at most (default: 16)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but /health")
    _add_device_flag(p)
    p = add("prepare", "load the corpus, train the tokenizer, partition into clusters, write data shards", cmd_prepare)
    p.add_argument("--out", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--overwrite", action="store_true", help="replace a run that already holds trained models")
    _add_config_flags(p)
    p = add(
        "train-seed-model",
        "train the seed model on the shared documents; every expert and the baseline branch from it",
        cmd_train_seed_model,
        aliases=["train-seed"],
    )
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    _add_device_flag(p)
    p = add("train-expert", "train expert K on its own shard only (runs under torchrun too)", cmd_train_expert)
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--expert", type=int, required=True, help="cluster / expert index K")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    _add_device_flag(p)
    p = add(
        "add-expert", "add a new cluster of documents to a prepared run as expert K (others untouched)", cmd_add_expert
    )
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument(
        "--dataset", required=True, help="hub name, json|csv|parquet|text (with --data-files), or a save_to_disk dir"
    )
    p.add_argument("--dataset-config", help="hub dataset configuration name")
    p.add_argument("--split", help="split to read (default: every split)")
    p.add_argument("--data-files", nargs="+", help="local files for --dataset json|csv|parquet|text")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument(
        "--streaming",
        action="store_true",
        help="stream the dataset from the hub or files, writing it to disk as it is read (no --max-documents needed)",
    )
    p.add_argument("--max-documents", type=int, help="read at most this many documents")
    p = add(
        "train-router", "train the router on prefixes of every cluster (masked runs: on noisy states)", cmd_train_router
    )
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    _add_device_flag(p)
    p = add(
        "train-baseline", "train the compute-matched central baseline on the union of all shards", cmd_train_baseline
    )
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    _add_device_flag(p)
    p = add("assemble", "write ensemble.json (experts, priors, router, tokenizer fingerprint)", cmd_assemble)
    p.add_argument("--run", required=True, help="run directory")
    p = add("eval", "perplexity-equivalence report: baseline vs experts vs every routing mode", cmd_eval)
    _add_eval_flags(p)
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="accept a run without a baseline: report the scores with no equivalence verdict and exit 0 "
        "(without it, a missing baseline exits non-zero after writing the report)",
    )
    p = add("generate", "generate text with the routed ensemble, streaming tokens to stdout", cmd_generate)
    p.add_argument("--run", required=True, help="run directory")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="prompt text (default: read stdin if piped, else start from BOS)")
    source.add_argument(
        "--prompt-file",
        help="UTF-8 file of prompts, one a line (blank lines skipped); several "
        "prompts are decoded in batches and printed one block (or, with "
        "--json, one JSON line) each, in file order",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="prompts decoded together (default 8); the same seed and batch size give the same texts",
    )
    p.add_argument(
        "--routing",
        default="mixture",
        help="mixture | topk | top1 | top2 | switch | bayes | centroid | oracle (default: mixture); "
        "masked runs: mixture, topk/topN, switch, oracle",
    )
    p.add_argument("--k", type=int, help="experts kept per token for topk (default 1) and centroid")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=100,
        help="tokens to generate (default 100); on a masked run, the masked positions to fill",
    )
    _add_renamed(p, "--steps", "sampler_steps", type=int)
    p.add_argument(
        "--sampler-steps",
        type=int,
        help="masked runs: Euler steps of the sampler (default 64); more steps, "
        "fewer tokens revealed at once, closer to the model's distribution",
    )
    p.add_argument(
        "--show-steps",
        action="store_true",
        help="masked runs: print every step's partly revealed text to stderr (masks as _)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--exclude-expert",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help="opt these experts out; the remaining weights are renormalised",
    )
    p.add_argument(
        "--route-on",
        choices=["token", "prompt"],
        default="token",
        help="re-route every token (default) or route once after the prompt",
    )
    p.add_argument("--cluster", type=int, help="true cluster for --routing oracle")
    p.add_argument("--centroid-temperature", type=float, default=0.1, help="temperature of centroid routing")
    p.add_argument(
        "--model",
        default="ensemble",
        help="ensemble (default), baseline, or expert-K: generate with one model through the same path",
    )
    p.add_argument("--allow-missing", action="store_true", help="leave out missing or corrupt experts with a warning")
    p.add_argument("--show-routing", action="store_true", help="after the text, show which expert carried each token")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_compile_flag(p)
    _add_device_flag(p)
    _add_dtype_flag(p)
    p = add(
        "convergence",
        "exact convergence of the masked-path sampler on an enumerable toy: total variation to "
        "the source vs the number of steps N and the router's error eps",
        cmd_convergence,
    )
    p.add_argument("--out", default="convergence.json", help="write the study as JSON here (default: convergence.json)")
    p.add_argument("--plot", help="also draw TV vs N (log-log) into this PNG")
    _add_renamed(p, "--steps", "sampler_steps", type=int, nargs="+")
    p.add_argument(
        "--sampler-steps", type=int, nargs="+", metavar="N", help="sampler step counts N (default: every N in 1..64)"
    )
    p.add_argument(
        "--eps",
        type=float,
        nargs="+",
        metavar="EPS",
        help="router errors: the exact posterior blended with uniform at eps (default 0 0.01 0.03 0.1 0.3)",
    )
    p.add_argument("--scheduler", default="linear", help="kappa(t) of the path: linear or cosine (default linear)")
    p = add("bench", "speed and memory of training, decoding and scoring, side by side with transformers", cmd_bench)
    p.add_argument("--quick", action="store_true", help="less work per figure: under two minutes, for a smoke test")
    p.add_argument("--out", default="bench.json", help="write every figure as JSON here (default: bench.json)")
    p.add_argument(
        "--prepare",
        type=int,
        nargs="+",
        metavar="N",
        help="instead: documents/s and peak RSS of `dfm prepare` on synthetic corpora of N documents "
        "each (e.g. 10000 100000 1000000), every run in a fresh process",
    )
    p.add_argument(
        "--prepare-vocab",
        type=int,
        metavar="V",
        help="with --prepare: the partition alone (fit on N synthetic token-id documents, then assign and "
        "centroid-weigh 1000) at a V-token vocabulary, e.g. 150000, in fresh processes",
    )
    p.add_argument(
        "--prepare-source",
        metavar="DIR",
        help="with --prepare: import dfm from the checkout at DIR in the measured processes (e.g. "
        "`git worktree add DIR COMMIT` for figures before a change; default: this one)",
    )
    p.add_argument(
        "--run",
        help="instead: decoding speed of this trained run on prompts from its test split, every "
        "routing mode against its baseline's transformers generate (batch 1 and 8)",
    )
    p.add_argument(
        "--serve",
        metavar="RUN",
        help="instead: `dfm serve` of this trained run under C concurrent streaming clients (prompts from its "
        "test split): tokens/s, time to first token and per-token latency of top1 and mixture, each against "
        "the baseline on the same server, and the C = 1 overhead against generate",
    )
    p.add_argument(
        "--clients", type=int, nargs="+", metavar="C", help="with --serve: concurrent clients (default 1 4 16 64)"
    )
    _add_compile_flag(p)
    _add_device_flag(p)
    return parser


def _set_threads(threads: int | None) -> None:
    """torch's intra-op threads: ``threads``, else OMP_NUM_THREADS when set, else every core this
    process may run on (its affinity)."""
    if threads is not None and threads < 1:
        raise DfmError(f"--threads must be a positive number of threads, got {threads}")
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def _check_args(args: argparse.Namespace) -> None:
    """Options of `dfm generate` checked before anything loads: the sampling seed and settings in
    range (NaN and inf refused), and no expert excluded twice."""
    from dfm.sampling import check_sampling, check_seed

    if hasattr(args, "temperature"):
        check_seed(args.seed, "--seed")
        check_sampling(args.temperature, args.top_k, args.top_p)
    excluded = getattr(args, "exclude_expert", None) or []
    twice = sorted({k for k in excluded if excluded.count(k) > 1})
    if twice:
        raise DfmError(f"--exclude-expert names expert {twice[0]} more than once: list each expert once")


def _unwritable(err: Exception) -> str | None:
    """What to do when dfm may not write a file (a read-only run directory, its permissions), or None
    for any other failure."""
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and err.filename:
        return (
            f"cannot write {err.filename} ({err.strerror}): make the run directory writable, or copy the run "
            f"to a writable place and use the copy"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _one_line_warning  # parsing warns about renamed options already
    args = build_parser().parse_args(argv)
    if args.command in RENAMED:
        _renamed(args.command)
    try:
        with warnings.catch_warnings():  # warning filters a command sets end with it
            _quiet_libraries(args.quiet)
            _set_threads(args.threads)
            _check_args(args)
            args.handler(args)
    except DfmError as err:
        if args.debug:
            traceback.print_exc()
        print(f"dfm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        unwritable = _unwritable(err)
        if unwritable is not None:
            print(f"dfm: error: {unwritable}", file=sys.stderr)
            return 2
        first = str(err).splitlines()[0] if str(err) else ""
        print(
            f"dfm: error: unexpected {type(err).__name__}: {first} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
