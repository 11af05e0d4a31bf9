"""Which stages are bit-reproducible across machines, and how far the others drift (issue 16, item 1).

On one machine a sweep is bit-reproducible (tests/integration/test_reproducibility.py). Across machines, PyTorch
and oneDNN pick floating-point kernels by the CPU's instruction set, so the same code can round differently on
another CPU. This script makes that difference on one machine: it runs each stage through the CLI, as a user would,
once per instruction-set ceiling (``ATEN_CPU_CAPABILITY`` for PyTorch's own kernels, ``ONEDNN_MAX_CPU_ISA`` for
oneDNN's convolutions), and compares every output with the native run:

- ``ebm``: PureGen-EBM Langevin purification of 20 real CIFAR-10 images (the shipped ``ebm-cifar10-cpu-nf64``,
  ``--steps`` steps);
- ``ddpm``: PureGen-DDPM purification of 10 CIFAR-10 images (the shipped ``ddpm-cifar10-cpu``, T_D = 75);
- ``jpeg``: the JPEG baseline on digits;
- ``badnets``: the BadNets poison set of a digits ``run``;
- ``train``: the README's one-experiment run, ``sweeps/quickstart_run.yaml`` (digits, BadNets, no defense, small
  CNN, ``--epochs`` epochs, default 15 as shipped): natural accuracy and poison success.

Purified images are compared in uint8 levels (max and mean |Δ|, share of pixels that differ); the run's metrics
in percentage points. A different CPU model is a different point of this same kind (the earlier README numbers
came from an AMD EPYC with AVX2, the current ones from an Intel Xeon with AVX-512).

    python benchmarks/cross_machine.py --isas native,avx2,default --json benchmarks/cross_machine.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"
ISAS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
        "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}}
"""Instruction-set ceilings: this CPU's best, AVX2 (an AVX2-only CPU such as the earlier AMD EPYC VM), none."""


def purify_configs(work: Path, steps: int) -> dict[str, str]:
    """``purify --no-ray`` configs of the three purification stages (YAML text)."""
    refs = REPO / "puregen_dist" / "reference_models"
    cifar = f"{{dataset: parquet, root: {CIFAR}, train_per_class: %d, test_per_class: 1}}"
    return {
        "ebm": (f"name: xm-ebm\nseed: 0\noutput: {work}/ebm.parquet\ndata: {cifar % 2}\n"
                f"defense: {{name: puregen_ebm, ebm: {refs / 'ebm-cifar10-cpu-nf64'}, langevin: {{steps: {steps}}}}}\n"
                "tracking: {enabled: false}\n"),
        "ddpm": (f"name: xm-ddpm\nseed: 0\noutput: {work}/ddpm.parquet\ndata: {cifar % 1}\n"
                 f"defense: {{name: puregen_ddpm, ddpm: {refs / 'ddpm-cifar10-cpu'}}}\ntracking: {{enabled: false}}\n"),
        "jpeg": (f"name: xm-jpeg\nseed: 0\noutput: {work}/jpeg.parquet\ndata: {{dataset: digits}}\n"
                 "defense: {name: jpeg, quality: 50}\ntracking: {enabled: false}\n"),
    }




