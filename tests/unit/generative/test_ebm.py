"""EBM networks, the Langevin update, EBM training and checkpoints (PUREGEN_REFERENCE §1)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import make_imageset
from puregen_dist.config.generative import EBMConfig, EBMJob, EBMTrainConfig, LangevinConfig
from puregen_dist.generative.checkpoints import CheckpointError, save_checkpoint
from puregen_dist.generative.ebm import build_ebm
from puregen_dist.generative.langevin import langevin_step
from puregen_dist.generative.noise import SampleNoise
from puregen_dist.generative.purifiers import EBMPurifier, load_ebm
from puregen_dist.generative.train_ebm import EBMTrainer, checkpoint_epoch, train_ebm
from puregen_dist.tracking import NullTracker

TINY = EBMConfig(nf=8, in_channels=1, image_size=16)


def tiny_job(tmp_path, epochs=1, **train):
    cfg = {"epochs": epochs, "batch_size": 16, "bank_size": 32, "mcmc_steps": 5, "sample_grid": 4,
           "sample_steps": 2, "device": "cpu", **train}
    return EBMJob(output=str(tmp_path / "ebm"), ebm=TINY, train=EBMTrainConfig(**cfg))


def tiny_data(n=32):
    return make_imageset(n=n, size=16, channels=1, classes=4)


def test_sngan32_has_the_published_parameter_count_and_any_input_size():
    assert sum(p.numel() for p in build_ebm(EBMConfig()).parameters()) == 1_053_824
    for c, s in [(1, 8), (3, 16), (3, 64)]:
        for arch in ("sngan32", "convnet"):
            model = build_ebm(EBMConfig(arch=arch, nf=8, in_channels=c, image_size=s))
            assert model(torch.zeros(2, c, s, s)).shape == (2,)


def test_sngan32_has_no_normalisation_and_a_bias_free_head():
    model = build_ebm(EBMConfig(nf=8))
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in model.modules())
    assert model.linear.bias is None


def test_golden_energy_and_noise_at_fixed_seed():
    torch.manual_seed(0)
    model = build_ebm(TINY)
    x = torch.linspace(-1, 1, 512).view(2, 1, 16, 16)
    assert model(x).tolist() == pytest.approx([-0.5156965851783752, -0.014834608882665634], rel=1e-4)
    z = SampleNoise(np.array([5, 7]), 0, 1).randn((3,))
    assert z.flatten().tolist() == pytest.approx([1.4651983976, 0.7474815249, -1.070183754,
                                                  -0.8267760873, -0.4594596624, -0.4441316724], rel=1e-6)


def test_one_langevin_step_matches_the_equation():
    """G(x) = a/2 ‖x‖² has ∇G = a x, so x' = x − (ε²/2)(a x / T) + ε z exactly."""
    a, eps, temp = 3.0, 1.25e-2, 1e-4
    x = torch.tensor([[[[0.5, -0.25]]]])
    z = torch.tensor([[[[1.0, -2.0]]]])
    x_next, energy, grad = langevin_step(lambda v: 0.5 * a * v.pow(2).flatten(1).sum(1), x, eps, temp, z)
    drift = 0.5 * eps**2 * a / temp  # 2.34375
    expected = x * (1 - drift) + eps * z  # by hand: [-0.659375, 0.3109375]
    assert torch.allclose(x_next, expected, atol=1e-7)
    assert x_next.flatten().tolist() == pytest.approx([-0.659375, 0.3109375], abs=1e-6)
    assert energy.item() == pytest.approx(0.46875) and torch.allclose(grad, a * x / temp)


def test_purifier_with_zero_steps_is_identity_and_output_is_clamped():
    purifier = EBMPurifier(build_ebm(TINY), LangevinConfig(steps=0))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.equal(purifier.purify(x, torch.arange(3), seed=0), x)
    out = EBMPurifier(build_ebm(TINY), LangevinConfig(steps=3, step_size=1.0)).purify(x, torch.arange(3), seed=0)
    assert out.min() >= -1 and out.max() <= 1


