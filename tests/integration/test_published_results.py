"""Published results re-derive from their MLflow runs: every ``docs/results/<name>/`` holds the MLflow database
its numbers came from (``mlflow.db``) and ``source.json``: a sweep report written by ``puregen-dist report
EXPERIMENT --report-dir docs/results/<name> --with-runs [--paper table1]`` must render again from that database
byte for byte; a ``diagnose`` run's ρ table (``survival.md``, ``"kind": "diagnose"``) must rebuild from the
metrics its run logged; a pool of several published reports (``"kind": "pooled"``, ``puregen-dist pool``) must
rebuild from their ``report.csv`` files; and every table a document quotes (between ``<!-- results: FILE -->`` and
``<!-- /results -->``) must be the committed file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from puregen_dist.diagnose import survival_rows_from_metrics
from puregen_dist.plots import survival_markdown
from puregen_dist.sweep.paper import paper_comparison
from puregen_dist.sweep.pool import POOLED_REPORT, pooled_markdown, read_pool_spec
from puregen_dist.sweep.report import REPORT_FILES, read_stats_csv, render_report
from puregen_dist.tracking.reader import latest_metric_histories

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
QUOTE = re.compile(r"<!-- results: (?P<file>[\w./-]+) -->\n(?P<body>.*?)<!-- /results -->", re.S)
PUBLISHED = sorted(p.parent for p in RESULTS.glob("*/source.json"))


def quotes() -> list[tuple[str, str, str]]:
    """(document, results file, quoted text) of every quoted table in docs/."""
    found = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for match in QUOTE.finditer(doc.read_text(encoding="utf-8")):
            found.append((doc.name, match["file"], match["body"]))
    return found


def _kind(published: Path) -> str | None:
    return json.loads((published / "source.json").read_text()).get("kind")


def test_documents_quote_the_committed_results():
    assert PUBLISHED, "no published results under docs/results"
    assert [p for p in RESULTS.iterdir() if p.is_dir()] and all(
        (p / "source.json").is_file() and ((p / "mlflow.db").is_file() or _kind(p) == "pooled")
        for p in RESULTS.iterdir() if p.is_dir()), \
        "every docs/results/<name>/ holds its source.json and, unless it pools other results, its mlflow.db"
    for doc, name, body in quotes():
        path = RESULTS / name
        assert path.is_file(), f"{doc} quotes {name}, which is not in docs/results"
        assert body == path.read_text(encoding="utf-8"), f"{doc}: the quoted {name} differs from the committed file"


@pytest.mark.parametrize("published", PUBLISHED, ids=[p.name for p in PUBLISHED])
def test_published_report_rederives_from_its_runs(published, tmp_path):
    source = json.loads((published / "source.json").read_text())
    if source.get("kind") == "pooled":  # rebuilt from the report.csv of the reports it pools (tested here too)
        assert pooled_markdown(read_pool_spec(published / "source.json")) == (published / POOLED_REPORT).read_text()
        return
    database = shutil.copy(published / "mlflow.db", tmp_path / "mlflow.db")  # reading must not touch the repo
    if source.get("kind") == "diagnose":  # the ρ table of a `diagnose` run, from the metrics it logged
        rows = survival_rows_from_metrics(latest_metric_histories(f"sqlite:///{database}", source["experiment"]))
        assert survival_markdown(rows, source["marked"]) == (published / "survival.md").read_text()
        return
    _, paths = render_report(f"sqlite:///{database}", source["experiment"], tmp_path / "report", source["parent"])
    derived = ("markdown", "csv", "targets", "removal")
    assert {n for n in derived if (published / REPORT_FILES[n]).is_file()} == set(derived) & set(paths)
    for name in derived:
        committed = published / REPORT_FILES[name]
        if committed.is_file():
            assert paths[name].read_text() == committed.read_text(), f"{committed} does not re-derive from its runs"
    assert (published / REPORT_FILES["paper"]).is_file() == bool(source["paper"])
    if source["paper"]:
        beside = paper_comparison(read_stats_csv(paths["csv"]))
        assert beside == (published / REPORT_FILES["paper"]).read_text()
