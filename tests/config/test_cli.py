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
    "eps_above_one": ("attack: {name: badnets, trigger: sign, eps: 2.0}\n", [], "attack.eps"),
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


def _hostile_toxic_trial(root: Path, marker: Path) -> None:
    """A poisoning-benchmark trial whose poisons.pickle runs ``echo pwned > marker`` when unpickled naively."""
    import os
    import pickle

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"echo pwned > {marker}",))

    root.mkdir()
    (root / "poisons.pickle").write_bytes(pickle.dumps([(Payload(), 0)]))
    (root / "base_indices.pickle").write_bytes(pickle.dumps([0]))
    (root / "target.pickle").write_bytes(pickle.dumps((np.zeros((16, 16), np.uint8), 1)))


@pytest.mark.parametrize("command", ["purify", "craft"])
@pytest.mark.parametrize("case", ["trigger_above_eps", "toxic_code_payload"])
def test_bad_imported_poisons_are_refused_before_writing(tmp_path, case, command, capsys, monkeypatch):
    """``purify --no-ray`` and ``craft`` on digits (16x16x1) with an imported poison that must be refused: exit 2,
    one ``error:`` line, no output, store or MLflow database, and a pickle's payload never ran."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    marker = tmp_path / "pwned"
    if case == "trigger_above_eps":
        trigger = np.full((1, 1, 16, 16), 2 * 12 / 255, np.float32)  # symmetric: 12/255 pixel units > 8 + 1
        np.save(tmp_path / "best_noise_lab0.npy", trigger)
        attack, needle = (f"{{name: trigger_file, path: {tmp_path / 'best_noise_lab0.npy'}, convention: symmetric}}",
                          "12.0/255 in pixel units (convention symmetric) > eps 8/255 + 1/255")
    else:
        _hostile_toxic_trial(tmp_path / "trial", marker)
        attack, needle = f"{{name: toxic, path: {tmp_path / 'trial'}}}", "refuses to load posix.system"
    out_dir, store = tmp_path / "out", tmp_path / "store"
    config = tmp_path / "purify.yaml"
    output = (f"output: {out_dir / 'purified.parquet'}" if command == "purify" else f"output_dir: {out_dir}")
    config.write_text(f"data: {{dataset: digits}}\nattack: {attack}\n{output}\n"
                      f"store: {store}\ntracking: {{enabled: true}}\n")
    before = set(tmp_path.iterdir())
    code = main(["-q", command, str(config), *(["--no-ray"] if command == "purify" else [])])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: attack.") and err.count("\n") == 1 and needle in err, err
    assert set(tmp_path.iterdir()) == before and not out_dir.exists() and not store.exists()
    assert not marker.exists()


def test_a_sweep_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    """``sweep --dry-run`` only reads: no store directory, no MLflow database, nothing in the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    quickstart = Path(__file__).resolve().parents[2] / "sweeps" / "quickstart.yaml"
    code = main(["-q", "sweep", str(quickstart), "--set", f"base.output_dir={tmp_path / 'out'}", "--dry-run"])
    assert code == 0 and "trials: 16 (16 to run, 0 already finished)" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
