"""Transfer learning (PUREGEN_REFERENCE §7.3): a classifier pretrained on clean data, its last linear layer
re-initialised for the new task, then either only that layer trained on frozen features (linear transfer; the
backbone's BatchNorm layers keep their running statistics, the paper's "eval_BatchNorm") or every parameter
fine-tuned. Checkpoints are safetensors + JSON, like every model of the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from puregen_dist.generative.checkpoints import CheckpointError, read_state, save_checkpoint

KIND = "classifier"


def head_name(net: nn.Module) -> str:
    """Qualified name of the classification head: the last ``nn.Linear`` of ``net`` (``linear`` for every
    registered architecture)."""
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(net).__name__} has no nn.Linear layer to use as the classification head")
    return names[-1]


def add_feature_dropout(net: nn.Module, rate: float) -> nn.Module:
    """Dropout at ``rate`` on the input of ``net``'s head while ``net`` trains (a forward pre-hook: no new
    parameters, so checkpoints load into the plain architecture). Returns ``net``."""
    head = dict(net.named_modules())[head_name(net)]
    head.register_forward_pre_hook(
        lambda module, args: (nn.functional.dropout(args[0], rate, training=module.training), *args[1:]))
    return net


def save_classifier(directory: str | Path, net: nn.Module, *, name: str, in_channels: int, num_classes: int,
                    image_size: int, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``net``'s weights (the bare architecture, without input normalisation) and its build arguments."""
    config = {"name": name, "in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    return save_checkpoint(directory, net, kind=KIND, model_config=config, meta=meta)


def save_trained_classifier(directory: str | Path, model: Any, *, name: str, epochs: int,
                            shape: tuple[int, int, int], num_classes: int, nat_acc: float | None,
                            meta: Mapping[str, Any] | None = None) -> Path:
    """:func:`save_classifier` for a network trained on (H, W, C) = ``shape`` images: ``model`` is the
    ``Normalized`` wrapper training returns; its bare network is saved, and the meta records the natural
    accuracy (when measured), the epochs and the input normalisation (mean, std) it was trained with, beside ``meta``."""
    h, _, c = shape
    meta = {**(meta or {}), "epochs": epochs, "mean": list(model.mean), "std": list(model.std),
            **({} if nat_acc is None else {"nat_acc": nat_acc})}
    return save_classifier(directory, model.net, name=name, in_channels=c, num_classes=num_classes,
                           image_size=h, meta=meta)


def load_pretrained(net: nn.Module, directory: str | Path, *, name: str, in_channels: int) -> nn.Module:
    """Load every weight of a pretrained classifier into ``net`` except its head, which is re-initialised
    (its shape may differ: another number of classes). Returns ``net``.

    Raises CheckpointError (exit 2) naming the checkpoint when it is not a classifier, is another architecture
    or channel count, or its backbone tensors do not match ``net``'s.
    """
    config, state, _ = read_state(directory, kind=KIND)
    source = Path(directory) / "config.json"
    trained = config.get("model", {})
    if trained.get("name") != name or trained.get("in_channels") != in_channels:
        raise CheckpointError(f"{source}: pretrained classifier is {trained.get('name')!r} with "
                              f"{trained.get('in_channels')} channel(s); classifier.name is {name!r} with "
                              f"{in_channels} channel(s)")
    head = head_name(net)
    backbone = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith(f"{head}.")}
    wrong = sorted(set(expected) ^ set(backbone)) + sorted(
        k for k in set(expected) & set(backbone) if expected[k].shape != backbone[k].shape)
    if wrong:
        raise CheckpointError(f"{source}: backbone tensors do not match {name!r} (e.g. {wrong[:3]})")
    net.load_state_dict({**net.state_dict(), **backbone})
    dict(net.named_modules())[head].reset_parameters()
    return net


class LinearProbe(nn.Module):
    """Linear transfer: every parameter but the head's frozen (``requires_grad = False``), and the backbone's
    BatchNorm layers kept in eval mode (running statistics frozen) even while the model trains."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        head = head_name(net)
        for name, param in net.named_parameters():
            param.requires_grad = name.startswith(f"{head}.")
        self._norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.train(self.training)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        for norm in self._norms:
            norm.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def transfer_model(net: nn.Module, mode: str, pretrained: str | Path, *, name: str, in_channels: int
                   ) -> nn.Module:
    """``net`` prepared for ``mode`` ("scratch": unchanged; "linear"; "finetune") from ``pretrained``."""
    if mode == "scratch":
        return net
    load_pretrained(net, pretrained, name=name, in_channels=in_channels)
    return LinearProbe(net) if mode == "linear" else net
