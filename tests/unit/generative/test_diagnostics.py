"""PureGen diagnostics (Figures 1 and 3 of https://arxiv.org/abs/2405.18627): energy groups, ℓ2 trajectories
of EBM and DDPM purification, and their PNG/CSV outputs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from puregen_dist.config.generative import DDPMConfig, EBMConfig, LangevinConfig
from puregen_dist.data.transforms import to_sym
from puregen_dist.generative.ddpm import DDPMPurifier
from puregen_dist.generative.diagnostics import (
    D_CLEAN_TO_PURIFIED_CLEAN,
    D_CLEAN_TO_PURIFIED_POISONED,
    D_POISONED_TO_PURIFIED_POISONED,
    DISTANCES,
    Trajectories,
    ddpm_l2_trajectories,
    ebm_l2_trajectories,
    energy_groups,
)
from puregen_dist.generative.diffusion import DDPMSchedule
from puregen_dist.generative.ebm import build_ebm
from puregen_dist.generative.purifiers import EBMPurifier
from puregen_dist.generative.unet import build_unet
from puregen_dist.plots import energy_histogram_png, trajectories_png, write_csv

SIZE, N, STEPS, SEED = 16, 6, 12, 7
DDPM_CFG = DDPMConfig(size="S", in_channels=1, image_size=SIZE, layers_per_block=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only spin against each other on a busy 2-core machine (10-100× slower).
    Module scope, so that the module-scoped chains below run single-threaded too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ebm() -> EBMPurifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_ebm(EBMConfig(nf=8, in_channels=1, image_size=SIZE))
    return EBMPurifier(model, LangevinConfig(steps=STEPS))


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """(clean, poisoned) uint8 (N, 16, 16, 1); the poison is a ±8/255 pattern, clipped to [0, 255]."""
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (N, SIZE, SIZE, 1), dtype=np.uint8)
    delta = rng.choice([-8, 8], size=clean.shape)
    return clean, np.clip(clean.astype(np.int64) + delta, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def batch(images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    clean, poisoned = images
    return to_sym(clean), to_sym(poisoned), torch.arange(100, 100 + N, dtype=torch.int64)


def per_image_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).flatten(1).double(), dim=1).mean())


@pytest.fixture(scope="module")
def ebm_traj(ebm, batch) -> Trajectories:
    clean, poisoned, ids = batch
    return ebm_l2_trajectories(ebm, clean, poisoned, ids, seed=SEED, every=1)


def test_ebm_trajectory_starts_at_the_poison(ebm_traj, batch):
    clean, poisoned, _ = batch
    np.testing.assert_array_equal(ebm_traj.steps, np.arange(STEPS + 1))
    assert set(ebm_traj.distances) == set(DISTANCES)
    assert ebm_traj.mean(D_CLEAN_TO_PURIFIED_POISONED)[0] == pytest.approx(per_image_mean(clean, poisoned))
    assert ebm_traj.mean(D_POISONED_TO_PURIFIED_POISONED)[0] == 0.0
    assert ebm_traj.mean(D_CLEAN_TO_PURIFIED_CLEAN)[0] == 0.0
    assert ebm_traj.mean(D_CLEAN_TO_PURIFIED_CLEAN)[-1] > 0.0


def test_ebm_trajectory_is_the_purifier_chain(ebm, ebm_traj, batch):
    """The last recorded step is EBMPurifier.purify's output: the chains (and their noise) are the same."""
    clean, poisoned, ids = batch
    purified_poisoned = ebm.purify(poisoned, ids, seed=SEED)
    purified_clean = ebm.purify(clean, ids, seed=SEED)
    expected = {D_CLEAN_TO_PURIFIED_POISONED: per_image_mean(clean, purified_poisoned),
                D_POISONED_TO_PURIFIED_POISONED: per_image_mean(poisoned, purified_poisoned),
                D_CLEAN_TO_PURIFIED_CLEAN: per_image_mean(clean, purified_clean)}
    for name, value in expected.items():
        assert ebm_traj.mean(name)[-1] == pytest.approx(value, abs=1e-4), name
    # and not a coincidence: another seed gives another chain
    other = per_image_mean(clean, ebm.purify(poisoned, ids, seed=SEED + 1))
    assert abs(other - expected[D_CLEAN_TO_PURIFIED_POISONED]) > 1e-3


def test_ebm_trajectory_ends_exactly_at_the_purified_output(ebm, ebm_traj, batch):
    """The trajectories watch the purification loop itself (a per-step observer), so the last recorded
    distances are those of ``purify``'s output bit for bit, and the recorded steps do not depend on the
    diagnostic's own batching."""
    clean, poisoned, ids = batch
    purified_poisoned = ebm.purify(poisoned, ids, seed=SEED)
    purified_clean = ebm.purify(clean, ids, seed=SEED)
    expected = {D_CLEAN_TO_PURIFIED_POISONED: per_image(clean, purified_poisoned),
                D_POISONED_TO_PURIFIED_POISONED: per_image(poisoned, purified_poisoned),
                D_CLEAN_TO_PURIFIED_CLEAN: per_image(clean, purified_clean)}
    for name, norms in expected.items():
        assert ebm_traj.mean(name)[-1] == norms.mean(), name
        assert ebm_traj.distances[name][1][-1] == norms.std(), name
    sparse = ebm_l2_trajectories(ebm, clean, poisoned, ids, seed=SEED, every=5, batch_size=4)
    for name in DISTANCES:
        np.testing.assert_array_equal(sparse.mean(name), ebm_traj.mean(name)[[0, 5, 10, 12]])


