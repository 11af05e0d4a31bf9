"""One Langevin algorithm: the reference chain, and the per-step observer of the fast purification loop (sees
every step of every row, changes no number, costs no extra energy evaluation)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from puregen_dist.config.generative import LangevinConfig
from puregen_dist.generative import langevin_fast
from puregen_dist.generative.ebm import SNGAN32Energy
from puregen_dist.generative.langevin import langevin_chain, langevin_step
from puregen_dist.generative.langevin_fast import fast_energy, langevin_purify
from puregen_dist.generative.purifiers import EBMPurifier

STEPS = 7


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads cost more than they give on a busy machine (conftest restores them)."""
    torch.set_num_threads(1)


def tiny_energy() -> SNGAN32Energy:
    torch.manual_seed(0)
    return SNGAN32Energy(in_channels=1, nf=8)


def images(n: int) -> Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (n, 1, 16, 16), generator=g).float() / 127.5 - 1.0


class Recording:
    """Keeps a copy of everything it is shown."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, slice, Tensor, Tensor | None]] = []

    def __call__(self, step: int, rows: slice, x: Tensor, energy: Tensor | None) -> None:
        self.calls.append((step, rows, x.clone(), None if energy is None else energy.clone()))


def test_the_chain_is_the_step_iterated():
    """``langevin_chain`` draws one z per step, in order, and yields exactly ``langevin_step``'s results."""
    a, eps, temp = 3.0, 1.25e-2, 1e-4
    energy_fn = lambda v: 0.5 * a * v.pow(2).flatten(1).sum(1)  # noqa: E731
    x0 = torch.tensor([[[[0.5, -0.25]]]])
    zs = [torch.full_like(x0, float(k)) for k in range(3)]
    draws = iter(zs)
    chain = list(langevin_chain(energy_fn, x0, lambda x: next(draws), steps=3, step_size=eps,
                                temperature=temp))
    x = x0
    assert len(chain) == 3
    for update, z in zip(chain, zs, strict=True):
        want = langevin_step(energy_fn, x, eps, temp, z)
        assert torch.equal(update.x, want.x) and torch.equal(update.energy, want.energy)
        assert torch.equal(update.grad, want.grad)
        x = update.x
    assert list(langevin_chain(energy_fn, x0, lambda x: x, steps=0, step_size=eps, temperature=temp)) == []


def test_observer_sees_every_step_of_every_row(monkeypatch):
    """40 rows in micro-batches of 16: each micro-batch is shown t = 0 … steps in order, its rows, x_t and
    G(x_t) (None after the last update); the states shown are the chain's."""
    monkeypatch.setitem(langevin_fast.MICRO_BATCH, "cpu", 16)
    energy, x, ids = tiny_energy(), images(40), torch.arange(40)
    seen = Recording()
    out = EBMPurifier(energy, LangevinConfig(steps=STEPS)).purify(x, ids, seed=3, observer=seen)
    parts = [slice(0, 16), slice(16, 32), slice(32, 40)]
    assert [(t, rows) for t, rows, _, _ in seen.calls] == [(t, p) for p in parts for t in range(STEPS + 1)]
    for t, rows, state, g in seen.calls:
        assert state.shape == (rows.stop - rows.start, 1, 16, 16)
        if t == 0:
            assert torch.equal(state, x[rows])
        if t == STEPS:
            assert g is None and torch.equal(state.clamp(-1.0, 1.0), out[rows])
        else:
            with torch.no_grad():
                assert torch.allclose(g, energy(state), rtol=1e-4, atol=1e-5)


def test_purification_with_and_without_an_observer_is_bit_identical():
    purifier = EBMPurifier(tiny_energy(), LangevinConfig(steps=STEPS))
    x, ids = images(24), torch.arange(100, 124)
    plain = purifier.purify(x, ids, seed=5)
    seen = Recording()
    assert torch.equal(purifier.purify(x, ids, seed=5, observer=seen), plain)
    assert len(seen.calls) == STEPS + 1


def test_the_state_at_step_t_is_the_purification_with_t_steps():
    energy, x, ids = tiny_energy(), images(8), torch.arange(8)
    seen = Recording()
    EBMPurifier(energy, LangevinConfig(steps=STEPS)).purify(x, ids, seed=1, observer=seen)
    for t in (1, 4):
        short = EBMPurifier(energy, LangevinConfig(steps=t)).purify(x, ids, seed=1)
        assert torch.equal(seen.calls[t][2].clamp(-1.0, 1.0), short)


def test_an_observer_costs_no_energy_evaluation():
    """The same number of network calls with and without an observer (its energy is the one the update
    needs anyway)."""
    counting = CountingEnergy(fast_energy(tiny_energy()))
    x, ids = images(12), torch.arange(12)
    kwargs = dict(seed=0, steps=STEPS, step_size=1.25e-2, temperature=1e-4, check_every=10, rows=8)
    langevin_purify(counting, x, ids, **kwargs)
    without, counting.calls = counting.calls, 0
    langevin_purify(counting, x, ids, **kwargs, observer=Recording())
    assert without == counting.calls == 2 * STEPS  # two micro-batches of 8 rows


class CountingEnergy:
    def __init__(self, energy: torch.nn.Module) -> None:
        self.energy, self.calls = energy, 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.energy(x)


def test_zero_steps_shows_the_input_once():
    x = images(3) * 1.5
    seen = Recording()
    purifier = EBMPurifier(tiny_energy(), LangevinConfig(steps=0))
    out = purifier.purify(x, torch.arange(3), seed=0, observer=seen)
    assert torch.equal(out, x.clamp(-1.0, 1.0))
    assert [(t, rows) for t, rows, _, _ in seen.calls] == [(0, slice(0, 3))]
    assert torch.equal(seen.calls[0][2], x) and seen.calls[0][3] is None
