"""Model checkpoints as safetensors weights plus a JSON config: never pickle.

A checkpoint is a directory holding ``model.safetensors`` (tensors only) and ``config.json`` (the model kind, its
constructor arguments, and free-form metadata such as the training epoch). Loading checks the kind and every tensor
name and shape against a freshly built model, so a wrong architecture or a tampered file is refused with an error
naming the file. Writes are atomic (:func:`puregen_dist.atomic.atomic_dir`): files go to a temporary sibling
directory that is renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from puregen_dist.atomic import atomic_dir
from puregen_dist.config.errors import UserInputError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(UserInputError):
    """A missing, corrupt or mismatched checkpoint."""


def save_checkpoint(directory: str | Path, model: nn.Module, *, kind: str, model_config: Mapping[str, Any],
                    meta: Mapping[str, Any] | None = None,
                    extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Atomically write ``model``'s state dict (plus ``extra_tensors``, e.g. optimizer-free training state)
    and its config to ``directory``; returns the directory."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps({"kind": kind, "model": dict(model_config), "meta": dict(meta or {})},
                                             indent=2, sort_keys=True))
    return Path(directory)


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint: ``{"kind", "model", "meta"}``."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint config not found (expected a directory with {CONFIG} and "
                              f"{WEIGHTS}, as written by puregen-dist)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not {"kind", "model"} <= set(config):
        raise CheckpointError(f"{path}: expected an object with 'kind' and 'model' keys")
    return config


def check_checkpoint_output(directory: str | Path, kind: str, key: str = "output") -> None:
    """``directory`` may receive a ``kind`` checkpoint: it is absent, an empty directory, or a checkpoint of
    ``kind`` (which training resumes from). Anything else is refused before training starts, because a
    checkpoint write replaces the whole directory: an existing file, a directory of other files, a checkpoint of
    another kind, or a path below a file.

    Raises:
        CheckpointError: naming ``key`` and ``directory``.
    """
    path = Path(directory)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{key}: {path}: {parent} is a file, not a directory")
            break
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{key}: {path} is an existing file, but a checkpoint is a directory (the file is "
                              "left untouched: choose another output)")
    if not (path / CONFIG).is_file():
        if any(path.iterdir()):
            raise CheckpointError(f"{key}: {path} is a directory of other files, not a checkpoint (no {CONFIG}); "
                                  f"writing the {kind} checkpoint would replace it: choose a new or empty directory")
        return
    found = read_checkpoint_config(path)["kind"]
    if found != kind:
        raise CheckpointError(f"{key}: {path} holds a {found!r} checkpoint, this job trains a {kind!r} model: choose "
                              "another output")


def load_state(directory: str | Path, model: nn.Module, *, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load weights into ``model`` after checking kind, names and shapes; returns (meta, extra tensors)."""
    config, state, extra = read_state(directory, kind=kind)
    _check_shapes(Path(directory) / WEIGHTS, model, state)
    model.load_state_dict(state)
    return dict(config.get("meta", {})), extra


def read_state(directory: str | Path, *, kind: str
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config.json, model state dict, extra tensors) of a checkpoint of ``kind`` (safetensors only)."""
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    if config["kind"] != kind:
        raise CheckpointError(f"{directory / CONFIG}: checkpoint holds a {config['kind']!r} model, expected {kind!r}")
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); pickled checkpoints are refused") from None
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds non-finite values (NaN or inf): the checkpoint is "
                                  "corrupt or its training diverged")
    return config, state, extra


def _check_shapes(path: Path, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the architecture (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the architecture "
                                  f"expects {tuple(expected[name].shape)}")


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as flat tensors ``{prefix}.{param_index}.{key}`` (safetensors-ready),
    so training can resume exactly without pickling."""
    out: dict[str, torch.Tensor] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.{index}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                      prefix: str = "optim") -> None:
    """Inverse of :func:`optimizer_tensors`; hyper-parameters come from the freshly built optimizer."""
    state_dict = optimizer.state_dict()
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1:].split(".", 1)
            per_param.setdefault(int(index), {})[key] = value
    state_dict["state"] = per_param
    optimizer.load_state_dict(state_dict)
