"""The names of the MLflow tags, metrics and params that the sweep writes and reads, in one place.

Writers: ``experiment.py`` (metrics, metric-definition tags), ``sweep/trial.py::cell_tags`` (child-run tags),
``sweep/runner.py`` (parent-run tags). Readers: ``tracking/reader.py`` (resume: finished cells) and
``sweep/report.py`` (the results table). Pure constants: importing this module imports neither MLflow nor Ray.

In the DataFrame of :func:`puregen_dist.tracking.reader.read_runs` (MLflow's own ``search_runs`` columns) a
tag ``x`` is the column ``tags.x``, a metric ``y`` is ``metrics.y`` and a param ``z`` is ``params.z``:
:func:`tag_column`, :func:`metric_column` and :func:`param_column` spell them.
"""

from __future__ import annotations

from typing import Final


class Tag:
    """Run tag names."""

    PARENT_RUN_ID: Final = "mlflow.parentRunId"
    """MLflow's own nesting tag: the sweep invocation (parent run) of a child run."""
    SWEEP: Final = "sweep"
    """The sweep name (= the MLflow experiment), on parent and child runs."""
    ROLE: Final = "role"
    """``sweep`` on the parent run of a sweep invocation."""
    CELL_ID: Final = "cell_id"
    """The sweep cell of a child run: what resume skips and the report deduplicates by."""
    CELL_INDEX: Final = "cell_index"
    ROW: Final = "row"
    """Defense label: the table row."""
    COL: Final = "col"
    """Attack label: the table column."""
    ATTACK_KIND: Final = "attack.kind"
    """One of :class:`AttackKind`."""
    SEED: Final = "seed"
    TARGET_CLASS: Final = "target_class"
    """Target class of a triggered attack (absent otherwise)."""
    CLASSIFIER: Final = "classifier"


class AttackKind:
    """Values of the tag :attr:`Tag.ATTACK_KIND`."""

    TRIGGERED: Final = "triggered"
    TRIGGERLESS: Final = "triggerless"
    AVAILABILITY: Final = "availability"
    """Every training row perturbed to lower clean accuracy (NTGA): the report shows natural accuracy only."""
    NONE: Final = "none"
    ALL: Final = (TRIGGERED, TRIGGERLESS, AVAILABILITY, NONE)


class Metric:
    """Metric names (final values; per-epoch curves use the same names with steps)."""

    NAT_ACC: Final = "nat_acc"
    """Natural accuracy in [0, 1]."""
    POISON_SUCCESS: Final = "poison_success"
    """Prefix of the triggered poison success per magnification: see :func:`success_key`."""
    POISON_M1: Final = "poison_success_m1"
    POISON_M3: Final = "poison_success_m3"
    TARGET_SUCCESS: Final = "target_success"
    """Triggerless: 1.0 when the single target image is classified as the adversarial label, else 0.0."""
    TARGET_CORRECT: Final = "target_correct"
    """Triggerless: 1.0 when the target image is classified as its true label, else 0.0."""
    FLOOR_PREFIX: Final = "floor_"
    """Prefix of a metric's floor: the same measurement on a classifier trained on the clean training set with
    the same defense, classifier and seed (``floor_poison_success_m1``, ``floor_target_success``)."""
    FLOOR_M1: Final = "floor_poison_success_m1"
    FLOOR_M3: Final = "floor_poison_success_m3"
    FLOOR_TARGET_SUCCESS: Final = "floor_target_success"
    REMOVAL_RECALL: Final = "removal_recall"
    """A defense that removed training rows (a filter, EPIC): the share of the poisons it removed."""
    REMOVAL_PRECISION: Final = "removal_precision"
    """The share of the rows it removed that were poisons (0 when it removed none)."""
    ROWS_REMOVED: Final = "rows_removed"


class Param:
    """Param names (flattened, dotted config keys) that the report reads."""

    SEED: Final = "seed"
    DEFENSE_NAME: Final = "defense.name"
    DEFENSE_QUALITY: Final = "defense.quality"
    ATTACK_NAME: Final = "attack.name"
    ATTACK_EPS: Final = "attack.eps"
    LANGEVIN_STEPS: Final = "defense.langevin.steps"
    DIFFUSION_STEPS: Final = "defense.diffusion.steps"


DEFINITION_TAG_PREFIX: Final = "metric."
"""``metric.<name>`` tags hold the written definition of a metric (e.g. ``metric.nat_acc``)."""
ARTIFACT_TAG_PREFIX: Final = "artifact."
"""``artifact.<stage>`` tags hold the artifact-store keys a child run read (``artifact.poison``, ...)."""


def success_key(magnification: float) -> str:
    """Metric name of poison success at ``magnification``: 1 -> ``poison_success_m1``, 1.5 -> ``..._m1p5``."""
    return f"{Metric.POISON_SUCCESS}_m{magnification:g}".replace(".", "p")


def definition_tag(metric: str) -> str:
    """The tag holding the definition of ``metric``: ``nat_acc`` -> ``metric.nat_acc``."""
    return DEFINITION_TAG_PREFIX + metric


def artifact_tag(stage: str) -> str:
    """The tag holding the artifact key of ``stage``: ``poison`` -> ``artifact.poison``."""
    return ARTIFACT_TAG_PREFIX + stage


def tag_column(name: str) -> str:
    """DataFrame column of tag ``name`` in MLflow's ``search_runs`` output: ``row`` -> ``tags.row``."""
    return f"tags.{name}"


def metric_column(name: str) -> str:
    """DataFrame column of metric ``name``: ``nat_acc`` -> ``metrics.nat_acc``."""
    return f"metrics.{name}"


def param_column(name: str) -> str:
    """DataFrame column of param ``name``: ``defense.name`` -> ``params.defense.name``."""
    return f"params.{name}"


__all__ = [
    "ARTIFACT_TAG_PREFIX", "DEFINITION_TAG_PREFIX", "AttackKind", "Metric", "Param", "Tag", "artifact_tag",
    "definition_tag", "metric_column", "param_column", "success_key", "tag_column",
]
