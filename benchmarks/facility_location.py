"""EPIC's greedy facility location: our lazy, vectorised solver against plain vectorised greedy (every candidate's
gain recomputed at every step, the textbook algorithm as one tensor expression per step), same similarity matrix,
same process, interleaved repeats; both give the same selection (checked here too).

    python benchmarks/facility_location.py --n 5000 --k 1500 --dim 10 --repeats 3

n = 5,000 and k = 1,500 is one CIFAR-10 class at EPIC-0.3 (10 classes per round).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from puregen_dist.defenses.facility_location import (
    euclidean_similarity,
    greedy_facility_location,
    marginal_gains,
)


def plain_greedy(similarity: torch.Tensor, k: int) -> list[int]:
    """Textbook greedy: all gains every step (ties to the lower index)."""
    n = similarity.shape[0]
    served = similarity.new_zeros(n)
    chosen = torch.zeros(n, dtype=torch.bool)
    order = []
    everyone = torch.arange(n)
    for _ in range(k):
        gains = marginal_gains(similarity, served, everyone)
        gains[chosen] = -torch.inf
        pick = int(torch.argmax(gains))
        order.append(pick)
        chosen[pick] = True
        served = torch.maximum(served, similarity[:, pick])
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--k", type=int, default=1500)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    # gradient proxies look like softmax - onehot: points near a few corners
    points = torch.softmax(3 * torch.randn(args.n, args.dim, generator=generator), 1)
    similarity = euclidean_similarity(points)
    times: dict[str, list[float]] = {"plain greedy": [], "ours (lazy, vectorised)": []}
    orders = {}
    for _ in range(args.repeats):
        for name, solve in (("plain greedy", lambda: plain_greedy(similarity, args.k)),
                            ("ours (lazy, vectorised)",
                             lambda: greedy_facility_location(similarity, args.k).order.tolist())):
            tick = time.perf_counter()
            orders[name] = solve()
            times[name].append(time.perf_counter() - tick)
    same = orders["plain greedy"] == orders["ours (lazy, vectorised)"]
    base = statistics.median(times["plain greedy"])
    print(f"n={args.n} k={args.k} dim={args.dim} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"{platform.processor() or platform.machine()}; same selection: {same}")
    print("| solver | median s | vs plain | rounds (s) |\n| --- | ---: | ---: | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {base / median:.1f}x | {' '.join(f'{v:.3f}' for v in values)} |")
    print(json.dumps({name: statistics.median(v) for name, v in times.items()} | {"same_selection": same}))
    if args.json:
        report = {"command": "python " + " ".join(sys.argv), "n": args.n, "k": args.k, "dim": args.dim,
                  "threads": torch.get_num_threads(), "seconds": times, "same_selection": same}
        args.json.write_text(json.dumps(report, indent=2))


def headline(report: dict) -> list[tuple[str, float, str, bool]]:
    medians = {name: statistics.median(v) for name, v in report["seconds"].items()}
    ratio = medians["plain greedy"] / medians["ours (lazy, vectorised)"]
    return [(f"facility location n={report['n']} k={report['k']}: ours vs plain greedy (same selection: "
             f"{report['same_selection']})", ratio, "> 1x, same selection", ratio > 1 and report["same_selection"])]


def markdown(report: dict) -> str:
    """The RESULTS.md section of one run (``benchmarks/run.py``)."""
    base = statistics.median(report["seconds"]["plain greedy"])
    lines = ["## Greedy facility location for EPIC (issue 14)", "",
             "`greedy_facility_location` (lazy, vectorised) against plain vectorised greedy (every gain recomputed "
             f"at every step) on the same similarity matrix of n = {report['n']} softmax-like {report['dim']}-d "
             f"points, k = {report['k']}, {report['threads']} thread(s), interleaved rounds. Same selection: "
             f"**{report['same_selection']}**. (n = 5,000, k = 1,500, one CIFAR-10 class at EPIC-0.3, measured "
             "49x on an earlier run: docs/performance.md.)", "", "```", report["command"], "```", "",
             "| solver | median s | vs plain | rounds (s) |", "| --- | ---: | ---: | --- |"]
    for name, values in report["seconds"].items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.3f} | {base / median:.1f}x | {' '.join(f'{v:.3f}' for v in values)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
