"""Run every benchmark this machine can run and rewrite ``benchmarks/RESULTS.md`` (issue 15).

    python benchmarks/run.py                  # the CPU figures, under 15 minutes on 2 cores
    python benchmarks/run.py --device cuda    # also the GPU figures (needs a CUDA device)
    python benchmarks/run.py --only langevin,ddpm --output /tmp/RESULTS.md

Each benchmark runs in its own subprocess (``python benchmarks/<name>.py ... --json FILE``) and renders its own
section (the module's ``markdown(result)``); this script adds the machine, the commands, the acceptance checks of
issue 15 side by side, and writes the file atomically. A benchmark that fails or times out is reported as such
in the file (with the tail of its output), never silently dropped. Every ratio in the file was measured within
one benchmark process, variants interleaved, so load on a shared machine moves both sides alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from common import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

Headline = Callable[[dict[str, Any]], list[tuple[str, float, str, bool]]]
"""result -> [(what, value, target as text, met)] for the acceptance table."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    cpu_args: tuple[str, ...] | None
    """Arguments of the CPU run; None: no CPU run."""
    cuda_args: tuple[str, ...] | None = None
    """Arguments of the ``--device cuda`` run; None: no GPU run."""
    timeout_s: float = 600.0
    env: dict[str, str] = field(default_factory=dict)


PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}  # spinning OpenMP threads distort timings on a shared machine

BENCHMARKS = (
    Benchmark("langevin", ("--nf", "128", "--batch", "64", "--steps", "5", "--threads", "2", "--repeats", "5"),
              ("--device", "cuda", "--nf", "128", "--batch", "256", "--steps", "48", "--repeats", "3"),
              timeout_s=300, env=PASSIVE),
    Benchmark("ddpm", ("--repeats", "5"), ("--device", "cuda", "--batch", "256", "--steps", "75"), timeout_s=420,
              env=PASSIVE),
    Benchmark("training", (), ("--device", "cuda"), timeout_s=420, env=PASSIVE),
    Benchmark("facility_location", ("--n", "2000", "--k", "600", "--repeats", "3", "--threads", "1"),
              timeout_s=300),
    Benchmark("ray_pipeline", ("--which", "ab", "--threads", "T1", "--repeats", "2"),
              ("--which", "g"), timeout_s=900, env=PASSIVE),
    Benchmark("sweep_overhead", (), None, timeout_s=420, env=PASSIVE),
)


