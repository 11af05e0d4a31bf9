"""The experiment configuration: frozen, typed dataclasses; YAML is only their serialisation.

Sections whose class derives from :class:`RegistryConfig` are polymorphic: their ``name`` picks an entry of a
registry, and that entry's config class (a subclass) holds the entry's own fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal
from urllib.parse import urlparse

from puregen_dist.config.errors import check, check_at_least, check_name
from puregen_dist.config.identity import PipelineKind, execution_only, key_neutral_default, model_ref


@dataclass(frozen=True, kw_only=True)
class RegistryConfig:
    """Base for a config section selected by ``name`` from a registry (see :mod:`puregen_dist.registry`)."""

    registry: ClassVar[str] = ""
    name: str


@dataclass(frozen=True, kw_only=True)
class AttackConfig(RegistryConfig):
    """Base of every attack's config; ``name`` is the attack's registry name. Fields declared with
    :func:`~puregen_dist.config.identity.execution_only` stay out of the poison set's key; fields declared with
    :func:`~puregen_dist.config.identity.model_ref` reference trained models (e.g. a surrogate)."""

    registry: ClassVar[str] = "attack"


@dataclass(frozen=True, kw_only=True)
class DefenseConfig(RegistryConfig):
    """Base of every defense's config; ``name`` is the defense's registry name.

    ``pipeline`` says how the pipeline runs the defense (see :data:`~puregen_dist.config.identity.PipelineKind`);
    fields declared with :func:`~puregen_dist.config.identity.model_ref` reference trained models, fields
    declared with :func:`~puregen_dist.config.identity.execution_only` stay out of the purified set's key."""

    registry: ClassVar[str] = "defense"
    pipeline: ClassVar[PipelineKind] = "task_pool"
    rank_by_energy: ClassVar[bool] = False
    """True: the actor pool first ranks all images by EBM energy and purifies only the top fraction
    (PureGen-Filt's two passes)."""
    rowwise: ClassVar[bool] = False
    """True: each purified row is a function of (image, id, seed) alone (with ``rank_by_energy``: each row it
    selects), so a poisoned set's purified set is assembled from its clean rows purified once (shared by every
    poison set of the same data and seed) and its other rows purified on their own
    (:func:`~puregen_dist.pipeline.stages.purify_stage`). False (the safe default for plugins): the whole set is
    purified each time."""
    random_streams: ClassVar[bool] = False
    """True: the defense draws per-sample random streams (:mod:`puregen_dist.generative.noise`), so the version
    of that noise scheme is part of its purified sets' keys."""
    removes_rows: ClassVar[bool] = False
    """True: the defense removes training rows: ``apply`` may return a subset of the rows (in order, ids and
    labels kept: a filter such as Spectral Signatures), or training drops rows (EPIC); its runs log how well it
    removed the poisons, even when it removed none. False: every row is kept."""

    def check_epochs(self, epochs: int) -> None:
        """A training-time defense refuses a schedule that would never act within ``epochs`` classifier epochs
        (raises :class:`~puregen_dist.config.errors.FieldError`); others accept any."""


@dataclass(frozen=True, kw_only=True)
class NoAttackConfig(AttackConfig):
    """No poisoning (the default attack section)."""

    name: str = "none"


