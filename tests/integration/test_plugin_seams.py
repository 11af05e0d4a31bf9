"""A new defense and a new model kind, defined entirely in this file, go through a whole digits sweep with no
change to ``puregen_dist/`` (issue 8 acceptance): planned, keyed, built as a Ray task, purified on a Ray Data
actor pool, trained on as Ray Tune trials and reported.

The model kind ``mean_image`` "trains" the per-pixel mean of its training split (a real, if trivial, model:
one tensor in a safetensors checkpoint). The defense ``mean_blend`` pulls every training image towards that
mean, ``x <- (1 - alpha) x + alpha mean``, in [-1, 1]; its ``template`` field references a ``mean_image``
model and ``batch_size`` is execution-only. Ray workers import this module through ``$PUREGEN_DIST_PLUGINS``
and ``PYTHONPATH``, as a user's plugin package would be shipped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from puregen_dist.config.errors import check
from puregen_dist.config.generative import ModelJob
from puregen_dist.config.identity import PipelineKind, execution_only, model_fields, model_ref
from puregen_dist.config.loading import key_dict
from puregen_dist.config.schema import DefenseConfig
from puregen_dist.data.transforms import sym_to_uint8, to_sym
from puregen_dist.device import resolve_device
from puregen_dist.registry import DEFENSES, MODELS
from puregen_dist.types import ImageSet

MODULE = Path(__file__).stem
MEAN_FILE = "mean.safetensors"


# ------------------------------------------------------------------------------------------ the new model kind


@dataclass(frozen=True, kw_only=True)
class MeanImageSection:
    """What the mean is taken over."""

    max_images: int | None = None
    """At most this many training images, in id order (None: all)."""


@dataclass(frozen=True, kw_only=True)
class MeanImageJob(ModelJob):
    """Train a ``mean_image`` model: the per-pixel mean of the training split."""

    model_kind: ClassVar[str] = "mean_image"
    name: str = execution_only("mean_image")
    output: str = execution_only("outputs/mean_image")
    mean: MeanImageSection = field(default_factory=MeanImageSection)


@MODELS.register(MeanImageJob.model_kind, MeanImageJob)
def train_mean_image(job: MeanImageJob, tracker, data: tuple[ImageSet, ImageSet]) -> Path:
    """Write ``mean.safetensors`` ((C, H, W) float32 in [-1, 1]) + ``config.json`` into ``job.output``."""
    train, _ = data
    images = train.images[np.argsort(train.ids)][: job.mean.max_images]
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"mean": to_sym(images).mean(dim=0).contiguous()}, str(out / MEAN_FILE))
    (out / "config.json").write_text(json.dumps({"kind": "mean_image", "images": len(images)}))
    tracker.log_metrics({"images": float(len(images))})
    return out


# ------------------------------------------------------------------------------------------ the new defense


@dataclass(frozen=True, kw_only=True)
class MeanBlendConfig(DefenseConfig):
    """Blend every training image with a ``mean_image`` model."""

    pipeline: ClassVar[PipelineKind] = "actor_pool"
    name: str = "mean_blend"
    template: str | None = model_ref("mean_image")
    alpha: float = 0.5
    batch_size: int = execution_only(64)
    device: str = execution_only("auto")

    def __post_init__(self) -> None:
        check(self.template is not None, "template", "required: a mean_image model")
        check(0.0 <= self.alpha <= 1.0, "alpha", "must lie in [0, 1]")


class MeanBlendPurifier:
    """(B, C, H, W) in [-1, 1] -> (1 - alpha) x + alpha mean; deterministic, so ids and seed are unused."""

    def __init__(self, mean: torch.Tensor, alpha: float) -> None:
        self.mean, self.alpha = mean, alpha

    def purify(self, x: torch.Tensor, ids: torch.Tensor, *, seed: int) -> torch.Tensor:
        return (1.0 - self.alpha) * x + self.alpha * self.mean.to(x.device)


class MeanBlendDefense:
    """A GenerativeDefense: the pipeline runs ``purifier`` on an actor pool."""

    def __init__(self, cfg: MeanBlendConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.purifier = MeanBlendPurifier(load_file(str(Path(cfg.template) / MEAN_FILE))["mean"], cfg.alpha)

    def validate(self, train: ImageSet) -> None:
        h, w, c = train.shape
        check(tuple(self.purifier.mean.shape) == (c, h, w), "template", "mean image shape differs from the data")

    def apply(self, train: ImageSet, *, seed: int) -> ImageSet:
        x = self.purifier.purify(to_sym(train.images), torch.from_numpy(train.ids), seed=seed)
        return train.replace(images=sym_to_uint8(x))


@DEFENSES.register("mean_blend", MeanBlendConfig)
def build_mean_blend(cfg: MeanBlendConfig) -> MeanBlendDefense:
    return MeanBlendDefense(cfg)


# ------------------------------------------------------------------------------------------ declarations


def test_the_declarations_are_read_from_the_classes():
    cfg = MeanBlendConfig(template="somewhere", batch_size=7)
    assert model_fields(cfg) == {"template": "mean_image"}
    assert key_dict(cfg) == {"name": "mean_blend", "template": "somewhere", "alpha": 0.5}
    job = MeanImageJob(output="a", name="x")
    assert key_dict(job) == key_dict(MeanImageJob(output="b", name="y"))  # execution-only fields: no effect
    assert "mean" in key_dict(job) and "output" not in key_dict(job)


# ------------------------------------------------------------------------------------------ a whole sweep

def sweep_file(tmp_path: Path, **defense_overrides) -> Path:
    blend = {"name": "mean_blend", "template": "model:avg", "alpha": 0.5, **defense_overrides}
    data = {
        "name": "plugin",
        "base": {"output_dir": str(tmp_path / "out"),
                 "data": {"dataset": "digits", "train_per_class": 12, "test_fraction": 0.25},
                 "attack": {"name": "badnets", "target_class": 0, "budget": 0.1, "label_mode": "dirty"},
                 "classifier": {"name": "small_cnn", "epochs": 1, "batch_size": 32, "threads": 1,
                                "crop_padding": 1, "flip": False},
                 "eval": {"magnifications": [1.0]}},
        "models": {"avg": {"kind": "mean_image", "data": {"dataset": "digits", "train_per_class": 10},
                           "mean": {"max_images": 50}}},
        "space": {"defense": {"grid": [{"name": "none"}, blend]}},
        "settings": {"trial_cpus": 1, "max_concurrent_trials": 2, "storage": str(tmp_path / "tune"),
                     "store": str(tmp_path / "store"),
                     "pipeline": {"actors": 1, "batch_size": 32, "cpu_tasks": 1, "craft": {"num_cpus": 1}}},
    }
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_planner_keys_the_new_defense_from_its_declarations(tmp_path):
    from puregen_dist.pipeline.store import ArtifactStore
    from puregen_dist.sweep.plan import plan_sweep
    from puregen_dist.sweep.spec import load_sweep

    store = ArtifactStore(tmp_path / "store")
    plan = plan_sweep(load_sweep(sweep_file(tmp_path)), store)
    assert [m.key.split("-")[0] for m in plan.models] == ["mean_image"]
    blend = next(t for t in plan.trials if t.cell.row == "mean_blend")
    none = next(t for t in plan.trials if t.cell.row == "none")
    assert none.train_key == none.poison_key and blend.train_key.startswith("purified-")
    assert blend.model_keys == {"mean_image": plan.models[0].key}
    assert blend.cell.config.defense.template == plan.models[0].key  # model:avg resolved to its key
    same = plan_sweep(load_sweep(sweep_file(tmp_path, batch_size=5)), store)
    other = plan_sweep(load_sweep(sweep_file(tmp_path, alpha=0.25)), store)
    row = {t.cell.row.split(" ")[0]: t.train_key for t in same.trials}
    assert row["mean_blend"] == blend.train_key  # execution-only: same purified set
    assert {t.train_key for t in other.trials} != {t.train_key for t in plan.trials}


@pytest.fixture
def plugin_ray(monkeypatch):
    """A local Ray whose workers import this module as a plugin."""
    import ray

    from puregen_dist.pipeline.purify import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", ":".join(p for p in (here, *sys.path) if p))
    monkeypatch.setenv("PUREGEN_DIST_PLUGINS", MODULE)
    ensure_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.mark.ray
def test_a_digits_sweep_builds_purifies_trains_and_reports_the_new_defense(plugin_ray, tmp_path):
    from puregen_dist.pipeline.store import ArtifactStore
    from puregen_dist.sweep.runner import run_sweep
    from puregen_dist.sweep.spec import load_sweep

    sweep = load_sweep(sweep_file(tmp_path))
    outcome = run_sweep(sweep, echo=lambda _: None)
    assert outcome.trials_run == 2 and outcome.trials_failed == []
    store = ArtifactStore(tmp_path / "store")
    assert sorted(m["kind"] for m in store.ls()) == ["mean_image", "poison", "purified"]

    blend = next(t for t in outcome.plan.trials if t.cell.row == "mean_blend")
    purified, _ = store.get_imageset(blend.train_key)
    poisoned, _ = store.get_imageset(blend.poison_key)
    template = store.get_dir(blend.model_keys["mean_image"])
    expected = MeanBlendDefense(dataclasses.replace(blend.cell.config.defense, template=str(template),
                                                    device="cpu")).apply(poisoned, seed=0)
    np.testing.assert_array_equal(purified.images, expected.images)
    assert not np.array_equal(purified.images, poisoned.images)

    assert "| mean_blend |" in outcome.report_markdown and "| none |" in outcome.report_markdown
    from mlflow.tracking import MlflowClient

    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("plugin").experiment_id
    child = client.search_runs([experiment], filter_string="tags.row = 'mean_blend'")[0]
    assert child.info.status == "FINISHED"
    assert child.data.tags["artifact.mean_image"] == blend.model_keys["mean_image"]
