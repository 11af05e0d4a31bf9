"""The training loop after issue 15 (data resident on the device, no per-batch host sync): the same numbers at a
fixed seed as before it, and on CUDA a loop that never waits for the GPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import make_imageset
from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.training import Normalized, ResidentSet, _train_epoch, train_classifier
from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.protocols import TrainHook

DEFAULT_AUGMENTATION = ClassifierConfig(name="small_cnn", epochs=2, batch_size=16, lr=0.05, milestones=(1,))
BATCH_OF_ONE = ClassifierConfig(name="small_cnn", epochs=3, batch_size=33, lr=0.05, milestones=(1,),
                                crop_padding=1, flip=False)  # 100 rows: 33 + 33 + 33 + a skipped batch of one
WITH_HOOK = ClassifierConfig(name="small_cnn", epochs=2, batch_size=33, lr=0.05, milestones=(1,))


class NoiseHook(TrainHook):
    """Adds noise drawn from the training generator to each batch (as FRIENDS does)."""

    def on_batch(self, x, ids, generator):
        return x + 0.05 * torch.randn(x.shape, generator=generator).to(x.device)


def model(channels=3, classes=5, size=12):
    torch.manual_seed(0)
    net = build_classifier("small_cnn", in_channels=channels, num_classes=classes, image_size=size)
    return Normalized(net, (0.5,) * channels, (0.5,) * channels)


def trained(cfg, hooks=(), device="cpu"):
    torch.set_num_threads(1)
    data = make_imageset(n=100, size=12, channels=3, classes=5)
    result = train_classifier(model(), data, dataclasses.replace(cfg, device=device), seed=3, hooks=hooks)
    weights = sum(float(p.detach().double().sum()) for p in result.model.parameters())
    return weights, [(h["train_loss"], h["train_acc"]) for h in result.history]


# Golden numbers of train_classifier before issue 15 (augmentation on the CPU, loss.item() per batch), at seed
# 3, one thread: the loop's order of random draws, its skip of a batch of one and its loss sums are unchanged.
@pytest.mark.parametrize(("cfg", "hooks", "weights", "history"), [
    (DEFAULT_AUGMENTATION, (), 233.43667992398704, [(1.6529614543914795, 0.18), (1.6546094131469726, 0.21)]),
    (BATCH_OF_ONE, (), 230.61312941258035,
     [(1.6117394542694092, 0.2), (1.5771446406841279, 0.31), (1.5690601480007171, 0.33)]),
    (WITH_HOOK, (NoiseHook(),), 229.82974787880596, [(1.605161372423172, 0.2), (1.5934022569656372, 0.18)]),
], ids=["crop4-flip", "batch-of-one", "on_batch-hook"])
def test_results_at_a_fixed_seed_are_unchanged(cfg, hooks, weights, history):
    got_weights, got_history = trained(cfg, hooks)  # bit-identical here; tolerances leave room for other CPUs
    assert got_weights == pytest.approx(weights, rel=1e-4)
    assert [loss for loss, _ in got_history] == pytest.approx([loss for loss, _ in history], rel=1e-4)
    assert [acc for _, acc in got_history] == pytest.approx([acc for _, acc in history], abs=0.02)


def test_the_training_set_moves_to_the_device_once_per_set():
    data, other = make_imageset(n=8), make_imageset(n=8, seed=1)
    resident = ResidentSet(torch.device("cpu"))
    first = resident.of(data)
    assert resident.of(data) is first  # every epoch of the same set: no new copy
    assert first.images.dtype == torch.uint8 and tuple(first.images.shape) == data.images.shape
    assert torch.equal(first.labels, torch.from_numpy(data.labels))
    assert resident.of(other).data is other  # a hook's new set for an epoch: that one


def test_a_non_finite_loss_stops_training_at_the_end_of_its_epoch():
    class Poison(TrainHook):
        def on_batch(self, x, ids, generator):
            return x * float("nan")

    with pytest.raises(FloatingPointError, match="loss is nan in epoch 1"):
        trained(DEFAULT_AUGMENTATION, (Poison(),))


def test_normalized_makes_its_statistics_once_per_device_and_matches_normalize():
    from puregen_dist.data.transforms import normalize

    wrapped = Normalized(torch.nn.Identity(), (0.25, 0.5, 0.75), (0.5, 0.25, 0.125))
    x = torch.rand(4, 3, 5, 5)
    assert torch.equal(wrapped(x), normalize(x, wrapped.mean, wrapped.std))
    assert torch.equal(wrapped(x[:2]), normalize(x[:2], wrapped.mean, wrapped.std)) and len(wrapped._stats) == 1
    grey = Normalized(torch.nn.Identity(), (0.5,), (0.25,))  # one value for every channel
    with torch.inference_mode():  # statistics first made here still serve a call that needs gradients
        assert torch.equal(grey(x), normalize(x, (0.5,), (0.25,)))
    x.requires_grad_(True)
    grey(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 4.0))


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_epoch_augments_on_the_device_and_never_waits_for_it():
    cuda = torch.device("cuda")
    data = make_imageset(n=100, size=12, channels=3, classes=5)
    net = model().to(cuda)
    seen = []

    class Probe(TrainHook):
        def on_batch(self, x, ids, generator):
            seen.append((x.device.type, ids.device.type))
            return x

    resident = ResidentSet(cuda).of(data)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, 12, 12, device=cuda))  # Normalized copies its statistics over once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation in the epoch raises
    try:
        loss_sum, correct = _train_epoch(net, resident, DEFAULT_AUGMENTATION, optimizer,
                                         torch.nn.CrossEntropyLoss(), generator, [Probe()])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert resident.images.device.type == "cuda" and loss_sum.device.type == "cuda"
    assert seen == [("cuda", "cpu")] * 7  # batches on the device, their ids on the host (TrainHook contract)
    assert np.isfinite(float(loss_sum)) and 0 <= int(correct) <= 100


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_follows_the_cpu_run():
    """Same seed: the same batches and augmentation draws (CPU generator) on both devices, so the losses agree
    up to the devices' rounding."""
    cpu_weights, cpu_history = trained(WITH_HOOK, (NoiseHook(),))
    cuda_weights, cuda_history = trained(WITH_HOOK, (NoiseHook(),), device="cuda")
    assert cuda_history[0][0] == pytest.approx(cpu_history[0][0], rel=1e-3)
    assert cuda_weights == pytest.approx(cpu_weights, rel=1e-3)
