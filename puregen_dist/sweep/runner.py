"""``puregen-dist sweep``: plan, build the missing artifacts stage by stage, run the trials with Ray Tune,
record everything in MLflow (a parent run per invocation, a child run per trial) and print the report.

Resume: every stage is cached by content key in the store, and a cell with a finished MLflow child run is not
run again, so re-running the same command after a crash, a kill or a node loss finishes only what is missing.
Within one plan, an interrupted Tune experiment is restored (``Tuner.restore``) when its state exists and holds
the marker this runner wrote when it started it (:data:`TUNE_MARKER`): an unknown directory is never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from puregen_dist.config.errors import UserInputError
from puregen_dist.console import Progress, ProgressFactory, no_progress
from puregen_dist.pipeline.purify import ensure_ray, resolve_path
from puregen_dist.pipeline.reference import import_reference
from puregen_dist.pipeline.stages import (
    StageResult,
    build_model_artifact,
    build_poison_artifact,
    purify_stage,
    rows_to_purify,
    submit_task,
    task_result,
)
from puregen_dist.pipeline.store import ArtifactStore, artifact_key
from puregen_dist.sweep.floors import cell_runs, log_floors
from puregen_dist.sweep.locations import check_sweep_locations, in_ray_job
from puregen_dist.sweep.plan import ArtifactPlan, SweepPlan, format_plan, plan_sweep
from puregen_dist.sweep.spec import Sweep
from puregen_dist.sweep.trial import close_orphaned_runs, run_trial, trial_spec
from puregen_dist.tracking.names import Tag
from puregen_dist.tracking.reader import finished_cells
from puregen_dist.tracking.redaction import browse_hint

log = logging.getLogger(__name__)

Trainable = Callable[[dict[str, Any]], None]
REVISION_ENV = "PUREGEN_GIT_REVISION"
"""The code revision of a Ray job, passed in by the submitter."""
TICK_S = 5.0
"""Seconds between two looks at running Ray tasks (progress clocks, periodic progress lines)."""


@dataclass
class SweepOutcome:
    """What one invocation did."""

    plan: SweepPlan
    parent_run_id: str | None
    tracking_uri: str
    trials_run: int
    trials_failed: list[str]
    report_dir: Path | None
    report_markdown: str


def tracking_uri_of(sweep: Sweep) -> str:
    """The absolute MLflow URI of the sweep (``base.tracking.uri``, $MLFLOW_TRACKING_URI, else a sqlite file
    in ``base.output_dir``), resolved on the driver so that every trial writes to the same database."""
    from puregen_dist.tracking.mlflow_tracker import resolve_tracking_uri

    base = sweep.cells[0].config
    return resolve_tracking_uri(base.tracking.uri, base.output_dir)


def connect(sweep: Sweep) -> str:
    """Start or join Ray, then check the sweep's locations (in a Ray job or on several nodes: shared ones
    only, :func:`~puregen_dist.sweep.locations.check_sweep_locations`); the tracking URI. Writes nothing but
    the probe's markers, removed again."""
    uri = tracking_uri_of(sweep)
    ensure_ray(sweep.settings.address)
    check_sweep_locations(sweep, uri)
    return uri


def dry_run(sweep: Sweep) -> str:
    """The plan as text (artifacts to build and cached, trials to run and finished). Only reads the store
    and the MLflow database: nothing is created, an absent store reads as empty."""
    store = ArtifactStore(sweep.settings.store, create=False)
    plan = plan_sweep(sweep, store)
    return format_plan(plan, finished_cells(tracking_uri_of(sweep), sweep.name))  # never creates the database


