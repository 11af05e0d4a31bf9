"""The bad-input catalogue (issue 16, deliverable 3; docs/reliability.md): every case is refused by the CLI
in-process with exit code 2 and one ``error:`` line naming the key, file or row, and leaves nothing behind
(the test directory's files are unchanged: no output directory, store or MLflow database).

Each case builds its inputs under a fresh directory (the working directory of the call) and returns the CLI
arguments; the cases use the embedded digits data, ``small_cnn`` and one epoch, and nearly all fail before
any training. outputs/notes/reliability_bad_inputs.md lists them with the command that reproduces each.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from puregen_dist import cli
from puregen_dist.cli import main
from puregen_dist.config.generative import EBMConfig
from puregen_dist.config.schema import DataConfig
from puregen_dist.data import datasets
from puregen_dist.data.datasets import load_data
from puregen_dist.generative.checkpoints import save_checkpoint
from puregen_dist.generative.ebm import build_ebm

DATA = "data: {dataset: digits, train_per_class: 5, test_per_class: 5}\n"
TINY = DATA + "classifier: {name: small_cnn, epochs: 1}\n"
"""A run that would train for a second: what a case adds to it is the bad input."""


@dataclass(frozen=True)
class Case:
    """``setup(tmp)`` writes the inputs and returns the CLI arguments; ``needle`` must be in the error line."""

    setup: Callable[[Path], list[str]]
    needle: str


def at(text: str, tmp: Path) -> str:
    """``text`` with ``{tmp}`` replaced by the case directory."""
    return text.replace("{tmp}", str(tmp))


def run_config(text: str = "", *overrides: str, base: str = TINY) -> Callable[[Path], list[str]]:
    """A ``run`` of TINY plus ``text`` (``{tmp}`` is the case directory) with ``--set`` overrides."""

    def setup(tmp: Path) -> list[str]:
        config = tmp / "cfg.yaml"
        config.write_text(base + at(text, tmp) + f"output_dir: {tmp / 'out'}\n")
        return ["run", str(config), *(a for o in overrides for a in ("--set", at(o, tmp)))]

    return setup


def raw_config(data: bytes | str, command: str = "run") -> Callable[[Path], list[str]]:
    """``command`` on a config file holding exactly ``data``."""

    def setup(tmp: Path) -> list[str]:
        config = tmp / "cfg.yaml"
        config.write_bytes(data.encode() if isinstance(data, str) else data)
        return [command, str(config)]

    return setup


def command_config(command: str, text: str, *extra: str, prepare: Callable[[Path], None] | None = None
                   ) -> Callable[[Path], list[str]]:
    """``command`` on the config ``text`` (``{tmp}`` is the case directory), after ``prepare(tmp)``."""

    def setup(tmp: Path) -> list[str]:
        if prepare is not None:
            prepare(tmp)
        config = tmp / "cfg.yaml"
        config.write_text(at(text, tmp))
        return [command, str(config), *extra]

    return setup


# ------------------------------------------------------------------------------------------ Parquet data


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


GRAY = png(np.full((8, 8), 128, np.uint8))


def parquet_split(path: Path, labels: list[int], images: list[bytes] | None = None,
                  label_type: pa.DataType | None = None) -> None:
    images = images or [GRAY] * len(labels)
    column = pa.array([{"bytes": b, "path": "x.png"} for b in images],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"img": column, "label": pa.array(labels, label_type or pa.int64())}), path)


def parquet_run(train: list[int], test: list[int], *, train_images: list[bytes] | None = None,
                after: Callable[[Path], None] | None = None, label_type: pa.DataType | None = None
                ) -> Callable[[Path], list[str]]:
    """A ``run`` on a Parquet dataset with these train / test labels (8x8 gray PNGs unless given)."""

    def setup(tmp: Path) -> list[str]:
        root = tmp / "data"
        root.mkdir()
        parquet_split(root / "train.parquet", train, train_images, label_type)
        parquet_split(root / "test.parquet", test, label_type=label_type)
        if after is not None:
            after(root)
        return run_config(f"data: {{dataset: parquet, root: {root}}}\n", base="classifier: {name: small_cnn, "
                          "epochs: 1}\n")(tmp)

    return setup


def truncate(root: Path) -> None:
    data = (root / "train.parquet").read_bytes()
    (root / "train.parquet").write_bytes(data[:len(data) // 2])


def not_parquet(root: Path) -> None:
    (root / "test.parquet").write_bytes(b"PK\x03\x04 this is a zip file, not Parquet" * 10)


def without_label_column(root: Path) -> None:
    pq.write_table(pa.table({"img": pa.array([{"bytes": GRAY, "path": "x"}] * 2), "y": [0, 1]}),
                   root / "train.parquet")


def image_folder_run(bad: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """A ``run`` on a CINIC-10 layout (classes a and b, one 8x8 PNG each per split) after ``bad(root)``."""

    def setup(tmp: Path) -> list[str]:
        root = tmp / "cinic"
        for split in ("train", "test"):
            for name in ("a", "b"):
                (root / split / name).mkdir(parents=True)
                (root / split / name / "0.png").write_bytes(GRAY)
        bad(root)
        return run_config(f"data: {{dataset: image_folder, root: {root}}}\n",
                          base="classifier: {name: small_cnn, epochs: 1}\n")(tmp)

    return setup


def empty_class(root: Path) -> None:
    (root / "train" / "b" / "0.png").unlink()


def corrupt_png(root: Path) -> None:
    (root / "train" / "b" / "0.png").write_bytes(GRAY[:40])  # the header, then nothing


# ------------------------------------------------------------------------------------------ checkpoints

TINY_EBM = EBMConfig(arch="convnet", nf=4, in_channels=1, image_size=16)
"""An EBM that fits digits (16x16, 1 channel)."""


def ebm_checkpoint(directory: Path, cfg: EBMConfig = TINY_EBM, *, written: dict | None = None,
                   nan: bool = False, scale: float = 1.0, kind: str = "ebm") -> Path:
    """A randomly initialised EBM checkpoint (``written``: the config.json it claims; ``nan``: a NaN weight;
    ``scale``: every weight multiplied, finite but overflowing float32 in the energy)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_ebm(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
        if nan:
            next(model.parameters()).fill_(float("nan"))
    return save_checkpoint(directory, model, kind=kind, model_config=written or asdict(cfg))


def with_ebm(make: Callable[[Path], Path], langevin: str = "{steps: 2}", command: str = "run"
             ) -> Callable[[Path], list[str]]:
    """A ``run`` (or ``purify --no-ray``) purifying with the EBM checkpoint ``make(tmp)`` writes."""

    def setup(tmp: Path) -> list[str]:
        ebm = make(tmp)
        defense = f"defense: {{name: puregen_ebm, ebm: {ebm}, langevin: {langevin}, batch_size: 64}}\n"
        if command == "purify":
            return command_config("purify", DATA + defense + f"output: {tmp / 'out' / 'purified.parquet'}\n"
                                  f"store: {tmp / 'store'}\n", "--no-ray")(tmp)
        return run_config(defense + "tracking: {enabled: false}\n")(tmp)

    return setup


def pickled_weights(tmp: Path) -> Path:
    directory = ebm_checkpoint(tmp / "ebm")
    torch.save(build_ebm(TINY_EBM).state_dict(), directory / "model.safetensors")  # a pickle, not safetensors
    return directory


# ------------------------------------------------------------------------------------------ poisons


def trigger_run(trigger: np.ndarray) -> Callable[[Path], list[str]]:
    """A ``run`` stamping the ``trigger_file`` trigger (pixel units, eps 8/255) on 10% of class 0."""

    def setup(tmp: Path) -> list[str]:
        np.save(tmp / "trigger.npy", trigger)
        return run_config(f"attack: {{name: trigger_file, path: {tmp / 'trigger.npy'}, convention: unit, "
                          "target_class: 0, budget: 0.1}\n")(tmp)

    return setup


def toxic_beyond_eps(tmp: Path) -> list[str]:
    """A poisoning-benchmark trial whose one poison differs from its base image by 40/255 > eps 8/255."""
    train, _ = load_data(DataConfig(dataset="digits"))
    base = train.images[0]
    poison = np.where(base > 127, base - 40, base + 40).astype(np.uint8)
    root = tmp / "trial"
    root.mkdir()
    (root / "poisons.pickle").write_bytes(pickle.dumps([(poison, int(train.labels[0]))]))
    (root / "base_indices.pickle").write_bytes(pickle.dumps([int(train.ids[0])]))
    (root / "target.pickle").write_bytes(pickle.dumps((train.images[1], int(train.labels[1]))))
    return run_config(f"attack: {{name: toxic, path: {root}}}\n",
                      base="data: {dataset: digits}\nclassifier: {name: small_cnn, epochs: 1}\n")(tmp)


# ------------------------------------------------------------------------------------------ sweeps, outputs

SWEEP = """name: {name}
base: {data: {dataset: digits, train_per_class: 5, test_per_class: 5}, classifier: {name: small_cnn, epochs: 1},
        output_dir: {tmp}/out}
models: {models}
space: {defense.name: [none]}
settings: {storage: {tmp}/sweeps, store: {tmp}/store}
"""


def sweep(name: str = "ok", models: str = "{}") -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        (tmp / "sweep.yaml").write_text(at(SWEEP.replace("{name}", name).replace("{models}", models), tmp))
        return ["sweep", str(tmp / "sweep.yaml")]

    return setup


def a_file(tmp: Path) -> None:
    (tmp / "taken").write_text("the user's file\n")


def a_directory_of_user_files(tmp: Path) -> None:
    (tmp / "taken").mkdir()
    (tmp / "taken" / "thesis.tex").write_text("months of work\n")


def a_ddpm_checkpoint(tmp: Path) -> None:
    ebm_checkpoint(tmp / "taken", kind="ddpm")


EBM_JOB = ("data: {dataset: digits, train_per_class: 5, test_per_class: 5}\n"
           "ebm: {arch: convnet, nf: 4, in_channels: 1, image_size: 16}\n"
           "train: {epochs: 1, batch_size: 8, bank_size: 16, mcmc_steps: 2, sample_grid: 0}\n")


CASES: dict[str, Case] = {
    # --- config files
    "empty_config": Case(raw_config(""), "empty config"),
    "comments_only_config": Case(raw_config("# nothing but a comment\n"), "empty config"),
    "duplicate_key": Case(raw_config(TINY + "seed: 1\nseed: 2\n"), "duplicate key 'seed' (first at line 3)"),
    "non_utf8_config": Case(raw_config("name: caf\xe9\n".encode("latin-1")), "not UTF-8 text (byte 0xe9 at line 1)"),
    "yaml_python_tag": Case(raw_config(TINY + "name: !!python/object/apply:os.system [touch pwned]\n"),
                            "could not determine a constructor"),
    "missing_config": Case(lambda tmp: ["run", str(tmp / "nope.yaml")], "config file not found"),
    "override_without_equals": Case(run_config("", "classifier.epochs"), "expected dotted.key=value"),
    "override_unknown_key": Case(run_config("", "classifier.epocs=1"), "unknown key 'classifier.epocs'"),
    # --- non-finite and out-of-range numbers
    "weight_decay_inf": Case(run_config("", "classifier.weight_decay=.inf"),
                             "classifier.weight_decay: expected a finite number, got inf"),
    "lr_inf": Case(run_config("", "classifier.lr=.inf"), "classifier.lr: expected a finite number"),
    "lr_nan": Case(run_config("", "classifier.lr=.nan"), "classifier.lr: expected a finite number, got nan"),
    "langevin_drift_overflows": Case(run_config("defense: {name: puregen_ebm, ebm: {tmp}/ebm, langevin: "
                                                "{step_size: 1e30, temperature: 1e-30}}\n"),
                                     "defense.langevin.step_size: the drift step_size**2 / (2 * temperature) = 5e+89 "
                                     "overflows float32"),
    "langevin_step_size_inf": Case(run_config("defense: {name: puregen_ebm, ebm: {tmp}/ebm, langevin: "
                                              "{step_size: .inf}}\n"), "defense.langevin.step_size: expected a finite"),
    "magnification_inf": Case(run_config("", "eval.magnifications=[1, .inf]"), "eval.magnifications[1]: expected a "
                                                                                "finite number"),
    "seed_2_64": Case(run_config("", "seed=18446744073709551616"), "seed: seed 18446744073709551616 is out of range (seeds lie in [0, 2**32 - 1"),
    "seed_negative": Case(run_config("", "seed=-1"), "seed: seed -1 is out of range"),
    "epochs_beyond_int64": Case(run_config("", "classifier.epochs=10000000000000000000000000000000"),
                                "classifier.epochs: 10000000000000000000000000000000 is out of range"),
    "image_size_1e9": Case(run_config("", "data.image_size=1000000000"), "data.image_size: 1000000000 pixels is too large"),
    "image_size_beyond_memory": Case(run_config("", "data.image_size=4096"), "data.image_size: 4096x4096 images of "
                                                                             "100 rows need 1.6 GiB, more than"),
    "batch_size_1e12": Case(run_config("", "classifier.batch_size=1000000000000"), "classifier.batch_size: "
                                                                                   "1000000000000 is too large"),
    "ebm_nf_1e6": Case(command_config("train-ebm", EBM_JOB + "output: {tmp}/ebm\n", "--set", "ebm.nf=1000000"),
                       "ebm.nf: must be <= 1024"),
    "empty_class_in_partition": Case(run_config("", "data.train_partitions=200", "data.train_partition=199",
                                                "data.train_per_class=null"), "holds no training image of class"),
    # --- devices, tracking, names
    "device_banana": Case(run_config("", "classifier.device=banana"), "classifier.device: expected auto, cpu, cuda"),
    "device_cuda_99": Case(run_config("", "classifier.device=cuda:99"), "classifier.device: 'cuda:99' is not available"),
    "tracking_uri_scheme": Case(run_config("", "tracking.uri=gopher://example.org/x"),
                                "tracking.uri: unsupported scheme 'gopher'"),
    "tracking_experiment_empty": Case(run_config("", "tracking.experiment="), "tracking.experiment: the MLflow "
                                                                             "experiment name must not be empty"),
    "run_name_traversal": Case(run_config("name: ../../escape\n"), "name: '../../escape' is not a plain name"),
    "sweep_name_traversal": Case(sweep(name="../../escape"), "name: '../../escape' is not a plain name"),
    "sweep_model_name_traversal": Case(sweep(models="{'../m': {kind: ebm}}"), "models.../m: '../m' is not a plain"),
    "empty_sweep": Case(raw_config("", "sweep"), "empty config"),
    # --- output locations
    "output_dir_is_a_file": Case(run_config("", "output_dir={tmp}/cfg.yaml"), "is an existing file, expected a "
                                                                             "directory"),
    "output_dir_below_a_file": Case(run_config("", "output_dir={tmp}/cfg.yaml/out"), "cfg.yaml is a file, not a "
                                                                                    "directory"),
    "train_ebm_output_is_a_file": Case(command_config("train-ebm", EBM_JOB + "output: {tmp}/taken\n", prepare=a_file),
                                       "output: {tmp}/taken is an existing file"),
    "train_ebm_output_holds_other_files": Case(command_config("train-ebm", EBM_JOB + "output: {tmp}/taken\n",
                                                              prepare=a_directory_of_user_files),
                                               "is a directory of other files, not a checkpoint"),
    "train_ebm_output_holds_a_ddpm": Case(command_config("train-ebm", EBM_JOB + "output: {tmp}/taken\n",
                                                         prepare=a_ddpm_checkpoint), "holds a 'ddpm' checkpoint"),
    "purify_output_is_a_directory": Case(command_config("purify", DATA + "output: {tmp}\nstore: {tmp}/store\n",
                                                        "--no-ray"), "is an existing directory, expected the path"),
    "artifacts_ls_missing_store": Case(lambda tmp: ["artifacts", "ls", "--store", str(tmp / "typo")],
                                       "--store {tmp}/typo: no artifact store there"),
    # --- Parquet datasets
    "parquet_label_100000": Case(parquet_run([0, 1, 100000], [0, 1]), "train.parquet row 2: label 100000, but no "
                                                                       "training image has label 2"),
    "parquet_label_2_31": Case(parquet_run([0, 1, 2**31 - 1], [0, 1]), "row 2: label 2147483647"),
    "parquet_test_only_label": Case(parquet_run([0, 1, 0, 1], [0, 1, 2]), "test.parquet row 2: label 2 is not a "
                                                                          "class of the train split"),
    "parquet_negative_label": Case(parquet_run([0, 1, -3], [0, 1]), "negative values (row 2)"),
    "parquet_float_labels": Case(parquet_run([0, 1], [0, 1], label_type=pa.float32()), "expected integers"),
    "parquet_truncated": Case(parquet_run([0, 1], [0, 1], after=truncate), "train.parquet: not a readable Parquet"),
    "parquet_not_parquet": Case(parquet_run([0, 1], [0, 1], after=not_parquet), "test.parquet: not a readable Parquet"),
    "parquet_no_rows": Case(parquet_run([], [0, 1]), "train.parquet: the file has no rows"),
    "parquet_missing_column": Case(parquet_run([0, 1], [0, 1], after=without_label_column), "no column 'label'"),
    "parquet_mixed_image_sizes": Case(parquet_run([0, 1], [0, 1], train_images=[GRAY, png(np.zeros((9, 8), np.uint8))]),
                                      "train.parquet row 1: image is 9x8 but the first image is 8x8"),
    "parquet_16bit_images": Case(parquet_run([0, 1], [0, 1], train_images=[png(np.full((8, 8), 1000, np.uint16))] * 2),
                                 "train.parquet row 0: a 'I;16' image (16-bit pixels); expected 8-bit"),
    "image_folder_empty_class": Case(image_folder_run(empty_class), "train/b holds no images (png/jpg/jpeg)"),
    "image_folder_truncated_png": Case(image_folder_run(corrupt_png), "train/b/0.png: cannot decode the image"),
    # --- poisons
    "trigger_beyond_eps": Case(trigger_run(np.full((16, 16), 24 / 255, np.float32)), "24.0/255 in pixel units"),
    "trigger_nan": Case(trigger_run(np.full((16, 16), np.nan, np.float32)), "the trigger has non-finite values"),
    "trigger_wrong_shape": Case(trigger_run(np.zeros((3, 32, 32), np.float32)), "trigger of shape (3, 32, 32)"),
    "toxic_poison_beyond_eps": Case(toxic_beyond_eps, "poison 0 (id 0) differs from its base image by"),
    # --- checkpoints
    "ebm_is_a_ddpm_checkpoint": Case(with_ebm(lambda tmp: ebm_checkpoint(tmp / "ebm", kind="ddpm")),
                                     "checkpoint holds a 'ddpm' model, expected 'ebm'"),
    "ebm_of_another_nf": Case(with_ebm(lambda tmp: ebm_checkpoint(tmp / "ebm", written={**asdict(TINY_EBM), "nf": 8})),
                              "the architecture expects"),
    "ebm_for_other_images": Case(with_ebm(lambda tmp: ebm_checkpoint(
        tmp / "ebm", EBMConfig(arch="convnet", nf=4, in_channels=3, image_size=16))), "with 3 channel(s), the data has "
                                                                                      "16x16x1"),
    "ebm_weights_nan": Case(with_ebm(lambda tmp: ebm_checkpoint(tmp / "ebm", nan=True)), "holds non-finite values"),
    "ebm_weights_pickled": Case(with_ebm(pickled_weights), "not a readable safetensors file"),
    "ebm_missing": Case(with_ebm(lambda tmp: tmp / "no-such-ebm"), "no-such-ebm/config.json: checkpoint config not "
                                                                   "found"),
    # --- non-finite values while computing (tracking off: with it on, the FAILED MLflow run is the record)
    "classifier_loss_diverges": Case(run_config("tracking: {enabled: false}\n", "classifier.lr=1e30",
                                                "classifier.batch_size=8"), "classifier training loss is"),
    "ebm_training_diverges": Case(command_config("train-ebm", EBM_JOB + "output: {tmp}/ebm\ntracking: {enabled: false}\n",
                                                 "--set", "train.langevin.temperature=1e-38"), "EBM training loss is"),
    "purification_diverges": Case(with_ebm(lambda tmp: ebm_checkpoint(tmp / "ebm", scale=1e20), command="purify"),
                                  "non-finite EBM energy or gradient at purification Langevin step"),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its content (directories: "dir")."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_leaves_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PUREGEN_STORE", raising=False)
    monkeypatch.chdir(tmp_path)  # relative defaults (outputs/, mlruns/) would land here and be seen
    monkeypatch.setattr(datasets, "_physical_memory", lambda: 2**30)  # 1 GiB: the same verdict on any machine
    spec = CASES[case]
    argv = spec.setup(tmp_path)
    before = snapshot(tmp_path)
    code = main(["-q", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    assert at(spec.needle, tmp_path) in err, err
    assert snapshot(tmp_path) == before  # nothing written, moved or removed
    assert not (tmp_path / "pwned").exists()


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "run", (interrupted, "run"))
    assert main(["-q", "run", "cfg.yaml"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
