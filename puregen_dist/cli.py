"""Command-line interface: ``puregen-dist COMMAND CONFIG [--set dotted.key=value ...]``.

Every command takes a YAML config plus dotted overrides; there are no per-hyperparameter flags. Bad input is a
one-paragraph error on stderr and exit code 2, raised before anything is computed or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from puregen_dist.atomic import DiskFullError, atomic_write_text
from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import (
    ClassifierJob,
    CraftJob,
    DDPMJob,
    DiagnoseJob,
    EBMJob,
    PurifyJob,
    SurrogateJob,
)
from puregen_dist.config.loading import load_config, load_yaml, to_yaml
from puregen_dist.config.schema import ExperimentConfig
from puregen_dist.device import check_devices
from puregen_dist.plugins import load_plugins

if TYPE_CHECKING:
    from puregen_dist.console import ProgressFactory

log = logging.getLogger("puregen_dist")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT, as a shell reports it)."""


def run_cmd(args: argparse.Namespace) -> int:
    """Run one experiment in-process and print a one-line summary."""
    from puregen_dist.console import epoch_progress
    from puregen_dist.experiment import execute, prepare_experiment, summary_line
    from puregen_dist.tracking import open_tracker

    cfg = load_config(ExperimentConfig, args.config, args.set)
    check_output_path(cfg.output_dir, "output_dir")
    check_devices(cfg)
    _set_threads(cfg.classifier.threads)
    prepared = prepare_experiment(cfg)  # all validation happens here: nothing has been written yet
    with open_tracker(cfg.tracking, cfg.output_dir, default_run_name=cfg.name) as tracker, \
            epoch_progress(tracker, f"training {cfg.classifier.name}", cfg.classifier.epochs,
                           enabled=not args.quiet) as tracked:
        metrics = execute(prepared, tracked)
    print(summary_line(cfg, metrics))
    _print_browse(tracker)
    return 0


def train_model_cmd(kind: str) -> Callable[[argparse.Namespace], int]:
    """The ``train-<kind>`` command of a model kind registered in ``MODELS``: train (or resume) the model,
    print its checkpoint directory (or, with a store, its artifact key)."""

    def command(args: argparse.Namespace) -> int:
        return _train_model(kind, args)

    command.__doc__ = f"Train (or resume) a {kind} model; prints the checkpoint directory or artifact key."
    return command


def _train_model(kind: str, args: argparse.Namespace) -> int:
    """Load the job and its data (errors before anything is written), then train: in-process into ``output``,
    or, with a store (``--store`` / ``store:``), as a Ray task into the artifact store (skipped when cached)."""
    from puregen_dist.console import epoch_progress
    from puregen_dist.jobs import training_data
    from puregen_dist.pipeline.models import resolve_models
    from puregen_dist.registry import MODELS
    from puregen_dist.tracking import open_tracker

    entry = MODELS.get(kind)
    overrides = [*args.set, *([f"store={args.store}"] if args.store else [])]
    job = load_config(entry.config_cls, args.config, overrides)
    if job.store:
        check_output_path(job.store, "store")
    else:
        _check_checkpoint_output(kind, job.output)
        check_devices(job)
    data = training_data(resolve_models(job, job.store, "job"))  # errors here, before anything is written
    if job.store:
        rerun = _private_ray_network(args, address=args.address, tracking_uri=_job_tracking_uri(job),
                                     stores=[job.store])
        return _train_into_store(job, args.address) if rerun is None else rerun
    with open_tracker(job.tracking, _parent(job.output), default_run_name=job.name) as tracker, \
            epoch_progress(tracker, f"training {kind}", None, enabled=not args.quiet) as tracked:
        path = entry.builder(job, tracked, data)
    print(f"{kind} checkpoint: {path}")
    return 0


CHECKPOINT_KINDS = {"ebm": "ebm", "ddpm": "ddpm", "classifier": "classifier", "surrogate": "classifier"}
"""Model kind -> the kind of checkpoint its ``train-<kind>`` command writes into ``output``."""


def _check_checkpoint_output(kind: str, output: str) -> None:
    """``output`` can receive the checkpoint of a ``kind`` model: never a file or a directory of other files,
    which the checkpoint write would replace."""
    from puregen_dist.generative.checkpoints import check_checkpoint_output

    if kind in CHECKPOINT_KINDS:
        check_checkpoint_output(output, CHECKPOINT_KINDS[kind])
    else:
        check_output_path(output, "output")


