"""Content keys of model artifacts: what the stages, the planner and the shipped reference models agree on."""

from __future__ import annotations

from typing import Any

from puregen_dist.config.generative import ModelJob
from puregen_dist.config.loading import key_dict
from puregen_dist.pipeline.store import artifact_key


def model_artifact(job: ModelJob) -> tuple[str, str, dict[str, Any]]:
    """(model kind, key, keyed config) of the model ``job`` trains: the job without its execution-only fields."""
    config = key_dict(job)
    return job.model_kind, artifact_key(job.model_kind, config), config
