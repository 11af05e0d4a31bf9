"""Device choice in one place: callers (CLI, Ray actors) pass a spec, algorithms receive a torch.device.

The config loader checks a spec's spelling (``auto``, ``cpu``, ``cuda[:N]``, ...); whether that device exists
can only be checked on the machine that runs the job: :func:`resolve_device` refuses a missing one, and
:func:`check_devices` checks every ``device`` field of a config before anything is computed or written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from puregen_dist.config.errors import UserInputError


def resolve_device(spec: str, key: str = "device") -> torch.device:
    """"auto" -> CUDA when available (e.g. a GPU Ray assigned), else CPU; anything else goes to torch.device.

    Raises:
        UserInputError: naming ``key``: ``spec`` is no torch device, or names an accelerator (or an index) this
            machine does not have.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserInputError(f"{key}: {spec!r} is not a device (expected auto, cpu, cuda or cuda:<index>)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            have = f"{count} CUDA device(s): cuda:0..cuda:{count - 1}" if count else "no CUDA device"
            raise UserInputError(f"{key}: {spec!r} is not available on this machine ({have}); use auto or cpu")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"{key}: {spec!r} is not available on this machine (no Apple MPS device)")
    elif device.type not in ("cpu", "mps"):
        accelerator = getattr(torch, device.type, None)
        available = getattr(accelerator, "is_available", None)
        if available is None or not available():
            raise UserInputError(f"{key}: {spec!r} is not available on this machine")
    return device


def device_fields(cfg: object, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, spec) of every ``device`` field of a config dataclass, at any depth."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name == "device" and isinstance(value, str):
            yield f"{prefix}{field.name}", value
        else:
            yield from device_fields(value, f"{prefix}{field.name}.")


def check_devices(cfg: object) -> None:
    """Every ``device`` field of ``cfg`` names a device of this machine (UserInputError naming the key)."""
    for key, spec in device_fields(cfg):
        resolve_device(spec, key)
