"""What makes a purifier's output independent of batching, shared by the Langevin and DDPM loops: every network
call has the same number of rows (the last micro-batch padded), and on CUDA the convolution algorithms are fixed
for the call, so equal inputs give equal bits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


def pad_rows(t: Tensor, rows: int) -> Tensor:
    """(b, ...) -> (rows, ...): ``t`` then copies of its last row (rows >= b; their results are unused)."""
    missing = rows - t.shape[0]
    return t if missing <= 0 else torch.cat([t, t[-1:].expand(missing, *t.shape[1:])])


@contextlib.contextmanager
def fixed_kernels(device: torch.device) -> Iterator[None]:
    """On CUDA: deterministic cuDNN algorithms, chosen without benchmarking, so that equal inputs give equal
    bits in every call (other cuDNN settings, TF32 included, are left as they are; restored on exit)."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved
