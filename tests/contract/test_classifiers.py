"""Contract tests for every registered classifier architecture (shapes, training step, eval determinism)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import puregen_dist.classifiers  # noqa: F401  (registers the built-in architectures)
from puregen_dist.classifiers import build_classifier
from puregen_dist.registry import CLASSIFIERS

NAMES = CLASSIFIERS.names()
SETTINGS = [(3, 32), (1, 16)]  # (in_channels, image_size): CIFAR-like and the digits default
NUM_CLASSES = 10
BATCH = 4


def _build(name: str, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return build_classifier(name, in_channels=in_channels, num_classes=NUM_CLASSES, image_size=image_size)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_expected_architectures_registered() -> None:
    expected = {"resnet18", "resnet34", "mobilenet_v2", "densenet121", "hlb_small", "hlb_medium", "hlb_large"}
    assert expected | {"small_cnn"} <= set(NAMES)


@pytest.mark.parametrize("in_channels,image_size", SETTINGS)
@pytest.mark.parametrize("name", NAMES)
def test_one_training_step(name: str, in_channels: int, image_size: int) -> None:
    model = _build(name, in_channels, image_size).train()
    x = torch.randn(BATCH, in_channels, image_size, image_size)
    y = torch.randint(0, NUM_CLASSES, (BATCH,))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logits = model(x)
    assert logits.shape == (BATCH, NUM_CLASSES)
    loss = nn.functional.cross_entropy(logits, y)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_is_deterministic(name: str) -> None:
    model = _build(name, 1, 16).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)


@pytest.mark.parametrize("in_channels,image_size", [(1, 8), (3, 8), (3, 64)])
@pytest.mark.parametrize("name", NAMES)
def test_any_input_size(name: str, in_channels: int, image_size: int) -> None:
    model = _build(name, in_channels, image_size).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, image_size, image_size))
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()


def test_resnet_parameter_counts() -> None:
    n18 = _n_params(_build("resnet18"))
    assert n18 == 11_173_962 or abs(n18 - 11.17e6) / 11.17e6 < 0.005
    assert _n_params(_build("resnet34")) > n18


def test_hlb_variants_are_distinct() -> None:
    counts = [_n_params(_build(name)) for name in ("hlb_small", "hlb_medium", "hlb_large")]
    assert all(a != b for a, b in itertools.combinations(counts, 2))


def test_hlb_batchnorm_weight_frozen() -> None:
    norms = [m for m in _build("hlb_small").modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    assert all(not m.weight.requires_grad and m.bias.requires_grad and m.eps == 1e-12 for m in norms)


def test_small_cnn_is_small() -> None:
    assert _n_params(_build("small_cnn", 1, 16)) < 200_000
    assert _n_params(_build("small_cnn", 3, 32)) < 200_000
