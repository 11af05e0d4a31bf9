"""The null tracker: accepts everything, records it in memory (unit tests, --dry-run, tracking disabled)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


def status_for(exc_type: type[BaseException] | None) -> str:
    """MLflow status of a run whose block ended with ``exc_type``: FINISHED (none), KILLED (interrupted: a
    KeyboardInterrupt, i.e. Ctrl-C / SIGINT, or a SystemExit), else FAILED."""
    if exc_type is None:
        return FINISHED
    return KILLED if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else FAILED


class NullTracker:
    """A Tracker that writes nothing anywhere; what it was given stays inspectable in memory."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[str, float, int | None]] = []
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.extend((k, float(v), step) for k, v in metrics.items())

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_image(self, image: np.ndarray, name: str) -> None:
        self.artifacts.append((Path(name), "images"))

    def close(self, status: str = "FINISHED") -> None:
        """Nothing to close."""

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close(status_for(exc_type))

    def final_metrics(self) -> dict[str, float]:
        """The last value logged for each metric key."""
        return {k: v for k, v, _ in self.metrics}