def run_sweep(sweep: Sweep, *, trainable: Trainable | None = None, echo: Callable[[str], None] = print,
              progress: ProgressFactory = no_progress, report_all: bool = False,
              connected: bool = False) -> SweepOutcome:
    """Run a whole sweep (see the module docstring). ``trainable`` replaces :func:`run_trial` (tests wrap it
    to inject failures); ``echo`` prints the plan and the report, ``progress`` shows each stage (details go to
    the log). The report covers this invocation's cells, or (``report_all``) every cell of the experiment.
    ``connected``: the caller already ran :func:`connect`."""
    from puregen_dist.tracking.base import status_for
    from puregen_dist.tracking.mlflow_tracker import MLflowTracker, ensure_experiment

    uri = connect(sweep) if not connected else tracking_uri_of(sweep)
    store = ArtifactStore(sweep.settings.store)
    ensure_experiment(uri, sweep.name)  # database and experiment exist before any trial starts
    plan = plan_sweep(sweep, store)
    finished = finished_cells(uri, sweep.name)
    pending_ids = [t.cell.cell_id for t in plan.trials if t.cell.cell_id not in finished]
    if pending_ids:  # an unknown Tune directory is refused now, before anything is built
        restorable_tune_experiment(sweep, pending_ids)
    echo(format_plan(plan, finished))
    parent = MLflowTracker(uri, sweep.name, run_name=f"{sweep.name} sweep {time.strftime('%Y-%m-%d %H:%M:%S')}",
                           tags=_parent_tags(sweep, plan))
    try:
        _log_parent(parent, sweep, plan, finished)
        build_stages(plan, store, uri, progress)
        pending = [t for t in plan.trials if t.cell.cell_id not in finished]
        specs = [trial_spec(t, sweep=sweep.name, store_uri=store.uri, tracking_uri=uri,
                            parent_run_id=parent.run_id) for t in pending]
        failed = run_trials(sweep, plan, specs, trainable or run_trial, echo, progress) if specs else []
        orphans = close_orphaned_runs(uri, sweep.name, parent.run_id) if specs else []
        if orphans:
            log.warning("ended %d trial run(s) left RUNNING by dead attempts as KILLED: %s", len(orphans),
                        ", ".join(orphans))
        log_floors(plan.trials, store, uri, cell_runs(uri, sweep.name))
        report_dir, markdown = _report(sweep, uri, parent, echo,
                                       None if report_all else {t.cell.cell_id for t in plan.trials})
    except BaseException as exc:
        parent.close(status_for(type(exc)))  # KILLED on Ctrl-C, else FAILED
        raise
    parent.log_metrics({"trials_run": len(specs), "trials_failed": len(failed)})
    parent.close("FINISHED" if not failed else "FAILED")
    echo(browse_hint(uri, sweep.name))
    return SweepOutcome(plan, parent.run_id, uri, len(specs), failed, report_dir, markdown)


# ------------------------------------------------------------------------------------------ parent run


def _parent_tags(sweep: Sweep, plan: SweepPlan) -> dict[str, str]:
    import ray

    tags = {Tag.SWEEP: sweep.name, "sweep_file": sweep.source, Tag.ROLE: "sweep",
            "git_revision": git_revision(), "cells": str(len(plan.trials))}
    if in_ray_job():
        tags["ray_job_id"] = ray.get_runtime_context().get_job_id()
    return tags


def _log_parent(parent: Any, sweep: Sweep, plan: SweepPlan, finished: set[str]) -> None:
    parent.log_params({"sweep_file": sweep.source, "cells": len(plan.trials),
                       "already_finished": len(set(t.cell.cell_id for t in plan.trials) & finished),
                       **{f"settings.{k}": v for k, v in _flat_settings(sweep).items()}})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sweep.yaml").write_text(yaml.safe_dump(sweep.raw, sort_keys=False))
        (Path(tmp) / "plan.json").write_text(json.dumps(plan.as_dict(), indent=2))
        (Path(tmp) / "plan.txt").write_text(format_plan(plan, finished))
        for name in ("sweep.yaml", "plan.json", "plan.txt"):
            parent.log_artifact(Path(tmp) / name)


def _flat_settings(sweep: Sweep) -> dict[str, Any]:
    from puregen_dist.config.loading import flatten

    return flatten(sweep.settings)


