"""The body of a training-set filter's Ray task (``pipeline = "whole_set"``: Spectral Signatures, Activation
Clustering): read the poison set from the store, get the detector trained on it (from the store when a filter
with the same detector recipe and seed trained it already, else train and commit it), flag rows.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

from puregen_dist.config.identity import with_device
from puregen_dist.config.loading import key_dict
from puregen_dist.pipeline.actors import ray_device
from puregen_dist.pipeline.store import ArtifactStore, artifact_key
from puregen_dist.plugins import load_plugins
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)

DETECTOR_KIND = "classifier"
"""Store kind of a filter's detector: an ordinary classifier checkpoint."""


def detector_key(defense_cfg: Any, seed: int, poison_key: str) -> tuple[str, dict[str, Any]]:
    """(key, keyed config) of the detector ``defense_cfg.detector`` trained on the poison set ``poison_key``."""
    config = {"trained_on": poison_key, "detector": key_dict(defense_cfg.detector), "seed": seed}
    return artifact_key(DETECTOR_KIND, config, inputs=[poison_key]), config


def cached_detector(store: ArtifactStore, defense: Any, seed: int, poison_key: str, data: ImageSet
                    ) -> tuple[Any, str, bool]:
    """(detector model, its key, whether it was trained now) for ``defense`` on ``data`` (the set of
    ``poison_key``)."""
    from puregen_dist.attacks.surrogate import load_classifier
    from puregen_dist.classifiers.transfer import save_trained_classifier
    from puregen_dist.device import resolve_device

    cfg = defense.cfg.detector
    key, config = detector_key(defense.cfg, seed, poison_key)
    if store.reusable(key):  # a corrupt one is moved aside and trained again
        log.info("%s: detector in the store, reused", key)
        return load_classifier(store.get_dir(key), resolve_device(cfg.device))[0], key, False
    model = defense.fit_detector(data, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_trained_classifier(f"{tmp}/model", model, name=cfg.name, epochs=cfg.epochs,
                                            shape=data.shape, num_classes=data.num_classes, nat_acc=None)
        store.put_dir(key, directory, kind=DETECTOR_KIND, config=config, inputs=[poison_key])
    return model, key, True


def filter_in_task(defense_cfg: Any, seed: int, poison_key: str, store_uri: str) -> dict[str, Any]:
    """Flag the rows of ``poison_key`` that the filter ``defense_cfg`` removes, on the device Ray assigned;
    returns ``{"kept_ids", "removed_ids"}`` (int64 arrays), the detector's key and seconds spent."""
    from puregen_dist.defenses import build_defense

    load_plugins()
    cfg = with_device(defense_cfg, ray_device(), only_auto=True)
    store = ArtifactStore(store_uri)
    data, _ = store.get_imageset(poison_key)
    defense = build_defense(cfg)
    defense.validate(data)
    tick = time.perf_counter()
    detector, key, trained = cached_detector(store, defense, seed, poison_key, data)
    detector_s = time.perf_counter() - tick
    flags = defense.flagged(data, detector, seed=seed)
    return {"kept_ids": data.ids[~flags], "removed_ids": data.ids[flags], "detector": key,
            "detector_trained": trained, "detector_s": detector_s,
            "flag_s": time.perf_counter() - tick - detector_s}
