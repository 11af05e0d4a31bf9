"""A sweep's report beside the paper's published numbers (PureGen, NeurIPS 2024, Table 1 and the tables that
extend it), so a reproduction can be read cell by cell against the paper.

Paper: Bhat et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model
Dynamics", https://arxiv.org/abs/2405.18627. The numbers are the paper's, as printed (percent):

- Table 1, from scratch, CIFAR-10, ResNet-18: Narcissus 1% ε 8/255 (avg ± std over target classes / natural
  accuracy / max) and Gradient Matching 1% (success rate / natural accuracy);
- Table 2, the same Narcissus scenario with the HLB network (closest to this platform's ``hlb_small``);
- Table 4, Narcissus 1% ε 16/255 (its JPEG row is the best baseline, JPEG quality 25);
- Table 10, Narcissus 1% ε 8/255 for the PureGen combinations Naive / Reps / Filt.

Pure pandas: the input is the report's statistics (:attr:`~puregen_dist.sweep.report.ReportTable.stats`, or
its CSV read back with :func:`~puregen_dist.sweep.report.read_stats_csv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from puregen_dist.sweep.report import PURIFICATION_LENGTH, TRIGGERED, TRIGGERLESS, attack_text, mean_std


@dataclass(frozen=True)
class PaperCell:
    """One published cell: poison success and natural accuracy as printed (percent), and where."""

    poison: str
    nat: str
    source: str

    def text(self) -> str:
        return f"{self.poison} / {self.nat} ({self.source})"


def _cells(source: str, rows: dict[str, tuple[str, str]]) -> dict[str, PaperCell]:
    return {defense: PaperCell(ps, nat, source) for defense, (ps, nat) in rows.items()}


_NS8_RESNET = _cells("T1 ResNet-18", {
    "none": ("43.95 ± 33.6 (max 93.59)", "94.89"), "epic": ("27.31 ± 34.0 (max 84.71) [EPIC-0.3]", "82.20"),
    "friends": ("8.32 ± 22.3 (max 83.03)", "91.01"), "jpeg": ("1.78 ± 1.17 (max 4.13)", "92.94"),
    "puregen_ddpm": ("1.64 ± 0.82 (max 2.83)", "90.99"), "puregen_ebm": ("1.39 ± 0.8 (max 2.50)", "92.92"),
})
_NS8_COMBINATIONS = _cells("T10 ResNet-18", {
    "puregen_naive": ("1.71 (max 3.17)", "88.84"), "puregen_reps": ("1.73 (max 3.25)", "87.25"),
    "puregen_filt": ("1.73 (max 2.88)", "90.61"),
})
_NS8_HLB = _cells("T2 HLB", {
    "none": ("76.39 ± 16.35", "93.95"), "epic": ("10.58", "24.88"), "friends": ("11.35", "87.03"),
    "jpeg": ("1.73", "90.92"), "puregen_ddpm": ("1.75", "89.34"), "puregen_ebm": ("1.89", "91.94"),
})
_NS16 = _cells("T4 ResNet-18", {
    "none": ("83.63 (max 97.36)", "93.67"), "jpeg-25": ("11.85 (max 36.90)", "87.72"),
    "puregen_ddpm": ("5.21 (max 13.32)", "86.16"), "puregen_ebm": ("7.35 (max 16.94)", "85.61"),
    "puregen_naive": ("5.20 (max 9.80)", "85.95"), "puregen_reps": ("4.95 (max 10.75)", "85.79"),
    "puregen_filt": ("5.74 (max 16.08)", "90.52"),
})
_GM = _cells("T1 ResNet-18", {
    "none": ("44.00", "94.84"), "epic": ("10.00 [EPIC-0.3]", "85.14"), "friends": ("0.00", "91.15"),
    "jpeg": ("0.00", "90.00"),
    "puregen_ddpm": ("0.00", "90.93"), "puregen_ebm": ("1.00", "92.98"),
})

FRIENDS_VARIANTS = ("friends_b", "friends_g")
"""This platform's FRIENDS defenses; the paper's tables print one FRIENDS row (its best of B and G), shown
beside both. Its EPIC row is EPIC-0.3 in Table 1 (PUREGEN_REFERENCE §4.3), shown beside every EPIC size."""

TABLE1: dict[str, list[dict[str, PaperCell]]] = {
    "narcissus-8": [_NS8_RESNET | _NS8_COMBINATIONS, _NS8_HLB],
    "narcissus-16": [_NS16],
    "gradient_matching": [_GM],
}
"""Attack key (``narcissus-<ε·255>``, or the attack's name) -> tables of defense key -> published cell. A
defense key is the defense's name, or ``jpeg-<quality>`` where the paper states the quality."""


def attack_key(name: object, eps: object) -> str | None:
    """``narcissus-8`` / ``narcissus-16`` for Narcissus at exactly that ε·255 (None at any other ε), else the
    attack's name (None when unknown)."""
    if not isinstance(name, str):
        return None
    if name != "narcissus":
        return name
    if not isinstance(eps, float | int) or math.isnan(eps):
        return None
    levels = eps * 255
    return f"narcissus-{round(levels)}" if abs(levels - round(levels)) < 0.01 else None


def paper_cells(cell: pd.Series) -> list[PaperCell]:
    """The published cells for a report cell (a line of the report's statistics: its ``attack_name``,
    ``attack_eps``, ``defense_name``, ``defense_quality`` and ``defense_steps``), best match first:
    ``jpeg-<quality>`` before ``jpeg``; empty when the paper has none, including a PureGen-EBM / -DDPM cell run
    at another purification length than the paper's (:data:`~puregen_dist.sweep.report.PURIFICATION_LENGTH`)."""
    name, quality = cell["defense_name"], cell["defense_quality"]
    if not isinstance(name, str):
        return []
    steps = cell.get("defense_steps")
    published = PURIFICATION_LENGTH[name].published if name in PURIFICATION_LENGTH else None
    if published is not None and steps is not None and not pd.isna(steps) and steps != published:
        return []
    keys = [name]
    if name == "jpeg":
        keys = ([] if pd.isna(quality) else [f"jpeg-{int(quality)}"]) + ["jpeg"]
    if name in FRIENDS_VARIANTS:  # the tables print one FRIENDS row
        keys.append("friends")
    found = []
    for table in TABLE1.get(attack_key(cell["attack_name"], cell["attack_eps"]) or "", []):
        match = next((table[k] for k in keys if k in table), None)
        if match is not None:
            found.append(match)
    return found


def _here(cell: pd.Series, magnification: int) -> str:
    if cell["attack_kind"] != TRIGGERED and magnification != 1:
        return "—"
    return attack_text(cell, magnification) if cell["attack_kind"] in (TRIGGERED, TRIGGERLESS) else "—"


def paper_comparison(stats: pd.DataFrame) -> str:
    """Markdown: one line per attacked report cell, grouped by attack in report order, with this run's poison
    success at m = 1 and m = 3 (triggered) or its success rate (triggerless), natural accuracy, and the paper's
    cells for the same defense and attack ("—" where the paper has none)."""
    lines = ["| attack | defense | poison success here, m = 1 | m = 3 | natural accuracy here | paper: "
             "poison success / natural accuracy |", "|---|---|---|---|---|---|"]
    attacked = stats[stats["attack_kind"].isin([TRIGGERED, TRIGGERLESS])]
    for col in attacked["col"].drop_duplicates():
        for _, cell in attacked[attacked["col"] == col].iterrows():
            paper = "; ".join(c.text() for c in paper_cells(cell)) or "—"
            lines.append(f"| {col} | {cell['row']} | {_here(cell, 1)} | {_here(cell, 3)} | "
                         f"{mean_std(cell, 'nat_acc')} | {paper} |")
    lines += ["", "*Here: percent over the cell's runs, mean ± std (max over target classes; floor = the same "
              "measurement on the classifier trained on the clean set with the same defense), or success rate "
              "[95% Wilson interval] (floor). Paper: as printed, T1 = Table 1 (from scratch, ResNet-18, 50,000 "
              "images), T2 = Table 2 (HLB), T4 = Table 4 (its JPEG row is JPEG-25, the best baseline), T10 = "
              "Table 10; Table 1 does not state its JPEG quality.*"]
    return "\n".join(lines) + "\n"


__all__ = ["PaperCell", "TABLE1", "attack_key", "paper_cells", "paper_comparison"]
