"""The CLI: its commands, --help, and bad input (exit 2, one-paragraph error, nothing written)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from puregen_dist.cli import COMMANDS, build_parser, main

QUICKSTART = Path(__file__).resolve().parents[2] / "sweeps" / "quickstart_run.yaml"


def test_commands_table_matches_subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


def test_help_renders():
    proc = subprocess.run([sys.executable, "-m", "puregen_dist", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "run" in proc.stdout and "show-config" in proc.stdout


def test_show_config_prints_the_resolved_config(capsys):
    assert main(["show-config", str(QUICKSTART), "--set", "classifier.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 2" in out and "name: badnets" in out and "momentum: 0.9" in out


def bad_parquet(root: Path) -> None:
    """A Parquet dataset whose third row is not an image."""
    root.mkdir()
    good = {"bytes": b"\x89PNG\r\n\x1a\n" + b"0" * 10, "path": "x.png"}
    table = pa.table({"img": [good] * 3, "label": np.zeros(3, np.int64)})
    for split in ("train", "test"):
        pq.write_table(table, root / f"{split}.parquet")


CASES = {
    "malformed": ("classifier: {epochs: 3\n", [], "malformed YAML"),
    "unknown_key": ("classifier: {epocs: 3}\n", [], "classifier.epocs"),
    "wrong_type": ("classifier: {epochs: many}\n", [], "expected an integer"),
    "negative_epochs": ("classifier: {epochs: -2}\n", [], "classifier.epochs"),
    "eps_above_one": ("attack: {name: badnets, trigger: blend, eps: 2.0}\n", [], "attack.eps"),
    "budget_above_one": ("attack: {name: badnets, budget: 1.5}\n", [], "attack.budget"),
    "unknown_attack": ("attack: {name: narcissuss}\n", [], "valid names"),
    "unknown_classifier": ("classifier: {name: resnet19}\n", [], "valid names: densenet121"),
    "missing_dataset": ("data: {dataset: parquet, root: /nonexistent/cifar}\n", [], "/nonexistent/cifar"),
    "bad_target": ("attack: {name: badnets, target_class: 12}\n", [], "attack.target_class"),
    "unreadable_row": (None, [], "row"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_and_writes_nothing(tmp_path, case, capsys):
    text, overrides, needle = CASES[case]
    out_dir = tmp_path / "out"
    if text is None:
        bad_parquet(tmp_path / "data")
        text = f"data: {{dataset: parquet, root: {tmp_path / 'data'}}}\n"
    config = tmp_path / "cfg.yaml"
    config.write_text(text + f"output_dir: {out_dir}\nclassifier: {{name: small_cnn, epochs: 1}}\n"
                      if "classifier:" not in text else text + f"output_dir: {out_dir}\n")
    code = main(["-q", "run", str(config), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err, err
    assert err.startswith("error: ") and err.count("\n") == 1  # one paragraph
    assert not out_dir.exists()
