"""Configs of the generative models (PUREGEN_REFERENCE §1-§3): architectures, training, purification, and the
jobs of the ``train-ebm``, ``train-ddpm``, ``purify`` and ``diagnose`` commands. Every constant has the published
default; tests and the quickstart scale them down through config only."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from puregen_dist.config.errors import check, check_at_least, check_custom_resources, check_eps, check_name
from puregen_dist.config.identity import (
    PipelineKind,
    execution_only,
    key_neutral_default,
    late_execution_option,
    model_ref,
)
from puregen_dist.config.schema import (
    AttackConfig,
    ClassifierConfig,
    DataConfig,
    DefenseConfig,
    NoAttackConfig,
    NoDefenseConfig,
    TrackingConfig,
)

FLOAT32_MAX = 3.4028234663852886e38
"""Largest finite float32: Langevin's drift and noise scale multiply float32 tensors."""

# --------------------------------------------------------------------------------------------------- EBM


@dataclass(frozen=True, kw_only=True)
class EBMConfig:
    """Energy network G_θ (§1.1): ``sngan32`` (default) or the Nijkamp/Hill ``convnet`` (§1.1.6)."""

    arch: Literal["sngan32", "convnet"] = "sngan32"
    nf: int = 128
    """Base width (sngan32: 128 → about 1.05M parameters; convnet: 32)."""
    in_channels: int = 3
    image_size: int = 32

    def __post_init__(self) -> None:
        check_at_least(self, nf=1, in_channels=1, image_size=8)
        check(self.nf <= 1024, "nf", "must be <= 1024 (sngan32: 128, convnet: 32)")


@dataclass(frozen=True, kw_only=True)
class LangevinConfig:
    """Langevin dynamics x ← x − (ε²/2)∇ₓ(G(x)/T) + εz (§1.2.6, §1.3)."""

    steps: int = 150
    """Langevin updates per image: 150 from scratch, 500 linear transfer, 1000 fine-tune."""
    step_size: float = 1.25e-2
    """ε; the per-step noise std in [-1, 1] space."""
    temperature: float = 1e-4
    """T; the drift on ∇G is ε²/(2T) = 0.78125 at the defaults."""
    precision: Literal["fp32", "bf16"] = key_neutral_default("fp32")
    """Arithmetic of the energy's forward and backward in purification: ``fp32``, or ``bf16`` autocast (meant
    for GPUs with bf16 tensor cores; changes the purified images slightly, so it is part of their key)."""
    cuda_graph: bool = late_execution_option(False)
    """On CUDA, capture one Langevin step as a CUDA graph and replay it: the same numbers, fewer host launches.
    Ignored on other devices."""

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", "must be >= 0")
        check(self.step_size > 0, "step_size", "must be > 0")
        check(self.temperature > 0, "temperature", "must be > 0")
        drift = self.step_size ** 2 / (2 * self.temperature)
        check(drift < FLOAT32_MAX, "step_size", f"the drift step_size**2 / (2 * temperature) = {drift:.3g} overflows "
              f"float32 (at most {FLOAT32_MAX:.3g}; the defaults give 0.78)")


@dataclass(frozen=True, kw_only=True)
class EBMTrainConfig:
    """Persistent-chain maximum-likelihood training (§1.2, code defaults)."""

    epochs: int = 120
    batch_size: int = 128
    """Global batch (8 TPU cores × 16 in the paper)."""
    lr: float = 1e-4
    milestones: tuple[int, ...] = (40, 75, 100)
    gamma: float = 0.1
    bank_size: int = 10000
    """Persistent chains, initialised from data + noise."""
    mcmc_steps: int = 100
    """K Langevin steps per iteration."""
    rejuvenation: float = 0.05
    """Probability that an updated chain is reset to a data image + noise."""
    data_noise: float = 1.5e-2
    """Std of the Gaussian noise added to positives and to chain (re)initialisations, in [-1, 1] space."""
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    """Training chains use ε and T from here (``steps`` is ignored: mcmc_steps applies)."""
    sample_grid: int = 16
    """Images in the per-epoch grid of short-run samples (0 disables)."""
    sample_steps: int = 100
    """Langevin steps of those short-run samples, from data + noise."""
    checkpoint_every: int = execution_only(1)
    """Save (and allow resuming) every this many epochs; the last epoch is always saved."""
    device: str = execution_only("auto")

    def __post_init__(self) -> None:
        check_at_least(self, epochs=1, batch_size=1)
        check(self.lr > 0, "lr", "must be > 0")
        check(self.bank_size >= self.batch_size, "bank_size", "must be >= batch_size")
        check(self.mcmc_steps >= 1, "mcmc_steps", "must be >= 1")
        check(0.0 <= self.rejuvenation <= 1.0, "rejuvenation", "must lie in [0, 1]")
        check_at_least(self, data_noise=0, checkpoint_every=1)