def check_output_path(path: str | None, key: str, *, kind: Literal["dir", "file"] = "dir") -> None:
    """A local output location (``key`` of the config) must be creatable: not below a file, and not an existing
    file where a directory goes (``kind="dir"``) or an existing directory where a file goes (``"file"``). URIs
    (``scheme://``) are left to their filesystem. Raises UserInputError naming ``key``, before anything is
    written."""
    if not path or "://" in path:
        return
    target = Path(path).expanduser()
    for parent in target.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserInputError(f"{key}: {path}: {parent} is a file, not a directory")
            break
    if kind == "dir" and target.exists() and not target.is_dir():
        raise UserInputError(f"{key}: {path} is an existing file, expected a directory (the file is left untouched)")
    if kind == "file" and target.is_dir():
        raise UserInputError(f"{key}: {path} is an existing directory, expected the path of a file")


def _train_into_store(job: Any, address: str | None) -> int:
    from puregen_dist.pipeline.stages import model_stage
    from puregen_dist.pipeline.store import ArtifactStore

    store = ArtifactStore(job.store)
    result = model_stage(job, store, tracking_dir=_parent(job.output), address=address, progress=True)
    state = "trained" if result.built else "cached (already in the store)"
    print(f"{job.model_kind} artifact {result.key} {state} in {store.uri}")
    print(f"use it as {reference_fields(job.model_kind)}: {result.key}  (with store: {store.uri})")
    return 0


def reference_fields(kind: str) -> str:
    """The config fields that reference models of ``kind`` (``defense.ebm``, ``classifier.pretrained``, ...),
    read from the declarations of every registered attack and defense config and of the classifier section."""
    from puregen_dist.config.identity import model_fields
    from puregen_dist.config.schema import ClassifierConfig
    from puregen_dist.registry import ATTACKS, DEFENSES

    sections = [("classifier", ClassifierConfig)]
    sections += [(family, registry.get(name).config_cls) for family, registry in
                 (("attack", ATTACKS), ("defense", DEFENSES)) for name in registry.names()]
    fields = {f"{section}.{name}" for section, cls in sections for name, found in model_fields(cls).items()
              if found == kind}
    return " / ".join(sorted(fields)) or f"a {kind} model reference"


def purify_cmd(args: argparse.Namespace) -> int:
    """Poison (optionally) and purify a training set: through Ray Data into the artifact store (default), or
    in-process into ``output`` (``--no-ray``); reports throughput."""
    from puregen_dist.jobs import prepare_purify
    from puregen_dist.pipeline.models import resolve_models

    overrides = [*args.set, *([f"pipeline.address={args.address}"] if args.address else [])]
    job = load_config(PurifyJob, args.config, overrides)
    if args.no_ray:
        check_output_path(job.output, "output", kind="file")
        check_devices(job)
    check_output_path(job.store, "store")
    local = dataclasses.replace(job, defense=resolve_models(job.defense, job.store),  # model keys -> dirs
                                attack=resolve_models(job.attack, job.store, "attack"))
    prepared = prepare_purify(local)  # validation and checkpoint loading: nothing written yet
    if args.no_ray:
        return _purify_in_process(local, prepared)
    rerun = _private_ray_network(args, address=job.pipeline.address, tracking_uri=_job_tracking_uri(job),
                                 stores=[job.store])
    return _purify_with_ray(job) if rerun is None else rerun


def _purify_in_process(job: PurifyJob, prepared: object) -> int:
    from puregen_dist.jobs import purify_job
    from puregen_dist.tracking import open_tracker

    with open_tracker(job.tracking, _parent(job.output), default_run_name=job.name) as tracker:
        result = purify_job(prepared, tracker)
    print(f"purified {result.images} images with {job.defense.name} in {result.seconds:.1f}s "
          f"({result.images_per_second:.2f} images/s, {1 / result.images_per_second:.4f} s/image/device) "
          f"-> {result.path}")
    return 0