def test_nan_energy_stops_purification_naming_the_step_and_ids():
    model = build_ebm(TINY)
    with torch.no_grad():
        model.linear.weight.fill_(float("nan"))
    purifier = EBMPurifier(model, LangevinConfig(steps=12))
    with pytest.raises(FloatingPointError, match=r"purification Langevin step 10 \(sample ids \[7, 8\]\)"):
        purifier.purify(torch.zeros(2, 1, 16, 16), torch.tensor([7, 8]), seed=0)


def test_nan_stops_training_with_the_epoch(tmp_path):
    trainer = EBMTrainer(tiny_job(tmp_path), tiny_data())
    with torch.no_grad():
        trainer.model.linear.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="epoch 1"):
        trainer.step(trainer.data[:16])


def test_one_training_step_golden(tmp_path):
    rng = np.random.default_rng(0)
    data = make_imageset(n=32, size=16, channels=1, classes=4).replace(
        images=rng.integers(0, 256, (32, 16, 16, 1), dtype=np.uint8))
    job = tiny_job(tmp_path)
    trainer = EBMTrainer(job, data)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = trainer.step(trainer.data[:16])
    assert stats["ebm_loss"] == pytest.approx(124.4409408569336, rel=1e-3)  # recorded at torch 2.14.1, CPU
    assert stats["energy_pos"] == pytest.approx(-0.20280715823173523, rel=1e-3)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_training_resumes_exactly_from_its_checkpoint(tmp_path, device):
    """On CUDA the chain noise is drawn on the device from a generator reseeded per chain from the trainer's
    own: a resumed run must still equal the straight one. cuDNN's default kernels are not deterministic (two
    straight runs on an H200 differed by 1.5e-8, a resumed one by up to 1.3e-7), so the CUDA case runs with
    deterministic cuDNN and no TF32, under which the H200 gave bit-equal weights."""
    data = tiny_data()
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        straight = train_ebm(tiny_job(tmp_path / "a", epochs=3, device=device), data, NullTracker())
        tracker = NullTracker()
        train_ebm(tiny_job(tmp_path / "b", epochs=2, device=device), data, NullTracker())
        resumed = train_ebm(tiny_job(tmp_path / "b", epochs=3, device=device), data, tracker)
    assert checkpoint_epoch(resumed) == 3 and {step for _, _, step in tracker.metrics} == {3}
    a, b = load_ebm(straight)[0], load_ebm(resumed)[0]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_checkpoints_refuse_mismatches_and_pickles(tmp_path):
    model = build_ebm(TINY)
    good = save_checkpoint(tmp_path / "good", model, kind="ebm", model_config=dataclasses.asdict(TINY))
    assert isinstance(load_ebm(good)[0], torch.nn.Module)
    wrong_arch = save_checkpoint(tmp_path / "wrong", build_ebm(dataclasses.replace(TINY, nf=16)), kind="ebm",
                                 model_config=dataclasses.asdict(TINY))
    with pytest.raises(CheckpointError, match="shape"):
        load_ebm(wrong_arch)
    wrong_kind = save_checkpoint(tmp_path / "kind", model, kind="ddpm", model_config=dataclasses.asdict(TINY))
    with pytest.raises(CheckpointError, match="'ddpm' model, expected 'ebm'"):
        load_ebm(wrong_kind)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"kind": "ebm", "model": dataclasses.asdict(TINY)}))
    torch.save({"state": model.state_dict(), "code": print}, pickled / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused"):
        load_ebm(pickled)
    bad_config = save_checkpoint(tmp_path / "cfg", model, kind="ebm", model_config={"arch": "resnet"})
    with pytest.raises(CheckpointError, match="invalid EBM config"):
        load_ebm(bad_config)
    with pytest.raises(CheckpointError, match="not found"):
        load_ebm(tmp_path / "absent")
