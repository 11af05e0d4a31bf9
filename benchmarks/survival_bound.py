"""Trigger survival of the ideal DDPM of a Gaussian fit of CIFAR-10 (issue 9): the ρ that a model knowing only the
images' second moments leaves at each purification noise level, beside which a trained DDPM's ρ is read.

Fits Σ on the generative half of CIFAR-10 (the images the CPU DDPM trained on), draws the survival diagnostic's
random patterns (same families, eps and seeding as `diagnose`), and prints ρ = Σ_k λ_k/(λ_k+s)⟨v_k,δ⟩²/‖δ‖² with
s = (1−ᾱ)/ᾱ (`puregen_dist.generative.survival.gaussian_survival`) per pattern and T_D, as a Markdown table.

    python benchmarks/survival_bound.py --root ../shared/datasets/cifar10-jpeg --steps 25 50 75 125 250
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from puregen_dist.config.schema import DataConfig
from puregen_dist.data.datasets import load_data
from puregen_dist.generative.diffusion import DDPMSchedule
from puregen_dist.generative.survival import (
    covariance_spectrum,
    gaussian_survival,
    image_covariance,
    make_pattern,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 75, 125, 250])
    parser.add_argument("--patterns", nargs="+", default=["sign", "smooth4", "smooth8", "smooth16"])
    parser.add_argument("--eps", type=float, default=16 / 255)
    parser.add_argument("--num-patterns", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tick = time.perf_counter()
    train, _ = load_data(DataConfig(dataset="parquet", root=args.root, train_partitions=2, train_partition=1,
                                    test_per_class=1))
    x = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    spectrum = covariance_spectrum(image_covariance(x))
    shape = tuple(x.shape[1:])
    print(f"covariance of {len(x)} generative-half images ({time.perf_counter() - tick:.0f} s); "
          f"eigenvalues {float(spectrum[0].max()):.3g} .. {float(spectrum[0].min()):.3g}")
    schedule = DDPMSchedule.linear()
    ids = list(range(args.num_patterns))
    deltas = {name: make_pattern(name, ids, shape, args.eps, seed=args.seed) for name in args.patterns}
    print("\n| T_D | ᾱ | noise std ([-1,1]) | " + " | ".join(f"ρ {n}" for n in args.patterns) + " |")
    print("|---" * (3 + len(args.patterns)) + "|")
    for steps in args.steps:
        alpha_bar = schedule.alpha_bar(steps)
        rhos = [float(np.nanmean(gaussian_survival(spectrum, alpha_bar, deltas[n]))) for n in args.patterns]
        print(f"| {steps} | {alpha_bar:.4f} | {np.sqrt(1 - alpha_bar):.3f} | "
              + " | ".join(f"{r:.3f}" for r in rhos) + " |")


if __name__ == "__main__":
    main()
