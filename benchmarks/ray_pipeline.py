"""Ray Data purification pipeline benchmarks (issue #4, deliverable 5), measured side by side in one run.

(a) Pipeline efficiency: end-to-end ``purify_parquet`` (read Parquet + actor start-up + model load + purify +
    write Parquet; ``ray.init`` excluded) against the in-process purifier ``PureGenDefense(cfg).apply``
    with the same total number of torch threads:
      T=1: in-process ``torch.set_num_threads(1)``  vs  Ray, 1 actor x num_cpus 1 (Ray: 1 torch thread)
           in a 2-CPU Ray session (the second CPU runs the read / repartition / write tasks);
      T=2: in-process ``torch.set_num_threads(2)``  vs  Ray, 2 actors x num_cpus 0.5 (1 torch thread each)
           in a 2-CPU session, and vs 1 actor x num_cpus 2 (2 torch threads) in a session declaring 3 logical
           CPUs (so that one logical CPU is left for the read/write tasks; 2 would starve them).
    Every configuration runs in a fresh subprocess (fresh Ray session); the torch thread count inside the
    actors is checked with a probe UDF scheduled with the same resources. Warm-up is separated as follows:
    in-process, the first batch is timed on its own; for Ray, the same session then purifies a small input
    (``--small`` images): fixed cost ~ T(small) - small / steady rate, and the marginal (steady-state) rate is
    (N - small) / (T(N) - T(small)). The outputs are checked byte for byte against the in-process result.
(b) Peak memory of the whole job (driver + every process it spawns: GCS, raylet, workers, actors, agents),
    sampled every 0.2 s with psutil from outside (sum of RSS, and of PSS which counts shared pages such as the
    object store and the torch libraries once), purifying 50,000 vs 5,000 images, each in a fresh subprocess;
    the plasma store usage is polled from the driver. ``--row-group-rows`` writes the input in bounded row
    groups, ``--object-store-mb`` caps the object store.
(c) Actor scaling: 1 vs 2 actors of 1 torch thread each (num_cpus 0.5 each, 2-CPU session).
(g) GPU, end to end: ``puregen-dist purify benchmarks/purify_cifar10_ebm150_gpu.yaml`` (all 50,000 CIFAR-10
    training images, EBM-150, nf = 128, one actor on one GPU) in a fresh store, timed around the command, with
    the pipeline's own purification time from the artifact's manifest. ``--gpu-set KEY=VALUE`` overrides the
    config (e.g. to try the mode on a CPU at toy size).

    python benchmarks/ray_pipeline.py --which all --json ray_pipeline.json
    python benchmarks/ray_pipeline.py --which a --images 4096 --steps 20 --nf 32
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0
PURIFY_SEED = 1
CLASSES = tuple(str(i) for i in range(10))


# ------------------------------------------------------------------------------------------ inputs


def make_checkpoint(root: Path, nf: int) -> str:
    """A random-init SNGAN-32 EBM checkpoint (seed 0) for 32x32x3 images."""
    import torch

    from puregen_dist.config.generative import EBMConfig
    from puregen_dist.generative.checkpoints import save_checkpoint
    from puregen_dist.generative.ebm import build_ebm

    torch.manual_seed(SEED)
    cfg = EBMConfig(nf=nf, in_channels=3, image_size=32)
    return str(save_checkpoint(root / f"ebm_nf{nf}", build_ebm(cfg), kind="ebm",
                               model_config=dataclasses.asdict(cfg)))


def make_input(root: Path, n: int, row_group_rows: int | None = None) -> str:
    """N seeded random 32x32x3 images (ids 0..N-1, 10 classes, every 17th flagged poisoned); returns the path
    Ray Data reads. Default: stored the way the package stores a poison set (``ArtifactStore.put_imageset``:
    files of at most 4,096 rows in 1,024-row groups). ``row_group_rows``: instead one file with row groups of
    that many rows (0: pyarrow's default, one row group up to 1 Mi rows), for comparison."""
    import pyarrow.parquet as pq

    from puregen_dist.data.io import imageset_table
    from puregen_dist.pipeline.store import ArtifactStore, artifact_key
    from puregen_dist.types import ImageSet

    rng = np.random.default_rng(SEED)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    data = ImageSet(images, (np.arange(n) % 10).astype(np.int64), np.arange(n, dtype=np.int64), CLASSES)
    poisoned = np.arange(0, n, 17, dtype=np.int64)
    if row_group_rows is None:
        store = ArtifactStore(root / f"store_{n}")
        config = {"benchmark": "ray_pipeline", "images": n, "seed": SEED}
        key = artifact_key("poison", config)
        store.put_imageset(key, data, kind="poison", config=config, poisoned_ids=poisoned)
        return store.imageset_path(key)
    directory = root / f"input_{n}_{row_group_rows}"
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(imageset_table(data, poisoned), directory / "train.parquet", compression="zstd",
                   row_group_size=row_group_rows or None)
    return str(directory)


def images_digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ child processes


def child_inproc(spec: dict[str, Any]) -> dict[str, Any]:
    """In-process purification with ``threads`` torch threads: read, build the defense, purify the first
    batch, purify the rest, write (each timed)."""
    import torch

    torch.set_num_threads(spec["threads"])
    from puregen_dist.config.generative import LangevinConfig
    from puregen_dist.data.io import write_imageset
    from puregen_dist.defenses.puregen import PureGenDefense, PureGenEBMConfig
    from puregen_dist.pipeline.purify import read_purified

    cfg = PureGenEBMConfig(ebm=spec["ckpt"], langevin=LangevinConfig(steps=spec["steps"]), device="cpu",
                           batch_size=spec["batch_size"])
    t0 = time.perf_counter()
    data, poisoned = read_purified(spec["input"])
    t1 = time.perf_counter()
    defense = PureGenDefense(cfg)
    t2 = time.perf_counter()
    first = np.arange(min(spec["batch_size"], len(data)))
    head = defense.apply(data.take(first), seed=PURIFY_SEED)
    t3 = time.perf_counter()
    tail = defense.apply(data.take(np.arange(len(first), len(data))), seed=PURIFY_SEED)
    t4 = time.perf_counter()
    out = data.replace(images=np.concatenate([head.images, tail.images]))
    write_imageset(out, Path(spec["workdir"]) / "out.parquet", poisoned_ids=data.ids[poisoned])
    t5 = time.perf_counter()
    return {"threads": torch.get_num_threads(), "images": len(data), "read_s": t1 - t0, "build_s": t2 - t1,
            "first_batch_s": t3 - t2, "first_batch_images": len(first), "rest_s": t4 - t3, "write_s": t5 - t4,
            "apply_s": t4 - t2, "digest": images_digest(out.images)}


class _ThreadProbe:
    """Ray Data UDF reporting the torch / OpenMP thread settings of an actor scheduled like the purifiers."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["id"])
        omp = os.environ.get("OMP_NUM_THREADS", "")
        return {"torch_threads": np.full(n, torch.get_num_threads()), "omp": np.array([omp] * n),
                "pid": np.full(n, os.getpid())}


def start_ray(num_cpus: int, object_store_mb: int | None) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = {"object_store_memory": object_store_mb * 2**20} if object_store_mb else {}
    ray.init(address="local", num_cpus=num_cpus, num_gpus=0, include_dashboard=False, log_to_driver=False,
             **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False


def probe_threads(actors: int, num_cpus: float) -> dict[str, Any]:
    import ray

    ds = ray.data.range(4 * actors, override_num_blocks=4 * actors).map_batches(
        _ThreadProbe, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=num_cpus)
    rows = ds.take_all()
    return {"torch_threads": sorted({int(r["torch_threads"]) for r in rows}),
            "OMP_NUM_THREADS": sorted({str(r["omp"]) for r in rows}),
            "actor_pids": len({int(r["pid"]) for r in rows})}


def child_ray(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh Ray session (``num_cpus`` logical CPUs): for each config, a thread probe, the full run
    (timed end to end around ``purify_parquet``), the small run (fixed-cost estimate), the output digest."""
    import ray

    from puregen_dist.config.generative import LangevinConfig
    from puregen_dist.defenses.puregen import PureGenEBMConfig
    from puregen_dist.pipeline.purify import RayPurifyConfig, purify_parquet, read_purified

    t0 = time.perf_counter()
    start_ray(spec["num_cpus"], spec.get("object_store_mb"))
    init_s = time.perf_counter() - t0
    cfg = PureGenEBMConfig(ebm=spec["ckpt"], langevin=LangevinConfig(steps=spec["steps"]), device="cpu")
    store = StorePoller() if spec.get("poll_store") else None
    if store:
        store.start()
    results = []
    for i, rc in enumerate(spec["configs"]):
        ray_cfg = RayPurifyConfig(actors=rc["actors"], batch_size=rc["batch_size"],
                                  num_cpus_per_actor=rc["num_cpus_per_actor"])
        row: dict[str, Any] = {**rc}
        if spec.get("probe", True):
            row["probe"] = probe_threads(rc["actors"], rc["num_cpus_per_actor"])
        for label, source in (("full", spec["input"]), ("small", spec.get("input_small"))):
            if source is None:
                continue
            out = Path(spec["workdir"]) / f"out_{i}_{label}"
            start = time.perf_counter()
            stats = purify_parquet(source, str(out), cfg, seed=PURIFY_SEED, ray_cfg=ray_cfg)
            row[f"{label}_s"] = time.perf_counter() - start
            row[f"{label}_pipeline_s"] = stats.seconds
            row[f"{label}_images"] = stats.images
            if label == "full" and spec.get("digest", True):
                data, _ = read_purified(str(out))
                row["digest"] = images_digest(data.images)
        results.append(row)
    extra = {}
    if store:
        store.stop()
        capacity = ray.cluster_resources().get("object_store_memory", 0) / 2**20
        extra = {"object_store_peak_mib": store.peak_mib, "object_store_capacity_mib": capacity,
                 "object_store_polls": store.polls}
    ray.shutdown()
    return {"num_cpus": spec["num_cpus"], "ray_init_s": init_s, "configs": results, **extra}


class StorePoller(threading.Thread):
    """Polls the plasma object store usage (``memory_summary(stats_only=True)``, ~30 ms) every 0.5 s."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.halt, self.peak_mib, self.polls = interval, threading.Event(), 0, 0

    def run(self) -> None:
        import re

        from ray._private.internal_api import memory_summary

        while not self.halt.is_set():
            try:
                found = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
            except Exception:  # noqa: BLE001 - best effort; the RSS/PSS sampling is the measurement
                found = None
            if found:
                self.peak_mib = max(self.peak_mib, int(found.group(1)))
                self.polls += 1
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join()


def run_child(spec: dict[str, Any], timeout: float, monitor: bool = False) -> dict[str, Any]:
    """Run one child spec in a fresh interpreter; with ``monitor``, sample the memory of its process tree."""
    result_path = Path(spec["workdir"]) / "result.json"
    spec = {**spec, "result": str(result_path)}
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeMemory(proc.pid) if monitor else None
    if sampler:
        sampler.start()
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise RuntimeError(f"child timed out after {timeout} s:\n{output[-4000:]}") from None
    finally:
        if sampler:
            sampler.stop()
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"child failed (rc {proc.returncode}):\n{output[-6000:]}")
    result = json.loads(result_path.read_text())
    if sampler:
        result["memory"] = sampler.report()
    return result


class TreeMemory(threading.Thread):
    """Every ``interval`` s: sum of RSS and of PSS over a process and all its descendants; keeps the maxima
    (and the driver's own peak RSS, and the process count at the RSS peak)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.halt = threading.Event()
        self.peak_rss = self.peak_pss = self.peak_driver = 0
        self.procs_at_peak: list[str] = []
        self.pss_breakdown: list[tuple[str, int, int, int]] = []  # name, RSS, PSS, USS
        self.samples = 0

    def run(self) -> None:
        import psutil

        while not self.halt.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            rss = pss = 0
            names, per_proc = [], []
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += info.pss
                    names.append(p.name())
                    per_proc.append((p.name(), info.rss, info.pss, info.uss))
                    if p.pid == self.root.pid:
                        self.peak_driver = max(self.peak_driver, info.rss)
                except psutil.Error:
                    continue
            if rss > self.peak_rss:
                self.peak_rss, self.procs_at_peak = rss, names
            if pss > self.peak_pss:
                self.peak_pss, self.pss_breakdown = pss, sorted(per_proc, key=lambda r: -r[2])
            self.samples += 1
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join()

    def report(self) -> dict[str, Any]:
        mib = 2**20
        return {"peak_rss_sum_mib": self.peak_rss / mib, "peak_pss_sum_mib": self.peak_pss / mib,
                "peak_driver_rss_mib": self.peak_driver / mib, "processes_at_peak": len(self.procs_at_peak),
                "process_names_at_peak": sorted(set(self.procs_at_peak)), "samples": self.samples,
                "pss_peak_breakdown_mib": [(n, round(r / mib), round(q / mib), round(u / mib))
                                           for n, r, q, u in self.pss_breakdown]}


def child_mem(spec: dict[str, Any]) -> dict[str, Any]:
    """A fresh Ray session purifying one input (memory sampled by the parent); also polls the object store
    usage from inside (:class:`StorePoller`)."""
    spec = {**spec, "configs": [spec["config"]], "probe": False, "digest": False, "poll_store": True}
    return child_ray(spec)


# ------------------------------------------------------------------------------------------ benchmarks


def bench_a(args: argparse.Namespace, root: Path, ckpt: str) -> dict[str, Any]:
    n, bs = args.images, args.batch_size
    inp, small = make_input(root, n), make_input(root, args.small)
    common = {"ckpt": ckpt, "steps": args.steps, "batch_size": bs}
    runs: dict[str, Any] = {}
    def ray_run(num_cpus: int, actors: int, cpus_per_actor: float) -> dict[str, Any]:
        return {"num_cpus": num_cpus,
                "configs": [{"actors": actors, "num_cpus_per_actor": cpus_per_actor, "batch_size": bs}]}

    plan = [
        ("inproc_T1", "inproc", {"threads": 1}),
        ("ray_T1_1x1", "ray", ray_run(2, 1, 1)),
        ("inproc_T2", "inproc", {"threads": 2}),
        ("ray_T2_2x1", "ray", ray_run(2, 2, 0.5)),
        ("ray_T2_1x2", "ray", ray_run(3, 1, 2)),  # 3 logical CPUs: one left for the read/write tasks
    ]
    plan = [case for case in plan if case[0].split("_")[1] in args.threads.split(",")]
    repeats: list[dict[str, Any]] = []
    for repeat in range(args.repeats):  # interleaved: each repeat runs every case once, in-process first
        runs = {}
        for name, kind, extra in plan:
            workdir = Path(tempfile.mkdtemp(prefix=f"{name}_{repeat}_", dir=root))
            spec = {"kind": kind, "workdir": str(workdir), "input": inp, "input_small": small, **common, **extra}
            print(f"[a] {name} (repeat {repeat + 1}/{args.repeats}) ...", flush=True)
            runs[name] = run_child(spec, timeout=args.timeout)
            print(f"[a] {name}: {json.dumps(runs[name])}", flush=True)
        repeats.append({"runs": runs, "summary": summarise_a(runs, n, args.small)})
    return {"images": n, "small": args.small, "steps": args.steps, "nf": args.nf, "batch_size": bs,
            "repeats": repeats, "summary": median_summary([r["summary"] for r in repeats])}


def median_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case and statistic, the median over repeats (with the per-repeat values alongside)."""
    out: dict[str, Any] = {}
    for case in summaries[0]:
        out[case] = {}
        for stat, value in summaries[0][case].items():
            values = [s[case][stat] for s in summaries]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[case][stat] = {"median": float(np.median(values)), "repeats": values}
            else:
                out[case][stat] = values if len(values) > 1 else value
    return out


def summarise_a(runs: dict[str, Any], n: int, small: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t, ray_names in ((1, ["ray_T1_1x1"]), (2, ["ray_T2_2x1", "ray_T2_1x2"])):
        if f"inproc_T{t}" not in runs:
            continue
        ip = runs[f"inproc_T{t}"]
        ip_e2e = n / ip["apply_s"]  # build + all batches (first included)
        ip_steady = (n - ip["first_batch_images"]) / ip["rest_s"]
        out[f"inproc_T{t}"] = {"apply_img_s": ip_e2e, "steady_img_s": ip_steady,
                               "with_io_img_s": n / (ip["read_s"] + ip["apply_s"] + ip["write_s"])}
        for name in ray_names:
            r = runs[name]["configs"][0]
            e2e = n / r["full_s"]
            marginal = (n - small) / (r["full_s"] - r["small_s"])
            out[name] = {"e2e_img_s": e2e, "marginal_img_s": marginal,
                         "fixed_cost_s": r["small_s"] - small / marginal,
                         "efficiency_e2e": e2e / ip_e2e, "efficiency_steady": marginal / ip_steady,
                         "efficiency_e2e_vs_inproc_with_io": e2e / out[f"inproc_T{t}"]["with_io_img_s"],
                         "same_bytes_as_inproc": r.get("digest") == ip["digest"],
                         "actor_torch_threads": r.get("probe", {}).get("torch_threads")}
    return out


def bench_b(args: argparse.Namespace, root: Path, ckpt: str) -> dict[str, Any]:
    sizes = [int(s) for s in args.mem_sizes.split(",")]
    rc = {"actors": args.mem_actors, "num_cpus_per_actor": args.mem_cpus_per_actor,
          "batch_size": args.batch_size}
    runs = {}
    for n in sizes:
        inp = make_input(root, n, args.row_group_rows)
        workdir = Path(tempfile.mkdtemp(prefix=f"mem_{n}_", dir=root))
        spec = {"kind": "mem", "workdir": str(workdir), "input": inp, "ckpt": ckpt, "steps": args.mem_steps,
                "num_cpus": 2, "config": rc, "object_store_mb": args.object_store_mb}
        print(f"[b] N={n} ...", flush=True)
        runs[str(n)] = run_child(spec, timeout=args.timeout, monitor=True)
        print(f"[b] N={n}: {json.dumps(runs[str(n)])}", flush=True)
        shutil.rmtree(Path(inp) if Path(inp).is_dir() else Path(inp).parent)
    lo, hi = runs[str(min(sizes))]["memory"], runs[str(max(sizes))]["memory"]
    summary = {"rss_ratio": hi["peak_rss_sum_mib"] / lo["peak_rss_sum_mib"],
               "pss_ratio": hi["peak_pss_sum_mib"] / lo["peak_pss_sum_mib"],
               "driver_rss_ratio": hi["peak_driver_rss_mib"] / lo["peak_driver_rss_mib"]}
    return {"sizes": sizes, "steps": args.mem_steps, "nf": args.mem_nf, "config": rc,
            "row_group_rows": args.row_group_rows,
            "object_store_mb": args.object_store_mb, "runs": runs, "summary": summary}


def bench_c(args: argparse.Namespace, root: Path, ckpt: str) -> dict[str, Any]:
    n, bs = args.scale_images, args.batch_size
    inp, small = make_input(root, n), make_input(root, args.small)
    configs = [{"actors": a, "num_cpus_per_actor": 0.5, "batch_size": bs} for a in (1, 2)]
    workdir = Path(tempfile.mkdtemp(prefix="scale_", dir=root))
    spec = {"kind": "ray", "workdir": str(workdir), "input": inp, "input_small": small, "ckpt": ckpt,
            "steps": args.scale_steps, "num_cpus": 2, "configs": configs}
    print("[c] 1 vs 2 actors ...", flush=True)
    run = run_child(spec, timeout=args.timeout)
    print(f"[c]: {json.dumps(run)}", flush=True)
    rows = {}
    for r in run["configs"]:
        marginal = (n - args.small) / (r["full_s"] - r["small_s"])
        rows[f"{r['actors']}_actors"] = {"e2e_img_s": n / r["full_s"], "marginal_img_s": marginal,
                                         "actor_torch_threads": r["probe"]["torch_threads"]}
    rows["speedup_e2e"] = rows["2_actors"]["e2e_img_s"] / rows["1_actors"]["e2e_img_s"]
    rows["speedup_marginal"] = rows["2_actors"]["marginal_img_s"] / rows["1_actors"]["marginal_img_s"]
    rows["same_bytes_1_vs_2"] = run["configs"][0]["digest"] == run["configs"][1]["digest"]
    return {"images": n, "steps": args.scale_steps, "nf": args.nf, "small": args.small, "run": run,
            "summary": rows}


def bench_g(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The whole-CIFAR-10 EBM-150 purification through the CLI, in a fresh store under ``root``."""
    config = Path(__file__).resolve().parent / "purify_cifar10_ebm150_gpu.yaml"
    store = root / "gpu_store"
    command = [sys.executable, "-m", "puregen_dist", "purify", str(config)]
    for item in [f"store={store}", *args.gpu_set]:
        command += ["--set", item]
    print(f"[g] {' '.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"purify failed (exit {done.returncode}): {(done.stdout + done.stderr)[-3000:]}")
    manifests = [json.loads(p.read_text()) for p in store.rglob("manifest.json")]
    purified = [m for m in manifests if m.get("kind") == "purified"]
    timings = purified[0].get("timings", {}) if purified else {}
    rows = purified[0].get("stats", {}).get("rows_purified") if purified else None
    return {"config": "benchmarks/purify_cifar10_ebm150_gpu.yaml", "overrides": args.gpu_set, "wall_s": wall,
            "timings": timings, "rows_purified": rows, "output_tail": (done.stdout + done.stderr)[-1500:]}


# ------------------------------------------------------------------------------------------ report


def headline(report: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """Issue 15's targets: Ray Data efficiency >= 0.85 end to end, memory ratio (50,000 / 5,000) <= 1.3."""
    out = []
    for case, stats in report.get("a", {}).get("summary", {}).items():
        if case.startswith("ray_"):
            value = stats["efficiency_e2e"]["median"]
            out.append((f"Ray Data efficiency end to end, {case}", value, ">= 0.85", value >= 0.85))
    if "b" in report:
        for stat in ("rss_ratio", "pss_ratio"):
            value = report["b"]["summary"][stat]
            out.append((f"peak memory 50,000 / 5,000 images, sum of {stat[:3].upper()}", value, "<= 1.3",
                        value <= 1.3))
    if "g" in report:
        out.append(("CIFAR-10 train, EBM-150, Ray Data on one GPU: wall s", report["g"]["wall_s"],
                    "< 60 s (design goal)", report["g"]["wall_s"] < 60))
    return out


def markdown(report: dict[str, Any]) -> str:
    """The RESULTS.md section of one run (``benchmarks/run.py``)."""
    lines = ["## Ray Data purification pipeline (issue 4, re-measured in issue 15)", "",
             "`purify_parquet` (read Parquet, actor start-up and model load, purify, write Parquet) against the "
             "in-process purifier `PureGenDefense(cfg).apply` with the same torch threads, every configuration in "
             "a fresh subprocess and Ray session; random-init SNGAN-32 EBM, seeded random 32x32x3 images stored "
             "as the package stores a poison set. Method and earlier runs: docs/performance.md.", "",
             "```", "python benchmarks/ray_pipeline.py " + " ".join(report["argv"]), "```", ""]
    if "a" in report:
        lines += _markdown_a(report["a"])
    if "b" in report:
        lines += _markdown_b(report["b"])
    if "g" in report:
        g = report["g"]
        timings = ", ".join(f"{k} {v:.1f}" for k, v in g["timings"].items() if isinstance(v, (int, float)))
        lines += [f"(g) `puregen-dist purify {g['config']}` {' '.join('--set ' + o for o in g['overrides'])}: "
                  f"**{g['wall_s']:.1f} s** end to end for {g['rows_purified']} images (manifest timings: "
                  f"{timings}).", ""]
    return "\n".join(lines)


def _markdown_a(a: dict[str, Any]) -> list[str]:
    lines = [f"(a) Efficiency, N = {a['images']}, nf = {a['nf']}, {a['steps']} Langevin steps, batch "
             f"{a['batch_size']}, {len(a['repeats'])} interleaved repeat(s); the fixed cost comes from a "
             f"{a['small']}-image run in the same Ray session:", "",
             "| case | images/s end to end | efficiency end to end | efficiency steady | fixed cost s | same bytes |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for case, stats in a["summary"].items():
        if case.startswith("inproc"):
            lines.append(f"| {case} | {stats['apply_img_s']['median']:.1f} | 1 | 1 | | |")
            continue
        lines.append(f"| {case} | {stats['e2e_img_s']['median']:.1f} | **{stats['efficiency_e2e']['median']:.3f}** "
                     f"| {stats['efficiency_steady']['median']:.3f} | {stats['fixed_cost_s']['median']:.1f} | "
                     f"{stats['same_bytes_as_inproc']} |")
    return lines + [""]


def _markdown_b(b: dict[str, Any]) -> list[str]:
    lines = [f"(b) Peak memory of the whole job (driver and every process it spawns, sampled every 0.2 s), "
             f"EBM nf = {b['nf']}, {b['steps']} step(s), {b['config']['actors']} actors:", "",
             "| N | peak sum RSS MiB | peak sum PSS MiB | driver peak RSS MiB |", "| ---: | ---: | ---: | ---: |"]
    for n, run in b["runs"].items():
        mem = run["memory"]
        lines.append(f"| {int(n):,} | {mem['peak_rss_sum_mib']:.0f} | {mem['peak_pss_sum_mib']:.0f} | "
                     f"{mem['peak_driver_rss_mib']:.0f} |")
    summary = b["summary"]
    return lines + ["", f"Ratio 50,000 / 5,000: **{summary['rss_ratio']:.2f}** (sum of RSS), "
                    f"**{summary['pss_ratio']:.2f}** (sum of PSS); target <= 1.3.", ""]


# ------------------------------------------------------------------------------------------ main


def machine() -> dict[str, Any]:
    import ray
    import torch
    from common import cpu_model

    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg": os.getloadavg()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--which", default="all", help="any of the letters a, b, c, g (g: GPU), or all (= abc)")
    p.add_argument("--gpu-set", action="append", default=[], metavar="KEY=VALUE",
                   help="(g) override a value of benchmarks/purify_cifar10_ebm150_gpu.yaml (repeatable)")
    p.add_argument("--images", type=int, default=4096, help="(a) images")
    p.add_argument("--steps", type=int, default=20, help="(a) Langevin steps")
    p.add_argument("--nf", type=int, default=32, help="(a), (c) SNGAN-32 width")
    p.add_argument("--batch-size", type=int, default=128, help="rows per map_batches call / in-process batch")
    p.add_argument("--repeats", type=int, default=1, help="(a) repeat every case, interleaved; medians")
    p.add_argument("--threads", default="T1,T2", help="(a) which cases: T1 and/or T2")
    p.add_argument("--small", type=int, default=256, help="(a), (c) small input for the fixed-cost estimate")
    p.add_argument("--mem-sizes", default="5000,50000", help="(b) image counts")
    p.add_argument("--mem-steps", type=int, default=1, help="(b) Langevin steps")
    p.add_argument("--mem-nf", type=int, default=8, help="(b) SNGAN-32 width")
    p.add_argument("--mem-actors", type=int, default=2)
    p.add_argument("--mem-cpus-per-actor", type=float, default=0.5)
    p.add_argument("--object-store-mb", type=int, default=None, help="(b) object store size (Ray default)")
    p.add_argument("--row-group-rows", type=int, default=None,
                   help="(b) input as ONE file with row groups of this many rows (0: pyarrow's default, one "
                        "group); default: the store's layout (files of <= 4,096 rows)")
    p.add_argument("--scale-images", type=int, default=2048, help="(c) images")
    p.add_argument("--scale-steps", type=int, default=10, help="(c) Langevin steps")
    p.add_argument("--timeout", type=float, default=1200, help="per child process, seconds")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        spec = json.loads(args.child)
        result = {"inproc": child_inproc, "ray": child_ray, "mem": child_mem}[spec["kind"]](spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return
    report: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:]}
    with tempfile.TemporaryDirectory(prefix="ray_pipeline_", dir=args.workdir) as tmp:
        root = Path(tmp)
        which = "abc" if args.which == "all" else args.which
        if not which or set(which) - set("abcg"):
            raise SystemExit(f"--which: expected letters from a, b, c, g or 'all', got {args.which!r}")
        if "a" in which or "c" in which:
            ckpt = make_checkpoint(root, args.nf)
        if "a" in which:
            report["a"] = bench_a(args, root, ckpt)
            print("[a] summary", json.dumps(report["a"]["summary"], indent=2), flush=True)
        if "b" in which:
            report["b"] = bench_b(args, root, make_checkpoint(root, args.mem_nf))
            print("[b] summary", json.dumps(report["b"]["summary"], indent=2), flush=True)
        if "c" in which:
            report["c"] = bench_c(args, root, ckpt)
            print("[c] summary", json.dumps(report["c"]["summary"], indent=2), flush=True)
        if "g" in which:
            report["g"] = bench_g(args, root)
            print("[g]", json.dumps({k: v for k, v in report["g"].items() if k != "output_tail"}), flush=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
