"""Gradient Matching efficacy at CPU scale (issue 11): for each poison key, brew poisons on a clean surrogate,
retrain a victim from scratch on the poisoned set, and compare with a victim trained on the same rows carrying
random ±ε sign noise (the same budget, the same targets) and with the clean set.

Prints one line per trial (the target's adversarial-class probability and prediction under each victim) and the
success counts. Examples (results: docs/attacks.md, "What it does at CPU scale"):

    python benchmarks/gradient_matching_efficacy.py --data cifar10 --keys 0 1 2 3 4 5
    python benchmarks/gradient_matching_efficacy.py --data digits --per-class 20 --arch small_cnn --epochs 15 \
        --eps 32 --poisons 20 --iterations 150 --shift 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from puregen_dist.attacks.gradient_matching import (
    GradientMatchingAttack,
    GradientMatchingConfig,
    brew_poisons,
)
from puregen_dist.classifiers.training import train_classifier
from puregen_dist.config.loading import build
from puregen_dist.config.schema import DataConfig, ExperimentConfig
from puregen_dist.data.datasets import load_data
from puregen_dist.data.transforms import to_unit, unit_to_uint8
from puregen_dist.experiment import build_model

DATA = {
    "cifar10": {"dataset": "parquet", "root": "../shared/datasets/cifar10-jpeg", "train_per_class": 100,
                "test_per_class": 50},
    "digits": {"dataset": "digits", "train_partitions": 2},
}


def efficacy(data_cfg: dict, *, arch: str = "hlb_small", epochs: int = 12, eps: float = 16 / 255,
             poisons: int = 20, iterations: int = 80, restarts: int = 1, shift: int = 2,
             keys: tuple[int, ...] = (0, 1, 2, 3, 4, 5), threads: int = 2, clean: bool = True) -> dict:
    """Per poison key: the target's adversarial probability and prediction under victims (seed 1, from scratch)
    trained on the Gradient-Matching set, on the same rows with random ±eps sign noise, and (``clean``) on the
    clean set; the surrogate is the same recipe at seed 0. Returns {"trials": [...], "counts": {gm, noise,
    clean}} (no "clean" entries without ``clean``)."""
    torch.set_num_threads(threads)
    train, test = load_data(DataConfig(**data_cfg))
    recipe = {"name": arch, "epochs": epochs, "batch_size": 64, "lr": 0.05, "milestones": [max(1, epochs * 2 // 3)],
              "crop_padding": shift, "flip": False, "threads": threads}

    def fit(images, seed: int) -> torch.nn.Module:
        cfg = build(ExperimentConfig, {"data": data_cfg, "seed": seed, "classifier": recipe}, source="benchmark")
        data = train.replace(images=images)
        model = build_model(cfg, data)
        train_classifier(model, data, cfg.classifier, seed=seed)
        return model.eval()

    start = time.perf_counter()
    surrogate = fit(train.images, seed=0)
    print(f"{len(train)} training images; surrogate trained in {time.perf_counter() - start:.0f} s", flush=True)
    victims = ("gm", "noise", "clean") if clean else ("gm", "noise")
    results, counts = [], dict.fromkeys(victims, 0)
    clean_victim = fit(train.images, seed=1) if clean else None
    for key in keys:
        cfg = GradientMatchingConfig(surrogate="-", poison_key=key, eps=eps, num_poisons=poisons)
        trial = GradientMatchingAttack(cfg).draw_trial(train, test)
        bases = to_unit(train.images[trial.poison_rows])
        target = to_unit(test.images[[trial.target_row]])
        brew = brew_poisons(surrogate, bases, torch.from_numpy(train.labels[trial.poison_rows]), target,
                            torch.tensor([trial.adversarial_label]), eps=eps, iterations=iterations,
                            restarts=restarts, augment=shift > 0, augment_shift=shift,
                            generator=torch.Generator().manual_seed(key))
        noise = (torch.randint(0, 2, bases.shape, generator=torch.Generator().manual_seed(1000 + key)) * 2 - 1) * eps
        row = {"key": key, "target_row": trial.target_row, "true": int(test.labels[trial.target_row]),
               "adversarial": trial.adversarial_label, "alignment_loss": [brew.losses[0], brew.losses[-1]]}
        for name, delta in zip(victims, (brew.delta, noise.float(), None), strict=False):
            if delta is None:
                victim = clean_victim
            else:
                images = train.images.copy()
                images[trial.poison_rows] = unit_to_uint8((bases + delta).clamp(0, 1))
                victim = fit(images, seed=1)
            with torch.no_grad():
                probs = torch.softmax(victim(target), 1)[0]
            counts[name] += int(probs.argmax()) == trial.adversarial_label
            row[name] = {"p_adv": float(probs[trial.adversarial_label]), "pred": int(probs.argmax())}
        results.append(row)
        print(f"key {key}: target {trial.target_row} ({row['true']} -> {row['adversarial']}), 1-cos "
              f"{brew.losses[0]:.3f} -> {brew.losses[-1]:.3f}; p_adv "
              + " / ".join(f"{name} {row[name]['p_adv']:.3f}" for name in victims), flush=True)
    n = len(keys)
    print("targets flipped: " + ", ".join(f"{name} {counts[name]}/{n}" for name in victims)
          + f"  ({time.perf_counter() - start:.0f} s)")
    return {"trials": results, "counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA), default="cifar10")
    parser.add_argument("--per-class", type=int, default=100, help="training images per class (0: all)")
    parser.add_argument("--arch", default="hlb_small")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--eps", type=float, default=16, help="L-inf bound in 0-255 units")
    parser.add_argument("--poisons", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--shift", type=int, default=2, help="crop padding of victims = crafting translation")
    parser.add_argument("--keys", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the per-trial results here")
    args = parser.parse_args()
    data_cfg = dict(DATA[args.data], **({"train_per_class": args.per_class} if args.per_class else {}))
    result = efficacy(data_cfg, arch=args.arch, epochs=args.epochs, eps=args.eps / 255, poisons=args.poisons,
                      iterations=args.iterations, restarts=args.restarts, shift=args.shift, keys=tuple(args.keys),
                      threads=args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **result}, f, indent=1)


if __name__ == "__main__":
    main()
