"""`dfm assemble`: write RUN/ensemble.json from what the run directory holds."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError, safe_open

from dfm.errors import DfmError
from models.expert import saved_config
from models.manifest import ExpertEntry, Manifest, tokenizer_fingerprint
from models.tokenizer import load_tokenizer
from training.config import read_run_config
from training.layout import RunLayout


def assemble(run_dir: str | Path) -> Manifest:
    """Experts with their cluster shares as priors, router, baseline, partition, tokenizer fingerprint,
    and the sha256 of every file of those (loading verifies them: a swapped, edited or missing file is
    refused).

    Every expert of the partition must be trained; router and baseline are optional.
    """
    run_dir = Path(run_dir)
    layout = RunLayout.of(run_dir)
    config = read_run_config(run_dir)
    stats_path = layout.partition / "stats.json"
    if not stats_path.is_file():
        raise DfmError(f"{stats_path} is missing: run `dfm prepare --out {run_dir}` first")
    priors = json.loads(stats_path.read_text())["priors"]
    configs = [saved_config(layout.expert(k)) for k in range(len(priors))]
    missing = [k for k, found in enumerate(configs) if found is None]
    if missing:
        names = ", ".join(f"expert-{k}" for k in missing)
        raise DfmError(f"{names} not trained yet: run `dfm train-expert --run {run_dir} --expert K` for each")
    tokenizer = load_tokenizer(layout.tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer.get_vocab())
    foreign = [
        f"expert-{k}" for k, found in enumerate(configs) if found.get("dfm_tokenizer_fingerprint") != fingerprint
    ]
    if foreign:
        raise DfmError(
            f"{', '.join(foreign)} of {run_dir} were trained with another tokenizer (was the run prepared "
            f"again?): retrain them with `dfm train-expert --run {run_dir} --expert K`"
        )
    experts = [ExpertEntry(f"expert-{k}", str(layout.expert(k).relative_to(run_dir)), p) for k, p in enumerate(priors)]

    def optional(path: Path, marker: str) -> str | None:
        return str(path.relative_to(run_dir)) if (path / marker).is_file() else None

    def trained(path: Path) -> str | None:
        return str(path.relative_to(run_dir)) if saved_config(path) is not None else None

    router, baseline = optional(layout.router, "config.json"), trained(layout.baseline)
    tokenizer_dir = str(layout.tokenizer.relative_to(run_dir))
    models = [*(e.path for e in experts), *(p for p in (router, baseline) if p is not None)]
    _check_weights(run_dir, models)
    manifest = Manifest(
        experts=experts,
        tokenizer=tokenizer_dir,
        tokenizer_fingerprint=fingerprint,
        vocab_size=len(tokenizer),
        router=router,
        partition=optional(layout.partition, "partition.json"),
        baseline=baseline,
        extra={"block_size": config.expert.block_size, "path": asdict(config.path)},
    ).with_hashes(run_dir)  # a LoRA expert's base (the seed) too: a changed seed changes every such expert
    manifest.save(run_dir)
    return manifest


def _check_weights(run_dir: Path, directories: list[str]) -> None:
    """Refuse to record a model whose safetensors weights are unreadable (empty, or cut off): their
    headers are read, not the tensors."""
    for directory in directories:
        for weights in sorted((run_dir / directory).glob("*.safetensors")):
            try:
                with safe_open(weights, framework="pt"):
                    pass
            except (OSError, SafetensorError) as err:
                raise DfmError(
                    f"{weights} is unreadable ({str(err).splitlines()[0]}): retrain or re-copy "
                    f"{run_dir / directory}, then run `dfm assemble` again"
                ) from err