def _purify_with_ray(job: PurifyJob) -> int:
    from puregen_dist.pipeline.stages import poison_stage, purify_stage
    from puregen_dist.pipeline.store import ArtifactStore

    store = ArtifactStore(job.store)
    poison = poison_stage(job, store, progress=True)
    purified = purify_stage(job, poison.key, store)
    timings = purified.manifest.get("timings", {})
    state = "built" if purified.built else "cached (already in the store)"
    print(f"poison set {poison.key} ({'built' if poison.built else 'cached'}); purified set {purified.key} "
          f"{state}: {purified.manifest.get('rows')} images, "
          f"{timings.get('images_per_second', float('nan')):.2f} images/s, "
          f"{timings.get('seconds_per_image_per_device', float('nan')):.4f} s/image/device")
    stats = purified.manifest.get("stats", {})
    if stats.get("rows_reused"):
        print(f"purified {stats['rows_purified']:.0f} changed rows; reused {stats['rows_reused']:.0f} purified "
              "clean rows (the clean training set is purified once per defense, models and seed)")
    print(f"artifact: {store.imageset_path(purified.key)}")
    return 0


def craft_cmd(args: argparse.Namespace) -> int:
    """Craft a poison set into the artifact store (a Ray task, once per key) and log it to MLflow: crafting time
    and statistics, the trigger as an image, sample poisons beside their clean images."""
    from puregen_dist.attacks import build_attack
    from puregen_dist.data.datasets import load_data
    from puregen_dist.pipeline.models import resolve_models
    from puregen_dist.pipeline.stages import poison_stage
    from puregen_dist.pipeline.store import ArtifactStore

    overrides = [*args.set, *([f"pipeline.address={args.address}"] if args.address else [])]
    job = load_config(CraftJob, args.config, overrides)
    check_output_path(job.store, "store")
    check_output_path(job.output_dir, "output_dir")
    train, _ = load_data(job.data)
    build_attack(resolve_models(job.attack, job.store, "attack")).validate(train)  # nothing written yet
    rerun = _private_ray_network(args, address=job.pipeline.address, tracking_uri=_job_tracking_uri(job),
                                 stores=[job.store])
    if rerun is not None:
        return rerun
    store = ArtifactStore(job.store)
    poison = poison_stage(job, store, progress=True)
    _log_poison_set(job, store, poison.key, train)
    manifest = poison.manifest
    print(f"poison set {poison.key} {'crafted' if poison.built else 'cached (already in the store)'} in "
          f"{store.uri}: {int(manifest.get('stats', {}).get('num_poisons', 0))} poisoned of {manifest.get('rows')} "
          f"images, crafted in {manifest.get('timings', {}).get('craft_s', float('nan')):.1f}s")
    print(f"artifact: {store.imageset_path(poison.key)}")
    return 0


def _log_poison_set(job: CraftJob, store: Any, key: str, train: Any) -> None:
    """One MLflow run per craft: the config, the poison key, crafting metrics, the trigger (scaled to be
    visible) and up to 16 poisons above their clean images."""
    import numpy as np

    from puregen_dist.config.loading import flatten
    from puregen_dist.data.transforms import image_grid, trigger_image
    from puregen_dist.pipeline.stages import read_target
    from puregen_dist.tracking import open_tracker

    manifest = store.manifest(key)
    target = read_target(store, key)
    poisoned, is_poisoned = store.get_imageset(key)
    with open_tracker(job.tracking, job.output_dir, default_run_name=job.name) as tracker:
        tracker.log_params(flatten(job))
        tracker.set_tags({"poison_key": key, "attack": job.attack.name})
        tracker.log_metrics({"craft_seconds": manifest.get("timings", {}).get("craft_s", 0.0),
                             **manifest.get("stats", {})})
        if target.trigger is not None:
            tracker.log_image(trigger_image(target.trigger), "trigger")
        ids = poisoned.ids[is_poisoned][:16]
        if len(ids):
            pairs = np.concatenate([poisoned.images[poisoned.positions(ids)], train.images[train.positions(ids)]])
            tracker.log_image(image_grid(pairs, columns=len(ids)), "poisons_over_clean")
    _print_browse(tracker)


def diagnose_cmd(args: argparse.Namespace) -> int:
    """Energy histograms and ℓ2 trajectories of PureGen purification (PNG + CSV, logged to MLflow)."""
    from puregen_dist.diagnose import prepare_diagnose, run_diagnose
    from puregen_dist.tracking import open_tracker

    job = load_config(DiagnoseJob, args.config, args.set)
    check_output_path(job.output_dir, "output_dir")
    check_devices(job)
    prepared = prepare_diagnose(job)
    with open_tracker(job.tracking, job.output_dir, default_run_name=job.name) as tracker:
        outputs = run_diagnose(prepared, tracker)
    for path in outputs:
        print(path)
    return 0