# --------------------------------------------------------------------------------------------------- DDPM


@dataclass(frozen=True, kw_only=True)
class DDPMConfig:
    """diffusers UNet2DModel + linear-β DDPM schedule (§2.1, §2.2)."""

    size: Literal["S", "M", "L"] = "L"
    """Block widths: S (32,32,64,64,128,128), M (64,...,256), L (128,128,256,256,512,512)."""
    in_channels: int = 3
    image_size: int = 32
    layers_per_block: int = 2
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        check_at_least(self, in_channels=1, image_size=8, layers_per_block=1, num_train_timesteps=2)
        check(0 < self.beta_start < self.beta_end < 1, "beta_end", "need 0 < beta_start < beta_end < 1")


@dataclass(frozen=True, kw_only=True)
class DDPMTrainConfig:
    """ε-prediction training on t < max_train_t only (§2.2, the paper's key trick)."""

    epochs: int = 150
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 500
    """Linear warm-up steps of the cosine schedule."""
    max_train_t: int = 250
    """t ~ Uniform{0, ..., max_train_t - 1}; the full 1000-step β schedule is kept."""
    sample_grid: int = 16
    """Images in the per-epoch grid of purified test images (0 disables)."""
    sample_every: int = late_execution_option(1)
    """Log that grid every this many epochs (and at the last). The grid has its own noise stream, so the weights
    do not depend on it; on small data its T_D reverse steps can cost more than the epoch."""
    checkpoint_every: int = execution_only(1)
    device: str = execution_only("auto")

    def __post_init__(self) -> None:
        check_at_least(self, epochs=1, batch_size=1)
        check(self.lr > 0, "lr", "must be > 0")
        check_at_least(self, weight_decay=0, warmup_steps=0, max_train_t=1, sample_every=1, checkpoint_every=1)


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """Noise-then-reverse purification (§2.3)."""

    steps: int = 75
    """T_D: noise to t = T_D, then T_D ancestral reverse steps (75 from scratch, 125 transfer)."""

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", "must be >= 0")


# --------------------------------------------------------------------------------------------------- defenses


@dataclass(frozen=True, kw_only=True)
class PureGenConfig(DefenseConfig):
    """Shared fields of the PureGen defenses. ``ebm`` / ``ddpm`` reference trained checkpoints: a directory
    written by ``train-ebm`` / ``train-ddpm`` (for the DDPM also a local diffusers-format directory), or the key
    of a model artifact in the job's store (``ebm-<hex16>``, printed by ``train-ebm --store``)."""

    pipeline: ClassVar[PipelineKind] = "actor_pool"
    random_streams: ClassVar[bool] = True
    rowwise: ClassVar[bool] = True  # per-sample seeding (PureGen-Filt: of the rows its global ranking selects)
    ebm: str | None = model_ref("ebm")
    ddpm: str | None = model_ref("ddpm")
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    reps: int = 1
    """T_Reps of PureGen-Reps."""
    filter_fraction: float = 0.5
    """k of PureGen-Filt: the highest-energy fraction that is purified."""
    batch_size: int = execution_only(128)
    device: str = execution_only("auto")

    def __post_init__(self) -> None:
        check(self.reps >= 1, "reps", "must be >= 1")
        check(0.0 < self.filter_fraction <= 1.0, "filter_fraction", "must lie in (0, 1]")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


