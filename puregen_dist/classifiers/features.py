"""Penultimate features and head weights of any registered classifier, read through a forward pre-hook on the
classification head (the last ``nn.Linear``), so no architecture needs a special ``penu=True`` forward.

Used by the defenses that look inside the model: EPIC (last-layer gradient proxies), Spectral Signatures and
Activation Clustering (representations).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from puregen_dist.classifiers.transfer import head_name
from puregen_dist.data.transforms import to_unit


def head_of(model: nn.Module) -> nn.Linear:
    """The classification head of ``model`` (a :class:`~puregen_dist.classifiers.training.Normalized` wrapper
    or a bare network)."""
    net = getattr(model, "net", model)
    return dict(net.named_modules())[head_name(net)]


@torch.no_grad()
def features_and_logits(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """(N, D) penultimate features (the head's input) and (N, K) logits of ``images`` ((N, H, W, C) uint8,
    un-augmented) under ``model`` in eval mode; both float32 on CPU. ``model``'s train/eval mode is restored."""
    head = head_of(model)
    device = head.weight.device
    captured: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1).float().cpu()))
    was_training = model.training
    model.eval()
    logits = []
    try:
        for start in range(0, len(images), batch_size):
            logits.append(model(to_unit(images[start:start + batch_size]).to(device)).float().cpu())
    finally:
        hook.remove()
        model.train(was_training)
    if not logits:
        return torch.zeros(0, head.in_features), torch.zeros(0, head.out_features)
    return torch.cat(captured), torch.cat(logits)


def gradient_proxies(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> Tensor:
    """EPIC's per-sample gradient proxy (N, K): ``softmax(W phi(x)) - onehot(y)`` with phi the penultimate
    features and W the head's weight (its bias left out, as in EPIC and CRAIG): the gradient of the cross-entropy
    with respect to the last layer's logits when the bias is ignored."""
    feats, _ = features_and_logits(model, images, batch_size)
    weight = head_of(model).weight.detach().float().cpu()
    probs = torch.softmax(feats @ weight.T, dim=1)
    return probs - nn.functional.one_hot(torch.from_numpy(labels), probs.shape[1]).float()
