"""The sweep planner (DESIGN §2): the unique artifacts of each stage that the cells need (generative models,
poison sets, purified sets), which of them the store already holds, and the trials.

Keys are computed from configs alone (nothing is loaded or built here), with the same functions the stages
use, so a plan's "cached" is exactly what the build will skip. "Cached" means committed and intact
(``ArtifactStore.intact``: checksums on a local store, sizes on a remote one): a corrupt artifact is planned as a
build, which sets it aside and rebuilds it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puregen_dist.config.generative import ModelJob, PurifyJob
from puregen_dist.config.identity import iter_model_refs
from puregen_dist.config.schema import ExperimentConfig
from puregen_dist.pipeline.reference import reference_for_key
from puregen_dist.pipeline.stages import clean_source, model_artifact, poison_artifact, purified_artifact
from puregen_dist.pipeline.store import ArtifactStore
from puregen_dist.sweep.spec import Cell, Sweep
from puregen_dist.tracking.names import artifact_tag


@dataclass
class ArtifactPlan:
    """One artifact the sweep needs: its stage, key, whether the store holds it, and the job that builds it."""

    stage: str  # "model" | "poison" | "purified"
    key: str
    cached: bool
    job: Any
    label: str
    reference: Path | None = None
    """A shipped reference model with this key (:mod:`puregen_dist.pipeline.reference`): imported, not trained."""
    source: str | None = None
    """Purified sets: the key of the poison set they purify."""

    @property
    def action(self) -> str:
        """What the build does: ``cached``, ``import`` (a shipped reference) or ``build``."""
        return "cached" if self.cached else "import" if self.reference is not None else "build "


@dataclass
class TrialPlan:
    """One trial: its cell and the artifacts it reads."""

    cell: Cell
    poison_key: str
    train_key: str
    """The training set the classifier sees: the purified set, or the poison set for ``defense: none``."""
    model_keys: dict[str, str] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        """Artifact keys as MLflow tags."""
        tags = {artifact_tag("poison"): self.poison_key, artifact_tag("train"): self.train_key}
        tags.update({artifact_tag(name): key for name, key in self.model_keys.items()})
        return tags


@dataclass
class SweepPlan:
    """Everything to build, stage by stage, and the trials."""

    sweep: Sweep
    models: list[ArtifactPlan]
    poisons: list[ArtifactPlan]
    purified: list[ArtifactPlan]
    trials: list[TrialPlan]

    def stages(self) -> list[tuple[str, list[ArtifactPlan]]]:
        return [("models", self.models), ("poison sets", self.poisons), ("purified sets", self.purified)]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary (logged to the parent run)."""
        return {"sweep": self.sweep.name, "cells": len(self.trials),
                **{name.replace(" ", "_"): [{"key": a.key, "cached": a.cached, "label": a.label} for a in items]
                   for name, items in self.stages()},
                "trials": [{"cell_id": t.cell.cell_id, "defense": t.cell.row, "attack": t.cell.col,
                            "classifier": t.cell.config.classifier.name, "seed": t.cell.config.seed,
                            **t.tags()} for t in self.trials]}


def purify_job_of(cell: Cell, sweep: Sweep) -> PurifyJob:
    """The ``purify`` job of a cell (data, attack, defense, seed, store, pipeline resources), so that its
    poison and purified keys are the ones ``puregen-dist purify`` would use."""
    cfg, settings = cell.config, sweep.settings
    return PurifyJob(name=f"{sweep.name}-{cell.cell_id}", seed=cfg.seed, store=settings.store,
                     pipeline=dataclasses.replace(settings.pipeline, address=settings.address),
                     data=cfg.data, attack=cfg.attack, defense=cfg.defense)