def git_revision() -> str:
    """``$PUREGEN_GIT_REVISION`` when the submitter passed it (a Ray job's working directory has no ``.git``:
    ``cluster/submit.sh`` sets it), else the checkout's commit (``-dirty`` when modified), else ``unknown``."""
    if os.environ.get(REVISION_ENV):
        return os.environ[REVISION_ENV]
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        if in_ray_job():
            log.warning("git_revision is 'unknown': Ray jobs upload no .git; submit with cluster/submit.sh or "
                        "set %s=$(git rev-parse HEAD) in the job's env_vars", REVISION_ENV)
        return "unknown"
    return rev + ("-dirty" if dirty else "")


# ------------------------------------------------------------------------------------------ stages


def build_stages(plan: SweepPlan, store: ArtifactStore, tracking_uri: str,
                 progress: ProgressFactory = no_progress) -> None:
    """Materialise the missing artifacts: models and poison sets as concurrent Ray tasks (resources from their
    configs), then purified sets one after another through Ray Data actor pools; one ``progress`` bar per
    stage. Model training runs log to the sweep's MLflow database (their experiments are created here first:
    no creation race)."""
    from puregen_dist.tracking.mlflow_tracker import ensure_experiment

    output_dir = str(Path(plan.sweep.cells[0].config.output_dir).absolute())
    for artifact in plan.models:
        if not artifact.cached and artifact.reference is not None:
            import_reference(artifact.reference, store)
            log.info("%s: imported the shipped reference %s", artifact.key, artifact.reference.name)
    models = [dataclasses.replace(a, job=dataclasses.replace(
        a.job, tracking=dataclasses.replace(a.job.tracking, uri=tracking_uri))) for a in plan.models
        if not a.cached and a.reference is None]
    for artifact in models:
        if artifact.job.tracking.enabled:
            ensure_experiment(tracking_uri, artifact.job.tracking.experiment)
    if models:
        _run_tasks(models, progress("models", len(models), "trained"),
                   lambda a: (build_model_artifact, a.job.resources, (a.job, store.uri, output_dir)))
    poisons = [a for a in plan.poisons if not a.cached]
    if poisons:
        _run_tasks(poisons, progress("poison sets", len(poisons), "crafted"),
                   lambda a: (build_poison_artifact, a.job.pipeline.craft, (a.job, store.uri)))
    todo = [a for a in plan.purified if not a.cached]
    if todo:
        _purify_all(todo, store, progress)


def _run_tasks(artifacts: list[ArtifactPlan], bar: Progress,
               task_of: Callable[[ArtifactPlan], tuple[Callable[..., Any], Any, tuple]]) -> None:
    """Submit one Ray task per artifact (all at once), then wait for all, moving ``bar`` as they finish; a
    task's UserInputError is re-raised as itself."""
    import ray

    with bar:
        futures = {}
        for artifact in artifacts:
            fn, resources, args = task_of(artifact)
            futures[submit_task(fn, resources, *args)] = artifact
            log.info("building %s %s (%s) as a Ray task", artifact.stage, artifact.key, artifact.label)
        start, pending = time.perf_counter(), list(futures)
        while pending:  # report in completion order; wake up now and then to keep the bar's clock going
            done, pending = ray.wait(pending, num_returns=1, timeout=TICK_S)
            for ref in done:
                task_result(ref)
                log.info("%s ready (%.1fs)", futures[ref].key, time.perf_counter() - start)
                bar.update(len(futures) - len(pending), f"last: {futures[ref].label}" if pending else "")
            bar.tick()


def _purify_all(todo: list[ArtifactPlan], store: ArtifactStore, progress: ProgressFactory) -> None:
    """The purified sets ``todo``, one after another through Ray Data; the bar counts rows written (live when
    Ray Data reports them, else per finished set)."""
    from puregen_dist.sweep.progress import report_rows

    rows = {a.key: rows_to_purify(a.job, a.source, store) for a in todo}
    with progress("purified sets", sum(rows.values()), "rows") as bar:
        written = 0
        for index, artifact in enumerate(todo):
            start, detail = time.perf_counter(), f"set {index + 1}/{len(todo)}: {artifact.label}"
            log.info("purifying %s through Ray Data", artifact.label)
            with report_rows(_RowsOfSet(bar, written, rows[artifact.key], detail)):
                result: StageResult = purify_stage(artifact.job, artifact.source, store)
            written += rows[artifact.key]
            bar.update(written, detail if index + 1 < len(todo) else f"{len(todo)} sets")
            log.info("%s %s in %.1fs", result.key, "built" if result.built else "cached",
                     time.perf_counter() - start)


