"""Bullseye Polytope's crafting core (issue 11): feature taps on any architecture, the mean-feature objective,
and crafting that moves the poisons' mean feature onto the target within the ε ball and the pixel range."""

from __future__ import annotations

import torch

from puregen_dist.attacks.bullseye import Substitute, bullseye_loss, craft_polytope, feature_blocks
from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.training import Normalized
from puregen_dist.classifiers.transfer import add_feature_dropout


def _net(seed: int) -> Normalized:
    torch.manual_seed(seed)
    return Normalized(build_classifier("small_cnn", in_channels=3, num_classes=4, image_size=8),
                      [0.5] * 3, [0.25] * 3).eval()


def test_feature_blocks_tap_the_head_input_and_every_block_in_end2end_mode():
    model, x = _net(0), torch.rand(5, 3, 8, 8)
    (penultimate,) = feature_blocks(model, x, "linear")
    assert penultimate.shape == (5, model.net.linear.in_features)
    assert torch.allclose(model.net.linear(penultimate), model(x), atol=1e-6)  # it is what the head sees
    blocks = feature_blocks(model, x, "end2end")
    assert len(blocks) == 3 and torch.equal(blocks[-1], penultimate)  # block1, block2, then penultimate
    assert all(b.shape[0] == 5 and b.dim() == 2 for b in blocks)
    assert not model.net.linear._forward_pre_hooks  # taps are removed afterwards


def test_bullseye_loss_is_the_normalised_distance_of_the_mean():
    target = [torch.tensor([[3.0, 4.0]])]
    assert float(bullseye_loss([torch.tensor([[3.0, 4.0], [3.0, 4.0]])], target)) == 0.0
    assert abs(float(bullseye_loss([torch.tensor([[0.0, 0.0], [6.0, 8.0]])], target))) < 1e-6  # mean on target
    assert abs(float(bullseye_loss([torch.tensor([[0.0, 0.0]])], target)) - 1.0) < 1e-6


def test_crafting_moves_the_poisons_mean_feature_onto_the_target_within_eps():
    substitutes = [Substitute(_net(0), 0.2), Substitute(_net(1), 0.0)]
    gen = torch.Generator().manual_seed(0)
    bases, target = torch.rand(4, 3, 8, 8, generator=gen), torch.rand(1, 3, 8, 8, generator=gen)
    torch.manual_seed(0)
    polytope = craft_polytope(substitutes, bases, target, eps=0.1, iterations=60, lr=0.04, net_repeat=3)
    print(f"feature distance ratio {polytope.distance_before:.3f} -> {polytope.distance_after:.3f}")
    assert polytope.distance_after < 0.6 * polytope.distance_before
    assert polytope.losses[-1] < polytope.losses[0]
    assert (polytope.poisons - bases).abs().max() <= 0.1 + 1e-6
    assert polytope.poisons.min() >= 0 and polytope.poisons.max() <= 1
    assert all(p.grad is None for s in substitutes for p in s.model.parameters())


def test_feature_dropout_trains_only_and_keeps_checkpoints_plain():
    net = add_feature_dropout(build_classifier("small_cnn", in_channels=3, num_classes=4, image_size=8), 0.5)
    x = torch.rand(8, 3, 8, 8)
    net.eval()
    assert torch.equal(net(x), net(x))  # off in eval mode
    net.train()
    torch.manual_seed(0)
    assert not torch.allclose(net(x), net(x))  # on while training
    plain = build_classifier("small_cnn", in_channels=3, num_classes=4, image_size=8)
    plain.load_state_dict(net.state_dict())  # no extra parameters
