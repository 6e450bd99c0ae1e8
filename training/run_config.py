"""The run configuration as typed sections (dataclasses), each validating its own keys with one
error naming the key to fix; ``RunConfig.validate`` adds the rules that join sections.

``RunConfig.to_dict()`` is what RUN/config.json holds, key for key; the open mappings (``arch``,
``lora``, every ``train`` and ``synthetic``) are validated by their owners (the model config,
peft's settings, ``TrainConfig``, ``SyntheticSpec``) and saved as given. training/config.py turns
defaults, a config file and ``--set`` overrides into one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dfm.errors import DfmError
from dfm.sampling import check_seed
from dfm.schedulers import scheduler
from models.adapters import DEFAULT_LORA, check_lora
from models.expert import DEFAULT_ARCH, arch_config, seed_context
from models.path_kinds import PathKind, path_kind
from models.router import RouterConfig
from training.synthetic import SyntheticSpec
from training.trainer import TrainConfig


def _positive_int(value: object, key: str, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DfmError(f"config {key} must be an integer >= {minimum}, got {value!r}")


def _fraction(value: object, key: str, low: float, high: float, closed_high: bool) -> None:
    inside = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = inside and low < value and (value <= high if closed_high else value < high)
    if not inside:
        raise DfmError(f"config {key} must lie in ({low}, {high}{']' if closed_high else ')'}, got {value!r}")


def _epochs(value: object, key: str) -> None:
    """null, or a positive finite number of passes over the training blocks."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise DfmError(f"config {key} must be a positive number of passes over the data or null, got {value!r}")


@dataclass
class PathOptions:
    # the probability path of every model in the run (README, "How it works"): "ar" (next token, causal
    # experts) or "masked" (any-order absorbing path, bidirectional experts, an N-step sampler)
    kind: str = "ar"
    scheduler: str = "linear"

    def validate(self) -> None:
        path_kind(self.kind)
        scheduler(self.scheduler)


@dataclass
class DataOptions:
    dataset: str | None = None  # None: the embedded synthetic corpus; else hub name, json|csv|parquet|text, or a dir
    config_name: str | None = None
    split: str | None = None
    data_files: Any = None
    text_column: str = "text"
    cluster_column: str | None = None  # use this label as the partition instead of k-means
    label_column: str | None = None  # reference label for purity/NMI (synthetic: "domain")
    streaming: bool = False
    max_documents: int | None = None
    validation_fraction: float = 0.05
    test_fraction: float = 0.05

    def validate(self) -> None:
        _positive_int(self.max_documents, "data.max_documents", optional=True)
        for name in ("validation_fraction", "test_fraction"):
            _fraction(getattr(self, name), f"data.{name}", 0, 0.5, closed_high=False)


@dataclass
class TokenizerOptions:
    # the BPE tokenizer and the partition are fitted on seeded samples of the training documents
    # (null: all of them); every document is then tokenized and assigned in one streaming pass
    path: str | None = None
    vocab_size: int = 2048
    sample_documents: int | None = 100_000

    def validate(self) -> None:
        _positive_int(self.vocab_size, "tokenizer.vocab_size", minimum=257)
        _positive_int(self.sample_documents, "tokenizer.sample_documents", optional=True)


@dataclass
class PartitionOptions:
    num_clusters: int = 4
    balance: float = 2.0
    svd_dim: int | None = None
    iterations: int = 30
    sample_documents: int | None = 50_000

    def validate(self) -> None:
        _positive_int(self.num_clusters, "partition.num_clusters")
        _positive_int(self.sample_documents, "partition.sample_documents", optional=True)
        if not isinstance(self.balance, (int, float)) or self.balance < 1:
            raise DfmError(f"config partition.balance must be >= 1, got {self.balance!r}")


@dataclass
class SeedModelOptions:
    # every expert and the baseline branch from one seed model (README, "Seeds"): a public
    # pretrained causal LM (init_from), and/or one trained centrally on the shareable documents
    init_from: str | None = None  # hub name or local directory of a Hugging Face causal LM (its tokenizer is used)
    phase: bool | None = None  # train a seed model on the shared documents: None = yes unless init_from is given
    shared_column: str | None = None  # boolean column marking the documents every owner may share
    shared_fraction: float = 0.25  # without shared_column: this fraction of every cluster's documents
    train: dict = field(
        default_factory=lambda: {
            "steps": 1200,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup_steps": 30,
            "checkpoint_every": 200,
        }
    )
    # null: train.steps; a number: that many passes over the shared documents' training blocks
    # (training/allocation.py, epoch_steps), so the seed phase is sized to the data
    epochs: float | None = None

    def validate(self) -> None:
        _epochs(self.epochs, "seed_model.epochs")
        if self.phase not in (None, True, False):
            raise DfmError(f"config seed_model.phase must be true, false or null (auto), got {self.phase!r}")
        _fraction(self.shared_fraction, "seed_model.shared_fraction", 0, 1, closed_high=True)
        TrainConfig.from_dict(self.train)

    @property
    def trained(self) -> bool:
        """Whether a seed model is trained centrally on the shared documents before the experts branch."""
        return self.init_from is None if self.phase is None else bool(self.phase)


