"""Sweep overhead and purification dedup on a real sweep (issue 15, deliverable 5).

Runs a small ``puregen-dist sweep`` on the embedded digits data in a temporary directory (fresh artifact store,
fresh sqlite MLflow database, local Ray): attack {none, BadNets} x defense {none, PureGen-EBM} x seeds, a
small CNN for a few epochs, trials one after another. The EBM is a randomly initialised tiny SNGAN-32
checkpoint written first (purification cost, not quality, is what this measures).

Per trial, what the trial spends is split into its compute -- training (``_train_epoch``) and evaluation
(``natural_accuracy``, ``poison_success``, ``target_outcome``) -- and its overhead: scheduling (the gap
between one trial's function returning and the next one's starting: Tune bookkeeping, actor process start,
imports), artifact reads and writes, MLflow (run creation, params, tags, metrics, artifacts, the resume query),
``tune.report``, the test-set load, sample-image rendering and the rest. The split comes from timers wrapped
around those functions inside the trial process (exclusive: a nested call counts once, where it runs); it is
cross-checked against what the package records itself: the MLflow run's start/end, ``train_seconds``, the
per-epoch ``epoch_seconds``, and Tune's ``time_total_s``. Purification is a stage before the trials (a trial
reads its purified set), so a trial's compute holds none; the purified sets' own times are reported beside it.

Images purified: the sum of ``rows_purified`` over the purified sets' manifests, against the number of
distinct (image bytes, id, seed, purifier) tuples over the training sets the sweep's purifying cells start
from: the clean rows once per (seed, purifier), plus each poison set's changed rows. They must match.

    python benchmarks/sweep_overhead.py --json sweep_overhead.json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

TRAINING, EVALUATION = "training", "evaluation"
COMPUTE = (TRAINING, EVALUATION)
OVERHEAD = ("scheduling", "imports", "artifact reads", "artifact writes", "mlflow", "tune.report", "test data",
            "sample images", "plugins", "config", "ray context", "model build", "other")
IN_TRIAL = OVERHEAD[1:-1]
"""Overhead timed inside the trial function (the rest of its time is ``other``)."""

INSTRUMENTED: tuple[tuple[str, str, str], ...] = (
    ("puregen_dist.classifiers.training", "_train_epoch", TRAINING),
    ("puregen_dist.experiment", "natural_accuracy", EVALUATION),
    ("puregen_dist.experiment", "poison_success", EVALUATION),
    ("puregen_dist.experiment", "target_outcome", EVALUATION),
    ("puregen_dist.experiment", "build_model", "model build"),
    ("puregen_dist.pipeline.store:ArtifactStore", "get_imageset", "artifact reads"),
    ("puregen_dist.pipeline.store:ArtifactStore", "manifest", "artifact reads"),
    ("puregen_dist.pipeline.store:ArtifactStore", "read_bytes", "artifact reads"),
    ("puregen_dist.sweep.trial", "store_clean_model", "artifact writes"),
    ("puregen_dist.tracking.mlflow_tracker:MLflowTracker", "__init__", "mlflow"),
    ("puregen_dist.tracking.mlflow_tracker:MLflowTracker", "log_params", "mlflow"),
    ("puregen_dist.tracking.mlflow_tracker:MLflowTracker", "log_metrics", "mlflow"),
    ("puregen_dist.tracking.mlflow_tracker:MLflowTracker", "set_tags", "mlflow"),
    ("puregen_dist.tracking.mlflow_tracker:MLflowTracker", "log_artifact", "mlflow"),
    ("puregen_dist.tracking.mlflow_tracker:MLflowTracker", "log_image", "mlflow"),
    ("puregen_dist.tracking.mlflow_tracker:MLflowTracker", "close", "mlflow"),
    ("puregen_dist.sweep.trial", "finished_cells", "mlflow"),
    ("ray.tune", "report", "tune.report"),
    ("puregen_dist.sweep.trial", "load_data", "test data"),
    ("puregen_dist.sweep.trial", "log_samples", "sample images"),
    ("puregen_dist.sweep.trial", "load_plugins", "plugins"),
    ("puregen_dist.sweep.trial", "build", "config"),
    ("puregen_dist.sweep.trial", "resolve_trial_models", "config"),
    ("puregen_dist.sweep.trial", "node_tags", "ray context"),
)
"""(module[:class], attribute, category): the functions timed inside each trial process."""


# ------------------------------------------------------------------------------------------ the sweep


def tiny_ebm(directory: Path) -> str:
    """A randomly initialised SNGAN-32 EBM (nf 16, 1x16x16) checkpoint, as ``puregen-dist train-ebm`` writes."""
    import torch

    from puregen_dist.config.generative import EBMConfig
    from puregen_dist.generative.checkpoints import save_checkpoint
    from puregen_dist.generative.ebm import build_ebm

    torch.manual_seed(0)
    cfg = EBMConfig(nf=16, in_channels=1, image_size=16)
    return str(save_checkpoint(directory, build_ebm(cfg), kind="ebm", model_config=cfg.__dict__))


def sweep_dict(root: Path, ebm: str, args: argparse.Namespace) -> dict[str, Any]:
    """The sweep: digits' classifier half, {none, BadNets} x {none, PureGen-EBM} x seeds, trials in turn
    (``--device cuda``: each trial and the purifier actor get a GPU)."""
    gpus = 1 if args.device == "cuda" else 0
    return {
        "name": "overhead",
        "base": {"output_dir": str(root / "out"),
                 "data": {"dataset": "digits", "train_partitions": 2, "train_partition": 0},
                 "classifier": {"name": "small_cnn", "epochs": args.epochs, "batch_size": 64, "lr": 0.05,
                                "milestones": [args.epochs], "crop_padding": 1, "flip": False, "threads": 1},
                 "eval": {"magnifications": [1.0]}},
        "space": {"attack": {"grid": [{"name": "none"},
                                      {"name": "badnets", "target_class": 0, "budget": 0.1,
                                       "label_mode": "dirty", "trigger": "sign", "eps": 0.0627451}]},
                  "defense": {"grid": [{"name": "none"},
                                       {"name": "puregen_ebm", "ebm": ebm, "langevin": {"steps": args.steps},
                                        "batch_size": 64}]}},
        "settings": {"seeds": list(range(args.seeds)), "trial_cpus": 1, "trial_gpus": gpus, "max_concurrent_trials": 1,
                     "reuse_actors": args.reuse_actors,
                     "max_failures": 0, "storage": str(root / "tune"), "store": str(root / "store"),
                     "pipeline": {"actors": 1, "batch_size": 128, "num_cpus_per_actor": 1,
                                  "num_gpus_per_actor": gpus, "cpu_tasks": 1, "craft": {"num_cpus": 1}}},
    }


class StageClock:
    """A progress factory (``run_sweep(progress=...)``) that records when each stage's bar opens and closes."""

    def __init__(self) -> None:
        self.spans: dict[str, list[float]] = {}

    def __call__(self, label: str, total: int | None, unit: str) -> Any:
        from puregen_dist.console import Progress

        clock = self

        class Timed(Progress):
            def close(self) -> None:
                clock.spans[label][1:] = [time.time()]  # the last close
                super().close()

        self.spans[label] = [time.time()]
        return Timed(label, total, unit, style="off")


