"""Classifier training loop: ``train_classifier`` versus a plain PyTorch loop (issue 15, deliverable 4).

Both variants train the same model class from the same initial weights (seed 0) on the same data with the same
recipe: SGD (momentum, weight decay), MultiStepLR, batch size, epochs, and the same augmentation ops (zero-pad,
random crop, random horizontal flip). Ours is :func:`~puregen_dist.classifiers.training.train_classifier` with
everything it does per epoch (seeded shuffling and augmentation, loss/accuracy bookkeeping, the non-finite loss
check, the schedule, the epoch's stats and log line). The plain loop is the textbook one::

    model.train()
    for x, y in batches:
        opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()

with the images converted to float once, moved to the device once, and batches indexed and augmented there.
Rounds are interleaved (every variant once per round, the order alternating, after one warm-up round);
the table reports medians, and ratio = plain time / our time (>= 0.95 is the target). Also reported: the
median of the per-round ratios, and the ratio of median process CPU times. On a shared machine another job's
threads stretch the wall times of a 2-thread run many-fold (OpenMP workers spin at barriers while a sibling is
descheduled): read a run whose rounds scatter widely as contended, not as a result.

With ``--device cuda`` the GPU's utilisation is sampled while each variant runs (``torch.cuda.utilization``,
else ``nvidia-smi``).

    python benchmarks/training.py --json training.json
    python benchmarks/training.py --case cifar_random --device cuda --epochs 5 --json training_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.training import Normalized, train_classifier
from puregen_dist.config.schema import ClassifierConfig, DataConfig
from puregen_dist.data.datasets import load_data
from puregen_dist.data.transforms import to_unit
from puregen_dist.plugins import load_plugins
from puregen_dist.types import ImageSet

TARGET_RATIO = 0.95
"""Issue 15: our loop takes at most 1/0.95 of the plain loop's time."""


@dataclass(frozen=True)
class Case:
    """What both variants train: a classifier registry name, its recipe, and the training set."""

    name: str
    classifier: str
    cfg: ClassifierConfig
    train: ImageSet

    def describe(self) -> dict[str, Any]:
        h, w, c = self.train.shape
        cfg = self.cfg
        return {"name": self.name, "classifier": self.classifier, "images": len(self.train),
                "shape": f"{c}x{h}x{w}", "classes": self.train.num_classes, "epochs": cfg.epochs,
                "batch_size": cfg.batch_size, "lr": cfg.lr, "milestones": list(cfg.milestones),
                "crop_padding": cfg.crop_padding, "flip": cfg.flip}


