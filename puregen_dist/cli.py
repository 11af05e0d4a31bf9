"""Command-line interface: ``puregen-dist COMMAND CONFIG [--set dotted.key=value ...]``.

Every command takes a YAML config plus dotted overrides; there are no per-hyperparameter flags. Bad input is a
one-paragraph error on stderr and exit code 2, raised before anything is computed or written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import torch

from puregen_dist.config.errors import UserInputError
from puregen_dist.config.loading import load_experiment, to_yaml

log = logging.getLogger("puregen_dist")

EXIT_USER_ERROR = 2


def run_cmd(args: argparse.Namespace) -> int:
    """Run one experiment in-process and print a one-line summary."""
    from puregen_dist.experiment import execute, prepare_experiment, summary_line
    from puregen_dist.tracking import open_tracker

    cfg = load_experiment(args.config, args.set)
    if cfg.classifier.threads:
        torch.set_num_threads(cfg.classifier.threads)
    log.info("loading data (%s)", cfg.data.dataset)
    prepared = prepare_experiment(cfg)  # all validation happens here: nothing has been written yet
    with open_tracker(cfg.tracking, cfg.output_dir, default_run_name=cfg.name) as tracker:
        metrics = execute(prepared, tracker)
    print(summary_line(cfg, metrics))
    uri = getattr(tracker, "tracking_uri", None)
    if uri:
        print(f"browse: mlflow ui --backend-store-uri {uri}")
    return 0


def show_config_cmd(args: argparse.Namespace) -> int:
    """Print the resolved, validated config."""
    print(to_yaml(load_experiment(args.config, args.set)), end="")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "run": (run_cmd, "run one experiment in-process (data -> poison -> defense -> train -> evaluate -> MLflow)"),
    "show-config": (show_config_cmd, "print the resolved config (defaults filled in, overrides applied)"),
}


def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one subcommand per COMMANDS entry."""
    parser = argparse.ArgumentParser(prog="puregen-dist", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("config", help="YAML config file")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value by dotted key, e.g. --set classifier.epochs=5 (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``puregen-dist`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    handler, _ = COMMANDS[args.command]
    try:
        return handler(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
