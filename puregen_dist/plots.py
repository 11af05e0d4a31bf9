"""PNG figures and CSV tables of the PureGen diagnostics (:mod:`puregen_dist.generative.diagnostics`).

Paper: Bhat et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model
Dynamics" (NeurIPS 2024), https://arxiv.org/abs/2405.18627: Figure 1 (energy histograms of clean, poisoned
and purified images) and Figure 3 (ℓ2 distances along purification).

Figures are drawn on a ``matplotlib.figure.Figure`` with an explicit ``FigureCanvasAgg``: no pyplot, no global
backend selection, so this is headless and safe to call from several threads. Every file is written atomically
(:func:`puregen_dist.atomic.atomic_file`).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from puregen_dist.atomic import atomic_file
from puregen_dist.generative.diagnostics import (
    D_CLEAN_TO_PURIFIED_CLEAN,
    D_CLEAN_TO_PURIFIED_POISONED,
    D_POISONED_TO_PURIFIED_POISONED,
    Trajectories,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from puregen_dist.generative.survival import SurvivalCurve

log = logging.getLogger(__name__)

DISTANCE_LABELS = {
    D_CLEAN_TO_PURIFIED_POISONED: r"$\Vert x - \Psi_t(x+\delta)\Vert_2$",
    D_POISONED_TO_PURIFIED_POISONED: r"$\Vert (x+\delta) - \Psi_t(x+\delta)\Vert_2$",
    D_CLEAN_TO_PURIFIED_CLEAN: r"$\Vert x - \Psi_t(x)\Vert_2$",
}
"""Legend entries of the three ℓ2 distances (matplotlib mathtext)."""


def _new_figure(width: float = 6.4, height: float = 4.4) -> Figure:
    """A Figure bound to its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Figure, path: str | Path) -> Path:
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png")
    log.info("wrote %s", path)
    return Path(path)


def energy_histogram_png(energies: Mapping[str, np.ndarray], path: str | Path, title: str, *,
                         bins: int = 50, density: bool = True) -> Path:
    """Overlaid histograms of EBM energies per group (Figure 1), on bins shared by all groups.

    Args:
        energies: group name -> (N,) energies (non-finite values are left out).
        path: the PNG to write.
        title: figure title.
        bins: number of shared bins.
        density: normalise each histogram (groups of different sizes stay comparable).

    Returns:
        ``path``.
    """
    finite = {name: np.asarray(e, dtype=np.float64)[np.isfinite(e)] for name, e in energies.items()}
    pooled = np.concatenate([e for e in finite.values()] or [np.zeros(0)])
    edges = np.histogram_bin_edges(pooled if pooled.size else np.zeros(1), bins=bins)
    figure = _new_figure()
    ax = figure.add_subplot()
    for name, e in finite.items():
        if e.size == 0:
            log.warning("energy histogram %r: group %r has no finite energies", title, name)
            continue
        label = f"{name} (n={e.size}): {e.mean():.3g} ± {e.std():.3g}"
        ax.hist(e, bins=edges, density=density, alpha=0.5, label=label, histtype="stepfilled",
                edgecolor="black", linewidth=0.5)
    ax.set(title=title, xlabel=r"energy $G_\theta(x)$", ylabel="density" if density else "count")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save_png(figure, path)


