"""The sweep's stage progress: trials (a Tune callback), purified rows (a bar that never runs backwards)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

from puregen_dist.console import Progress
from puregen_dist.sweep.progress import TrialProgress, report_trials
from puregen_dist.sweep.runner import _RowsOfSet


def _trial(status: str, epoch: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(status=status, last_result={} if epoch is None else {"epoch": epoch})


def test_trial_progress_counts_finished_and_failed_trials_and_epochs_from_the_trial_list():
    trials = [_trial("TERMINATED", 2), _trial("RUNNING", 1), _trial("ERROR", 1), _trial("PENDING"),
              SimpleNamespace(status="TERMINATED", last_result=None)]  # finished before a restore: no result here
    with report_trials(Progress("trials", 5, "finished", style="off")) as bar:
        TrialProgress(total_epochs=10).on_step_end(0, trials)
        assert bar.done == 3 and bar.detail == "4/10 epochs, 1 failed"


def test_a_restored_trial_progress_reports_to_the_current_bar():
    restored = pickle.loads(pickle.dumps(TrialProgress(total_epochs=2)))
    restored.on_step_end(0, [_trial("TERMINATED", 2)])  # no bar outside report_trials: nothing shown, no error
    with report_trials(Progress("trials", 1, "finished", style="off")) as bar:
        restored.on_step_end(0, [_trial("TERMINATED", 2)])
    assert bar.done == 1 and bar.detail == "2/2 epochs"


def test_rows_of_a_set_stay_within_the_set_and_never_go_back():
    bar = Progress("purified sets", 300, "rows", style="off")
    bar.update(100)
    rows = _RowsOfSet(bar, offset=100, rows=100, detail="set 2/3")
    rows(60)
    rows(250)  # PureGen-Filt's second pass, or a miscount: capped at the set
    rows(10)
    assert bar.done == 200 and bar.detail == "set 2/3"