def per_image(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.linalg.vector_norm((a - b).flatten(1).double(), dim=1).numpy()


def test_ebm_trajectory_every_and_batching(ebm, ebm_traj, batch):
    clean, poisoned, ids = batch
    sparse = ebm_l2_trajectories(ebm, clean, poisoned, ids, seed=SEED, every=5, batch_size=4)
    np.testing.assert_array_equal(sparse.steps, [0, 5, 10, 12])
    for name in DISTANCES:
        np.testing.assert_allclose(sparse.distances[name][0], ebm_traj.mean(name)[[0, 5, 10, 12]], atol=1e-5)
        np.testing.assert_allclose(sparse.distances[name][1], ebm_traj.distances[name][1][[0, 5, 10, 12]],
                                   atol=1e-5)
    with pytest.raises(ValueError, match="every"):
        ebm_l2_trajectories(ebm, clean, poisoned, ids, seed=SEED, every=0)


def test_ddpm_trajectory(batch):
    clean, poisoned, ids = batch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_unet(DDPM_CFG)
    purifier = DDPMPurifier(unet, DDPMSchedule.from_config(DDPM_CFG), steps=5)
    traj = ddpm_l2_trajectories(purifier, clean, poisoned, ids, seed=SEED, steps_grid=[5, 0, 2])
    np.testing.assert_array_equal(traj.steps, [0, 2, 5])
    assert traj.mean(D_CLEAN_TO_PURIFIED_POISONED)[0] == pytest.approx(per_image_mean(clean, poisoned))
    assert traj.mean(D_POISONED_TO_PURIFIED_POISONED)[0] == 0.0
    assert traj.mean(D_CLEAN_TO_PURIFIED_CLEAN)[0] == 0.0
    assert traj.mean(D_POISONED_TO_PURIFIED_POISONED)[2] > 0.0
    # T_D = 5 is the purifier's own purification
    expected = per_image_mean(clean, purifier.purify(poisoned, ids, seed=SEED))
    assert traj.mean(D_CLEAN_TO_PURIFIED_POISONED)[2] == pytest.approx(expected, abs=1e-4)


def test_energy_groups(ebm, images):
    clean, poisoned = images
    groups = {"clean": clean, "poisoned": poisoned[:4], "empty": clean[:0]}
    energies = energy_groups(ebm, groups, batch_size=4)
    assert list(energies) == ["clean", "poisoned", "empty"]
    assert [e.shape for e in energies.values()] == [(N,), (4,), (0,)]
    np.testing.assert_allclose(energies["clean"], ebm.energies(to_sym(clean)).numpy(), rtol=1e-5, atol=1e-6)


def handmade(d_cp: list[float], d_pp: list[float], steps: list[int] | None = None) -> Trajectories:
    steps = steps or list(range(0, 10 * len(d_cp), 10))
    zeros = np.zeros(len(d_cp))
    return Trajectories(np.asarray(steps), {
        D_CLEAN_TO_PURIFIED_POISONED: (np.asarray(d_cp), zeros + 0.1),
        D_POISONED_TO_PURIFIED_POISONED: (np.asarray(d_pp), zeros + 0.1),
        D_CLEAN_TO_PURIFIED_CLEAN: (np.asarray(d_pp) * 0.9, zeros + 0.1)})


def test_crossing_step():
    assert handmade([1.0, 0.9, 0.7, 0.5], [0.0, 0.5, 0.8, 0.9]).crossing_step() == 20
    assert handmade([1.0, 0.9, 0.7, 0.5], [0.0, 0.5, 0.7, 0.9]).crossing_step() == 30  # strict
    assert handmade([1.0, 0.9], [0.0, 0.5]).crossing_step() is None
    assert handmade([1.0, 0.2], [0.0, 0.5], steps=[0, 150]).crossing_step() == 150
    with pytest.raises(ValueError, match="steps"):
        Trajectories(np.arange(3), {D_CLEAN_TO_PURIFIED_POISONED: (np.zeros(2), np.zeros(2))})


def test_as_rows():
    rows = handmade([1.0, 0.2], [0.0, 0.5]).as_rows()
    assert rows[1]["step"] == 10 and rows[1][f"{D_CLEAN_TO_PURIFIED_POISONED}_mean"] == 0.2
    assert list(rows[0]) == ["step"] + [f"{n}_{s}" for n in DISTANCES for s in ("mean", "std")]


def open_png(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_pngs_and_csv(tmp_path, ebm_traj):
    rng = np.random.default_rng(1)
    energies = {"clean": rng.normal(0, 1, 50), "poisoned": rng.normal(3, 1, 5),
                "purified": rng.normal(0.2, 1, 5)}
    hist = energy_histogram_png(energies, tmp_path / "figs" / "energy.png", "energies")
    assert min(open_png(hist)) > 100
    crossing = handmade([1.0, 0.9, 0.5], [0.0, 0.6, 0.8])
    for name, traj in {"ebm": ebm_traj, "crossing": crossing}.items():
        assert min(open_png(trajectories_png(traj, tmp_path / f"{name}.png", name, "Langevin steps"))) > 100
    table = write_csv(ebm_traj.as_rows(), tmp_path / "traj.csv")
    with table.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(ebm_traj.as_rows()[0])
    assert len(rows) == 1 + len(ebm_traj.steps)
    assert float(rows[-1][1]) == pytest.approx(ebm_traj.mean(D_CLEAN_TO_PURIFIED_POISONED)[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crossing.png", "ebm.png", "figs", "traj.csv"]


def test_write_csv_overwrites_atomically_and_keeps_header_without_rows(tmp_path):
    path = tmp_path / "t.csv"
    write_csv([{"a": 1, "b": 2}], path)
    write_csv([], path, fieldnames=["a", "b"])
    assert path.read_text().splitlines() == ["a,b"]
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]
