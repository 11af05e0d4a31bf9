"""What the benchmark scripts share: the machine's CPU model and interleaved timing rounds."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def time_rounds(runs: dict[str, Callable[[], Any]], repeats: int, *, warm_up: bool = True) -> dict[str, list[float]]:
    """Seconds per run over ``repeats`` interleaved rounds (every variant once per round), after one warm-up run
    of each unless ``warm_up`` is False (the caller warmed up); CUDA is synchronised around each run."""
    if warm_up:
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
