"""Reference models shipped with the package (issue 9): trained checkpoints that a sweep imports into its store
under their recipe's content key instead of retraining them.

A reference is a directory under ``puregen_dist/reference_models/<name>/`` holding

* ``model.safetensors`` + ``config.json``: the checkpoint, model tensors only (no optimizer or chain state);
* ``reference.json``: the model kind, the artifact key of the recipe (:func:`~puregen_dist.pipeline.keys.model_artifact`), the recipe itself (the model job, as data), the fingerprint of its training data, and notes
  (training cost, measured figures).

``export_reference`` writes one from a trained checkpoint; ``import_reference`` commits one into a store (the key
is recomputed from the recipe first, so a reference whose recipe no longer hashes to its key is refused rather
than served under a stale key); ``reference_for_key`` finds the shipped reference of a model key, which is how the
sweep planner and ``train-<kind> --store`` skip training.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from puregen_dist.atomic import atomic_dir, atomic_write_text
from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import ModelJob
from puregen_dist.config.loading import build, key_dict, to_dict
from puregen_dist.generative.checkpoints import CONFIG, WEIGHTS
from puregen_dist.pipeline.keys import model_artifact
from puregen_dist.pipeline.store import ArtifactStore, StagedArtifact
from puregen_dist.plugins import load_plugins
from puregen_dist.registry import MODELS

REFERENCE_ROOT = Path(__file__).resolve().parents[1] / "reference_models"
"""Where the package's shipped reference models live."""
REFERENCE_JSON = "reference.json"


def export_reference(job: ModelJob, checkpoint: str | Path, out: str | Path, *, data_fingerprint: str,
                     notes: Mapping[str, Any] | None = None) -> Path:
    """Write the reference of ``job``'s model trained into ``checkpoint`` to ``out`` (atomically): model tensors
    only, the config, and ``reference.json``. Returns ``out``."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / WEIGHTS).is_file():
        raise UserInputError(f"{checkpoint}: no {WEIGHTS} (not a checkpoint directory)")
    kind, key, _ = model_artifact(job)
    model = {k: v for k, v in load_file(str(checkpoint / WEIGHTS)).items() if k.startswith("model.")}
    with atomic_dir(out) as tmp:
        save_file(model, str(Path(tmp) / WEIGHTS))
        shutil.copy(checkpoint / CONFIG, Path(tmp) / CONFIG)
        record = {"kind": kind, "key": key, "recipe": to_dict(job), "data_fingerprint": data_fingerprint,
                  "notes": dict(notes or {})}
        atomic_write_text(Path(tmp) / REFERENCE_JSON, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Path(out)


def read_reference(directory: str | Path) -> tuple[dict[str, Any], ModelJob]:
    """(``reference.json``, the recipe as its model job) of a reference directory; the recipe must still hash to
    the recorded key (UserInputError naming the directory otherwise)."""
    path = Path(directory) / REFERENCE_JSON
    if not path.is_file():
        raise UserInputError(f"{directory}: not a reference model (no {REFERENCE_JSON})")
    record = json.loads(path.read_text())
    load_plugins()  # a library caller (a notebook importing a reference) need not have registered the model kinds
    job_cls = MODELS.get(record["kind"]).config_cls
    job = build(job_cls, record["recipe"], source=str(path), path="recipe")
    key = model_artifact(job)[1]
    if key != record["key"]:
        raise UserInputError(f"{path}: the recipe now hashes to {key}, not the recorded {record['key']} (the "
                             "model config schema changed): re-export the reference")
    return record, job


def shipped_references(root: str | Path | None = None) -> dict[str, Path]:
    """``{model key: reference directory}`` of the references under ``root`` (default :data:`REFERENCE_ROOT`),
    read from their JSON only."""
    found = {}
    for path in sorted(Path(root or REFERENCE_ROOT).glob(f"*/{REFERENCE_JSON}")):
        found[json.loads(path.read_text())["key"]] = path.parent
    return found


def reference_for_key(key: str, root: str | Path | None = None) -> Path | None:
    """The shipped reference directory of model artifact ``key``, or None."""
    return shipped_references(root).get(key)


def import_reference(directory: str | Path, store: ArtifactStore) -> tuple[str, bool]:
    """Commit the reference at ``directory`` into ``store`` under its recipe's key; returns (key, whether this
    call committed it; False: the store had it already)."""
    record, job = read_reference(directory)
    files = [Path(directory) / name for name in (WEIGHTS, CONFIG, REFERENCE_JSON)]

    def build_artifact(staged: StagedArtifact) -> None:
        with tempfile.TemporaryDirectory(prefix="puregen-reference-") as tmp:
            for file in files:  # reference.json travels along: provenance and data fingerprint
                shutil.copy(file, Path(tmp) / file.name)
            store.stage_dir(staged, tmp)

    _, built = store.get_or_build(record["key"], build_artifact, kind=record["kind"], config=key_dict(job))
    return record["key"], built
