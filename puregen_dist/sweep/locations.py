"""Where a sweep reads and writes, checked before any work when it runs as a Ray job or on more than one node.

On a laptop every relative path resolves against the working directory and every process sees the same disk.
Under ``ray job submit --working-dir .`` the working directory is Ray's working-dir cache on the head
(``<ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_*``), which Ray deletes and re-creates
when a node unpacks the same package; and with several nodes a path on one node's disk is not the same directory
on another. So, inside a job or on a multi-node cluster, the artifact store, the Tune storage, the output
directory, the sqlite tracking database and the data roots must be URIs or absolute paths outside Ray's temp
directory that every node sees (checked by a zero-CPU probe task per node). ``PUREGEN_ROOT`` supplies all the
output locations at once (:func:`puregen_dist.sweep.spec.rebase_on_root`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puregen_dist.config.errors import UserInputError
from puregen_dist.config.schema import DataConfig
from puregen_dist.sweep.spec import ROOT_ENV, Sweep

log = logging.getLogger(__name__)

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for a submitted job's entrypoint (and only there)."""
PROBE_TIMEOUT_S = 120.0
MARKER_PREFIX = ".puregen-shared-check-"


@dataclass(frozen=True)
class Location:
    """One place a sweep uses: the setting that names it, its path or URI, and whether it is written
    (an output location may not exist yet; an input must)."""

    key: str
    path: str
    output: bool = True
    shared: bool = True
    """Whether every node must see it (checked with several nodes); inside Ray's temp dir is refused either way."""

    @property
    def is_uri(self) -> bool:
        return "://" in self.path

    @property
    def absolute(self) -> Path:
        return Path(self.path).absolute()


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a job submitted with ``ray job submit``."""
    return JOB_ENV in os.environ


def sweep_locations(sweep: Sweep, tracking_uri: str) -> list[Location]:
    """The store, the Tune storage, the output directory, the sqlite database (when the tracking URI is one)
    and every data root of the cells and models, each once. The output directory must be shared only when it
    holds the sqlite database: with a tracking server it holds the driver's log and a copy of the report."""
    base = sweep.cells[0].config
    sqlite = tracking_uri.startswith("sqlite:///")
    found = [Location("settings.store", sweep.settings.store), Location("settings.storage", sweep.settings.storage),
             Location("base.output_dir", base.output_dir, shared=sqlite)]  # else only the driver's logs and report
    if sqlite:
        found.append(Location("base.tracking.uri (the sqlite database)", tracking_uri.removeprefix("sqlite:///")))
    for cell in sweep.cells:
        found += [Location(f"cell {cell.index}: {key}", root, output=False) for key, root in _data_roots(cell.config)]
    for name, job in sweep.models.items():
        found += [Location(f"models.{name}.{key}", root, output=False) for key, root in _data_roots(job)]
    unique: dict[str, Location] = {}
    for location in found:
        unique.setdefault(location.path, location)
    return list(unique.values())


def _data_roots(config: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, root) of every DataConfig with a root inside the config dataclass ``config``."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, DataConfig):
            if value.root is not None:
                yield f"{prefix}{field.name}.root", value.root
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _data_roots(value, f"{prefix}{field.name}.")


def inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` is ``directory`` or below it (both resolved: symlinks cannot hide it)."""
    resolved, parent = path.resolve(), directory.resolve()
    return resolved == parent or parent in resolved.parents


def in_ray_temp(locations: list[Location], ray_temp_dir: Path) -> list[Location]:
    """The local ``locations`` inside Ray's temp directory (the working-dir cache and the session dirs)."""
    return [loc for loc in locations if not loc.is_uri and inside(loc.absolute, ray_temp_dir)]


def check_sweep_locations(sweep: Sweep, tracking_uri: str) -> None:
    """Refuse (UserInputError, before any work) local locations that a Ray job or a multi-node cluster would
    lose or not share; a no-op for a single-node run outside a job. Ray must be initialised."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    job = in_ray_job()
    if not job and len(nodes) < 2:
        return
    where = "as a Ray job" if job else f"on a Ray cluster of {len(nodes)} nodes"
    locations = sweep_locations(sweep, tracking_uri)
    cached = in_ray_temp(locations, Path(ray.get_runtime_context().get_temp_dir()))
    if cached:
        raise UserInputError(_refusal(where, [(loc, f"{loc.absolute} is inside Ray's temp directory (the job's "
                                                    "working-dir cache, deleted and re-created by Ray)")
                                              for loc in cached]))
    if len(nodes) > 1:
        _check_visible_from_every_node([loc for loc in locations if loc.shared and not loc.is_uri], nodes, where)


def _refusal(where: str, problems: list[tuple[Location, str]]) -> str:
    lines = "; ".join(f"{loc.key}: {why}" for loc, why in problems)
    return (f"this sweep runs {where}, where every node must see the same store, Tune storage, output "
            f"directory, sqlite database and data: {lines}. Give shared locations: set {ROOT_ENV}=/shared/dir "
            "(an absolute directory every node mounts: the store, Tune storage and output directory, and with them "
            "the sqlite database, resolve under it), or --set settings.store=s3://... settings.storage=s3://... "
            "base.output_dir=/shared/... base.tracking.uri=http://<mlflow-server>:5000, and absolute shared data "
            "roots (e.g. --set base.data.root=/shared/datasets/...). docs/cluster.md has the steps.")


def _check_visible_from_every_node(locations: list[Location], nodes: list[dict[str, Any]], where: str) -> None:
    """A marker file in each output location (created if absent) and each input path must be visible from
    a zero-CPU probe task pinned to every alive node; else UserInputError naming the location and the node.
    Markers, and directories made only for them, are removed either way."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    created: list[Path] = []
    markers: list[Path] = []
    try:
        probes = []
        for loc in locations:
            if loc.output:
                markers.append(_marker(loc, token, created))
            probes.append((loc.key, str(markers[-1] if loc.output else loc.absolute)))
        refs = {ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))(
            _missing_paths).remote(probes): node for node in nodes}
        start = time.perf_counter()
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        log.info("shared-location probe: %d locations on %d nodes in %.1f s", len(probes), len(nodes),
                 time.perf_counter() - start)
        for ref in late:
            log.warning("node %s did not answer the shared-location probe in %.0f s; its view of the store and "
                        "outputs is not checked", refs[ref]["NodeManagerAddress"], PROBE_TIMEOUT_S)
        by_key = {loc.key: loc for loc in locations}
        problems = [(by_key[key], f"{by_key[key].absolute} is not visible from node "
                                  f"{refs[ref]['NodeManagerAddress']} ({refs[ref]['NodeID'][:12]}): a node-local path")
                    for ref in ready for key in ray.get(ref)]
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
        for directory in created:  # outermost first; kept if something else wrote into it meanwhile
            if directory.exists() and not any(p.is_file() for p in directory.rglob("*")):
                shutil.rmtree(directory, ignore_errors=True)
    if problems:
        raise UserInputError(_refusal(where, problems[:4]))


def _marker(location: Location, token: str, created: list[Path]) -> Path:
    """A marker file in the directory of ``location`` (the database's parent for a database file); the
    directories made for it are appended to ``created``, outermost first."""
    directory = location.absolute.parent if location.absolute.suffix == ".db" else location.absolute
    created.extend(reversed([d for d in (directory, *directory.parents) if not d.exists()]))
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f"{MARKER_PREFIX}{token}"
    marker.write_text("puregen-dist checks that every node sees this directory; safe to delete\n")
    return marker


def _missing_paths(probes: list[tuple[str, str]]) -> list[str]:
    """On one node: the keys of ``probes`` whose path does not exist there."""
    return [key for key, path in probes if not os.path.exists(path)]
