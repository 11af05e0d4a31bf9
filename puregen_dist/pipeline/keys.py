"""Content keys of model artifacts: what the stages, the planner and the shipped reference models agree on."""

from __future__ import annotations

from typing import Any

from puregen_dist.config.generative import ModelJob
from puregen_dist.config.loading import key_dict
from puregen_dist.pipeline.models import model_fingerprints
from puregen_dist.pipeline.store import artifact_key


def model_artifact(job: ModelJob) -> tuple[str, str, dict[str, Any]]:
    """(model kind, key, keyed config) of the model ``job`` trains: the job without its execution-only fields,
    plus, when it references artifacts or directories (``train_on``), their fingerprints."""
    config = key_dict(job)
    if fingerprints := model_fingerprints(job):
        config["models"] = fingerprints
    return job.model_kind, artifact_key(job.model_kind, config), config
