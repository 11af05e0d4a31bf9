"""Langevin purification throughput: ``EBMPurifier.purify`` versus a literal reference loop (issue #3).

Both run the chain of PUREGEN_REFERENCE §1.3 (x ← x − (ε²/2)∇ₓ(G(x)/T) + εz, ε = 1.25e-2, T = 1e-4, zero
initial noise) with the same SNGAN-32 energy weights on the same batch, in this process, alternating rounds;
the table reports the median of each. The reference is the package's readable chain
(``puregen_dist.generative.langevin.langevin_chain``) run the way the published code runs it: autograd of the
batch-summed energy with respect to the input, the whole batch at once, default memory format, parameters left
requiring grad, noise from ``torch.randn_like`` on the whole batch.

Also reported: FLOPs of one Langevin step (torch.utils.flop_counter, forward + input-gradient backward) and
the achieved FLOP/s against a dense float32 matmul roofline timed in the same run.

    python benchmarks/langevin.py --nf 128 --batch 64 --steps 5 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import cpu_model, sync, time_rounds
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from puregen_dist.config.generative import LangevinConfig
from puregen_dist.generative import langevin, langevin_fast
from puregen_dist.generative.ebm import SNGAN32Energy
from puregen_dist.generative.noise import STREAM_LANGEVIN, SampleNoise
from puregen_dist.generative.purifiers import EBMPurifier

STEP_SIZE, TEMPERATURE = 1.25e-2, 1e-4


def reference_purify(model: nn.Module, x: Tensor, steps: int) -> Tensor:
    """The naive baseline: the package's reference chain (``langevin.langevin_chain``, i.e. ``langevin_step``
    per step) run as the published code runs it: the whole batch at once, default memory format, parameters
    left requiring grad, ``torch.randn_like`` noise on the whole batch; clamp at the end."""
    chain = langevin.langevin_chain(model, x, torch.randn_like, steps=steps, step_size=STEP_SIZE,
                                    temperature=TEMPERATURE)
    for update in chain:
        x = update.x
    return x.clamp(-1.0, 1.0)


def backward_purify(model: nn.Module, x: Tensor, steps: int) -> Tensor:
    """Ablation, not the package's step: the published code's ``.backward()`` variant, which also fills
    parameter gradients (what that costs against ``autograd.grad`` on the input only)."""
    x = x.clone().requires_grad_(True)
    for _ in range(steps):
        x.grad = None
        (model(x).sum() / TEMPERATURE).backward()
        x.data = x.data - 0.5 * STEP_SIZE ** 2 * x.grad + STEP_SIZE * torch.randn_like(x)
    return x.detach().clamp(-1.0, 1.0)


def previous_purify(model: nn.Module, x: Tensor, ids: Tensor, steps: int) -> Tensor:
    """``EBMPurifier.purify`` before issue #3: the reference chain with per-sample noise drawn per step,
    the whole batch at once, NCHW, the module as written (no pool folding)."""
    noise = SampleNoise(ids, 0, STREAM_LANGEVIN)
    draw = lambda state: noise.randn(tuple(state.shape[1:]), state.device, state.dtype)  # noqa: E731
    for update in langevin.langevin_chain(model, x, draw, steps=steps, step_size=STEP_SIZE,
                                          temperature=TEMPERATURE):
        x = update.x
    return x.clamp(-1.0, 1.0)


class Patched:
    """Context: set attributes of ``langevin_fast`` (the fast path's switches) for one variant, then
    restore."""

    def __init__(self, **values: object) -> None:
        self.values = values
        self.saved: dict[str, object] = {}

    def __enter__(self) -> None:
        for name, value in self.values.items():
            self.saved[name] = copy.deepcopy(getattr(langevin_fast, name))
            setattr(langevin_fast, name, value)

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            setattr(langevin_fast, name, value)


def variants(args: argparse.Namespace, model: nn.Module, x: Tensor,
             ids: Tensor) -> dict[str, Callable[[], Tensor]]:
    """name -> a zero-argument run of ``args.steps`` steps on the benchmark batch."""
    ref_model = copy.deepcopy(model).requires_grad_(True)
    def ours(cfg: LangevinConfig | None = None, **patch: object) -> Callable[[], Tensor]:
        purifier = EBMPurifier(copy.deepcopy(model), cfg or LangevinConfig(steps=args.steps))

        def run() -> Tensor:
            with Patched(**patch):
                return purifier.purify(x, ids, seed=0)
        return run

    runs = {"reference": lambda: reference_purify(ref_model, x, args.steps), "ours": ours()}
    if x.device.type == "cuda":
        runs["ours, CUDA graph"] = ours(LangevinConfig(steps=args.steps, cuda_graph=True))
        runs["ours, bf16"] = ours(LangevinConfig(steps=args.steps, precision="bf16"))
        runs["ours, bf16 + CUDA graph"] = ours(LangevinConfig(steps=args.steps, precision="bf16", cuda_graph=True))
    runs["noise alone (Philox, as the chain makes it)"] = lambda: noise_alone(model, x, ids, args.steps)
    if args.ablations:
        runs["reference (.backward)"] = lambda: backward_purify(ref_model, x, args.steps)
        runs["previous EBMPurifier"] = lambda: previous_purify(copy.deepcopy(model), x, ids, args.steps)
        runs["ours, no pool fold"] = ours(FOLD_POOL=False)
        runs["ours, NCHW"] = ours(CHANNELS_LAST={"cpu": False, "cuda": False})
        block = 1 if x.device.type == "cuda" else 16
        runs[f"ours, noise in {block}-step blocks"] = ours(NOISE_BLOCK_STEPS={"cpu": block, "cuda": block})
        default = langevin_fast.micro_batch_size(model, x)
        for rows in (8, 16, 32, 64) if x.device.type == "cpu" else (128, 512):
            if rows != default:
                runs[f"ours, micro-batch {rows}"] = ours(MICRO_BATCH={"cpu": rows, "cuda": rows})
    return runs


def noise_alone(model: nn.Module, x: Tensor, ids: Tensor, steps: int) -> Tensor:
    """Only the per-sample noise of ``steps`` steps, made on ``x``'s device the way the chain makes it (per
    micro-batch, in blocks of ``NOISE_BLOCK_STEPS``)."""
    rows = langevin_fast.micro_batch_size(model, x)
    block = langevin_fast.NOISE_BLOCK_STEPS.get(x.device.type, 1)
    for start in range(0, x.shape[0], rows):
        noise = SampleNoise(ids[start:start + rows].to(x.device), 0, STREAM_LANGEVIN)
        for first in range(0, steps, block):
            z = noise.block(min(block, steps - first), tuple(x.shape[1:]), x.device, x.dtype)
    return z


def step_flops(model: nn.Module, x: Tensor) -> dict[str, float]:
    """FLOPs of one Langevin step on the batch (forward + input-gradient backward): the model as written (what
    the reference executes) and what ``EBMPurifier`` executes (pool-folded network, padded micro-batches)."""
    frozen = copy.deepcopy(model).requires_grad_(False)
    rows = langevin_fast.micro_batch_size(model, x)
    padded = torch.cat([x, x[:1].expand(-rows * (-x.shape[0] // rows) - x.shape[0], *x.shape[1:])])
    fast = langevin_fast.fast_energy(frozen)
    return {"model": _count_flops(frozen, x), "executed": _count_flops(fast, padded)}


def _count_flops(model: nn.Module, x: Tensor) -> float:
    """torch.utils.flop_counter count of G(x) and ∇ₓ ΣG(x) (FlopCounterMode cannot see autograd.grad)."""
    x = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def matmul_roofline(device: torch.device, repeats: int = 5) -> float:
    """Achievable dense float32 FLOP/s on this device and thread count: median over torch.mm of n×n
    (n = 2048 on CPU, 8192 on CUDA, where TF32 follows torch.backends.cuda.matmul's setting)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - start)
    return 2.0 * n ** 3 / statistics.median(times)


def profile_ours(model: nn.Module, x: Tensor, ids: Tensor, steps: int, rows: int = 12) -> str:
    """torch.profiler table (self CPU time) of ``EBMPurifier.purify`` for ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    purifier = EBMPurifier(copy.deepcopy(model), LangevinConfig(steps=steps))
    purifier.purify(x, ids, seed=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        purifier.purify(x, ids, seed=0)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def machine() -> dict[str, object]:
    """nproc, CPU model, torch version, date."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": date}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nf", type=int, default=128, help="SNGAN-32 width (128 = the released model)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="Langevin steps per timed run")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds; medians reported")
    parser.add_argument("--ablations", action="store_true",
                        help="also time the fast path's switches one by one")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top ops of our path")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = SNGAN32Energy(args.channels, args.nf).eval().to(device)
    x = (torch.rand(args.batch, args.channels, args.image_size, args.image_size) * 2 - 1).to(device)
    ids = torch.arange(args.batch)
    info = machine()
    roofline = matmul_roofline(device)
    flops = step_flops(model, x)
    seconds = time_rounds(variants(args, model, x, ids), args.repeats)
    roofline = max(roofline, matmul_roofline(device))  # once before, once after the timed rounds
    report = summarise(args, info, seconds, flops, roofline)
    report["command"] = "python " + " ".join(sys.argv)
    print_table(report)
    if args.profile:
        print(profile_ours(model, x, ids, args.steps))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def summarise(args: argparse.Namespace, info: dict[str, object], seconds: dict[str, list[float]],
              flops: dict[str, float], roofline: float) -> dict[str, object]:
    """Medians, throughputs, speed-ups against the reference, FLOP/s against the roofline."""
    image_steps = args.batch * args.steps
    ref = statistics.median(seconds["reference"])
    rows = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        rows[name] = {"seconds": times, "median_s": median, "image_steps_per_s": image_steps / median,
                      "speedup_vs_reference": ref / median}
    ours = rows["ours"]["median_s"]
    flop_rates = {"model_gflop_per_step": flops["model"] / 1e9,
                  "executed_gflop_per_step": flops["executed"] / 1e9, "roofline_gflops": roofline / 1e9,
                  "ours_effective_gflops": flops["model"] * args.steps / ours / 1e9,
                  "ours_executed_gflops": flops["executed"] * args.steps / ours / 1e9,
                  "reference_gflops": flops["model"] * args.steps / ref / 1e9}
    keys = ("nf", "batch", "steps", "image_size", "channels", "repeats", "device")
    config = {k: getattr(args, k) for k in keys}
    return {"machine": info, "config": config, "variants": rows, "flops": flop_rates}


