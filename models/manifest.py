"""ensemble.json: which experts, priors, router, partition and tokenizer make up an ensemble, and the
sha256 of every file of those artifacts (format version 2; version 1 manifests, without them, still
load, with a warning that nothing is verified)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from dfm.atomic import write_json
from dfm.errors import DfmError
from models.adapters import base_directory, is_adapter
from models.partition import Partition

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

FORMAT_VERSION = 2
#: Versions this dfm reads: 1 has no sha256 of the artifacts (nothing is verified), 2 has them.
READABLE_VERSIONS = (1, 2)
MANIFEST = "ensemble.json"


def tokenizer_fingerprint(vocab: dict[str, int]) -> str:
    """sha256 of the token -> id table: two tokenizers with the same fingerprint encode alike."""
    canonical = json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass
class ExpertEntry:
    name: str
    path: str  # relative to the run directory
    prior: float  # cluster share pi_k


@dataclass
class Manifest:
    experts: list[ExpertEntry]
    tokenizer: str
    tokenizer_fingerprint: str
    vocab_size: int
    router: str | None = None
    partition: str | None = None
    baseline: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    #: run-relative file -> sha256 of its bytes, for every file of the listed artifacts (version 2)
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def path_kind(self) -> str:
        """The probability path the run's models were trained on: "ar" or "masked"."""
        return self.extra.get("path", {}).get("kind", "ar")

    def save(self, run_dir: str | os.PathLike) -> Path:
        path = Path(run_dir) / MANIFEST
        write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not Path(run_dir).is_dir():
            raise DfmError(f"run directory {run_dir} does not exist: run `dfm run --out {run_dir}` first")
        if not path.is_file():
            raise DfmError(f"{path} is missing: run `dfm assemble --run {run_dir}` after training the experts")
        try:
            raw = json.loads(path.read_text())
            version = raw.get("format_version")
            if version not in READABLE_VERSIONS:
                raise DfmError(
                    f"{path} has format version {version}, this dfm reads versions "
                    f"{', '.join(map(str, READABLE_VERSIONS))}: re-run `dfm assemble --run {run_dir}` "
                    f"with this version"
                )
            raw["experts"] = [ExpertEntry(**e) for e in raw["experts"]]
            manifest = cls(**raw)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:
            raise DfmError(f"{path} is corrupt ({err}); re-run `dfm assemble --run {run_dir}`") from err
        manifest._check(path, run_dir)
        if manifest.format_version < 2:  # stacklevel 1: one warning a run, however often a command loads it
            warnings.warn(
                f"{path} has format version 1, without the sha256 of its artifacts: nothing it names is "
                f"verified; run `dfm assemble --run {run_dir}` to record them",
                stacklevel=1,
            )
        return manifest

    def _check(self, path: Path, run_dir: str | os.PathLike) -> None:
        """Refuse priors that are not shares of the corpus, an expert listed twice and malformed hashes."""
        fix = f"re-run `dfm assemble --run {run_dir}`"
        if not isinstance(self.sha256, dict) or not all(isinstance(v, str) for v in self.sha256.values()):
            raise DfmError(f"{path}: sha256 must map file names to hex digests; {fix}")
        if self.format_version >= 2 and not self.sha256:
            raise DfmError(
                f"{path} has format version {self.format_version} but records no sha256 of its artifacts, "
                f"so nothing it names could be verified; {fix}"
            )
        for entry in self.experts:
            prior = entry.prior
            if (
                isinstance(prior, bool)
                or not isinstance(prior, (int, float))
                or not (math.isfinite(prior) and 0 < prior <= 1)
            ):
                raise DfmError(
                    f"{path}: the prior of {entry.name} must be a number in (0, 1] (a cluster share), "
                    f"got {prior!r}; {fix}"
                )
        for what, values in (
            ("name", [e.name for e in self.experts]),
            ("path", [os.path.normpath(e.path) for e in self.experts]),
        ):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise DfmError(f"{path} lists the expert {what} {twice[0]} more than once: {fix}")

    def verify(self, run_dir: str | os.PathLike, relative: str) -> None:
        """Refuse the artifact directory ``relative`` unless every file `dfm assemble` recorded of it is
        there with the bytes it had (not another expert's weights, say); a directory of which nothing
        is recorded is refused too. A version 1 manifest records nothing and verifies nothing."""
        if self.format_version < 2:
            return
        prefix = os.path.normpath(relative) + os.sep
        recorded = {name: expected for name, expected in self.sha256.items() if name.startswith(prefix)}
        if not recorded:
            raise DfmError(
                f"{MANIFEST} records no sha256 of {relative}, so it cannot be verified: "
                f"re-run `dfm assemble --run {run_dir}`"
            )
        for name, expected in recorded.items():
            path = resolve_inside(run_dir, name)
            if not path.is_file():
                raise DfmError(
                    f"{path} is listed in {MANIFEST} but missing: restore it, or re-run "
                    f"`dfm assemble --run {run_dir}` if it was removed on purpose"
                )
            if file_sha256(path) != expected:
                raise DfmError(
                    f"{path} differs from the file `dfm assemble` recorded in {MANIFEST} (sha256): "
                    f"restore it, or re-run `dfm assemble --run {run_dir}` if the change was intended"
                )

    def verify_model(self, run_dir: str | os.PathLike, relative: str) -> None:
        """``verify`` the model directory ``relative`` and, for a LoRA adapter, its base model in the run."""
        for directory in model_directories(run_dir, relative):
            self.verify(run_dir, directory)

    def load_model(
        self,
        run_dir: str | os.PathLike,
        relative: str,
        loader: Callable[..., PreTrainedModel],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> PreTrainedModel:
        """The model listed at ``relative``, loaded with ``loader(path, device, dtype=dtype)`` and then
        verified (``verify_model``): the loader's own error names a missing or unreadable model first."""
        model = loader(resolve_inside(run_dir, relative), device, dtype=dtype)
        self.verify_model(run_dir, relative)
        return model

    def load_partition(self, run_dir: str | os.PathLike) -> Partition:
        """The partition the manifest lists (centroid routing reads it), verified, then loaded."""
        if self.partition is None:
            raise DfmError(
                f"{Path(run_dir) / MANIFEST} lists no partition: run `dfm prepare` and "
                f"`dfm assemble --run {run_dir}` again"
            )
        self.verify(run_dir, self.partition)
        return Partition.load(resolve_inside(run_dir, self.partition))

    def directories(self, run_dir: str | os.PathLike) -> list[str]:
        """The run-relative directories of every artifact listed: tokenizer, experts (and a LoRA
        expert's base), router, baseline and partition."""
        models = [*(e.path for e in self.experts), *(p for p in (self.router, self.baseline) if p is not None)]
        listed = [self.tokenizer, *(d for m in models for d in model_directories(run_dir, m)), self.partition]
        return list(dict.fromkeys(d for d in listed if d is not None))

    def with_hashes(self, run_dir: str | os.PathLike) -> Manifest:
        """This manifest with the sha256 of every file of its artifacts as they are now in ``run_dir``."""
        return replace(self, sha256=artifact_hashes(run_dir, self.directories(run_dir)))


def model_directories(run_dir: str | os.PathLike, relative: str) -> list[str]:
    """The run-relative directories a saved model is read from: its own and, for a LoRA adapter, that
    of its base model (the run's seed) when the base lies inside the run."""
    path = resolve_inside(run_dir, relative)
    base = base_directory(path) if is_adapter(path) else None
    root = Path(run_dir).resolve()
    if base is None or not base.resolve().is_relative_to(root):
        return [relative]
    return [relative, os.path.relpath(base.resolve(), root)]


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_hashes(run_dir: str | os.PathLike, directories: list[str]) -> dict[str, str]:
    """{run-relative name: sha256} of the files directly in each of the run's ``directories``."""
    return {
        os.path.join(os.path.normpath(relative), p.name): file_sha256(p)
        for relative in directories
        for p in sorted(resolve_inside(run_dir, relative).iterdir())
        if p.is_file()
    }


def resolve_inside(run_dir: str | os.PathLike, relative: str) -> Path:
    """``run_dir / relative``, refusing paths that escape the run directory."""
    root = Path(run_dir).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise DfmError(f"path {relative!r} in {MANIFEST} points outside the run directory {root}; fix the manifest")
    return target
