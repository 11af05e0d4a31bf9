"""benchmarks/training.py (issue 15): its plain loop trains the same kind of model as ``train_classifier``, its
augmentation does what the package's does, and its report renders."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, make_imageset
from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.data.transforms import to_unit


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("training_benchmark", REPO_ROOT / "benchmarks" / "training.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def separable_case(bench):
    """Class c has mean brightness 40 + 60c: learnable in a few epochs."""
    data = make_imageset(n=96, size=8, channels=1, classes=4)
    noise = np.random.default_rng(1).integers(0, 20, data.images.shape)
    data = data.replace(images=(40 + 60 * data.labels[:, None, None, None] + noise).astype(np.uint8))
    cfg = ClassifierConfig(name="small_cnn", epochs=4, batch_size=16, lr=0.05, milestones=(3,), crop_padding=1,
                           flip=True, device="cpu")
    return bench.Case("separable", "small_cnn", cfg, data)


def test_plain_loop_and_train_classifier_train_the_same_kind_of_model(bench):
    torch.set_num_threads(1)  # tiny convolutions: threads only contend (conftest restores the count)
    case, cpu = separable_case(bench), torch.device("cpu")
    start = [p.detach().clone() for p in bench.initial_model(case).parameters()]
    models = {name: bench.VARIANTS[name](bench.initial_model(case), case.train, case.cfg, 0, cpu)
              for name in ("plain", "ours")}
    plain, ours = models["plain"], models["ours"]
    assert type(plain) is type(ours) and type(plain.net) is type(ours.net)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in ours.parameters()] == [p.shape for p in start]
    for model in (plain, ours):
        assert not model.training
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))
        assert bench.train_accuracy(model, case.train, cpu) > 0.9


def test_plain_augmentation_crops_a_padded_window_and_flips_whole_images(bench):
    x = to_unit(make_imageset(n=6, size=5, channels=2).images)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(bench.plain_augment(x, 0, False, generator), x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    cropped = bench.plain_augment(x, 2, False, generator)
    for image, source in zip(cropped, padded, strict=True):
        windows = [source[:, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(image, w) for w in windows)
    flipped = bench.plain_augment(x, 0, True, generator)
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(2)) for a, b in zip(flipped, x, strict=True))


def test_markdown_renders_the_measured_rounds(bench):
    case = separable_case(bench)
    args = argparse.Namespace(device="cpu", threads=2, repeats=3)
    measured = {"seconds": {"plain": [1.0, 1.2, 1.1], "ours": [1.1, 1.0, 1.05]},
                "cpu_seconds": {"plain": [2.0, 2.0, 2.0], "ours": [2.0, 2.0, 2.0]},
                "utilisation": {"plain": [], "ours": []}, "train_accuracy": {"plain": 0.9, "ours": 0.91}}
    result = bench.summarise(args, case, measured)
    assert result["ratio"] == pytest.approx(1.1 / 1.05) and result["meets_target"]
    text = bench.markdown(result)
    assert text.startswith("## Classifier training loop (issue 15)")
    assert "**Ratio plain / ours: 1.048**" in text and " ".join(["python", *sys.argv]) in text