def plan_sweep(sweep: Sweep, store: ArtifactStore) -> SweepPlan:
    """The unique artifacts per stage (first-use order) and one trial per cell. A model that no cell references
    (a ``--set`` that narrows the space, say) is not planned: nothing would use it."""
    intact = functools.cache(store.intact)  # each artifact's checksums once, however many cells share it
    models: dict[str, ArtifactPlan] = {}
    keys = sweep.model_keys()
    used = {ref for cell in sweep.cells for ref in used_models(cell.config).values()}
    for name, job in sweep.models.items():
        if keys[name] not in used:
            continue
        models.setdefault(keys[name], ArtifactPlan("model", keys[name], intact(keys[name]),
                                                   _with_store(job, store), _model_label(name, job),
                                                   reference_for_key(keys[name])))
    poisons: dict[str, ArtifactPlan] = {}
    purified: dict[str, ArtifactPlan] = {}
    trials = []
    for cell in sweep.cells:
        job = purify_job_of(cell, sweep)
        poison_key, _ = poison_artifact(job)
        poisons.setdefault(poison_key, ArtifactPlan("poison", poison_key, intact(poison_key), job,
                                                    f"{cell.col} seed={cell.config.seed}{_target(cell)}"))
        train_key = poison_key
        if cell.config.defense.pipeline != "none":
            train_key, _ = purified_artifact(job, poison_key)
            cached = intact(train_key)
            if not cached and (clean_job := clean_source(job)) is not None:
                _plan_clean_rows(clean_job, cell, intact, poisons, purified)
            purified.setdefault(train_key, ArtifactPlan("purified", train_key, cached, job,
                                                        f"{cell.row} on {poison_key}", source=poison_key))
        trials.append(TrialPlan(cell, poison_key, train_key, used_models(cell.config)))
    return SweepPlan(sweep, list(models.values()), list(poisons.values()), list(purified.values()), trials)


def _plan_clean_rows(clean_job: PurifyJob, cell: Cell, intact: Callable[[str], bool],
                     poisons: dict[str, ArtifactPlan], purified: dict[str, ArtifactPlan]) -> None:
    """Plan the clean training set and its purified set, ahead of a poisoned set that reuses its purified
    clean rows (:func:`~puregen_dist.pipeline.stages.purify_stage`)."""
    clean_key, _ = poison_artifact(clean_job)
    poisons.setdefault(clean_key, ArtifactPlan("poison", clean_key, intact(clean_key), clean_job,
                                               f"none seed={cell.config.seed} (clean rows)"))
    key, _ = purified_artifact(clean_job, clean_key)
    purified.setdefault(key, ArtifactPlan("purified", key, intact(key), clean_job,
                                          f"{cell.row} on {clean_key} (clean rows, shared)", source=clean_key))


def used_models(cfg: ExperimentConfig) -> dict[str, str]:
    """``{name: model reference}`` of the models a cell's attack, defense and classifier reference, named by
    model kind (by dotted field where two references share a kind): the trial's ``artifact.<name>`` tags."""
    refs = [(f"{section}.{path}", kind, ref) for section in ("attack", "defense", "classifier")
            for path, kind, ref in iter_model_refs(getattr(cfg, section))]
    kinds = [kind for _, kind, _ in refs]
    return {(kind if kinds.count(kind) == 1 else path): ref for path, kind, ref in refs}


def _with_store(job: ModelJob, store: ArtifactStore) -> ModelJob:
    return dataclasses.replace(job, store=store.uri)


def _model_label(name: str, job: ModelJob) -> str:
    kind = model_artifact(job)[0]
    return name if name == kind else f"{name} ({kind})"


def _target(cell: Cell) -> str:
    target = getattr(cell.config.attack, "target_class", None)
    key = getattr(cell.config.attack, "poison_key", None)
    return ("" if target is None else f" target={target}") + ("" if key is None else f" poison_key={key}")


def format_plan(plan: SweepPlan, finished: set[str] | frozenset[str] = frozenset()) -> str:
    """The plan as text: per stage, each artifact as `build` or `cached`; then the trials (`done` for cells
    that already have a finished MLflow run)."""
    lines = [f"sweep {plan.sweep.name!r} ({plan.sweep.source}): {len(plan.trials)} cells"]
    for name, items in plan.stages():
        todo = sum(not a.cached for a in items)
        shipped = sum(a.action == "import" for a in items)
        imports = f", {shipped} imported from shipped references" if shipped else ""
        lines.append(f"{name}: {len(items)} ({todo - shipped} to build{imports}, {len(items) - todo} cached)")
        lines += [f"  {a.action}  {a.key}  {a.label}" for a in items]
    pending = [t for t in plan.trials if t.cell.cell_id not in finished]
    lines.append(f"trials: {len(plan.trials)} ({len(pending)} to run, {len(plan.trials) - len(pending)} "
                 "already finished)")
    lines += [f"  {'done' if t.cell.cell_id in finished else 'run '}  {t.cell.describe()}" for t in plan.trials]
    return "\n".join(lines)