def sweep_cmd(args: argparse.Namespace) -> int:
    """Plan a sweep, build its missing artifacts, run its trials with Ray Tune, print the report."""
    from puregen_dist.sweep.locations import in_ray_job
    from puregen_dist.sweep.runner import connect, dry_run, run_sweep, tracking_uri_of
    from puregen_dist.sweep.spec import load_sweep

    sweep = load_sweep(args.config, args.set)  # every cell validated: nothing computed or written yet
    if args.address:
        sweep = dataclasses.replace(sweep, settings=dataclasses.replace(sweep.settings, address=args.address))
    if args.dry_run:
        print(dry_run(sweep))
        return 0
    on_cluster = bool(sweep.settings.address or os.environ.get("RAY_ADDRESS")) or in_ray_job()
    if on_cluster:  # refuse unshared locations before the log file is made (a laptop's own Ray checks nothing)
        connect(sweep)
    rerun = _private_ray_network(args, address=sweep.settings.address, tracking_uri=tracking_uri_of(sweep),
                                 stores=[sweep.settings.store, sweep.settings.storage])
    if rerun is not None:
        return rerun
    with _sweep_console(sweep.cells[0].config.output_dir, quiet=args.quiet) as progress:
        outcome = run_sweep(sweep, progress=progress, report_all=args.report_all, connected=on_cluster)
    return 0 if not outcome.trials_failed else 1


@contextmanager
def _sweep_console(output_dir: str, *, quiet: bool) -> Iterator[ProgressFactory]:
    """The terminal of a sweep: one progress bar (or plain line) per stage unless ``quiet``, warnings and
    errors; everything else (INFO logs, Ray's and MLflow's, Ray Data's operator progress) goes to a log file
    under ``output_dir/logs``, named once on stderr."""
    from puregen_dist.console import log_file, logs_to_file, progress_factory
    from puregen_dist.sweep.progress import configure_ray_loggers, quiet_ray_output

    path = log_file(output_dir, "sweep")
    with logs_to_file(path, configure_ray_loggers()), quiet_ray_output():
        if not quiet:
            print(f"logs: {path}", file=sys.stderr)
        yield progress_factory(enabled=not quiet)


QUICKSTART = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"


def quickstart_cmd(args: argparse.Namespace) -> int:
    """The README's main job: the quickstart sweep on the embedded digits data, local Ray, local MLflow."""
    if not QUICKSTART.is_file():
        raise UserInputError(f"{QUICKSTART}: the quickstart sweep file is missing (run from a checkout of the "
                             "repository, installed with `pip install -e .`)")
    args.config = str(QUICKSTART)
    return sweep_cmd(args)