def trajectories_png(traj: Trajectories, path: str | Path, title: str, xlabel: str) -> Path:
    """The ℓ2 distances against purification steps (Figure 3): mean lines, ±1 std bands, and a dashed
    vertical line at :meth:`Trajectories.crossing_step` when there is one.

    Args:
        traj: recorded distances.
        path: the PNG to write.
        title: figure title.
        xlabel: x-axis label (e.g. "EBM Langevin steps" or "DDPM steps $T_D$").

    Returns:
        ``path``.
    """
    figure = _new_figure()
    ax = figure.add_subplot()
    for name, (mean, std) in traj.distances.items():
        (line,) = ax.plot(traj.steps, mean, marker="o" if len(traj.steps) <= 30 else None, markersize=3,
                          label=DISTANCE_LABELS.get(name, name))
        ax.fill_between(traj.steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    crossing = traj.crossing_step()
    if crossing is not None:
        ax.axvline(crossing, color="black", linestyle="--", linewidth=1, label=f"crossing at t = {crossing}")
    ax.set(title=title, xlabel=xlabel, ylabel=r"mean $\ell_2$ distance ([-1, 1] space)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    return _save_png(figure, path)


SURVIVAL_TABLE_COLUMNS = 11
"""At most this many steps per model in :func:`survival_markdown` (evenly thinned; the marked step always kept)."""


def survival_markdown(rows: Sequence[Mapping[str, Any]], marked: Mapping[str, int] | None = None) -> str:
    """ρ per perturbation family against purification steps as Markdown, one table per model.

    Args:
        rows: ``survival.csv`` rows (keys ``model``, ``pattern``, ``step``, ``rho_mean``,
            ``clean_change_mean``); each (model, step) has the same clean change for every pattern.
        marked: model -> its default step, shown in bold and never thinned away.

    Returns:
        For each model (EBM first): a header line, then ``| pattern | step ... |`` with ρ to three
        decimals (patterns sorted, the attack's own perturbations last) and a last ``clean change`` line (relative
        change of clean images).
    """
    marked = marked or {}
    blocks = []
    for model in sorted({r["model"] for r in rows}, key=lambda m: (m != "ebm", m)):
        mine = [r for r in rows if r["model"] == model]
        steps = sorted({int(r["step"]) for r in mine})
        shown = steps
        if len(steps) > SURVIVAL_TABLE_COLUMNS:
            keep = {steps[-1]} | ({marked[model]} if marked.get(model) in steps else set())
            stride = -(-len(steps) // (SURVIVAL_TABLE_COLUMNS - len(keep)))
            shown = sorted(set(steps[::stride]) | keep)
        head = [f"**{t}**" if t == marked.get(model) else str(t) for t in shown]
        lines = [f"{model.upper()}: ρ by purification step", "", "| pattern | " + " | ".join(head) + " |",
                 "|---|" + "---|" * len(shown)]
        value = {(r["pattern"], int(r["step"])): r for r in mine}
        patterns = sorted({r["pattern"] for r in mine}, key=lambda p: (p == "attack", p))
        for pattern in patterns:
            cells = [f"{float(value[pattern, t]['rho_mean']):.3f}" for t in shown]
            lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
        cells = [f"{float(value[patterns[0], t]['clean_change_mean']):.3f}" for t in shown]
        lines.append("| clean change | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def survival_png(curve: SurvivalCurve, path: str | Path, title: str, xlabel: str,
                 default_step: int | None = None) -> Path:
    """Trigger survival ρ of each perturbation family against purification steps (left axis, with the 0 and 1
    references) and the relative change of clean images (right axis, dash-dotted).

    Args:
        curve: the measured :class:`~puregen_dist.generative.survival.SurvivalCurve`.
        path: the PNG to write.
        title: figure title.
        xlabel: x-axis label.
        default_step: marks the configured purification length (e.g. 150 Langevin steps), if given.

    Returns:
        ``path``.
    """
    figure = _new_figure()
    ax = figure.add_subplot()
    marker = "o" if len(curve.steps) <= 30 else None
    for name in curve.rho:
        ax.plot(curve.steps, curve.mean_rho(name), marker=marker, markersize=3, label=f"ρ {name}")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    if default_step is not None:
        ax.axvline(default_step, color="black", linestyle="--", linewidth=1, label=f"t = {default_step}")
    ax.set(title=title, xlabel=xlabel, ylabel="trigger survival ρ (1: passes, 0: removed)")
    change = ax.twinx()
    (clean_line,) = change.plot(curve.steps, curve.clean_change.mean(axis=1), color="dimgray", linestyle="-.",
                                linewidth=1.2, label="clean change (right axis)")
    change.set_ylabel("relative change of clean images ‖Ψ(x) − x‖ / ‖x‖")
    change.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend([*handles, clean_line], [*labels, clean_line.get_label()], fontsize="small", loc="upper right")
    return _save_png(figure, path)


def write_csv(rows: list[dict[str, Any]], path: str | Path, fieldnames: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as a CSV table with a header row.

    Args:
        rows: one dict per row (e.g. :meth:`Trajectories.as_rows`); missing keys are left empty.
        path: the CSV to write.
        fieldnames: the columns; default: every key, in order of first appearance.

    Returns:
        ``path``.
    """
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    columns = list(fieldnames)

    with atomic_file(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    log.info("wrote %s (%d rows)", path, len(rows))
    return Path(path)