def load_module(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (for its ``markdown`` and ``headline``)."""
    qualified = f"benchmarks_{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module  # dataclasses look their module up while the class is made
    for path in (str(ROOT), str(HERE)):  # the package; benchmarks/common.py
        if path not in sys.path:
            sys.path.insert(0, path)
    spec.loader.exec_module(module)
    return module


def run_benchmark(bench: Benchmark, args: tuple[str, ...], scratch: Path) -> dict[str, Any]:
    """Run one benchmark subprocess; {"command", "seconds", "result" | "error"}."""
    out = scratch / f"{bench.name}-{len(list(scratch.iterdir()))}.json"
    command = [sys.executable, str(HERE / f"{bench.name}.py"), *args, "--json", str(out)]
    shown = "python benchmarks/" + " ".join([f"{bench.name}.py", *args])
    print(f"== {shown}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, **bench.env, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=bench.timeout_s)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-2000:]
        return {"command": shown, "seconds": time.perf_counter() - start,
                "error": f"timed out after {bench.timeout_s:.0f} s", "tail": str(tail)}
    seconds = time.perf_counter() - start
    print(f"   {seconds:.0f} s, exit {done.returncode}", flush=True)
    if done.returncode != 0 or not out.exists():
        return {"command": shown, "seconds": seconds, "error": f"exit code {done.returncode}",
                "tail": (done.stdout + done.stderr)[-3000:]}
    return {"command": shown, "seconds": seconds, "result": json.loads(out.read_text())}


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, versions, GPU, load."""
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30 if hasattr(os, "sysconf") else 0.0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("ray", "mlflow", "diffusers"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = "not installed"
    return {"cpu": cpu_model(), "nproc": os.cpu_count(), "memory_gib": round(memory, 1), "gpu": gpu, **versions,
            "loadavg_start": os.getloadavg()}


def render(info: dict[str, Any], runs: list[tuple[Benchmark, str, dict[str, Any]]], argv: list[str],
           started: str, wall: float) -> str:
    """The whole RESULTS.md."""
    lines = ["# Benchmark results", "",
             "Written by `python " + " ".join(["benchmarks/run.py", *argv]) + "` (do not edit by hand: rerun it). "
             "Each section names the command that produced it; every ratio compares variants measured side by "
             "side, interleaved, in one process. What was optimised and why, older measurements (the H200 runs "
             "of issue 3, the ablations) and the projection to the paper's settings: "
             "[docs/performance.md](../docs/performance.md).", "",
             "## Machine", "", "| | |", "| --- | --- |",
             f"| CPU | {info['cpu']}, {info['nproc']} cores visible, {info['memory_gib']} GiB RAM |",
             f"| GPU | {info['gpu'] or 'none on this machine: GPU figures not measured in this run'} |",
             f"| versions | Python {info['python']}, torch {info['torch']}, Ray {info['ray']}, MLflow "
             f"{info['mlflow']}, diffusers {info['diffusers']} |",
             f"| date | {started}, {wall / 60:.1f} min in all |",
             f"| load average | {' / '.join(f'{v:.2f}' for v in info['loadavg_start'])} at the start, "
             f"{' / '.join(f'{v:.2f}' for v in info.get('loadavg_end', os.getloadavg()))} at the end |", ""]
    lines += acceptance(runs)
    for bench, device, run in runs:
        lines += section(bench, device, run)
    return "\n".join(lines).rstrip() + "\n"


def acceptance(runs: list[tuple[Benchmark, str, dict[str, Any]]]) -> list[str]:
    """Issue 15's acceptance figures, each from its benchmark's ``headline``."""
    rows = []
    for bench, device, run in runs:
        if "result" not in run:
            rows.append(f"| {bench.name} ({device}) | failed: {run['error']} | | no |")
            continue
        headline: Headline | None = getattr(load_module(bench.name), "headline", None)
        for what, value, target, met in (headline(run["result"]) if headline else []):
            rows.append(f"| {what} ({device}) | {value:.3g} | {target} | {'yes' if met else '**no**'} |")
    if not rows:
        return []
    return ["## Acceptance (issue 15)", "", "| figure | measured | target | met |", "| --- | ---: | --- | --- |",
            *rows, ""]


def section(bench: Benchmark, device: str, run: dict[str, Any]) -> list[str]:
    if "result" not in run:
        return [f"## {bench.name} ({device}): FAILED", "", f"`{run['command']}`: {run['error']} after "
                f"{run['seconds']:.0f} s. Last output:", "", "```", run.get("tail", "").strip(), "```", ""]
    module = load_module(bench.name)
    body = module.markdown(run["result"]).rstrip()
    return [body, "", f"*{run['seconds']:.0f} s wall (`{run['command']}`).*", ""]


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def render_saved(args: argparse.Namespace) -> int:
    """--render-only: RESULTS.md again from the saved raw results (e.g. after a change to a ``markdown``)."""
    saved = json.loads(args.raw.read_text())
    by_name = {bench.name: bench for bench in BENCHMARKS}
    runs = [(by_name[run["benchmark"]], run["device"], run) for run in saved["runs"]]
    write_atomically(args.output, render(saved["machine"], runs, saved["argv"], saved["started"], saved["wall_s"]))
    print(f"wrote {args.output} from {args.raw}")
    return 0 if all("result" in run for _, _, run in runs) else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: also run the GPU benchmarks (the CPU ones run either way)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--skip-cpu", action="store_true", help="with --device cuda: only the GPU runs")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--raw", type=Path, default=HERE / "RESULTS.json",
                        help="every benchmark's JSON result, written before the Markdown is rendered")
    parser.add_argument("--render-only", action="store_true",
                        help="re-render --output from --raw without running anything")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    names = {n for n in args.only.split(",") if n}
    unknown = names - {b.name for b in BENCHMARKS}
    if unknown:
        print(f"--only: unknown benchmark(s) {sorted(unknown)}; known: {[b.name for b in BENCHMARKS]}",
              file=sys.stderr)
        return 2
    if args.render_only:
        return render_saved(args)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is visible to torch on this machine", file=sys.stderr)
            return 2
    info = machine()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="puregen-bench-") as scratch:
        for bench in BENCHMARKS:
            if names and bench.name not in names:
                continue
            plans = [] if args.skip_cpu else [("cpu", bench.cpu_args)]
            if args.device == "cuda":
                plans.append(("cuda", bench.cuda_args))
            for device, bench_args in plans:
                if bench_args is not None:
                    runs.append((bench, device, run_benchmark(bench, bench_args, Path(scratch))))
    wall = time.perf_counter() - start
    info["loadavg_end"] = os.getloadavg()
    saved = {"machine": info, "argv": sys.argv[1:], "started": started, "wall_s": wall,
             "runs": [{"benchmark": bench.name, "device": device, **run} for bench, device, run in runs]}
    write_atomically(args.raw, json.dumps(saved, indent=1))
    write_atomically(args.output, render(info, runs, sys.argv[1:], started, wall))
    print(f"wrote {args.output} ({(time.perf_counter() - start) / 60:.1f} min)")
    return 0 if all("result" in run for _, _, run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