def report_cmd(args: argparse.Namespace) -> int:
    """The paper-shaped table of a sweep's MLflow experiment (Markdown printed; CSV, PNG written)."""
    from puregen_dist.sweep.report import REPORT_FILES, render_report
    from puregen_dist.tracking.mlflow_tracker import resolve_tracking_uri
    from puregen_dist.tracking.reader import check_run_id

    if args.parent is not None:
        check_run_id(args.parent, "report --parent")  # before anything is written (--with-runs copies the DB)
    uri = resolve_tracking_uri(args.tracking_uri, args.output_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserInputError(f"{uri}: no MLflow database there (pass --tracking-uri, or --output-dir of the "
                             "sweep)")
    out_dir = Path(args.report_dir or Path(args.output_dir) / "report")
    if args.with_runs:
        from puregen_dist.tracking.reader import snapshot_database

        uri = f"sqlite:///{snapshot_database(uri, out_dir / RUNS_DATABASE).resolve()}"
    markdown, paths = render_report(uri, args.experiment, out_dir, args.parent)
    if args.with_runs:
        paths["runs"] = out_dir / RUNS_DATABASE
        source = {"experiment": args.experiment, "parent": args.parent, "paper": args.paper}
        paths["source"] = atomic_write_text(out_dir / RUNS_SOURCE, json.dumps(source, indent=1) + "\n")
    print(markdown)
    paper_path = out_dir / REPORT_FILES["paper"]
    paper_path.unlink(missing_ok=True)  # every file in out_dir describes this report
    if args.paper:
        from puregen_dist.sweep.paper import paper_comparison
        from puregen_dist.sweep.report import read_stats_csv, write_text

        beside = paper_comparison(read_stats_csv(paths["csv"]))
        paths["paper"] = write_text(beside, paper_path)
        print(f"Beside the paper ({args.paper}):\n\n{beside}")
    for path in paths.values():
        print(path)
    return 0


def pool_cmd(args: argparse.Namespace) -> int:
    """Pool the same cells of several published reports into ``report_pooled.md`` beside the spec."""
    from puregen_dist.sweep.pool import render_pool

    markdown, path = render_pool(args.spec)
    print(markdown)
    print(path)
    return 0


def artifacts_cmd(args: argparse.Namespace) -> int:
    """List, show, remove or garbage-collect artifacts of a content-addressed store."""
    from puregen_dist.pipeline.artifacts_cli import format_table, show
    from puregen_dist.pipeline.store import ArtifactStore

    if args.action != "import" and "://" not in args.store and not Path(args.store).is_dir():
        raise UserInputError(f"--store {args.store}: no artifact store there (not a directory); name the store with "
                             f"--store or $PUREGEN_STORE (default {DEFAULT_STORE})")  # read-only: never created
    store = ArtifactStore(args.store)
    if args.action in ("show", "rm", "import") and not args.key:
        raise UserInputError(f"artifacts {args.action}: a KEY (for import: a reference model directory or the "
                             "name of a shipped one) is required (see `puregen-dist artifacts ls`)")
    if args.action == "import":
        return _import_reference(store, args.key)
    if args.action == "ls":
        print(format_table(store.ls()))
    elif args.action == "show":
        print(show(store, args.key))
    elif args.action == "rm":
        store.manifest(args.key)  # a missing key is an error naming it
        store.rm(args.key)
        print(f"removed {args.key}")
    else:
        removed = store.gc()
        print("\n".join(removed) if removed else "nothing to collect")
    return 0


def _import_reference(store: Any, name: str) -> int:
    """``artifacts import REF``: commit a reference model (a directory, or a shipped one by name) into the store."""
    from puregen_dist.pipeline.reference import REFERENCE_ROOT, import_reference

    directory = Path(name) if Path(name).is_dir() else REFERENCE_ROOT / name
    key, built = import_reference(directory, store)
    print(f"{key} {'imported' if built else 'already in the store'} ({directory}) -> {store.uri}")
    return 0


def export_reference_cmd(args: argparse.Namespace) -> int:
    """Export a trained model (``--checkpoint``, default the job's ``output``) as a reference model: weights only,
    its recipe (this config), key and training-data fingerprint, into ``--to`` (default: the package's
    ``reference_models/<name>``)."""
    from puregen_dist.data.datasets import load_data
    from puregen_dist.data.io import imageset_fingerprint
    from puregen_dist.generative.checkpoints import read_checkpoint_config
    from puregen_dist.pipeline.reference import REFERENCE_ROOT, export_reference
    from puregen_dist.registry import MODELS

    data = load_yaml(args.config)
    kind = data.pop("kind", None) or guess_command(data).removeprefix("train-")
    job = load_config(MODELS.get(kind).config_cls, args.config, [*args.set])
    checkpoint = Path(args.checkpoint or job.output)
    meta = read_checkpoint_config(checkpoint).get("meta", {})
    train, _ = load_data(job.data)
    out = export_reference(job, checkpoint, args.to or REFERENCE_ROOT / job.name,
                           data_fingerprint=imageset_fingerprint(train), notes={"checkpoint_meta": meta})
    print(f"reference {out} (key {json.loads((out / 'reference.json').read_text())['key']})")
    return 0


CONFIG_KINDS: dict[str, type] = {"run": ExperimentConfig, "train-ebm": EBMJob, "train-ddpm": DDPMJob,
                                 "train-classifier": ClassifierJob, "train-surrogate": SurrogateJob,
                                 "craft": CraftJob,
                                 "purify": PurifyJob, "diagnose": DiagnoseJob}


def show_config_cmd(args: argparse.Namespace) -> int:
    """Print the resolved, validated config (as the command ``--as`` would read it; guessed by default)."""
    kind = args.as_command or guess_command(load_yaml(args.config, allow_empty=True))
    if kind == "sweep":
        from puregen_dist.sweep.spec import load_sweep

        sweep = load_sweep(args.config, args.set)
        print(f"# sweep {sweep.name!r}: {len(sweep.cells)} cells")
        print("\n".join(cell.describe() for cell in sweep.cells))
        return 0
    print(f"# resolved as `puregen-dist {kind}` config", file=sys.stderr)
    print(to_yaml(load_config(CONFIG_KINDS[kind], args.config, args.set, allow_empty=True)), end="")
    return 0


def guess_command(data: dict[str, Any]) -> str:
    """Which command a config file is for, from its top-level keys."""
    if "space" in data or "base" in data:
        return "sweep"
    if "train" in data:
        return "train-ddpm" if "ddpm" in data else "train-ebm"
    if "pood" in data or "target_classes" in data:
        return "train-surrogate"
    if "output" in data and "classifier" in data:
        return "train-classifier"
    if {"num_images", "every", "ddpm_grid", "ebm", "ddpm"} & set(data):
        return "diagnose"
    if "output" in data:
        return "purify"
    if "attack" in data and "store" in data and not {"classifier", "defense"} & set(data):
        return "craft"
    return "run"


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "run": (run_cmd, "run one experiment in-process (data -> poison -> defense -> train -> evaluate -> MLflow)"),
    "train-ebm": (train_model_cmd("ebm"), "train (or resume) a PureGen energy-based model (--store: as a Ray task)"),
    "train-ddpm": (train_model_cmd("ddpm"), "train (or resume) a PureGen DDPM (t < 250) (--store: as a Ray task)"),
    "train-classifier": (train_model_cmd("classifier"), "pretrain a classifier on clean data for transfer "
                                               "(--store: as a Ray task)"),
    "train-surrogate": (train_model_cmd("surrogate"), "train an attack surrogate (public OOD images + target "
                                                     "classes; Narcissus) (--store: as a Ray task)"),
    "craft": (craft_cmd, "craft a poison set into the artifact store (a Ray task) and log it to MLflow"),
    "purify": (purify_cmd, "poison and purify a training set through Ray Data into the store (--no-ray: "
                           "in-process into a Parquet file)"),
    "diagnose": (diagnose_cmd, "energy histograms and l2 trajectories of purification (PNG + CSV)"),
    "sweep": (sweep_cmd, "run a sweep: build the missing artifacts, Ray Tune trials, MLflow runs, report"),
    "quickstart": (quickstart_cmd, "the quickstart sweep (digits, tiny EBM + DDPM, 4 defenses, 2 seeds)"),
    "report": (report_cmd, "the paper-shaped results table of a sweep's MLflow experiment"),
    "pool": (pool_cmd, "pool the same cells of several published reports (e.g. seeds added by a later sweep) "
                       "into one table"),
    "show-config": (show_config_cmd, "print the resolved config (defaults filled in, overrides applied)"),
    "export-reference": (export_reference_cmd, "export a trained model as a reference model (weights, recipe, "
                                               "key, data fingerprint) that sweeps import instead of training"),
    "artifacts": (artifacts_cmd, "ls | show KEY | rm KEY | gc: inspect the content-addressed artifact store"),
}

