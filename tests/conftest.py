"""Shared fixtures: tiny seeded data, and paths to the repository and the shared datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from puregen_dist.plugins import load_plugins
from puregen_dist.types import ImageSet

load_plugins()  # the test session is an entry point: register the built-in attacks, defenses, models

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def make_imageset(n: int = 64, size: int = 8, channels: int = 3, classes: int = 4, seed: int = 0) -> ImageSet:
    """Random uint8 images, labels cycling over ``classes``, ids 100..100+n-1 (not positions, on purpose)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    labels = (np.arange(n) % classes).astype(np.int64)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    return ImageSet(images, labels, ids, tuple(f"c{i}" for i in range(classes)))


def kill_processes(family: list) -> None:
    """SIGKILL every ``psutil.Process`` of ``family`` (gone ones skipped) and wait for them, at most 30 s."""
    import psutil

    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


@pytest.fixture
def tiny_imageset() -> ImageSet:
    return make_imageset()


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests may change the default dtype, thread count or global seed; put them back."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    state = torch.random.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    torch.random.set_rng_state(state)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Randomly initialised EBM and DDPM checkpoints for 16x16 images with 1 and 3 channels:
    ``{channels: (ebm_dir, ddpm_dir)}``. Enough for contract tests (not for purification quality)."""
    from puregen_dist.config.generative import DDPMConfig, EBMConfig
    from puregen_dist.generative.checkpoints import save_checkpoint
    from puregen_dist.generative.ebm import build_ebm
    from puregen_dist.generative.unet import build_unet

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    out = {}
    for channels in (1, 3):
        torch.manual_seed(channels)
        ebm_cfg = EBMConfig(nf=8, in_channels=channels, image_size=16)
        ddpm_cfg = DDPMConfig(size="S", in_channels=channels, image_size=16, layers_per_block=1)
        ebm = save_checkpoint(root / f"ebm{channels}", build_ebm(ebm_cfg), kind="ebm",
                              model_config=ebm_cfg.__dict__)
        ddpm = save_checkpoint(root / f"ddpm{channels}", build_unet(ddpm_cfg), kind="ddpm",
                               model_config=ddpm_cfg.__dict__)
        out[channels] = (ebm, ddpm)
    return out


# --- a poisoned digits set and a detector trained on it (the FRIENDS, EPIC and filter tests) -----------------

DIGITS_CNN_RECIPE = dict(name="small_cnn", epochs=8, batch_size=64, lr=0.05, milestones=(6,), crop_padding=1,
                         flip=False, threads=1)
"""The quickstart's small CNN recipe with fewer epochs: ~3 s on one CPU core."""


@pytest.fixture(scope="session")
def digits_patch_poison():
    """(poisoned training set, poison ids): digits with a dirty-label 3x3 checkerboard BadNets patch on 5% of
    the images, relabelled to class 0 (a third of class 0's rows are then poisons)."""
    from puregen_dist.attacks import build_attack
    from puregen_dist.attacks.badnets import BadNetsConfig
    from puregen_dist.config.schema import DataConfig
    from puregen_dist.data.datasets import load_data

    train, _ = load_data(DataConfig())
    poison = build_attack(BadNetsConfig(target_class=0, budget=0.05, label_mode="dirty")).craft(train, seed=0)
    return poison.materialize(), poison.poison_ids


@pytest.fixture(scope="session")
def digits_detector(digits_patch_poison):
    """A small CNN trained on the poisoned digits set (it learns the backdoor)."""
    from puregen_dist.config.schema import ClassifierConfig
    from puregen_dist.defenses.filtering import train_detector

    return train_detector(digits_patch_poison[0], ClassifierConfig(**DIGITS_CNN_RECIPE), seed=0)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance (2 CPUs, token authentication) for the tests of one module, without Ray Data's
    progress bars; shut down after the module."""
    import ray

    from puregen_dist.pipeline.purify import ensure_ray

    ensure_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
