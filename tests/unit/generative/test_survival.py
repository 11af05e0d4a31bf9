"""Trigger survival ρ = ⟨Ψ(x+δ) − Ψ(x), δ⟩ / ‖δ‖² (issue 9): patterns, the statistic, and closed-form chains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from puregen_dist.config.generative import LangevinConfig
from puregen_dist.generative.purifiers import EBMPurifier
from puregen_dist.generative.survival import (
    covariance_spectrum,
    gaussian_survival,
    image_covariance,
    make_pattern,
    perturb,
    relative_change,
    sign_pattern,
    smooth_pattern,
    survival,
)
from puregen_dist.generative.survival import ebm_survival as ebm_rho

SHAPE = (3, 8, 8)
EPS = 16 / 255


class Quadratic(nn.Module):
    """G(x) = c/2 ‖x‖² per image: Langevin contracts every perturbation by (1 − ε²c/(2T)) per step."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.c * x.flatten(1).pow(2).sum(dim=1)


def images(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-0.3, 0.3] (far from the clamp), ids 10..10+n-1."""
    x = (torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(0)) - 0.5) * 0.6
    return x, torch.arange(10, 10 + n)


def test_sign_pattern_is_plus_minus_eps_and_seeded_per_id():
    delta = sign_pattern([1, 2, 3], SHAPE, EPS, seed=0)
    assert delta.shape == (3, *SHAPE)
    assert torch.all(delta.abs() == torch.tensor(EPS, dtype=torch.float32))
    torch.testing.assert_close(sign_pattern([3, 1], SHAPE, EPS, seed=0), delta[[2, 0]])
    assert not torch.equal(sign_pattern([1], SHAPE, EPS, seed=1), delta[:1])


@pytest.mark.parametrize("cells", [1, 4, 8])
def test_smooth_pattern_has_linf_eps_and_is_smooth(cells):
    delta = smooth_pattern(list(range(5)), (3, 32, 32), EPS, cells, seed=0)
    assert torch.allclose(delta.abs().flatten(1).amax(dim=1), torch.full((5,), EPS))
    roughness = (delta[..., 1:] - delta[..., :-1]).abs().mean() / delta.abs().mean()
    sign_roughness = 1.0  # a sign pattern changes by 2·eps on half of its neighbours: ratio 1
    assert roughness < 0.35 * sign_roughness
    torch.testing.assert_close(make_pattern(f"smooth{cells}", [4], (3, 32, 32), EPS, seed=0), delta[4:])


def test_make_pattern_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown random pattern"):
        make_pattern("blur", [0], SHAPE, EPS, seed=0)


def test_survival_statistic_bounds():
    x, _ = images()
    delta = sign_pattern(range(6), SHAPE, EPS, seed=0) * 2  # [-1, 1] units
    assert np.allclose(survival(x, x + delta, delta), 1.0)
    assert np.allclose(survival(x, x, delta), 0.0)
    assert np.allclose(survival(x, x - 0.5 * delta, delta), -0.5)
    assert np.isnan(survival(x[:1], x[:1], torch.zeros_like(x[:1]))).all()
    assert np.allclose(relative_change(x, x), 0.0)


def test_perturb_clips_to_the_valid_range():
    x = torch.full((1, *SHAPE), 0.99)
    assert perturb(x, torch.full_like(x, EPS)).max() == 1.0


def test_zero_energy_passes_the_perturbation_untouched_because_both_chains_share_their_noise():
    x, ids = images()
    flat = EBMPurifier(Quadratic(0.0), LangevinConfig(steps=20))
    curve = ebm_rho(flat, x, {"sign": sign_pattern(ids.tolist(), SHAPE, EPS, seed=0)}, ids, seed=3,
                    record_at=[0, 10, 20])
    np.testing.assert_allclose(curve.mean_rho("sign"), 1.0, atol=1e-5)
    assert curve.clean_change[0].max() == 0.0 and curve.clean_change[-1].min() > 0.0  # the noise moved x


def test_quadratic_energy_contracts_rho_geometrically():
    x, ids = images()
    lang = LangevinConfig(steps=30, step_size=1.25e-2, temperature=1e-4)
    c = 0.02
    a = lang.step_size**2 * c / (2 * lang.temperature)  # per-step contraction of any difference of chains
    purifier = EBMPurifier(Quadratic(c), lang)
    deltas = {"sign": sign_pattern(ids.tolist(), SHAPE, EPS, seed=0),
              "smooth2": smooth_pattern(ids.tolist(), SHAPE, EPS, 2, seed=0)}
    curve = ebm_rho(purifier, x, deltas, ids, seed=0, record_at=[0, 5, 30], batch_size=4)
    expected = (1 - a) ** np.array([0, 5, 30])
    for name in deltas:
        np.testing.assert_allclose(curve.mean_rho(name), expected, rtol=1e-4)
    assert curve.at(30)["rho_sign"] == pytest.approx(expected[-1], rel=1e-4)
    rows = curve.as_rows("ebm")
    assert len(rows) == 2 * 3 and {r["pattern"] for r in rows} == {"sign", "smooth2"}


def test_ebm_survival_last_state_is_the_purified_output():
    x, ids = images(4)
    purifier = EBMPurifier(Quadratic(0.05), LangevinConfig(steps=7))
    delta = sign_pattern(ids.tolist(), SHAPE, EPS, seed=0)
    curve = ebm_rho(purifier, x, {"sign": delta}, ids, seed=1, record_at=[7])
    purified_clean = purifier.purify(x, ids, seed=1)
    purified_perturbed = purifier.purify(perturb(x, delta), ids, seed=1)
    expected = survival(purified_clean, purified_perturbed, perturb(x, delta) - x)
    np.testing.assert_allclose(curve.rho["sign"][0], expected, rtol=1e-6)


def test_ddpm_survival_is_one_at_zero_steps_and_lower_after_diffusion(tiny_checkpoints):
    from puregen_dist.generative.ddpm import DDPMPurifier, load_ddpm
    from puregen_dist.generative.survival import ddpm_survival

    unet, schedule = load_ddpm(tiny_checkpoints[3][1], "cpu")
    x = (torch.rand((3, 3, 16, 16), generator=torch.Generator().manual_seed(0)) - 0.5) * 0.6
    ids = torch.arange(3)
    deltas = {"sign": sign_pattern(ids.tolist(), (3, 16, 16), EPS, seed=0)}
    curve = ddpm_survival(DDPMPurifier(unet, schedule, 75), x, deltas, ids, seed=0, steps_grid=[0, 50])
    assert list(curve.steps) == [0, 50] and curve.rho["sign"].shape == (2, 3)
    np.testing.assert_allclose(curve.rho["sign"][0], 1.0, atol=1e-5)
    assert np.isfinite(curve.rho["sign"][1]).all() and curve.mean_rho("sign")[1] < 1.0


def test_gaussian_survival_keeps_what_the_data_varies_along_and_drops_the_rest():
    """Σ = diag(λ): a δ along an eigenvector keeps λ/(λ + s), s = (1−ᾱ)/ᾱ; mixtures average by energy."""
    lam = torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=torch.float64)
    alpha_bar = 0.8  # s = 0.25
    basis = torch.eye(4).view(4, 1, 2, 2)
    rho = gaussian_survival(torch.diag(lam), alpha_bar, basis)
    np.testing.assert_allclose(rho, (lam / (lam + 0.25)).numpy(), rtol=1e-9)
    mixed = gaussian_survival(torch.diag(lam), alpha_bar, (basis[0] + 2 * basis[2]).unsqueeze(0))
    np.testing.assert_allclose(mixed, [(4 / 4.25 + 4 * 0.5) / 5], rtol=1e-9)
    assert np.isnan(gaussian_survival(torch.diag(lam), alpha_bar, torch.zeros(1, 1, 2, 2)))[0]
    np.testing.assert_allclose(gaussian_survival(torch.diag(lam), 1.0, basis[:3]), 1.0)  # no noise: all passes
    with pytest.raises(ValueError, match="covariance shape"):
        gaussian_survival(torch.eye(3), alpha_bar, basis)


def test_gaussian_survival_is_rotation_invariant_and_matches_the_empirical_covariance():
    x = torch.randn(500, 2, 2, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 0.1]).view(1, 2, 1, 1)
    cov = image_covariance(x)
    assert cov.shape == (8, 8) and torch.allclose(cov, torch.cov(x.flatten(1).double().T))
    delta = torch.randn(5, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    rotated = gaussian_survival(q @ cov @ q.T, 0.9, (delta.flatten(1).double() @ q.T).view(5, 2, 2, 2))
    np.testing.assert_allclose(rotated, gaussian_survival(cov, 0.9, delta), rtol=1e-9)
    np.testing.assert_allclose(gaussian_survival(covariance_spectrum(cov), 0.9, delta),  # precomputed once
                               gaussian_survival(cov, 0.9, delta), rtol=1e-12)
    high, low = (gaussian_survival(cov, 0.9, torch.zeros(1, 2, 2, 2).index_fill_(1, torch.tensor([c]), 1.0))
                 for c in (0, 1))
    assert high[0] > 0.95 > 0.2 > low[0]  # the high-variance channel survives, the quiet one is removed


def test_survival_table_thins_long_curves_and_keeps_the_default_and_last_step():
    from puregen_dist.plots import SURVIVAL_TABLE_COLUMNS, survival_markdown

    rows = [{"model": "ebm", "pattern": p, "step": s, "rho_mean": 1.0 - s / 1000, "clean_change_mean": s / 1000}
            for p in ("attack", "sign") for s in range(0, 501, 10)]
    table = survival_markdown(rows, {"ebm": 150})
    header = next(line for line in table.splitlines() if line.startswith("| pattern |"))
    steps = header.strip("| ").split(" | ")[1:]
    assert len(steps) <= SURVIVAL_TABLE_COLUMNS and "**150**" in steps and steps[-1] == "500" and steps[0] == "0"
    lines = table.splitlines()
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| sign", "| attack", "| clean change"]
    assert lines[-1].endswith("| 0.500 |") and "| 0.850 |" in lines[5]  # attack ρ at step 150 = 1 - 0.15


def test_survival_rows_from_metrics_rebuild_the_table_and_refuse_incomplete_runs():
    from puregen_dist.diagnose import survival_rows_from_metrics

    metrics = {"ebm_rho_sign": [(0, 1.0), (150, 0.4)], "ebm_rho_attack": [(0, 1.0), (150, 0.6)],
               "ebm_clean_change": [(0, 0.0), (150, 0.1)], "ebm_energy_clean": [(0, 0.2)]}
    rows = survival_rows_from_metrics(metrics)
    assert {(r["pattern"], r["step"], r["rho_mean"], r["clean_change_mean"]) for r in rows} == {
        ("sign", 0, 1.0, 0.0), ("sign", 150, 0.4, 0.1), ("attack", 0, 1.0, 0.0), ("attack", 150, 0.6, 0.1)}
    with pytest.raises(ValueError, match="ddpm_clean_change"):
        survival_rows_from_metrics({"ddpm_rho_sign": [(0, 1.0)]})