DEFAULT_STORE = "outputs/store"
RUNS_DATABASE = "mlflow.db"
"""File name of the MLflow database a report is published with (``report --with-runs``)."""
RUNS_SOURCE = "source.json"
"""Beside it: the experiment, parent run and paper table the report was rendered with."""


def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one subcommand per COMMANDS entry."""
    parser = argparse.ArgumentParser(prog="puregen-dist", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == "report":
            cmd.add_argument("experiment", help="MLflow experiment (the sweep's name)")
            cmd.add_argument("--output-dir", default="outputs", help="the sweep's base output_dir: its "
                             "mlflow.db is read and report/ written there (default: outputs)")
            cmd.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite under --output-dir)")
            cmd.add_argument("--parent", help="only the trials of this parent (sweep invocation) run id")
            cmd.add_argument("--report-dir", help="where to write the files (default: OUTPUT_DIR/report)")
            cmd.add_argument("--with-runs", action="store_true", help=f"copy the sqlite MLflow database into "
                             f"the report directory ({RUNS_DATABASE}) and render the report from that copy, so "
                             "the published numbers can be re-derived from their runs")
            cmd.add_argument("--paper", choices=["table1"], help="also write report_paper.md: every attacked "
                             "cell beside the paper's published numbers (Tables 1, 2, 4, 10)")
            continue
        if name == "pool":
            cmd.add_argument("spec", help="pool spec (JSON, \"kind\": \"pooled\"); report_pooled.md is written "
                             "beside it")
            continue
        if name == "quickstart":
            cmd.set_defaults(config=None, set=[], dry_run=False, report_all=False)
            cmd.add_argument("--dry-run", action="store_true", help="print the plan and stop")
            cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                             help="override a sweep-file value, e.g. --set settings.seeds=[0]")
            cmd.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else local Ray)")
            continue
        if name == "artifacts":
            cmd.add_argument("action", choices=["ls", "show", "rm", "gc", "import"])
            cmd.add_argument("key", nargs="?", help="artifact key (show, rm); reference model (import)")
            cmd.add_argument("--store", default=os.environ.get("PUREGEN_STORE", DEFAULT_STORE),
                             help="store directory or pyarrow.fs URI (default: $PUREGEN_STORE or outputs/store)")
            continue
        if name == "export-reference":
            cmd.add_argument("--checkpoint", help="trained checkpoint directory (default: the config's output)")
            cmd.add_argument("--to", help="reference directory (default: puregen_dist/reference_models/<name>)")
        cmd.add_argument("config", help="YAML config file")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value by dotted key, e.g. --set classifier.epochs=5 (repeatable)")
        if name == "purify":
            cmd.add_argument("--no-ray", action="store_true",
                             help="purify in-process (tests, debugging) and write `output` instead of the store")
        if name in ("train-ebm", "train-ddpm", "train-classifier", "train-surrogate"):
            cmd.add_argument("--store", help="train as a Ray task into this artifact store (directory or "
                                              "pyarrow.fs URI); skipped when the model is already there")
        if name == "sweep":
            cmd.add_argument("--dry-run", action="store_true",
                             help="print the plan (artifacts to build / cached, trials) and stop")
            cmd.add_argument("--report-all", action="store_true",
                             help="report every finished cell of the sweep's MLflow experiment (default: the cells "
                                  "of this sweep file as given, e.g. not those of other seeds run earlier)")
        if name in ("purify", "craft", "train-ebm", "train-ddpm", "train-classifier", "train-surrogate", "sweep"):
            cmd.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else local Ray)")
        if name == "show-config":
            cmd.add_argument("--as", dest="as_command", choices=sorted([*CONFIG_KINDS, "sweep"]),
                             help="resolve the file as this command's config (default: guessed from its keys)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``puregen-dist`` console script."""
    args = build_parser().parse_args(argv)
    # the command line a command may re-run itself with in a private network; None when called in-process
    args.rerun_argv = list(sys.argv[1:]) if argv is None else None
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)  # force: the current stderr, also on repeated calls
    handler, _ = COMMANDS[args.command]
    try:
        load_plugins()
        return handler(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (FloatingPointError, DiskFullError) as exc:  # a non-finite loss, energy or gradient; a full disk
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _private_ray_network(args: argparse.Namespace, *, address: str | None, tracking_uri: str | None,
                         stores: Sequence[str | None]) -> int | None:
    """Where a command that may start a local Ray instance runs (``pipeline/isolation.py``): the exit code of
    the same command re-run in a private network namespace, or None to carry on here (also when ``main`` was
    called in-process with its own argv: a library caller or a test keeps its process)."""
    from puregen_dist.pipeline.isolation import maybe_rerun_private
    from puregen_dist.sweep.locations import in_ray_job

    ray = sys.modules.get("ray")
    joins = bool(address or os.environ.get("RAY_ADDRESS")) or in_ray_job() or bool(ray and ray.is_initialized())
    return maybe_rerun_private(getattr(args, "rerun_argv", None), starts_local_ray=not joins,
                               tracking_uri=tracking_uri, stores=stores)


def _job_tracking_uri(job: Any) -> str | None:
    """The tracking URI a job writes to (None: tracking off, or the default local sqlite database)."""
    tracking = getattr(job, "tracking", None)
    if tracking is None or not tracking.enabled:
        return None
    return tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")


def _parent(path: str) -> Path:
    """Directory holding ``path`` (where a job's default MLflow database goes)."""
    return Path(path).parent


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _print_browse(tracker: object) -> None:
    from puregen_dist.tracking.redaction import browse_hint

    uri = getattr(tracker, "tracking_uri", None)
    if uri:
        print(browse_hint(uri))


if __name__ == "__main__":
    raise SystemExit(main())
