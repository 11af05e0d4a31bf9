"""Device choice in one place: callers (CLI, Ray actors) pass a spec, algorithms receive a torch.device."""

from __future__ import annotations

import torch


def resolve_device(spec: str) -> torch.device:
    """"auto" -> CUDA when available (e.g. a GPU Ray assigned), else CPU; anything else goes to torch.device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)