def print_table(report: dict[str, object]) -> None:
    info, config, rows, fl = report["machine"], report["config"], report["variants"], report["flops"]
    print(f"# {info['cpu']}, nproc {info['nproc']}, torch {info['torch']}, threads {info['threads']}, "
          f"{info['date']}")
    size = config["image_size"]
    print(f"# {config['device']}: SNGAN-32 nf={config['nf']}, batch {config['batch']}, "
          f"{config['channels']}x{size}x{size}, {config['steps']} steps, "
          f"median of {config['repeats']} alternating rounds")
    print(f"{'variant':<24}{'median s':>10}{'img-steps/s':>13}{'vs ref':>8}   rounds (s)")
    for name, row in rows.items():
        rounds = " ".join(f"{t:.3f}" for t in row["seconds"])
        print(f"{name:<24}{row['median_s']:>10.3f}{row['image_steps_per_s']:>13.1f}"
              f"{row['speedup_vs_reference']:>7.2f}x   {rounds}")
    roof = fl["roofline_gflops"]
    print(f"FLOPs/step: model {fl['model_gflop_per_step']:.2f} GFLOP (fwd + input-grad bwd), "
          f"executed by ours {fl['executed_gflop_per_step']:.2f} GFLOP")
    print(f"roofline (float32 mm): {roof:.1f} GFLOP/s; "
          f"ours {fl['ours_executed_gflops']:.1f} executed ({100 * fl['ours_executed_gflops'] / roof:.0f}%), "
          f"{fl['ours_effective_gflops']:.1f} model-equivalent; "
          f"reference {fl['reference_gflops']:.1f} GFLOP/s ({100 * fl['reference_gflops'] / roof:.0f}%)")