@dataclass(frozen=True, kw_only=True)
class NoDefenseConfig(DefenseConfig):
    """No defense (the default defense section): train on the (possibly poisoned) set as is."""

    pipeline: ClassVar[PipelineKind] = "none"
    name: str = "none"


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which dataset to load and how to subset it."""

    dataset: Literal["digits", "cifar10", "cifar100", "parquet", "image_folder"] = "digits"
    """Loader: embedded scikit-learn digits, torchvision CIFAR, Hugging Face style Parquet, or an image folder."""
    root: str | None = None
    """Directory of the dataset (required for every loader except digits)."""
    download: bool = False
    """CIFAR only: let torchvision download into ``root`` (off: nothing is downloaded implicitly)."""
    layout: Literal["cinic10", "tiny_imagenet"] = "cinic10"
    """image_folder only: CINIC-10 (``train|test/<class>/*.png``) or Tiny-ImageNet (``val/val_annotations.txt``)."""
    exclude: str | None = None
    """image_folder (cinic10) only: skip files whose name contains this text; ``cifar10`` keeps CINIC-10's
    ImageNet-derived images only (the paper's CINIC-10-ImageNet, 70,000 training images)."""
    image_column: str = "img"
    """parquet only: column holding the encoded image (a struct with ``bytes`` or raw binary)."""
    label_column: str = "label"
    """parquet only: column holding the integer label."""
    image_size: int | None = None
    """Resize every image to this square size (None: the loader's native size; digits default to 16)."""
    train_per_class: int | None = None
    """Seeded stratified subset of the training split: at most this many images per class (None: all)."""
    test_per_class: int | None = None
    """Same for the test split."""
    train_partitions: int = 1
    """Cut the training split into this many disjoint class-balanced parts (seeded) and keep one: lets a
    generative model train on data disjoint from the classifier's."""
    train_partition: int = 0
    """Which part to keep, in [0, train_partitions)."""
    test_fraction: float = 0.25
    """Datasets without a test split (digits): stratified fraction held out for testing."""
    subset_seed: int = 0
    """Seed of the subsets and splits (kept separate from the experiment seed, so seeds vary training only)."""

    def __post_init__(self) -> None:
        check(self.dataset == "digits" or self.root is not None, "root", f"required for dataset {self.dataset!r}")
        check(self.image_size is None or self.image_size >= 4, "image_size", "must be >= 4 pixels")
        for key in ("train_per_class", "test_per_class"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, "must be >= 1 (or null for all images)")
        check(0.0 < self.test_fraction < 1.0, "test_fraction", "must lie in (0, 1)")
        check(self.train_partitions >= 1, "train_partitions", "must be >= 1")
        check(0 <= self.train_partition < self.train_partitions, "train_partition",
              f"must lie in [0, {self.train_partitions})")


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Architecture and training recipe (defaults: the paper's from-scratch ResNet-18 recipe, §7.2)."""

    name: str = "resnet18"
    """Classifier registry name (resnet18, resnet34, mobilenet_v2, densenet121, hlb_*, small_cnn)."""
    epochs: int = 200
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (100, 150)
    """Epochs at which the learning rate is multiplied by ``gamma`` (MultiStepLR)."""
    gamma: float = 0.1
    schedule: Literal["multistep", "cosine"] = key_neutral_default("multistep")
    """Learning-rate schedule per epoch: ``multistep`` (``milestones``, ``gamma``) or ``cosine`` (cosine annealing
    from ``lr`` to 0 over ``epochs``, as the Narcissus surrogate is trained; ``milestones`` unused)."""
    label_smoothing: float = 0.0
    dropout: float = key_neutral_default(0.0)
    """Dropout rate on the penultimate features (the head's input) while training, as the Bullseye Polytope
    substitutes are trained (0.2, 0.25, 0.3); 0: none."""
    crop_padding: int = 4
    """RandomCrop padding in pixels (0 disables); images are cropped back to their size."""
    flip: bool = True
    """Random horizontal flips."""
    mean: tuple[float, ...] | None = None
    """Per-channel normalisation mean in [0, 1] units (None: the dataset's standard values)."""
    std: tuple[float, ...] | None = None
    eval_batch_size: int = execution_only(512)
    device: str = execution_only("auto")
    """"auto" (CUDA when available, else CPU), "cpu", or a torch device string such as "cuda:1"."""
    threads: int | None = execution_only(None)
    """torch CPU threads (None: torch's default)."""
    transfer: Literal["scratch", "linear", "finetune"] = "scratch"
    """From scratch, or transfer from ``pretrained``: ``linear`` re-initialises the last linear layer and trains
    only it (the backbone and its BatchNorm statistics frozen; paper: Adam, lr 0.1, 40 epochs, decay [15, 25, 35]),
    ``finetune`` re-initialises it and trains every parameter (paper: Adam, lr 1e-4, 60 epochs, [15, 30, 45])."""
    pretrained: str | None = model_ref("classifier")
    """Transfer only: a classifier checkpoint directory (``puregen-dist train-classifier``) or, in a sweep, a
    ``model:<name>`` reference / ``classifier-<hex16>`` artifact key. Same architecture as ``name``."""

    def __post_init__(self) -> None:
        check_at_least(self, epochs=1, batch_size=1, eval_batch_size=1)
        check(self.lr > 0, "lr", "must be > 0")
        check(0.0 <= self.momentum < 1.0, "momentum", "must lie in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0.0 < self.gamma <= 1.0, "gamma", "must lie in (0, 1]")
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must lie in [0, 1)")
        check(0.0 <= self.dropout < 1.0, "dropout", "must lie in [0, 1)")
        check(self.crop_padding >= 0, "crop_padding", "must be >= 0")
        check(list(self.milestones) == sorted(self.milestones) and all(m >= 1 for m in self.milestones),
              "milestones", "must be increasing epochs >= 1")
        check(self.threads is None or self.threads >= 1, "threads", "must be >= 1")
        check(self.transfer == "scratch" or self.pretrained is not None, "pretrained",
              f"required for transfer: {self.transfer} (a classifier checkpoint directory)")
        check(self.transfer != "scratch" or self.pretrained is None, "pretrained",
              "only used with transfer: linear or finetune")
        for key in ("mean", "std"):
            value = getattr(self, key)
            check(value is None or len(value) >= 1, key, "must list at least one value")
        check(self.std is None or all(s > 0 for s in self.std), "std", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Where results go."""

    enabled: bool = True
    """False: log nothing (a null tracker)."""
    uri: str | None = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite at <output_dir>/mlflow.db (absolute)."""
    experiment: str = "puregen-dist"
    """MLflow experiment name."""
    run_name: str | None = None

    def __post_init__(self) -> None:
        problem = None if self.uri is None else tracking_uri_problem(self.uri)
        check(problem is None, "uri", problem or "")
        check(bool(self.experiment.strip()), "experiment", "the MLflow experiment name must not be empty")
        check(self.run_name is None or bool(self.run_name.strip()), "run_name",
              "must not be empty (null: the default run name)")


TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                    "uc")
"""URI schemes of MLflow's tracking stores (a database scheme may carry a ``+driver`` suffix); a bare path is a
local file store, and ``databricks`` / ``databricks-uc`` / ``uc`` alone name a Databricks workspace."""


def tracking_uri_problem(uri: str) -> str | None:
    """Why ``uri`` is no MLflow tracking URI (None when its scheme is one of :data:`TRACKING_SCHEMES`)."""
    if not uri.strip():
        return "must not be empty (null: $MLFLOW_TRACKING_URI, else sqlite under output_dir)"
    scheme = urlparse(uri).scheme.split("+", 1)[0].lower()
    if len(scheme) <= 1 or scheme in TRACKING_SCHEMES:  # "" or a Windows drive letter: a path
        return None
    return (f"unsupported scheme {scheme!r}; expected one of "
            f"{', '.join(TRACKING_SCHEMES)} (e.g. sqlite:////abs/path/mlflow.db, http://127.0.0.1:5000)")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How the attack is measured (DESIGN §6)."""

    magnifications: tuple[float, ...] = (1.0, 3.0)
    """Trigger magnifications m at which poison success is measured (Narcissus paper: 1 and 3)."""

    def __post_init__(self) -> None:
        check(len(self.magnifications) >= 1 and all(m > 0 for m in self.magnifications),
              "magnifications", "must list at least one value > 0")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One experiment: data -> attack -> defense -> classifier -> metrics."""

    name: str = "experiment"
    seed: int = 0
    """Seed of crafting, defense noise and classifier training."""
    output_dir: str = "outputs"
    """Where runs write their files (and the default MLflow database); relative to the working directory."""
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=NoAttackConfig)
    defense: DefenseConfig = field(default_factory=NoDefenseConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check_name(self.name)
        check(self.seed >= 0, "seed", "must be >= 0")
        self.defense.check_epochs(self.classifier.epochs)
