"""Experiment tracking: the Tracker protocol's implementations (MLflow is imported lazily)."""

from __future__ import annotations

from pathlib import Path

from puregen_dist.config.schema import TrackingConfig
from puregen_dist.tracking.base import NullTracker


def open_tracker(cfg: TrackingConfig, output_dir: str | Path, *, default_run_name: str | None = None,
                 tags: dict[str, str] | None = None):  # noqa: ANN201
    """An MLflowTracker for ``cfg`` (sqlite under ``output_dir`` by default), or a NullTracker when disabled.

    The run is named ``cfg.run_name``, else ``default_run_name``."""
    if not cfg.enabled:
        return NullTracker()
    from puregen_dist.tracking.mlflow_tracker import MLflowTracker, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.uri, output_dir)
    artifact_root = Path(output_dir) / "mlartifacts" if uri.startswith("sqlite:") else None
    return MLflowTracker(uri, cfg.experiment, run_name=cfg.run_name or default_run_name, tags=tags,
                         artifact_root=artifact_root)


__all__ = ["NullTracker", "open_tracker"]