@dataclass
class ExpertOptions:
    arch: dict = field(default_factory=lambda: dict(DEFAULT_ARCH))
    # training blocks as long as the context that evaluation and generation use
    block_size: int = 256
    # null: every expert (and the baseline) fine-tunes all of the seed's weights; "lora": each
    # trains a low-rank adapter on the frozen seed (peft), saved as megabytes, for big seeds
    adapter: str | None = None
    lora: dict = field(default_factory=lambda: dict(DEFAULT_LORA))
    train: dict = field(
        default_factory=lambda: {"steps": 150, "batch_size": 8, "lr": 3e-3, "warmup_steps": 15, "checkpoint_every": 50}
    )
    # "equal": every expert trains train.steps; "tokens": K x train.steps split in proportion to the
    # shards' training tokens (training/allocation.py), for clusters of unequal size
    allocation: str = "equal"
    # null: steps as allocation says; a number: every expert makes that many passes over its own
    # shard's training blocks, which sizes the branch phase to the data (and in proportion to it)
    epochs: float | None = None

    def validate(self) -> None:
        _positive_int(self.block_size, "expert.block_size", minimum=2)
        if self.allocation not in ("equal", "tokens"):
            raise DfmError(f"config expert.allocation must be equal or tokens, got {self.allocation!r}")
        _epochs(self.epochs, "expert.epochs")
        if self.epochs is not None and self.allocation != "equal":
            raise DfmError(
                "config expert.epochs already sizes every expert by its own shard: leave expert.allocation "
                "at equal, or set expert.epochs to null to split train.steps by tokens"
            )


@dataclass
class RouterOptions:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 256  # tokens per training sequence (one document from BOS)
    # what the router learns at every prefix (README, "The router"): cluster, the document's
    # cluster, which every expert's owner has for free; bayes, the experts' posterior, which
    # they must score the documents for (2 x their parameters per token, charged to the ensemble)
    targets: str = "cluster"
    documents: int | None = None  # training documents (bayes: the ones the experts score; null: all)
    scored_length: int | None = None  # tokens of each such document the experts score (null: max_length)
    label_documents: int | None = 0  # with bayes: more training documents with their cluster as target (null: all)
    validation_documents: int | None = None  # validation documents (bayes: scored alike; null: all)
    windows: bool = True  # also train on one window from inside every long training document (its cluster)
    # "seed": start the token embedding from the seed model's (its top principal directions) when
    # the run has one (a seed phase or --init-from); null: from scratch
    init: str | None = "seed"
    dropout: float = 0.0
    temperature: str | None = "fit"  # divide the logits by the T that fits the validation documents best; null: 1
    train: dict = field(
        default_factory=lambda: {"steps": 140, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "checkpoint_every": 50}
    )

    def validate(self) -> None:
        _positive_int(self.max_length, "router.max_length", minimum=2)
        _positive_int(self.documents, "router.documents", optional=True)
        if self.targets not in ("bayes", "cluster"):
            raise DfmError(f"config router.targets must be bayes or cluster, got {self.targets!r}")
        for name in ("scored_length", "validation_documents"):
            _positive_int(getattr(self, name), f"router.{name}", optional=True)
        _positive_int(self.label_documents, "router.label_documents", minimum=0, optional=True)
        if not isinstance(self.windows, bool):
            raise DfmError(f"config router.windows must be true or false, got {self.windows!r}")
        if self.init not in (None, "seed"):
            raise DfmError(f'config router.init must be null (from scratch) or "seed", got {self.init!r}')
        if self.temperature not in (None, "fit"):
            raise DfmError(f'config router.temperature must be null (1) or "fit", got {self.temperature!r}')
        TrainConfig.from_dict(self.train)
        if self.train.get("fsdp"):
            raise DfmError(
                "config router.train.fsdp: the router is small and trains replicated; drop fsdp "
                "(expert.train.fsdp and seed_model.train.fsdp shard the big models)"
            )
        RouterConfig(
            vocab_size=1,
            num_experts=1,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            dropout=self.dropout,
        )


#: The sections of a run's configuration, by key.
SECTIONS = {
    "path": PathOptions,
    "data": DataOptions,
    "tokenizer": TokenizerOptions,
    "partition": PartitionOptions,
    "seed_model": SeedModelOptions,
    "expert": ExpertOptions,
    "router": RouterOptions,
}


