"""The sweep's stage progress: trials (a Tune callback), purified rows (a bar that never runs backwards)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

from puregen_dist.console import Progress
from puregen_dist.sweep.progress import TrialProgress
from puregen_dist.sweep.runner import _RowsOfSet


def test_trial_progress_counts_finished_trials_and_epochs():
    bar = Progress("trials", 3, "finished", style="off")
    callback = TrialProgress(bar, total_epochs=6)
    a, b, c = (SimpleNamespace(trial_id=name) for name in "abc")
    for trial, epoch in ((a, 1), (a, 2), (b, 1), (b, 1)):  # b restarted after a failure: no double count
        callback.on_trial_result(0, [], trial, {"epoch": epoch})
    callback.on_trial_result(0, [], c, {"already_finished": 1.0})
    callback.on_trial_complete(0, [], a)
    callback.on_trial_error(0, [], b)
    assert bar.done == 2 and bar.detail == "3/6 epochs, 1 failed"


def test_trial_progress_pickles_without_its_bar():
    callback = TrialProgress(Progress("trials", 1, "finished", style="off"), total_epochs=1)
    restored = pickle.loads(pickle.dumps(callback))
    assert restored.progress is None and restored.total_epochs == 1
    restored.on_trial_complete(0, [], SimpleNamespace(trial_id="a"))  # no bar: nothing to show, no error


def test_rows_of_a_set_stay_within_the_set_and_never_go_back():
    bar = Progress("purified sets", 300, "rows", style="off")
    bar.update(100)
    rows = _RowsOfSet(bar, offset=100, rows=100, detail="set 2/3")
    rows(60)
    rows(250)  # PureGen-Filt's second pass, or a miscount: capped at the set
    rows(10)
    assert bar.done == 200 and bar.detail == "set 2/3"