def digits_case(epochs: int, device: str) -> Case:
    """The quickstart's classifier (small CNN, batch 64, lr 0.05) on the whole digits training split (1347
    images, 1x16x16), with the package's default augmentation (crop padding 4, flips)."""
    train, _ = load_data(DataConfig(dataset="digits"))
    cfg = ClassifierConfig(name="small_cnn", epochs=epochs, batch_size=64, lr=0.05,
                           milestones=(max(1, 2 * epochs // 3),), device=device)
    return Case("digits", "small_cnn", cfg, train)


def cifar_random_case(epochs: int, device: str, images: int = 10_000) -> Case:
    """ResNet-18 on CIFAR-shaped random data (3x32x32 uint8, 10 classes): the paper's recipe (batch 128,
    lr 0.1, crop padding 4, flips) at a size that keeps a GPU busy."""
    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8),
                     (np.arange(images) % 10).astype(np.int64), np.arange(images, dtype=np.int64),
                     tuple(str(c) for c in range(10)))
    cfg = ClassifierConfig(name="resnet18", epochs=epochs, milestones=(max(1, 2 * epochs // 3),), device=device)
    return Case("cifar_random", "resnet18", cfg, train)


CASES: dict[str, Callable[[int, str], Case]] = {"digits": digits_case, "cifar_random": cifar_random_case}


def initial_model(case: Case) -> nn.Module:
    """The classifier of ``case`` initialised from seed 0, taking [0, 1] input (normalisation 0.5 / 0.5)."""
    h, _, c = case.train.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_classifier(case.classifier, in_channels=c, num_classes=case.train.num_classes, image_size=h)
    return Normalized(net, (0.5,) * c, (0.5,) * c)


# ------------------------------------------------------------------------------------------ the plain loop


def plain_augment(x: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Zero-pad, random crop back and random h-flip of (N, C, H, W), on ``x``'s device."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device, generator=generator)
        rows = dy + torch.arange(h, device=x.device).view(1, h, 1)
        cols = dx + torch.arange(w, device=x.device).view(1, 1, w)
        x = padded[torch.arange(n, device=x.device).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, 1, 1, 1, device=x.device, generator=generator) < 0.5
        x = torch.where(mask, x.flip(3), x)
    return x


def plain_train(model: nn.Module, train: ImageSet, cfg: ClassifierConfig, seed: int,
                device: torch.device) -> nn.Module:
    """The textbook loop over ``train`` (uint8 NHWC, converted once): returns the trained model (eval mode)."""
    model.to(device)
    images, labels = to_unit(train.images).to(device), torch.from_numpy(train.labels).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), gamma=cfg.gamma)
    generator = torch.Generator(device=device).manual_seed(seed)
    for _ in range(cfg.epochs):
        model.train()
        for index in torch.randperm(len(train), device=device, generator=generator).split(cfg.batch_size):
            x, y = plain_augment(images[index], cfg.crop_padding, cfg.flip, generator), labels[index]
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        schedule.step()
    return model.eval()


def ours_train(model: nn.Module, train: ImageSet, cfg: ClassifierConfig, seed: int,
               device: torch.device) -> nn.Module:
    """The package's loop (``cfg.device`` names the device)."""
    del device
    return train_classifier(model, train, cfg, seed=seed).model


VARIANTS: dict[str, Callable[..., nn.Module]] = {"plain": plain_train, "ours": ours_train}


# ------------------------------------------------------------------------------------------ measuring


class UtilisationSampler:
    """Samples the GPU's utilisation (percent) every ``interval`` seconds on a thread, while in a ``with``."""

    def __init__(self, device: torch.device, interval: float = 0.1) -> None:
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self.source = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def _read(self) -> float | None:
        try:
            value = float(torch.cuda.utilization(self.device))
            self.source = "torch.cuda.utilization"
            return value
        except Exception:  # no pynvml/amdsmi: ask nvidia-smi
            self.source = "nvidia-smi"
            try:
                out = subprocess.run(["nvidia-smi", f"--id={self.device.index or 0}", "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            except (OSError, subprocess.SubprocessError):
                return None
            return float(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def timed_run(variant: str, case: Case, device: torch.device) -> tuple[float, float, list[float], nn.Module]:
    """One training run of ``variant`` from the initial weights: (wall seconds, process CPU seconds, GPU
    utilisation samples, model). CPU time is the steadier figure on a shared machine with one thread (other
    processes stretch the wall time, not the CPU time); with more threads it also counts their spin-waits."""
    model = initial_model(case)
    sampler = UtilisationSampler(device) if device.type == "cuda" else None
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    if sampler is not None:
        with sampler:
            trained = VARIANTS[variant](model, case.train, case.cfg, 0, device)
            _sync(device)
    else:
        trained = VARIANTS[variant](model, case.train, case.cfg, 0, device)
    return time.perf_counter() - start, time.process_time() - cpu, sampler.samples if sampler else [], trained


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_accuracy(model: nn.Module, train: ImageSet, device: torch.device) -> float:
    """Accuracy of ``model`` on the (unaugmented) training set: both variants should learn alike."""
    with torch.no_grad():
        logits = torch.cat([model(to_unit(train.images[i:i + 512]).to(device)) for i in range(0, len(train), 512)])
    return float((logits.argmax(1).cpu().numpy() == train.labels).mean())


def measure(case: Case, device: torch.device, repeats: int) -> dict[str, Any]:
    """One warm-up round, then ``repeats`` interleaved rounds (order alternating); seconds, utilisation and
    the last round's training accuracy per variant."""
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    util: dict[str, list[float]] = {name: [] for name in VARIANTS}
    accuracy: dict[str, float] = {}
    for round_index in range(repeats + 1):
        order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            spent, cpu_spent, samples, model = timed_run(name, case, device)
            if round_index > 0:
                seconds[name].append(spent)
                cpu[name].append(cpu_spent)
                util[name].extend(samples)
            accuracy[name] = train_accuracy(model, case.train, device)
            print(f"round {round_index}{' (warm-up)' if round_index == 0 else ''} {name}: {spent:.3f}s",
                  file=sys.stderr)
    return {"seconds": seconds, "cpu_seconds": cpu, "utilisation": util, "train_accuracy": accuracy}


def summarise(args: argparse.Namespace, case: Case, measured: dict[str, Any]) -> dict[str, Any]:
    median = {name: statistics.median(values) for name, values in measured["seconds"].items()}
    median_cpu = {name: statistics.median(values) for name, values in measured["cpu_seconds"].items()}
    steps = case.cfg.epochs * -(-len(case.train) // case.cfg.batch_size)
    result: dict[str, Any] = {
        "argv": sys.argv, "machine": machine(args), "case": case.describe(), "repeats": args.repeats,
        "seconds": measured["seconds"], "median_s": median, "steps": steps,
        "cpu_seconds": measured["cpu_seconds"], "median_cpu_s": median_cpu,
        "images_per_s": {name: case.cfg.epochs * len(case.train) / s for name, s in median.items()},
        "train_accuracy": measured["train_accuracy"],
        "ratio": median["plain"] / median["ours"], "target": TARGET_RATIO,
        "cpu_ratio": median_cpu["plain"] / median_cpu["ours"],
        "paired_ratio": statistics.median(p / o for p, o in zip(measured["seconds"]["plain"],
                                                                measured["seconds"]["ours"], strict=True)),
    }
    result["meets_target"] = result["ratio"] >= TARGET_RATIO
    if args.device.startswith("cuda"):
        result["gpu_utilisation"] = {name: _util_summary(v) for name, v in measured["utilisation"].items()}
    return result


def _util_summary(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"samples": 0}
    return {"samples": len(samples), "mean": float(np.mean(samples)), "median": float(np.median(samples)),
            "p10": float(np.percentile(samples, 10))}


def machine(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                            "python": platform.python_version(), "cpu": _cpu_model(),
                            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "loadavg": os.getloadavg()[0]}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ------------------------------------------------------------------------------------------ report


def headline(result: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """Issue 15's target: ``train_classifier`` >= 0.95x the plain loop (time ratio plain / ours)."""
    return [(f"classifier training ({result['case']['name']}): plain loop "
             "time / ours", result["ratio"], f">= {result['target']}", result["ratio"] >= result["target"])]


def markdown(result: dict[str, Any]) -> str:
    """The RESULTS.md section of one run's ``result`` (what :func:`main` writes with ``--json``)."""
    case, info, median = result["case"], result["machine"], result["median_s"]
    device = "GPU (" + info["gpu"] + ")" if "gpu" in info else f"CPU ({info['nproc']} cores, {info['threads']} threads)"
    lines = [
        "## Classifier training loop (issue 15)", "",
        f"`train_classifier` (the package's loop: seeded shuffling and augmentation, loss/accuracy bookkeeping, "
        f"the non-finite loss check, the schedule, per-epoch stats) against a plain PyTorch loop written in the "
        f"benchmark (`model.train(); for x, y in batches: opt.zero_grad(); loss = F.cross_entropy(model(x), y); "
        f"loss.backward(); opt.step()`, data converted to float and moved to the device once, the same "
        f"pad/crop/flip ops applied batch-wise). Same model class and initial weights, same data, SGD and "
        f"MultiStepLR, batch size and epochs: {case['classifier']} on {case['name']} ({case['images']} images "
        f"{case['shape']}, {case['classes']} classes), {case['epochs']} epochs of batch {case['batch_size']} "
        f"(crop padding {case['crop_padding']}, flip {case['flip']}), on {device}. One warm-up round, then "
        f"{result['repeats']} interleaved rounds; medians. Script: `benchmarks/training.py`.", "",
        "| variant | median s | images/s | rounds (s) | median CPU s | train accuracy |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, label in (("plain", "plain PyTorch loop"), ("ours", "`train_classifier`")):
        rounds = " ".join(f"{s:.2f}" for s in result["seconds"][name])
        lines.append(f"| {label} | {median[name]:.3f} | {result['images_per_s'][name]:.0f} | {rounds} | "
                     f"{result['median_cpu_s'][name]:.3f} | {result['train_accuracy'][name]:.3f} |")
    verdict = "meets" if result["meets_target"] else "misses"
    lines += ["", f"**Ratio plain / ours: {result['ratio']:.3f}** ({verdict} the target >= {result['target']}); "
              f"median of the per-round ratios (each round's two runs back to back): {result['paired_ratio']:.3f}; "
              f"ratio of median process CPU times: {result['cpu_ratio']:.3f}."]
    if "gpu_utilisation" in result:
        util = result["gpu_utilisation"]
        lines += ["", "GPU utilisation while training (samples every 0.1 s): " + "; ".join(
            f"{name} mean {u.get('mean', float('nan')):.0f}% (median {u.get('median', float('nan')):.0f}%, "
            f"p10 {u.get('p10', float('nan')):.0f}%, {u['samples']} samples)" for name, u in util.items()) + "."]
    lines += ["", f"Machine: {info['cpu']}, torch {info['torch']}, {info['date']}, load average "
              f"{info['loadavg']:.2f} at the start.", "", "```", " ".join(["python", *result["argv"]]), "```", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="digits")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds after the warm-up")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="write the result here")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    load_plugins()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    case = CASES[args.case](args.epochs, args.device)
    result = summarise(args, case, measure(case, device, args.repeats))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
