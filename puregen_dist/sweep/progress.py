"""Progress of a sweep's Ray stages for :mod:`puregen_dist.console`, and Ray's own terminal output moved out
of the way: Ray Tune's trial tables and Ray Data's progress bars and per-operator progress logs.

- Trials: :class:`TrialProgress`, a Tune callback on the driver, counts finished trials and the epochs they
  reported (``tune.report(..., epoch=e)``) into the bar of :func:`report_trials`.
- Purification: :func:`report_rows` registers :class:`RowsCallback` on Ray Data's context, so that the rows
  reaching the last operator of each dataset executed on the driver (the Parquet writer) move a bar.
- :func:`quiet_ray_output`: no Tune tables, no Ray Data bars on a terminal (Ray Data logs its progress instead
  when stdout is not a terminal, to the ``ray.data`` logger: see :data:`RAY_LOGGERS`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.tune import Callback

from puregen_dist.console import Progress

RAY_LOGGERS = ("", "ray", "ray.data", "mlflow")
"""Loggers with their own console handler during a sweep (the root one covers ``puregen_dist``): what
:func:`puregen_dist.console.logs_to_file` moves to the sweep's log file."""

RowsSink = Callable[[int], None]
_rows_sink: RowsSink | None = None
"""Where :class:`RowsCallback` reports (set by :func:`report_rows`, on the driver only)."""


_trial_bar: Progress | None = None
"""Where :class:`TrialProgress` reports (set by :func:`report_trials`, on the driver only)."""


class TrialProgress(Callback):
    """Moves the bar of :func:`report_trials` to the number of finished trials, with the epochs reported so far
    (of ``total_epochs``) and the failed trials as detail, counted from Tune's trial list at every step. Counting
    from the list (not from events) and reaching the bar through the module keeps a restored experiment's
    progress right: Tune unpickles this callback without a bar, and the trials that finished before the
    interruption fire no events."""

    def __init__(self, total_epochs: int) -> None:
        self.total_epochs = total_epochs

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        bar = _trial_bar
        if bar is None:
            return
        finished = sum(trial.status == "TERMINATED" for trial in trials)
        failed = sum(trial.status == "ERROR" for trial in trials)
        epochs = sum(int((trial.last_result or {}).get("epoch", 0) or 0) for trial in trials)
        detail = f"{epochs}/{self.total_epochs} epochs" + (f", {failed} failed" if failed else "")
        if (finished + failed, detail) != (bar.done, bar.detail):
            bar.update(finished + failed, detail)
        else:
            bar.tick()


@contextmanager
def report_trials(bar: Progress) -> Iterator[Progress]:
    """Within the block, :class:`TrialProgress` callbacks (new or restored) move ``bar``; closed on exit."""
    global _trial_bar
    _trial_bar = bar
    try:
        with bar:
            yield bar
    finally:
        _trial_bar = None


class RowsCallback(ExecutionCallback):
    """Ray Data execution callback (instantiated by the planner, on the driver): reports the rows received by
    the dataset's last operator to the sink of :func:`report_rows`. Reads executor internals of Ray 2.60: when
    they change, the bar just moves once per finished set."""

    def on_execution_step(self, executor: Any) -> None:
        if _rows_sink is None:
            return
        try:
            last = list(executor._topology)[-1]
            rows = int(last.metrics.num_row_inputs_received)
        except (AttributeError, IndexError, TypeError):
            return
        _rows_sink(rows)


@contextmanager
def report_rows(sink: RowsSink) -> Iterator[None]:
    """Within the block, datasets created and executed on the driver call ``sink(rows)`` as rows arrive."""
    import ray.data

    global _rows_sink
    classes = ray.data.DataContext.get_current().custom_execution_callback_classes
    classes.append(RowsCallback)
    _rows_sink = sink
    try:
        yield
    finally:
        _rows_sink = None
        classes.remove(RowsCallback)


@contextmanager
def quiet_ray_output() -> Iterator[None]:
    """Ray Tune prints no tables (the legacy output engine with ``verbose=0`` prints nothing; the new one
    still prints the experiment header); Ray Data draws no bars of its own on a terminal (its logged
    progress, used when stdout is not a terminal, goes through the ``ray.data`` logger). Restored on exit."""
    import ray.data
    from ray.util.debug import log_once

    context = ray.data.DataContext.get_current()
    saved_env, saved_bars = os.environ.get("RAY_AIR_NEW_OUTPUT"), context.enable_progress_bars
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if sys.stdout.isatty():
        context.enable_progress_bars = False
        log_once("ray_data_progress_manager_disabled")  # consumed: Ray Data's "bars disabled" warning
    try:
        yield
    finally:
        context.enable_progress_bars = saved_bars
        if saved_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved_env


def configure_ray_loggers() -> tuple[str, ...]:
    """Import Ray Data and MLflow (each configures its loggers on import: later imports would replace what
    :func:`puregen_dist.console.logs_to_file` set up); returns :data:`RAY_LOGGERS`."""
    import mlflow  # noqa: F401
    import ray.data  # noqa: F401

    return RAY_LOGGERS