@dataclass
class _RowsOfSet:
    """Rows of one purified set as a position of the stage's bar (never beyond the set, never backwards: a
    PureGen-Filt set streams every row twice)."""

    bar: Progress
    offset: int
    rows: int
    detail: str

    def __call__(self, rows: int) -> None:
        position = self.offset + min(rows, self.rows)
        if position > self.bar.done:
            self.bar.update(position, self.detail)
        else:
            self.bar.tick()


# ------------------------------------------------------------------------------------------ trials


def run_trials(sweep: Sweep, plan: SweepPlan, specs: list[dict[str, Any]], trainable: Trainable,
               echo: Callable[[str], None], progress: ProgressFactory = no_progress) -> list[str]:
    """Run the pending cells as Ray Tune trials (FIFO, every cell to completion, ``max_failures`` retries);
    returns the cell ids whose trial finally failed. An interrupted run of the same pending set is restored."""
    from ray import tune

    from puregen_dist.sweep.progress import TrialProgress, report_trials

    settings = sweep.settings
    # Trials run in the job's working directory, not in their trial directory, so that relative paths in the
    # cells (data.root, checkpoint directories) mean what they mean to the driver (and to `ray job submit
    # --working-dir`). Tune propagates this variable from the driver to the trial processes.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    cell_ids = [spec["cell_id"] for spec in specs]
    name, path = tune_experiment(sweep, cell_ids)
    storage = path.rsplit("/", 1)[0]
    wrapped = tune.with_resources(trainable, {"cpu": settings.trial_cpus, "gpu": settings.trial_gpus,
                                              **settings.trial_resources})
    bar = progress("trials", len(specs), "finished")
    epochs = sum(int(spec["config"]["classifier"]["epochs"]) for spec in specs)
    if restorable_tune_experiment(sweep, cell_ids):
        echo(f"restoring the interrupted Tune experiment {path}")
        tuner = tune.Tuner.restore(path, wrapped, resume_unfinished=True, restart_errored=True)
    else:
        _write_text(f"{path}/{TUNE_MARKER}", json.dumps(tune_marker(sweep, cell_ids), indent=1) + "\n")
        tuner = tune.Tuner(
            wrapped, param_space={"trial": tune.grid_search(specs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=settings.max_concurrent_trials or None,
                                        reuse_actors=settings.reuse_actors, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      callbacks=[TrialProgress(epochs)],
                                      failure_config=tune.FailureConfig(max_failures=settings.max_failures)))
    log.info("running %d trial(s) with Ray Tune (%s CPU, %s GPU each; storage %s)", len(specs),
             settings.trial_cpus, settings.trial_gpus, path)
    with report_trials(bar):
        results = tuner.fit()
    failed = [r.config["trial"]["cell_id"] for r in results if r.error is not None]
    for result in results:
        if result.error is not None:
            echo(f"  FAILED cell {result.config['trial']['cell_id']}: {str(result.error).splitlines()[0][:300]}")
    return failed


TUNE_MARKER = "puregen-tune.json"
"""Written by :func:`run_trials` into a Tune experiment directory it starts: :func:`tune_marker`. Only a directory
holding it (for the same sweep and cells) is ever restored: ``Tuner.restore`` unpickles the directory's files."""


def tune_experiment(sweep: Sweep, cell_ids: list[str]) -> tuple[str, str]:
    """(name, path) of the Tune experiment that runs ``cell_ids`` (the storage directory is created)."""
    name = f"{sweep.name}-{artifact_key('trials', {'cells': cell_ids})[7:]}"
    return name, f"{_storage_path(sweep.settings.storage).rstrip('/')}/{name}"


def tune_marker(sweep: Sweep, cell_ids: list[str]) -> dict[str, Any]:
    """What :data:`TUNE_MARKER` holds: who started the experiment, for which sweep and which cells."""
    return {"created_by": "puregen-dist", "format": 1, "sweep": sweep.name,
            "tune_experiment": tune_experiment(sweep, cell_ids)[0],
            "cells": artifact_key("trials", {"cells": cell_ids})}


def restorable_tune_experiment(sweep: Sweep, cell_ids: list[str]) -> bool:
    """Whether the Tune experiment of ``cell_ids`` was interrupted and can be restored: True when its directory
    holds Tune's state and this project's :data:`TUNE_MARKER` for the same sweep and cells; False when it holds
    no Tune state (a fresh start). Nothing is unpickled here.

    Raises:
        UserInputError: Tune state without the marker, or with another plan's (a directory this project did
            not start: restoring it would unpickle whatever is there).
    """
    from ray import tune

    _, path = tune_experiment(sweep, cell_ids)
    if not tune.Tuner.can_restore(path):
        return False
    try:
        found = json.loads(_read_text(f"{path}/{TUNE_MARKER}"))
    except (OSError, ValueError):
        found = None
    if found != tune_marker(sweep, cell_ids):
        why = f"no {TUNE_MARKER}" if found is None else f"its {TUNE_MARKER} is for another sweep or set of cells"
        raise UserInputError(
            f"{path}: a Ray Tune experiment that puregen-dist did not start for these cells of sweep "
            f"{sweep.name!r} ({why}); it is not restored, because restoring unpickles its files. Move it away "
            "and re-run (cells with a finished MLflow run are not run again)")
    return True


def _read_text(path: str) -> str:
    filesystem, fs_path = resolve_path(path)
    with filesystem.open_input_stream(fs_path) as stream:
        return stream.read().decode("utf-8")


def _write_text(path: str, text: str) -> None:
    """``text`` into ``path``, a local file (atomically) or a ``pyarrow.fs`` URI."""
    if "://" not in path:
        from puregen_dist.atomic import atomic_write_text

        atomic_write_text(Path(path), text)
        return
    filesystem, fs_path = resolve_path(path)
    filesystem.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(fs_path) as stream:
        stream.write(text.encode("utf-8"))


def _trial_name(trial: Any) -> str:
    spec = trial.config["trial"]
    return f"cell{spec['index']:04d}_{spec['cell_id'][5:13]}"


def _storage_path(storage: str) -> str:
    """An absolute path (created) or a URI, as Tune requires."""
    if "://" in storage:
        resolve_path(storage)  # an unusable URI is a clear error now
        return storage
    path = Path(storage).absolute()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


# ------------------------------------------------------------------------------------------ report


def _report(sweep: Sweep, uri: str, parent: Any, echo: Callable[[str], None],
            cells: set[str] | None) -> tuple[Path | None, str]:
    """Build the report from the latest finished child run of each of ``cells`` (None: every cell of the
    sweep's experiment), log it to the parent run, and print the table with what it covers."""
    from puregen_dist.sweep.report import render_report

    out_dir = Path(sweep.cells[0].config.output_dir).absolute() / "report"
    try:
        markdown, paths = render_report(uri, sweep.name, out_dir, cells=cells)
    except UserInputError as exc:
        echo(f"no report: {exc}")
        return None, ""
    for path in paths.values():
        parent.log_artifact(Path(path), "report")
    echo(markdown)
    if cells is None:
        echo(f"report: {out_dir} (every finished cell of experiment {sweep.name!r})")
    else:
        cover = f"the {len(cells)} cells" if len(cells) != 1 else "the one cell"
        echo(f"report: {out_dir} ({cover} of {sweep.source}; `puregen-dist report {sweep.name}` or `sweep "
             "--report-all` covers every finished cell of the experiment)")
    return out_dir, markdown