# ------------------------------------------------------------------------------------------ in the trials


class Ledger:
    """Exclusive wall time per category: time inside a timed call that another timed call nested in it
    spent is that call's, not the outer one's."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open call: [start, time spent in nested timed calls]

    def timed(self, fn: Callable[..., Any], category: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            frame = [time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.perf_counter() - frame[0]
                self.seconds[category] = self.seconds.get(category, 0.0) + spent - frame[1]
                if self._stack:
                    self._stack[-1][1] += spent

        return wrapper


@contextmanager
def instrumented(ledger: Ledger) -> Iterator[None]:
    """Within the block, the :data:`INSTRUMENTED` functions are timed into ``ledger`` (then restored)."""
    saved = []
    for where, name, category in INSTRUMENTED:
        module_name, _, class_name = where.partition(":")
        owner = importlib.import_module(module_name)
        owner = getattr(owner, class_name) if class_name else owner
        original = owner.__dict__[name] if class_name else getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, ledger.timed(original, category))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def timed_trial(out_dir: str) -> Callable[[dict[str, Any]], None]:
    """A Tune trainable: :func:`~puregen_dist.sweep.trial.run_trial` with its time split by :class:`Ledger`,
    written to ``out_dir/<cell_id>.json`` with the wall clock at entry and exit."""

    def trainable(config: dict[str, Any]) -> None:
        entry, ledger = time.time(), Ledger()
        start = time.perf_counter()
        try:
            imports = time.perf_counter()  # what a fresh worker imports for run_trial (torch, MLflow, ...)
            from puregen_dist.sweep.trial import run_trial

            for where, _, _ in INSTRUMENTED:
                importlib.import_module(where.partition(":")[0])
            ledger.seconds["imports"] = time.perf_counter() - imports
            with instrumented(ledger):
                run_trial(config)
        finally:
            record = {"cell_id": config["trial"]["cell_id"], "entry": entry, "exit": time.time(),
                      "wall": time.perf_counter() - start, "seconds": ledger.seconds, "pid": os.getpid()}
            Path(out_dir, f"{record['cell_id']}.json").write_text(json.dumps(record))

    return trainable


# ------------------------------------------------------------------------------------------ what was recorded


def child_runs(tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    """Each finished trial's MLflow run: tags, final metrics, start/end and the sum of its ``epoch_seconds``."""
    from mlflow.tracking import MlflowClient

    from puregen_dist.tracking.reader import read_runs

    frame = read_runs(tracking_uri, experiment)
    client = MlflowClient(tracking_uri)
    runs = []
    for row in frame[frame["tags.cell_id"].notna()].to_dict("records"):
        epochs = client.get_metric_history(row["run_id"], "epoch_seconds")
        runs.append({"cell_id": row["tags.cell_id"], "row": row["tags.row"], "col": row["tags.col"],
                     "seed": int(row["tags.seed"]), "poison_key": row["tags.artifact.poison"],
                     "train_key": row["tags.artifact.train"], "train_seconds": row["metrics.train_seconds"],
                     "nat_acc": row["metrics.nat_acc"],
                     "epoch_seconds": sum(m.value for m in epochs),
                     "run_seconds": (row["end_time"] - row["start_time"]).total_seconds()})
    return runs


