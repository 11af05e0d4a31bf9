"""Progress bars / plain progress lines, and logs moved to a file with only warnings left on the console."""

from __future__ import annotations

import io
import logging

from puregen_dist.console import Progress, ProgressTracker, epoch_progress, logs_to_file, progress_factory
from puregen_dist.tracking.base import NullTracker


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_at_start_when_due_and_at_the_end():
    out = io.StringIO()
    with Progress("models", 2, "trained", style="lines", stream=out, interval=3600) as bar:
        bar.update(1, "ebm")  # not due yet: no line
        bar.tick()
        bar.update(2, "ddpm")
    lines = out.getvalue().splitlines()
    assert [line.rsplit(" [", 1)[0] for line in lines] == ["models: 0/2 trained", "models: 2/2 trained, ddpm"]


def test_a_due_line_is_printed_on_tick():
    out = io.StringIO()
    with Progress("trials", 4, "finished", style="lines", stream=out, interval=0) as bar:
        bar.tick()
    assert len(out.getvalue().splitlines()) == 2  # start, tick (the end repeats nothing new)


def test_factory_picks_bars_on_a_terminal_lines_elsewhere_nothing_when_disabled():
    assert progress_factory(stream=Terminal())("x", 1, "u").style == "bar"
    assert progress_factory(stream=io.StringIO())("x", 1, "u").style == "lines"
    assert progress_factory(stream=io.StringIO(), plain=False)("x", 1, "u").style == "off"
    assert progress_factory(enabled=False, stream=Terminal())("x", 1, "u").style == "off"
    out = io.StringIO()
    with progress_factory(enabled=False, stream=out)("x", 3, "u") as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_bar_shows_position_and_detail():
    out = Terminal()
    with Progress("purified sets", 160, "rows", style="bar", stream=out) as bar:
        bar.update(96, "set 2/3")
    assert "purified sets: 96/160 rows, set 2/3" in out.getvalue()


def test_progress_tracker_follows_the_highest_step_and_forwards():
    tracker = NullTracker()
    bar = Progress("training", 3, "epochs", style="off")
    tracked = ProgressTracker(tracker, bar)
    tracked.log_metrics({"loss": 1.0}, step=1)
    tracked.log_metrics({"loss": 0.5}, step=2)
    tracked.log_metrics({"final": 1.0})
    tracked.set_tags({"a": "b"})
    assert bar.done == 2 and tracker.metrics[-1] == ("final", 1.0, None) and tracker.tags == {"a": "b"}
    assert tracked.run_id is None  # other attributes are the tracker's


def test_epoch_progress_off_the_terminal_is_the_tracker_itself():
    tracker = NullTracker()
    with epoch_progress(tracker, "training", 5) as tracked:  # pytest's stderr is not a terminal
        assert tracked is tracker


def test_logs_to_file_keeps_warnings_on_the_console_and_restores_handlers(tmp_path, capsys):
    logger = logging.getLogger("puregen_dist.test_console")
    logger.propagate, logger.level = False, logging.WARNING  # as with --quiet: the file still gets INFO
    console = logging.StreamHandler()  # stderr, as the CLI's basicConfig
    logger.handlers = [console]
    path = tmp_path / "sweep.log"
    try:
        with logs_to_file(path, ["puregen_dist.test_console"]):
            logger.info("details for the file")
            logger.warning("something to see")
        assert logger.handlers == [console] and logger.level == logging.WARNING
    finally:
        logger.handlers, logger.propagate, logger.level = [], True, logging.NOTSET
    err = capsys.readouterr().err
    assert "something to see" in err and "details for the file" not in err
    text = path.read_text()
    assert "INFO puregen_dist.test_console: details for the file" in text and "something to see" in text
