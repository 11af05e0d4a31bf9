"""The shipped CIFAR-10 reference models (issue 9): each one's recipe file hashes to its recorded key (so a sweep
naming the recipe imports it), its training data has the recorded fingerprint, it loads, and on real CIFAR-10
images of the classifier half it orders clean < perturbed < noise (EBM: energy G(x); DDPM: the denoising error
‖ε̂(x_t, t) − ε‖² at t = 50 with the same ε for all three, the ε-loss that bounds −log p(x))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from puregen_dist.config.loading import build, load_yaml
from puregen_dist.config.schema import DataConfig
from puregen_dist.data.datasets import load_data
from puregen_dist.data.io import imageset_fingerprint
from puregen_dist.generative.ddpm import load_ddpm
from puregen_dist.generative.diffusion import q_sample
from puregen_dist.generative.purifiers import EBMPurifier, load_ebm
from puregen_dist.generative.survival import sign_pattern
from puregen_dist.pipeline import reference
from puregen_dist.pipeline.keys import model_artifact
from puregen_dist.registry import MODELS

REPO = Path(__file__).resolve().parents[2]
CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"
EBM_REFERENCES = ("ebm-cifar10-cpu-k100", "ebm-cifar10-cpu-nf64", "ebm-cifar10-gpu-nf128")
DDPM_REFERENCE = "ddpm-cifar10-cpu"
RECIPES = {"ebm-cifar10-cpu-k100": "sweeps/ebm_cifar10_cpu_k100.yaml",
           "ebm-cifar10-gpu-nf128": "sweeps/ebm_cifar10_gpu_nf128.yaml",
           "ebm-cifar10-cpu-nf64": "sweeps/ebm_cifar10_cpu_nf64.yaml", DDPM_REFERENCE: "sweeps/ddpm_cifar10_cpu.yaml"}
SHIPPED = {path.name: path for path in reference.shipped_references().values()}

needs_cifar = pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"{CIFAR10} not present (a fresh clone has no "
                                                               "../shared)")


def test_every_shipped_reference_is_small_and_has_its_recipe_file():
    assert set(SHIPPED) <= set(RECIPES), f"a shipped reference without a recipe file: {sorted(SHIPPED)}"
    assert SHIPPED, "no reference model is shipped in puregen_dist/reference_models/"
    for name, path in SHIPPED.items():
        assert (path / "model.safetensors").stat().st_size <= 25 * 2**20, f"{name}: weights over 25 MB"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_recipe_file_hashes_to_the_shipped_key(name):
    record, job = reference.read_reference(SHIPPED[name])
    recipe_file = load_yaml(REPO / RECIPES[name])
    from_file = build(MODELS.get(record["kind"]).config_cls, recipe_file, source=RECIPES[name])
    assert model_artifact(from_file)[1] == model_artifact(job)[1] == record["key"]
    assert reference.reference_for_key(record["key"]) == SHIPPED[name]


def classifier_half_images(count: int) -> torch.Tensor:
    """(count, 3, 32, 32) CIFAR-10 test images in [-1, 1] (never seen by either generative model)."""
    _, test = load_data(DataConfig(dataset="parquet", root=str(CIFAR10), train_partitions=2, train_partition=0,
                                   train_per_class=1, test_per_class=count // 10))
    return torch.from_numpy(test.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def clean_perturbed_noise(count: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean images, the same with a random ±16/255 sign pattern (clipped), and uniform noise."""
    clean = classifier_half_images(count)
    delta = sign_pattern(range(len(clean)), tuple(clean.shape[1:]), 16 / 255, seed=0)
    perturbed = (clean + 2 * delta).clamp(-1, 1)
    noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return clean, perturbed, noise


@needs_cifar
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_training_data_has_the_recorded_fingerprint(name):
    record, job = reference.read_reference(SHIPPED[name])
    train, _ = load_data(job.data)
    assert imageset_fingerprint(train) == record["data_fingerprint"]


@needs_cifar
@pytest.mark.parametrize("name", [n for n in EBM_REFERENCES if n in SHIPPED])
def test_ebm_energy_orders_clean_below_perturbed_below_noise(name):
    energy, _ = load_ebm(SHIPPED[name])
    purifier = EBMPurifier(energy, reference.read_reference(SHIPPED[name])[1].train.langevin)
    clean, perturbed, noise = (purifier.energies(x) for x in clean_perturbed_noise())
    assert clean.mean() < perturbed.mean() < noise.mean()
    assert (clean < perturbed).float().mean() >= 0.9  # per image, not only on average


@needs_cifar
@pytest.mark.skipif(DDPM_REFERENCE not in SHIPPED, reason="the DDPM reference is not shipped")
def test_ddpm_denoising_error_orders_clean_below_perturbed_below_noise():
    unet, schedule = load_ddpm(SHIPPED[DDPM_REFERENCE])
    images = clean_perturbed_noise()
    eps = torch.randn(images[0].shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((len(eps),), 50, dtype=torch.long)
    errors = []
    with torch.no_grad():
        for x0 in images:
            predicted = unet(q_sample(x0, t, eps, schedule), t).sample
            errors.append(((predicted - eps) ** 2).flatten(1).mean(dim=1))
    clean, perturbed, noise = errors
    assert clean.mean() < perturbed.mean() < noise.mean()
    assert (clean < perturbed).float().mean() >= 0.9
    assert np.isfinite(noise.numpy()).all()