# --------------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True, kw_only=True)
class TaskResources:
    """Ray resources of one task that materialises an artifact (model training, poison crafting)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    """GPUs for the task; the task trains on CUDA exactly when Ray assigned it one (``device: auto``)."""
    max_retries: int = 2
    """Re-runs after a worker or node failure (a model task resumes from its last local checkpoint)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources the task needs (e.g. ``{big_memory_node: 1}``): it runs only on nodes that offer them."""

    def __post_init__(self) -> None:
        check_at_least(self, num_cpus=0, num_gpus=0, max_retries=0)
        check_custom_resources(self.resources, "resources")

    def ray_options(self) -> dict[str, object]:
        """The ``ray.remote`` options of this task."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_retries": self.max_retries,
                **({"resources": dict(self.resources)} if self.resources else {})}


@dataclass(frozen=True, kw_only=True)
class ModelJob:
    """Base of every model-training job (``train-ebm``, ``train-ddpm``, ``train-classifier``, a sweep's
    ``models:`` entries): trains one model of ``model_kind`` on ``data``'s training split.

    A new model kind subclasses this, sets ``model_kind``, adds its sections, and registers its trainer in
    :data:`puregen_dist.registry.MODELS`. The model's artifact key hashes the job without its execution-only
    fields (where outputs go, resources, tracking, devices, checkpoint frequency)."""

    model_kind: ClassVar[str] = ""
    name: str = execution_only("model")
    seed: int = 0
    output: str = execution_only("outputs/model")
    """Checkpoint directory (model.safetensors + config.json); training resumes from it."""
    store: str | None = execution_only(None)
    """When set (or ``--store``): train as a Ray task into this artifact store, skipped when the model's
    artifact exists; ``output`` is then unused. The printed key is what model references accept."""
    resources: TaskResources = execution_only(default_factory=TaskResources)
    data: DataConfig = field(default_factory=DataConfig)
    train_on: str | None = model_ref("poison", key_neutral=True)
    """Train on a poison set instead of ``data``'s clean training split: a ``poison-<hex16>`` artifact key in
    the job's store (``puregen-dist craft`` prints it) or that artifact's directory. PureGen Table 3: generative
    models trained on Narcissus-poisoned data. ``data`` still gives the test split."""
    tracking: TrackingConfig = execution_only(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check_name(self.name)


@dataclass(frozen=True, kw_only=True)
class EBMJob(ModelJob):
    """``puregen-dist train-ebm``: train an EBM on ``data``'s training split."""

    model_kind: ClassVar[str] = "ebm"
    name: str = execution_only("ebm")
    output: str = execution_only("outputs/ebm")
    ebm: EBMConfig = field(default_factory=EBMConfig)
    train: EBMTrainConfig = field(default_factory=EBMTrainConfig)


@dataclass(frozen=True, kw_only=True)
class DDPMJob(ModelJob):
    """``puregen-dist train-ddpm``: train a DDPM on ``data``'s training split."""

    model_kind: ClassVar[str] = "ddpm"
    name: str = execution_only("ddpm")
    output: str = execution_only("outputs/ddpm")
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    train: DDPMTrainConfig = field(default_factory=DDPMTrainConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Purification setting of the per-epoch sample grid."""


@dataclass(frozen=True, kw_only=True)
class ClassifierJob(ModelJob):
    """``puregen-dist train-classifier``: pretrain a classifier on clean data, the starting point of the
    transfer recipes (``classifier.transfer: linear | finetune``, ``classifier.pretrained``)."""

    model_kind: ClassVar[str] = "classifier"
    name: str = execution_only("classifier")
    output: str = execution_only("outputs/classifier")
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.classifier.transfer == "scratch", "classifier.transfer",
              "pretraining trains from scratch (transfer: scratch)")


def _narcissus_surrogate_recipe() -> ClassifierConfig:
    """The Narcissus surrogate's published training (PEERS_AND_ATTACKS §5.3): ResNet-18, 200 epochs, SGD lr 0.1,
    momentum 0.9, weight decay 5e-4, cosine schedule, batch 350, random crop + flip."""
    return ClassifierConfig(name="resnet18", epochs=200, batch_size=350, lr=0.1, momentum=0.9, weight_decay=5e-4,
                            schedule="cosine")


@dataclass(frozen=True, kw_only=True)
class SurrogateJob(ModelJob):
    """``puregen-dist train-surrogate``: an attack surrogate, the classifier Narcissus crafts its trigger on
    (PEERS_AND_ATTACKS §5.3): trained on public out-of-distribution images (``pood``, POOD: Tiny-ImageNet in the
    paper) plus the victim's images of ``target_classes`` (from ``data``'s training split, which is the victim's
    training set: the attacker knows target-class data only). The network has one output per POOD class, then
    one per target class, in ``target_classes`` order (the original: 200 Tiny-ImageNet classes + 1).

    One surrogate serves every poison set whose target class it lists: a sweep over three target classes trains
    one surrogate with ``target_classes: [a, b, c]`` (an attacker who knows the three classes' images; the original
    trains one surrogate per target class, ``target_classes: [c]``)."""

    model_kind: ClassVar[str] = "surrogate"
    name: str = execution_only("surrogate")
    output: str = execution_only("outputs/surrogate")
    pood: DataConfig = field(default_factory=DataConfig)
    """The public out-of-distribution image set (its training split); resized to the victim's image size with
    ``pood.image_size`` where needed. At CPU scale: a disjoint partition of another or the same dataset."""
    pood_drop_classes: tuple[int, ...] = ()
    """POOD classes left out (when POOD shares the victim's label space, e.g. a disjoint partition of CIFAR-10:
    drop the target classes so their images are not also learned as POOD classes)."""
    target_classes: tuple[int, ...] = (0,)
    """Victim classes whose training images join as extra outputs; a Narcissus attack's target class must be
    one of them."""
    classifier: ClassifierConfig = field(default_factory=_narcissus_surrogate_recipe)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.target_classes) >= 1, "target_classes", "must list at least one victim class")
        check(len(set(self.target_classes)) == len(self.target_classes) and min(self.target_classes) >= 0,
              "target_classes", "must be distinct classes >= 0")
        check(len(set(self.pood_drop_classes)) == len(self.pood_drop_classes)
              and all(c >= 0 for c in self.pood_drop_classes), "pood_drop_classes", "must be distinct classes >= 0")
        check(self.classifier.transfer == "scratch", "classifier.transfer", "a surrogate trains from scratch")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Ray Data purification resources (``puregen-dist purify`` without ``--no-ray``)."""

    actors: int = 1
    """Purifier actors in the pool; each loads the generative models once."""
    batch_size: int = 64
    """Rows per map_batches call (results do not depend on it)."""
    num_cpus_per_actor: float = 1.0
    """CPUs reserved per actor; leave one CPU free for reading/writing (2 actors on 2 CPUs: 0.5 each)."""
    num_gpus_per_actor: float = 0.0
    """GPUs per actor (fractions pack several actors on one GPU); 0 runs on CPU."""
    cpu_tasks: int = 2
    """Task-pool size for CPU-only defenses (JPEG)."""
    resources_per_actor: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources of each purifier actor and CPU-defense task (e.g. ``{gpu_pool: 1}``): purification
    runs only on nodes that offer them."""
    craft: TaskResources = field(default_factory=TaskResources)
    """Resources of the poison-crafting task."""
    address: str | None = None
    """Ray cluster address; None: $RAY_ADDRESS, else a local Ray instance."""

    def __post_init__(self) -> None:
        check_at_least(self, actors=1, batch_size=1, num_cpus_per_actor=0, num_gpus_per_actor=0, cpu_tasks=1)
        check_custom_resources(self.resources_per_actor, "resources_per_actor")

    def actor_resources(self) -> TaskResources:
        """One purifier actor's resources as a task's (the few-row path runs them in one Ray task)."""
        return TaskResources(num_cpus=self.num_cpus_per_actor, num_gpus=self.num_gpus_per_actor,
                             resources=dict(self.resources_per_actor))


@dataclass(frozen=True, kw_only=True)
class PurifyJob:
    """``puregen-dist purify``: (optionally poison, then) purify a training set and write it as Parquet."""

    name: str = "purify"
    seed: int = 0
    output: str = "outputs/purified.parquet"
    """In-process path (``--no-ray``): Parquet file of the purified training set."""
    store: str = "outputs/store"
    """Ray path: the artifact store (directory or pyarrow.fs URI) holding the poison and purified sets."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=NoAttackConfig)
    defense: DefenseConfig = field(default_factory=NoDefenseConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(enabled=False))

    def __post_init__(self) -> None:
        check_name(self.name)


@dataclass(frozen=True, kw_only=True)
class CraftJob:
    """``puregen-dist craft``: craft the poison set of (data, attack, seed) into the artifact store, once per key
    (a Ray task with ``pipeline.craft`` resources, the same stage a sweep uses), and log it to MLflow: crafting
    time, the trigger as an image, sample poisons."""

    name: str = "craft"
    seed: int = 0
    store: str = "outputs/store"
    """The artifact store (directory or pyarrow.fs URI) the poison set is written to."""
    output_dir: str = "outputs"
    """Where the default MLflow database (``mlflow.db``) goes."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=NoAttackConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="craft"))

    def __post_init__(self) -> None:
        check_name(self.name)


@dataclass(frozen=True, kw_only=True)
class SurvivalConfig:
    """Trigger survival ρ = ⟨Ψ(x+δ) − Ψ(x), δ⟩ / ‖δ‖² of perturbation families (``diagnose``; see
    :mod:`puregen_dist.generative.survival`), measured on ``num_images`` seeded training images along the EBM
    Langevin steps (every ``every``) and the DDPM ``ddpm_grid``."""

    patterns: tuple[str, ...] = ("sign", "smooth4", "smooth8", "attack")
    """``sign`` (±eps per pixel), ``smooth<k>`` (k×k-cell noise upsampled, L∞ = eps), ``attack`` (the configured
    attack's crafted perturbations, poisoned − clean rows); an empty list turns the diagnostic off."""
    eps: float = 16 / 255
    """L∞ size of the random patterns, pixel units in [0, 1]."""
    num_images: int = 64
    """Images of the training split (seeded choice) that carry the random patterns."""
    langevin_steps: int = 500
    """The EBM chain runs this long (ρ against steps beyond the purification default)."""

    def __post_init__(self) -> None:
        bad = [p for p in self.patterns if not re.fullmatch(r"sign|smooth[1-9][0-9]*|attack", p)]
        check(not bad, "patterns", f"unknown pattern(s) {bad}; expected sign, smooth<k> (k >= 1) or attack")
        check_eps(self.eps, 16)
        check_at_least(self, num_images=1, langevin_steps=1)


@dataclass(frozen=True, kw_only=True)
class DiagnoseJob:
    """``puregen-dist diagnose``: energy histograms (Figure 1) and ℓ2 trajectories (Figure 3) of PureGen."""

    name: str = "diagnose"
    seed: int = 0
    output_dir: str = "outputs/diagnose"
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=NoAttackConfig)
    """The poison whose images are compared with clean ones (poisoned rows only)."""
    ebm: str | None = model_ref("ebm")
    ddpm: str | None = model_ref("ddpm")
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    num_images: int = 64
    """Poisoned images (and their clean originals) in the diagnostics."""
    every: int = 10
    """Record the EBM ℓ2 trajectory every this many Langevin steps."""
    ddpm_grid: tuple[int, ...] = (0, 15, 25, 50, 75, 100, 125, 150)
    """DDPM purification steps T_D at which the ℓ2 distances are measured."""
    survival: SurvivalConfig = field(default_factory=SurvivalConfig)
    """Trigger survival of perturbation families (:class:`SurvivalConfig`)."""
    batch_size: int = 128
    device: str = "auto"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check_name(self.name)
        check(self.ebm is not None or self.ddpm is not None, "ebm", "set ebm and/or ddpm checkpoints to diagnose")
        check_at_least(self, num_images=1, every=1)
