"""The `dfm` command line: the one composition root. Subcommands import what they need lazily."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

from dfm.errors import DfmError

#: Shortcut flags of the pipeline commands and the config key each one sets.
CONFIG_FLAGS: dict[str, tuple[str, dict]] = {
    "--dataset": ("data.dataset", {"help": "hub name, json|csv|parquet|text (with --data-files), or a save_to_disk dir; "
                                           "default: the embedded synthetic corpus"}),
    "--dataset-config": ("data.config_name", {"help": "hub dataset configuration name"}),
    "--split": ("data.split", {"help": "split to train on (validation/test are carved from it if absent)"}),
    "--data-files": ("data.data_files", {"nargs": "+", "help": "local files for --dataset json|csv|parquet|text"}),
    "--text-column": ("data.text_column", {"help": "column holding the text (default: text)"}),
    "--cluster-column": ("data.cluster_column", {"help": "use this label column as the partition instead of k-means"}),
    "--label-column": ("data.label_column", {"help": "reference label for purity/NMI of the partition"}),
    "--streaming": ("data.streaming", {"action": "store_const", "const": True, "help": "stream the dataset (needs --max-documents)"}),
    "--max-documents": ("data.max_documents", {"type": int, "help": "read at most this many documents"}),
    "--tokenizer": ("tokenizer.path", {"help": "use this saved tokenizer instead of training a BPE one"}),
    "--vocab-size": ("tokenizer.vocab_size", {"type": int, "help": "BPE vocabulary size (default 2048)"}),
    "--num-clusters": ("partition.num_clusters", {"type": int, "help": "number of clusters = experts (default 4)"}),
    "--steps": ("expert.train.steps", {"type": int, "help": "optimizer steps per expert (baseline: K times this)"}),
    "--router-steps": ("router.train.steps", {"type": int, "help": "optimizer steps of the router"}),
    "--seed": ("seed", {"type": int, "help": "seed of everything (default 0)"}),
    "--num-proc": ("num_proc", {"type": int, "help": "processes for tokenization (Dataset.map)"}),
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (every key of the config can also be set with --set)")
    group.add_argument("--config", help="YAML or JSON config file")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, e.g. --set expert.train.lr=1e-3 (repeatable)")
    for flag, (key, options) in CONFIG_FLAGS.items():
        group.add_argument(flag, dest="cfg:" + key, default=None, **options)


def _resolved_config(args: argparse.Namespace) -> dict:
    from training.config import parse_override, resolve_config

    overrides = [parse_override(text) for text in args.set]
    for name, value in vars(args).items():
        if name.startswith("cfg:") and value is not None:
            override: object = value
            for part in reversed(name[4:].split(".")):
                override = {part: override}
            overrides.append(override)
    return resolve_config(args.config, overrides)


def _say(message: str) -> None:
    print(f"[dfm] {message}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


# --- subcommands ------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> dict:
    from training.prepare import prepare

    summary = prepare(_resolved_config(args), args.out)
    _say(f"prepared {args.out}: {json.dumps(summary)}")
    return summary


def cmd_train_expert(args: argparse.Namespace) -> dict:
    from training.experts import train_expert

    summary = train_expert(args.run, args.expert, resume=args.resume)
    _say(f"expert-{args.expert}: val loss {summary['val_loss']} nats/token "
         f"(unigram entropy {summary['unigram_entropy']:.3f}) in {summary['seconds']:.1f}s")
    return summary


def cmd_train_router(args: argparse.Namespace) -> dict:
    from training.router_training import train_router

    summary = train_router(args.run, resume=args.resume)
    _say(f"router: val loss {summary['val_loss']} in {summary['seconds']:.1f}s")
    return summary


def cmd_train_baseline(args: argparse.Namespace) -> dict:
    from training.experts import train_baseline

    summary = train_baseline(args.run, resume=args.resume)
    _say(f"baseline: val loss {summary['val_loss']} nats/token in {summary['seconds']:.1f}s")
    return summary


def cmd_assemble(args: argparse.Namespace) -> None:
    from training.assemble import assemble

    manifest = assemble(args.run)
    _say(f"wrote {args.run}/ensemble.json: {len(manifest.experts)} experts, router: {manifest.router}, "
         f"baseline: {manifest.baseline}")


def cmd_run(args: argparse.Namespace) -> None:
    from training.assemble import assemble
    from training.config import read_run_config
    from training.experts import train_baseline, train_expert
    from training.prepare import prepare

    timings: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], object]) -> object:
        _say(f"{name} ...")
        start = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - start, 2)
        return result

    run_dir = args.out
    stage("prepare", lambda: _say(f"data: {json.dumps(prepare(_resolved_config(args), run_dir))}"))
    config = read_run_config(run_dir)
    for k in range(config["partition"]["num_clusters"]):
        summary = stage(f"expert-{k}", lambda k=k: train_expert(run_dir, k, resume=args.resume))
        _say(f"expert-{k}: val loss {summary['val_loss']:.4f} nats/token, unigram entropy "
             f"{summary['unigram_entropy']:.4f}")
    if config["partition"]["num_clusters"] > 1:
        from training.router_training import train_router

        summary = stage("router", lambda: train_router(run_dir, resume=args.resume))
        _say(f"router: val loss {summary['val_loss']:.4f}")
    summary = stage("baseline", lambda: train_baseline(run_dir, resume=args.resume))
    _say(f"baseline: val loss {summary['val_loss']:.4f} nats/token")
    stage("assemble", lambda: assemble(run_dir))
    from dfm.atomic import write_json

    write_json(os.path.join(run_dir, "logs", "timings.json"), timings)
    _say(f"done in {sum(timings.values()):.0f}s: {json.dumps(timings)}")
    _say("evaluation and sample generation are not implemented yet; the run ends after assemble")


def cmd_not_implemented(args: argparse.Namespace) -> None:
    raise DfmError(f"`dfm {args.command}` is not implemented yet")


# --- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfm",
        description="Decentralized autoregressive generation: train one expert per data cluster in isolation, "
                    "combine them token by token with a router (discrete flow matching).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str, handler: Callable) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("run", "the whole pipeline: prepare, train every expert, router, baseline, assemble", cmd_run)
    p.add_argument("--out", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--resume", action="store_true", help="continue interrupted training stages from checkpoints")
    _add_config_flags(p)
    p = add("prepare", "load the corpus, train the tokenizer, partition into clusters, write data shards", cmd_prepare)
    p.add_argument("--out", default="runs/default", help="run directory (default: runs/default)")
    _add_config_flags(p)
    p = add("train-expert", "train expert K on its own shard only (runs under torchrun too)", cmd_train_expert)
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--expert", type=int, required=True, help="cluster / expert index K")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    p = add("train-router", "train the router on prefixes of every cluster", cmd_train_router)
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    p = add("train-baseline", "train the compute-matched central baseline on the union of all shards", cmd_train_baseline)
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    p = add("assemble", "write ensemble.json (experts, priors, router, tokenizer fingerprint)", cmd_assemble)
    p.add_argument("--run", required=True, help="run directory")
    for name, text in [("generate", "generate text with the routed ensemble (not implemented yet)"),
                       ("eval", "perplexity-equivalence report against the baseline (not implemented yet)"),
                       ("bench", "speed and memory benchmarks (not implemented yet)")]:
        add(name, text, cmd_not_implemented)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command not in ("bench",):
            _quiet_libraries()
        args.handler(args)
    except DfmError as err:
        if args.debug:
            traceback.print_exc()
        print(f"dfm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