def child(isa: str, work: Path, steps: int, epochs: int) -> dict[str, str]:
    """Run every stage under ``isa`` into ``work``; returns the output paths."""
    env = {**os.environ, **ISAS[isa], "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    env.pop("RAY_ADDRESS", None)
    outputs = {}
    for stage, text in purify_configs(work, steps).items():
        config = work / f"{stage}.yaml"
        config.write_text(text)
        done = subprocess.run(["puregen-dist", "-q", "purify", str(config), "--no-ray"], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{isa} {stage}: {done.stderr[-2000:]}")
        outputs[stage] = str(work / f"{stage}.parquet")
    done = subprocess.run(["puregen-dist", "-q", "run", str(REPO / "sweeps" / "quickstart_run.yaml"),
                           "--set", f"output_dir={work}/run", "--set", f"classifier.epochs={epochs}",
                           "--set", "classifier.threads=2"], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{isa} train: {done.stderr[-2000:]}")
    outputs["train"] = str(work / "mlflow.db")
    return outputs


def images(path: str) -> np.ndarray:
    from puregen_dist.data.io import read_imageset

    data, _ = read_imageset(path)  # sorted by id
    return data.images


def metrics(database: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{database}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {k: v for k, v in runs[0].data.metrics.items() if k in ("nat_acc", "poison_success_m1")}


def compare(native: dict[str, str], other: dict[str, str]) -> dict[str, dict[str, float]]:
    rows = {}
    for stage in ("ebm", "ddpm", "jpeg"):
        a, b = images(native[stage]).astype(np.int16), images(other[stage]).astype(np.int16)
        diff = np.abs(a - b)
        rows[stage] = {"identical": bool((diff == 0).all()), "max_levels": int(diff.max()),
                       "mean_levels": float(diff.mean()), "pixels_differing": float((diff > 0).mean())}
    m_a, m_b = metrics(native["train"]), metrics(other["train"])
    rows["train"] = {"identical": m_a == m_b, **{f"{k}_native": 100 * v for k, v in m_a.items()},
                     **{f"{k}_delta_pp": 100 * (m_b[k] - m_a[k]) for k in m_a}}
    return rows


def markdown(result: dict) -> str:
    lines = [f"Cross-instruction-set reproducibility ({result['cpu']}, {result['date']}; `{result['command']}`):", "",
             "| stage | ISA ceiling | bit-identical to native | max \\|Δ\\| (levels) | mean \\|Δ\\| | pixels differing |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for isa, rows in result["compared"].items():
        for stage in ("ebm", "ddpm", "jpeg"):
            r = rows[stage]
            lines.append(f"| {stage} | {isa} | {'yes' if r['identical'] else 'no'} | {r['max_levels']} | "
                         f"{r['mean_levels']:.4f} | {100 * r['pixels_differing']:.2f} % |")
    lines += ["", "| run (sweeps/quickstart_run.yaml) | ISA ceiling | identical | nat acc | Δ nat acc (pp) | "
              "poison success m=1 | Δ (pp) |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for isa, rows in result["compared"].items():
        r = rows["train"]
        lines.append(f"| train + evaluate | {isa} | {'yes' if r['identical'] else 'no'} | {r['nat_acc_native']:.2f} | "
                     f"{r['nat_acc_delta_pp']:+.2f} | {r['poison_success_m1_native']:.2f} | "
                     f"{r['poison_success_m1_delta_pp']:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isas", default="native,avx2,default")
    parser.add_argument("--steps", type=int, default=40, help="Langevin steps of the EBM stage")
    parser.add_argument("--epochs", type=int, default=15, help="classifier epochs of the train stage")
    parser.add_argument("--json", type=Path, help="write the raw result here")
    args = parser.parse_args()
    isas = args.isas.split(",")
    if isas[0] != "native" or any(isa not in ISAS for isa in isas):
        raise SystemExit(f"--isas: start with native, then any of {sorted(ISAS)}")
    sys.path.insert(0, str(Path(__file__).parent))
    from common import cpu_model

    tmp = Path(tempfile.mkdtemp(prefix="cross-machine-"))
    outputs = {}
    for isa in isas:
        work = tmp / isa
        work.mkdir()
        print(f"running every stage with the {isa} instruction set ...", file=sys.stderr)
        outputs[isa] = child(isa, work, args.steps, args.epochs)
    compared = {isa: compare(outputs["native"], outputs[isa]) for isa in isas[1:]}
    shutil.rmtree(tmp)  # kept when a stage fails, to look at
    command = "python benchmarks/cross_machine.py " + " ".join(sys.argv[1:])
    result = {"cpu": cpu_model(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command.strip(), "steps": args.steps, "epochs": args.epochs, "compared": compared}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