def headline(report: dict[str, object]) -> list[tuple[str, float, str, bool]]:
    """Issue 15's targets: >= 2.0x the literal loop on CPU, >= 3x on CUDA (nf = 128)."""
    config, rows = report["config"], report["variants"]
    target = 3.0 if config["device"] == "cuda" else 2.0
    out = []
    for name, row in rows.items():
        if name == "ours" or (name.startswith("ours, ") and ("graph" in name or "bf16" in name)):
            ratio = row["speedup_vs_reference"]
            out.append((f"Langevin nf={config['nf']} batch {config['batch']}: {name} vs literal loop", ratio,
                        f">= {target:.1f}x", ratio >= target))
    return out


def markdown(report: dict[str, object]) -> str:
    """The RESULTS.md section of one run (``benchmarks/run.py``)."""
    config, rows, fl = report["config"], report["variants"], report["flops"]
    size = config["image_size"]
    lines = [f"### Langevin purification, {config['device']}, SNGAN-32 nf = {config['nf']}", "",
             f"`EBMPurifier.purify` (fast path: micro-batches, pool-folded channels-last network, Philox noise "
             f"made on the device) against the literal loop of the published code (`torch.randn_like` noise, "
             f"whole batch, NCHW). Batch {config['batch']} of {config['channels']}x{size}x{size}, "
             f"{config['steps']} steps, random-init weights; medians of {config['repeats']} interleaved rounds.",
             "", "```", str(report["command"]), "```", "",
             "| variant | median s | image-steps/s | vs reference | rounds (s) |", "| --- | ---: | ---: | ---: | --- |"]
    for name, row in rows.items():
        rounds = " ".join(f"{t:.3f}" for t in row["seconds"])
        bold = "**" if name == "ours" else ""
        lines.append(f"| {bold}{name}{bold} | {row['median_s']:.3f} | {row['image_steps_per_s']:.1f} | "
                     f"{bold}{row['speedup_vs_reference']:.2f}x{bold} | {rounds} |")
    roof = fl["roofline_gflops"]
    lines += ["", f"FLOPs per step: model {fl['model_gflop_per_step']:.2f} GFLOP, executed by ours "
              f"{fl['executed_gflop_per_step']:.2f} GFLOP (pool folding). Dense fp32 matmul in the same run: "
              f"{roof:.1f} GFLOP/s; ours {fl['ours_executed_gflops']:.1f} GFLOP/s executed "
              f"({100 * fl['ours_executed_gflops'] / roof:.0f} %), reference {fl['reference_gflops']:.1f} "
              f"({100 * fl['reference_gflops'] / roof:.0f} %).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