@dataclass
class RunConfig:
    """Every setting of a run; the field order is the key order of RUN/config.json."""

    seed: int = 0
    path: PathOptions = field(default_factory=PathOptions)
    num_proc: int | None = None  # worker processes for Dataset.map (None = in process)
    data: DataOptions = field(default_factory=DataOptions)
    # longer documents and more of them than SyntheticSpec's defaults: the start of a document is
    # ambiguous between clusters, and top-1 routing pays for it once per document (see README)
    synthetic: dict = field(
        default_factory=lambda: {"num_domains": 4, "num_documents": 6000, "seed": 0, "mean_length": 100}
    )
    tokenizer: TokenizerOptions = field(default_factory=TokenizerOptions)
    partition: PartitionOptions = field(default_factory=PartitionOptions)
    seed_model: SeedModelOptions = field(default_factory=SeedModelOptions)
    expert: ExpertOptions = field(default_factory=ExpertOptions)
    router: RouterOptions = field(default_factory=RouterOptions)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """The typed configuration of a mapping with every key (training/config.py resolves one)."""
        values = dict(data)
        for key, section in SECTIONS.items():
            values[key] = section(**values[key])
        return cls(**values)

    def to_dict(self) -> dict:
        """The plain mapping, key for key as RUN/config.json holds it."""
        return asdict(self)

    @property
    def kind(self) -> PathKind:
        """The probability path the run trains and samples on (``path.kind``)."""
        return path_kind(self.path.kind)

    @property
    def is_masked(self) -> bool:
        """Whether the run trains on the masked (any-order) path rather than the autoregressive one."""
        return self.path.kind == "masked"

    def scoring_context(self, max_positions: int) -> int:
        """The context experts are scored at (evaluation, router targets): their own, never beyond the
        blocks they were trained on."""
        return min(max_positions, self.expert.block_size)

    def validate(self) -> None:
        """Refuse impossible settings before any work starts, naming the key to fix: every section's
        own keys, then the rules that join sections."""
        check_seed(self.seed, "config seed (--seed)")
        self.path.validate()
        if self.is_masked and self.seed_model.init_from is not None:
            raise DfmError(
                "--init-from branches from a pretrained causal LM, which the masked path cannot use: drop it "
                "(the masked run trains its own seed) or use path.kind=ar"
            )
        _positive_int(self.num_proc, "num_proc", optional=True)
        self.partition.validate()
        self.tokenizer.validate()
        self.expert.validate()
        self._check_model_type()
        self._check_adapter()
        self.router.validate()
        self._check_context()
        self.seed_model.validate()
        if self.is_masked and (self.router.temperature == "fit" or self.router.targets == "bayes"):
            raise DfmError(
                "config router.temperature=fit and router.targets=bayes are for the prefix router of the ar path; "
                "the masked path's router learns the cluster from noisy states: set router.temperature=null "
                "and router.targets=cluster"
            )
        self.data.validate()
        TrainConfig.from_dict(self.expert.train)
        spec = SyntheticSpec.from_dict(self.synthetic)
        clusters = self.partition.num_clusters
        if self.data.dataset is None and self.data.cluster_column is None and clusters > spec.num_domains:
            raise DfmError(
                f"config partition.num_clusters ({clusters}) exceeds synthetic.num_domains ({spec.num_domains}): "
                f"the embedded corpus has no more domains to separate, so extra clusters split one at random; "
                f"lower --num-clusters or raise synthetic.num_domains"
            )

    def _check_adapter(self) -> None:
        adapter = self.expert.adapter
        if adapter is None:
            return
        if adapter != "lora":
            raise DfmError(f'config expert.adapter must be null (full fine-tuning) or "lora", got {adapter!r}')
        if self.is_masked:
            raise DfmError("expert.adapter=lora is for causal experts: drop it or use path.kind=ar")
        if not self.seed_model.trained:
            raise DfmError(
                "expert.adapter=lora adapts the run's seed model RUN/seed: keep the seed phase on "
                "(with --init-from: --set seed_model.phase=true)"
            )
        check_lora(self.expert.lora)

    def _check_context(self) -> None:
        """The expert architecture must build (``models.expert.arch_config``), and training blocks and
        router sequences must fit in the experts' context: expert.arch's, or with --init-from the
        pretrained seed's (the router reads the prefixes the experts read, so its context is theirs)."""
        arch = arch_config(self.expert.arch, self.kind.default_arch["model_type"])
        init_from = self.seed_model.init_from
        if init_from is None:
            context, where = getattr(arch, "max_position_embeddings", None), "expert.arch.max_position_embeddings"
        else:
            context, where = seed_context(init_from), f"max_position_embeddings of --init-from {init_from}"
        if context is None:
            return
        block, length = self.expert.block_size, self.router.max_length
        if block > context:
            raise DfmError(
                f"config expert.block_size ({block}) exceeds the model context {where} ({context}): "
                f"lower one or raise the other"
            )
        if length > context:
            raise DfmError(
                f"config router.max_length ({length}) exceeds the experts' context {where} ({context}), "
                f"the longest prefix the router is ever asked about: lower router.max_length"
            )

    def _check_model_type(self) -> None:
        """The expert architecture must be a Hugging Face model of the path's kind (causal LM or masked LM)."""
        kind = self.kind
        default = kind.default_arch["model_type"]
        model_type = self.expert.arch.get("model_type", default)
        if model_type not in kind.model_types():
            raise DfmError(
                f"config expert.arch.model_type {model_type!r} is not a Hugging Face {kind.model_family} type, "
                f"which the {kind.name} path needs: use e.g. {default!r}"
            )
