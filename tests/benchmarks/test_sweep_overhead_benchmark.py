"""benchmarks/sweep_overhead.py (issue 15): the functions it times exist, its ledger counts nested calls once,
and its accounting and report add up (the sweep itself: run the script)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time

import pytest

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sweep_overhead_benchmark",
                                                  REPO_ROOT / "benchmarks" / "sweep_overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_instrumented_function_exists(bench):
    for where, name, category in bench.INSTRUMENTED:
        module_name, _, class_name = where.partition(":")
        owner = importlib.import_module(module_name)
        owner = getattr(owner, class_name) if class_name else owner
        assert callable(getattr(owner, name)), f"{where}.{name}"
        assert category in (*bench.COMPUTE, *bench.OVERHEAD)


def test_ledger_counts_nested_time_once_and_instrumented_restores(bench):
    from puregen_dist import experiment

    ledger = bench.Ledger()
    inner = ledger.timed(lambda: time.sleep(0.05), "inner")
    outer = ledger.timed(lambda: (time.sleep(0.05), inner()), "outer")
    outer()
    assert ledger.seconds["inner"] == pytest.approx(0.05, abs=0.04)
    assert ledger.seconds["outer"] == pytest.approx(0.05, abs=0.04)
    original = experiment.natural_accuracy
    with bench.instrumented(bench.Ledger()):
        assert experiment.natural_accuracy is not original
    assert experiment.natural_accuracy is original


def raw_measurements():
    """Two trials in turn: the first starts 3 s after the trial stage, the second 3 s after the first."""
    seconds = {"training": 2.0, "evaluation": 1.0, "mlflow": 0.5, "imports": 0.25}
    records = [{"cell_id": "a", "entry": 103.0, "exit": 108.0, "wall": 5.0, "seconds": dict(seconds),
                "pid": 1},
               {"cell_id": "b", "entry": 111.0, "exit": 116.0, "wall": 5.0, "seconds": dict(seconds),
                "pid": 2}]
    runs = [{"cell_id": c, "row": "puregen_ebm", "col": "badnets", "seed": i, "poison_key": "p", "train_key": "t",
             "train_seconds": 2.5, "epoch_seconds": 2.0, "run_seconds": 4.0, "nat_acc": 0.9}
            for i, c in enumerate("ab")]
    images = {"purified_sets": [{"key": "purified-x", "rows": 10, "rows_purified": 3, "rows_reused": 7,
                                 "purify_s": 0.5}],
              "rows_purified": 3, "distinct_tuples": 3, "cells_purifying": 2, "rows_trained_on_purified": 10}
    return {"records": records, "runs": runs, "tune": {"a": 6.0}, "stages": {"trials": [100.0, 117.0]},
            "start": 90.0, "ray_start_s": 1.0, "sweep_wall_s": 27.0, "trials": 2, "failed": [], "images": images}


def test_overhead_is_the_trial_wall_time_less_its_compute(bench):
    args = argparse.Namespace(epochs=3, steps=20, seeds=2, cpus=2, reuse_actors=False, device="cpu")
    result = bench.summarise(args, raw_measurements())
    first, second = result["rows"]
    assert first["seconds"]["scheduling"] == pytest.approx(3.0)  # trial stage began at 100, entry at 103
    assert second["seconds"]["scheduling"] == pytest.approx(3.0)  # previous exit 108, entry at 111
    assert first["wall"] == pytest.approx(8.0) and first["overhead"] == pytest.approx(5.0)
    assert first["seconds"]["other"] == pytest.approx(5.0 - 2.0 - 1.0 - 0.5 - 0.25)
    assert result["overhead_share"] == pytest.approx(10 / 16) and result["images_match"]
    text = bench.markdown(result)
    assert text.startswith("## Sweep overhead (issue 15)") and "3 images purified, 3 distinct tuples: match" in text
