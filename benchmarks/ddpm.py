"""DDPM purification throughput: ``DDPMPurifier.purify`` versus the straightforward diffusers loop (issue 15).

Both purify the same batch with the same UNet and the same per-sample noise, the PureGen way
(PUREGEN_REFERENCE §2.3): noise to timestep index T_D with the stream's first draw, then T_D ancestral steps
t = T_D−1, …, 0 with x̂₀ clipping and the "fixed_small" variance. The reference is what a diffusers user writes:
``DDPMScheduler`` (linear β 1e-4 → 0.02, 1000 steps, clip_sample, no ``set_timesteps``, so prev_t = t − 1),
``scheduler.add_noise`` once, then ``unet(x, t).sample`` and ``scheduler.step(...)`` per timestep under
``torch.no_grad()``, the whole batch at once, default memory format. Its step noise is our next
``SampleNoise`` draw (``randn_tensor`` patched inside the diffusers module), so the outputs can be compared.
Ours is the package's path: ``diffusion_purify`` (inference mode, coefficients computed once, in-place
updates, micro-batches of fixed size, channels-last inputs on CPU) calling ``LeanUNet`` (the same UNet
function with less work per call). Ablations switch one of these off at a time. Rounds alternate (every
variant once per round, after one warm-up run each); medians are reported.

    python benchmarks/ddpm.py --batch 64 --steps 10 --repeats 3 --threads 2 --json out.json

Timings of the whole-batch loop move by up to ~25 % between processes on a 2-core VM: part of its time is the
kernel zeroing fresh pages for its large activations, which depends on the allocator's state (with glibc
told to keep freed memory, ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set high, both loops get
faster and the ratio shrinks). Report several runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import cpu_model, time_rounds
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.schedulers import scheduling_ddpm
from torch import Tensor

from puregen_dist.config.generative import DDPMConfig
from puregen_dist.generative import diffusion
from puregen_dist.generative.ddpm import DDPMPurifier, load_ddpm
from puregen_dist.generative.diffusion import DDPMSchedule, diffusion_purify, q_sample, reverse_step
from puregen_dist.generative.noise import STREAM_DIFFUSION, SampleNoise
from puregen_dist.generative.unet import build_unet

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "puregen_dist" / "reference_models" / "ddpm-cifar10-cpu"
SEED = 0
REFERENCE = "reference (diffusers loop)"
OURS = "ours (DDPMPurifier.purify)"


@contextlib.contextmanager
def scheduler_noise(noise: SampleNoise) -> Iterator[None]:
    """Inside: ``DDPMScheduler.step`` draws its variance noise as the next draw of ``noise`` (same shape)."""
    original = scheduling_ddpm.randn_tensor

    def next_draw(shape: tuple[int, ...], generator: object = None, device: torch.device | None = None,
                  dtype: torch.dtype | None = None, **_: object) -> Tensor:
        return noise.randn(tuple(shape[1:]), device=device or "cpu", dtype=dtype or torch.float32)

    scheduling_ddpm.randn_tensor = next_draw
    try:
        yield
    finally:
        scheduling_ddpm.randn_tensor = original


def reference_purify(unet: UNet2DModel, scheduler: DDPMScheduler, x: Tensor, ids: Tensor, steps: int) -> Tensor:
    """The straightforward diffusers loop, with PureGen's off-by-one: add_noise to index T_D, then
    ``scheduler.step`` at t = T_D−1, …, 0."""
    noise = SampleNoise(ids, SEED, STREAM_DIFFUSION)
    with torch.no_grad(), scheduler_noise(noise):
        t_noise = torch.full((x.shape[0],), steps, dtype=torch.long, device=x.device)
        x = scheduler.add_noise(x, noise.randn(tuple(x.shape[1:]), device=x.device), t_noise)
        for t in range(steps - 1, -1, -1):
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x).prev_sample
    return x


def module_eps(unet: UNet2DModel) -> Callable[[Tensor, Tensor], Tensor]:
    """ε̂ = unet(x_t, t).sample: the diffusers module call (what ``eps_model`` was before issue 15)."""
    return lambda x_t, t: unet(x_t, t).sample


def literal_purify(unet: UNet2DModel, schedule: DDPMSchedule, x: Tensor, ids: Tensor, steps: int) -> Tensor:
    """``DDPMPurifier.purify`` before issue 15: ``q_sample`` then ``reverse_step`` per step with the module
    call, whole batch, NCHW, ``torch.no_grad``."""
    noise = SampleNoise(ids, SEED, STREAM_DIFFUSION)
    shape = tuple(x.shape[1:])
    with torch.no_grad():
        t_noise = torch.full((x.shape[0],), steps, dtype=torch.long, device=x.device)
        x = q_sample(x, t_noise, noise.randn(shape, device=x.device), schedule)
        for t in range(steps - 1, -1, -1):
            z = noise.randn(shape, device=x.device) if t > 0 else None
            x, _ = reverse_step(module_eps(unet), x, t, schedule, z)
    return x


class Patched:
    """Context: set attributes of :mod:`puregen_dist.generative.diffusion` (the fast path's switches) for one
    variant, then restore them."""

    def __init__(self, **values: object) -> None:
        self.values = values
        self.saved: dict[str, object] = {}

    def __enter__(self) -> None:
        for name, value in self.values.items():
            self.saved[name] = getattr(diffusion, name)
            setattr(diffusion, name, value)

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            setattr(diffusion, name, value)


def diffusers_scheduler() -> DDPMScheduler:
    """The scheduler of the reference loop (diffusers' DDPM defaults, spelled out)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=True, variance_type="fixed_small", prediction_type="epsilon")


def untimed_checks(args: argparse.Namespace, unet: UNet2DModel, schedule: DDPMSchedule, x: Tensor,
                   ids: Tensor) -> dict[str, Callable[[], Tensor]]:
    """Runs compared with ours but not timed: the reference loop with ᾱ in float64 (diffusers forms ᾱ_t and
    1 − ᾱ_t in float32, which alone moves its output by ~4e-5 at small t; ours uses float64 as reverse_step
    does)."""
    scheduler = diffusers_scheduler()
    scheduler.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod64)
    return {"reference with ᾱ in float64 (untimed)": lambda: reference_purify(unet, scheduler, x, ids,
                                                                               args.steps)}


def variants(args: argparse.Namespace, unet: UNet2DModel, schedule: DDPMSchedule, x: Tensor,
             ids: Tensor) -> dict[str, Callable[[], Tensor]]:
    """name -> a zero-argument purification of the benchmark batch with ``args.steps`` steps."""
    scheduler = diffusers_scheduler()

    purifier = DDPMPurifier(unet, schedule, args.steps)

    def ours(**patch: object) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with Patched(**patch):
                return purifier.purify(x, ids, seed=SEED)
        return run

    runs = {REFERENCE: lambda: reference_purify(unet, scheduler, x, ids, args.steps), OURS: ours()}
    if args.ablations:
        device = x.device.type
        runs["previous DDPMPurifier (literal loop)"] = lambda: literal_purify(unet, schedule, x, ids, args.steps)
        runs["ours, module forward (no LeanUNet)"] = lambda: diffusion_purify(
            module_eps(unet), x, ids, steps=args.steps, schedule=schedule, seed=SEED)
        runs["ours, NCHW"] = ours(CHANNELS_LAST={device: False})
        rows = diffusion.micro_batch_rows(x.device)
        for other in (rows // 4, rows // 2):
            runs[f"ours, micro-batch {other}"] = ours(MICRO_BATCH={device: other})
    return runs


def warm_up_and_compare(runs: dict[str, Callable[[], Tensor]],
                        untimed: dict[str, Callable[[], Tensor]]) -> dict[str, float]:
    """Run every variant once (the warm-up) and every untimed check; max |ours − other| over the batch."""
    outputs = {name: run().double().cpu() for name, run in {**runs, **untimed}.items()}
    return {name: (outputs[OURS] - out).abs().max().item() for name, out in outputs.items() if name != OURS}


def load_unet(args: argparse.Namespace, device: torch.device) -> tuple[UNet2DModel, DDPMSchedule, str]:
    """The shipped CPU DDPM (size S, 32x32), else a seeded random UNet of the same config."""
    if SHIPPED_MODEL.is_dir() and not args.random_init:
        unet, schedule = load_ddpm(SHIPPED_MODEL, device)
        return unet, schedule, f"shipped {SHIPPED_MODEL.name} (size S)"
    cfg = DDPMConfig(size="S", in_channels=3, image_size=32, layers_per_block=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = build_unet(cfg)
    return unet.to(device).eval().requires_grad_(False), DDPMSchedule.from_config(cfg).to(device), \
        "random-init size S (seed 0)"


def machine() -> dict[str, object]:
    """nproc, CPU model, torch version, threads, date."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": date, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def summarise(args: argparse.Namespace, info: dict[str, object], model: str, seconds: dict[str, list[float]],
              diffs: dict[str, float]) -> dict[str, object]:
    """Medians, throughputs and ratios against the reference, with the configuration and command line."""
    image_steps = args.batch * args.steps
    ref = statistics.median(seconds[REFERENCE])
    rows = {name: {"seconds": times, "median_s": statistics.median(times),
                   "image_steps_per_s": image_steps / statistics.median(times),
                   "ratio_vs_reference": ref / statistics.median(times)} for name, times in seconds.items()}
    config = {"model": model, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
              "device": args.device, "micro_batch": diffusion.micro_batch_rows(torch.device(args.device))}
    return {"argv": sys.argv, "machine": info, "config": config, "variants": rows, "max_abs_diff": diffs}


def headline(result: dict) -> list[tuple[str, float, str, bool]]:
    """Issue 15's target: ours >= 1.3x the diffusers-style loop (CPU)."""
    ratio = result["variants"]["ours (DDPMPurifier.purify)"]["ratio_vs_reference"]
    config = result["config"]
    return [(f"DDPM reverse loop, batch {config['batch']}, T_D = {config['steps']}: ours vs diffusers-style loop",
             ratio, ">= 1.3x", ratio >= 1.3)]


def markdown(result: dict) -> str:
    """A benchmarks/RESULTS.md section for a result written by ``--json``."""
    info, config, rows = result["machine"], result["config"], result["variants"]
    lines = [
        "## DDPM reverse loop (issue 15)",
        "",
        f"`DDPMPurifier.purify` (PureGen-DDPM Ψ_{{T_D}}: noise to index T_D, T_D ancestral steps t = T_D−1 … 0, "
        f"x̂₀ clipped, fixed_small variance, per-sample noise from (seed, id); `diffusion_purify` with inference "
        f"mode, coefficients computed once, in-place updates, fixed micro-batches of {config['micro_batch']} rows, "
        f"channels-last inputs on CPU, and `LeanUNet`, the same UNet function with less work per call) against "
        f"the straightforward diffusers loop: `DDPMScheduler` (linear β 1e-4 → 0.02, 1000 steps, clip_sample, "
        f"no `set_timesteps`), `scheduler.add_noise`, then `unet(x, t).sample` and `scheduler.step` per "
        f"timestep under `torch.no_grad()`, whole batch, default memory format, its step noise patched to the "
        f"same per-sample draws. Same UNet ({config['model']}), same batch of {config['batch']} seeded random "
        f"3x32x32 images, "
        f"T_D = {config['steps']}, {config['device']}, {info['threads']} torch threads, same process, "
        f"{config['repeats']} alternating rounds after one warm-up each; medians. {info['cpu']}, nproc "
        f"{info['nproc']}, torch {info['torch']}, {info['date']}, load average at the end "
        f"{_load(info.get('load_average'))}. Script: `benchmarks/ddpm.py` (its docstring: why the whole-batch "
        f"loop's timings move between processes).",
        "",
        "| variant | median s | images·steps/s | vs reference | rounds (s) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, row in rows.items():
        rounds = " ".join(f"{t:.3f}" for t in row["seconds"])
        lines.append(f"| {name} | {row['median_s']:.3f} | {row['image_steps_per_s']:.1f} | "
                     f"{row['ratio_vs_reference']:.2f}x | {rounds} |")
    lines += ["", "max |ours − other| over the batch: " + "; ".join(
        f"{name} {diff:.2e}" for name, diff in result["max_abs_diff"].items()) + ". The diffusers loop forms "
        "ᾱ_t and 1 − ᾱ_t in float32 (ours in float64, as `reverse_step`); with its ᾱ in float64 the difference "
        "is float32 rounding.", "",
        "```", " ".join(["python", *result["argv"]]), "```", ""]
    return "\n".join(lines)


def _load(value: object) -> str:
    return " / ".join(f"{v:.2f}" for v in value) if isinstance(value, list | tuple) else "n/a"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="T_D: reverse steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds; medians reported")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--ablations", action="store_true",
                        help="also time the previous literal loop and the fast path's switches one by one (these "
                             "runs share the process's heap with the two main variants and move their timings)")
    parser.add_argument("--random-init", action="store_true",
                        help="a seeded random UNet of the shipped config instead of the shipped weights")
    parser.add_argument("--json", type=Path, default=None, help="write the result dict here")
    return parser.parse_args()


def print_table(result: dict) -> None:
    print(f"# {result['machine']['cpu']}, threads {result['machine']['threads']}, {result['config']}")
    print(f"{'variant':<38}{'median s':>10}{'img·steps/s':>13}{'vs ref':>8}   rounds (s)")
    for name, row in result["variants"].items():
        rounds = " ".join(f"{t:.3f}" for t in row["seconds"])
        print(f"{name:<38}{row['median_s']:>10.3f}{row['image_steps_per_s']:>13.1f}"
              f"{row['ratio_vs_reference']:>7.2f}x   {rounds}")
    for name, diff in result["max_abs_diff"].items():
        print(f"max |ours - {name}| = {diff:.3e}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    unet, schedule, model = load_unet(args, device)
    x = (torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(SEED)) * 2 - 1).to(device)
    ids = torch.arange(args.batch)
    runs = variants(args, unet, schedule, x, ids)
    diffs = warm_up_and_compare(runs, untimed_checks(args, unet, schedule, x, ids))
    seconds = time_rounds(runs, args.repeats, warm_up=False)
    result = summarise(args, machine(), model, seconds, diffs)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