def tune_seconds(storage: Path) -> dict[str, float]:
    """cell id -> Tune's ``time_total_s`` of the trial's last result (from the trial directories)."""
    totals = {}
    for path in storage.rglob("result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            totals[lines[-1]["config"]["trial"]["cell_id"]] = float(lines[-1]["time_total_s"])
    return totals


def trial_rows(records: list[dict[str, Any]], runs: list[dict[str, Any]], tune: dict[str, float],
               trials_start: float) -> list[dict[str, Any]]:
    """One row per trial, in the order they ran: recorded times, the ledger's split, overhead and its share.
    Scheduling is the gap since the previous trial returned (since the trial stage began, for the first): Tune's
    bookkeeping, the trial actor's creation (on a worker process Ray started ahead), the trainable's start."""
    by_cell = {run["cell_id"]: run for run in runs}
    rows, previous_exit = [], trials_start
    for record in sorted(records, key=lambda r: r["entry"]):
        run, seconds = by_cell[record["cell_id"]], dict(record["seconds"])
        seconds["scheduling"] = record["entry"] - previous_exit
        seconds["other"] = record["wall"] - sum(seconds.get(c, 0.0) for c in (*COMPUTE, *IN_TRIAL))
        previous_exit = record["exit"]
        wall = record["wall"] + seconds["scheduling"]
        overhead = wall - sum(seconds.get(c, 0.0) for c in COMPUTE)
        rows.append({"cell": f"{run['col']} / {run['row']} / seed {run['seed']}", "cell_id": record["cell_id"],
                     "wall": wall, "in_trial": record["wall"], "seconds": seconds, "overhead": overhead,
                     "overhead_share": overhead / wall, "recorded": {
                         "mlflow_run_s": run["run_seconds"], "train_seconds": run["train_seconds"],
                         "sum_epoch_seconds": run["epoch_seconds"], "tune_time_total_s": tune.get(record["cell_id"])},
                     "nat_acc": run["nat_acc"]})
    return rows


def image_counts(store_uri: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows purified (manifests) against the distinct (image, id, seed, purifier) tuples of the purifying
    cells' training sets (poison sets read from the store)."""
    from puregen_dist.pipeline.store import ArtifactStore

    store = ArtifactStore(store_uri)
    tuples: set[tuple[str, int, int, str]] = set()
    cells = [run for run in runs if run["train_key"] != run["poison_key"]]
    for poison_key in sorted({run["poison_key"] for run in cells}):
        data, _ = store.get_imageset(poison_key)
        digests = [hashlib.sha1(image.tobytes()).hexdigest() for image in data.images]
        for run in (r for r in cells if r["poison_key"] == poison_key):
            tuples.update((d, int(i), run["seed"], run["row"]) for d, i in zip(digests, data.ids, strict=True))
    purified = [m for m in store.ls() if m["kind"] == "purified"]
    sets = [{"key": m["key"], "source": _source_label(store.manifest(m["inputs"][0])), "rows": m["rows"],
             **{k: int(v) for k, v in m.get("stats", {}).items()},
             "purify_s": m["timings"].get("changed_rows_purify_s", m["timings"].get("purify_s", 0.0))}
            for m in purified]
    return {"purified_sets": sets, "rows_purified": sum(s.get("rows_purified", 0) for s in sets),
            "distinct_tuples": len(tuples), "cells_purifying": len(cells),
            "rows_trained_on_purified": sum(s["rows"] for s in sets)}


def _source_label(poison_manifest: dict[str, Any]) -> str:
    config = poison_manifest.get("config", {})
    return f"{config.get('attack', {}).get('name', '?')} seed {config.get('seed', '?')}"


# ------------------------------------------------------------------------------------------ running


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Build and run the sweep under ``root``; the raw measurements."""
    import ray

    from puregen_dist.pipeline.purify import ensure_ray
    from puregen_dist.plugins import load_plugins
    from puregen_dist.sweep.runner import run_sweep
    from puregen_dist.sweep.spec import sweep_from_dict

    load_plugins()
    sweep = sweep_from_dict(sweep_dict(root, tiny_ebm(root / "ebm"), args), source="benchmarks/sweep_overhead.py")
    records_dir = root / "trial_timings"
    records_dir.mkdir()
    start = time.time()
    ensure_ray(num_cpus=args.cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.time() - start
    stages, echoed = StageClock(), []
    outcome = run_sweep(sweep, trainable=timed_trial(str(records_dir)), echo=echoed.append, progress=stages,
                        connected=False)
    sweep_wall = time.time() - start
    ray.shutdown()
    records = [json.loads(p.read_text()) for p in sorted(records_dir.glob("*.json"))]
    runs = child_runs(outcome.tracking_uri, sweep.name)
    return {"records": records, "runs": runs, "tune": tune_seconds(root / "tune"), "stages": stages.spans,
            "start": start, "ray_start_s": ray_start, "sweep_wall_s": sweep_wall,
            "trials": len(outcome.plan.trials), "failed": outcome.trials_failed,
            "images": image_counts(sweep.settings.store, runs)}


def summarise(args: argparse.Namespace, raw: dict[str, Any]) -> dict[str, Any]:
    """The JSON result: per-trial rows, their medians and totals, stage spans, image counts."""
    rows = trial_rows(raw["records"], raw["runs"], raw["tune"], raw["stages"]["trials"][0])
    categories = (*COMPUTE, *OVERHEAD)
    totals = {c: sum(r["seconds"].get(c, 0.0) for r in rows) for c in categories}
    wall = sum(r["wall"] for r in rows)
    stages = {label: span[1] - span[0] for label, span in raw["stages"].items() if len(span) == 2}
    images = raw["images"]
    return {
        "argv": sys.argv, "machine": machine(), "trials": raw["trials"], "failed": raw["failed"],
        "sweep": {"epochs": args.epochs, "langevin_steps": args.steps, "seeds": args.seeds, "cpus": args.cpus,
                  "reuse_actors": args.reuse_actors, "device": args.device},
        "rows": rows, "totals": totals, "trials_wall_s": wall,
        "median": {"wall": statistics.median(r["wall"] for r in rows),
                   "overhead": statistics.median(r["overhead"] for r in rows),
                   "overhead_share": statistics.median(r["overhead_share"] for r in rows),
                   "compute": statistics.median(r["wall"] - r["overhead"] for r in rows)},
        "overhead_share": (wall - totals[TRAINING] - totals[EVALUATION]) / wall,
        "stages_s": stages, "ray_start_s": raw["ray_start_s"], "sweep_wall_s": raw["sweep_wall_s"],
        "images": images, "images_match": images["rows_purified"] == images["distinct_tuples"],
    }


def machine() -> dict[str, Any]:
    import ray
    import torch

    return {"nproc": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": os.getloadavg()[0]}


# ------------------------------------------------------------------------------------------ report


def headline(result: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """Images purified equal the distinct (image, id, seed, purifier) tuples; per-trial overhead share."""
    images = result["images"]
    return [("sweep: images purified / distinct (image, id, seed, purifier) tuples",
             images["rows_purified"] / images["distinct_tuples"], "= 1 exactly", bool(result["images_match"])),
            ("sweep: median per-trial overhead, share of the trial's wall time", result["median"]["overhead_share"],
             "measured (no target)", True)]


def markdown(result: dict[str, Any]) -> str:
    """The RESULTS.md section of one run's ``result`` (what :func:`main` writes with ``--json``)."""
    sweep, images, median = result["sweep"], result["images"], result["median"]
    lines = [
        "## Sweep overhead (issue 15)", "",
        f"A real `puregen-dist sweep` (`run_sweep`, local Ray, fresh store and sqlite MLflow database) on the "
        f"digits classifier half (675 images 1x16x16): attack {{none, BadNets dirty-label}} x defense {{none, "
        f"PureGen-EBM ({sweep['langevin_steps']} Langevin steps, random-init tiny SNGAN-32)}} x "
        f"{sweep['seeds']} seed(s) = {result['trials']} trials of a small CNN ({sweep['epochs']} epochs, 1 "
        f"thread), run one after another on {result['machine']['nproc']} cores"
        f"{' and a GPU' if sweep.get('device') == 'cuda' else ''}"
        f"{'; Tune reuses trial actors (`settings.reuse_actors`, the default)' if sweep.get('reuse_actors') else '; a fresh process per trial (`--no-reuse-actors`)'}. "
        f"Each trial's wall time (from the previous trial's end) is split by timers around the functions a "
        f"trial calls (exclusive: nested calls count once): compute = training epochs + evaluation; overhead = "
        f"the rest (scheduling: Tune's bookkeeping and the trial actor's start; imports: what `run_trial` "
        f"imports in the trial's process; artifact reads/writes; MLflow; `tune.report`; the test-set load; "
        f"sample images; other). The package's own records are beside it (MLflow run span, `train_seconds`, "
        f"the sum of `epoch_seconds`, Tune's `time_total_s`). Script: `benchmarks/sweep_overhead.py`.", "",
        "| trial (attack / defense / seed) | wall s | training | evaluation | overhead s | overhead % | "
        "scheduling | imports | mlflow | MLflow run s | Σ epoch_seconds | train_seconds | Tune s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        s, rec = row["seconds"], row["recorded"]
        tune = rec["tune_time_total_s"]
        lines.append(
            f"| {row['cell']} | {row['wall']:.2f} | {s.get(TRAINING, 0):.2f} | {s.get(EVALUATION, 0):.2f} | "
            f"{row['overhead']:.2f} | {100 * row['overhead_share']:.0f}% | {s['scheduling']:.2f} | "
            f"{s.get('imports', 0):.2f} | {s.get('mlflow', 0):.2f} | {rec['mlflow_run_s']:.2f} | "
            f"{rec['sum_epoch_seconds']:.2f} | {rec['train_seconds']:.2f} | "
            f"{'' if tune is None else f'{tune:.2f}'} |")
    totals, wall = result["totals"], result["trials_wall_s"]
    lines += [
        "", f"**Per-trial overhead: median {median['overhead']:.2f} s of a {median['wall']:.2f} s trial "
        f"({100 * median['overhead_share']:.0f}%); over all trials {100 * result['overhead_share']:.0f}% of "
        f"{wall:.1f} s.** Where the overhead goes (all trials):", "",
        "| category | seconds | share of trial wall |", "| --- | ---: | ---: |",
    ]
    for category in (*COMPUTE, *OVERHEAD):
        lines.append(f"| {category}{' (compute)' if category in COMPUTE else ''} | {totals[category]:.2f} | "
                     f"{100 * totals[category] / wall:.1f}% |")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in result["stages_s"].items())
    lines += ["", f"Sweep: {result['sweep_wall_s']:.1f} s in all (Ray start {result['ray_start_s']:.1f} s; "
              f"stages: {stages}).", "",
              "Images purified (the manifests' `rows_purified`) against the distinct (image, id, seed, purifier) "
              "tuples of the purifying cells' training sets:", "",
              "| purified set | of the poison set | rows | rows purified | rows reused | own purification s |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for s in images["purified_sets"]:
        lines.append(f"| `{s['key']}` | {s.get('source', '')} | {s['rows']} | {s.get('rows_purified', 0)} | "
                     f"{s.get('rows_reused', 0)} | {s['purify_s']:.1f} |")
    verdict = "match" if result["images_match"] else "**do not match**"
    lines += ["", f"**{images['rows_purified']} images purified, {images['distinct_tuples']} distinct tuples: "
              f"{verdict}** ({images['cells_purifying']} purifying trials trained on "
              f"{images['rows_trained_on_purified']} purified rows in all).", "",
              f"Machine: torch {result['machine']['torch']}, Ray {result['machine']['ray']}, "
              f"{result['machine']['date']}, load average {result['machine']['loadavg']:.2f} at the end.", "",
              "```", " ".join(["python", *result["argv"]]), "```", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=3, help="classifier epochs per trial")
    parser.add_argument("--steps", type=int, default=20, help="Langevin steps of PureGen-EBM")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: trials and the purifier actor get a GPU each")
    parser.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=True,
                        help="settings.reuse_actors (the default); --no-reuse-actors: a fresh process per trial")
    parser.add_argument("--keep", type=Path, help="run under this (new) directory and keep it")
    parser.add_argument("--json", type=Path, help="write the result here")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        raw = run(args, args.keep.absolute())
    else:
        with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
            raw = run(args, Path(tmp))
    result = summarise(args, raw)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))


if __name__ == "__main__":
    main()
