"""Text for ``puregen-dist artifacts ls|show KEY|rm KEY|gc``: pure functions over store manifests."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from puregen_dist.pipeline.store import ArtifactStore, total_bytes

COLUMNS = ("KEY", "KIND", "ROWS", "SIZE", "CREATED")


def human_bytes(n: int) -> str:
    """``n`` bytes as ``"512 B"``, ``"1.5 KiB"``, ``"3.2 MiB"``, ... (binary units)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _row(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    rows = manifest.get("rows")
    created = str(manifest.get("created", "-"))[:19].replace("T", " ")
    return (str(manifest.get("key", "?")), str(manifest.get("kind", "?")),
            "-" if rows is None else str(rows), human_bytes(total_bytes(manifest)), created)


def format_table(manifests: Iterable[Mapping[str, Any]]) -> str:
    """A fixed-width table (KEY, KIND, ROWS, SIZE, CREATED in UTC) of ``manifests``, one artifact per line,
    in the given order; ``"no artifacts"`` when there are none."""
    rows = [_row(m) for m in manifests]
    if not rows:
        return "no artifacts"
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    right = {2, 3}  # numbers are right-aligned

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join(line(r) for r in [COLUMNS, *rows])


def show(store: ArtifactStore, key: str) -> str:
    """The manifest of ``key`` as indented JSON (StoreError naming the key when missing)."""
    return json.dumps(store.manifest(key), indent=2, sort_keys=True)
