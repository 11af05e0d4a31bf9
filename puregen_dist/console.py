"""What long commands show on a terminal: one progress bar per stage (a tqdm bar when stderr is a terminal,
a plain line at most every ``interval`` seconds otherwise, for CI logs), and logs moved off the screen into a
file (warnings and errors stay on it).

The CLI layer owns this module (HOUSE_STYLE: progress bars belong to the CLI). Orchestration code takes a
:data:`ProgressFactory` and calls :meth:`Progress.update` / :meth:`Progress.tick`; algorithm code never sees
it (training loops report per-epoch metrics to their tracker, which :class:`ProgressTracker` turns into a
bar).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

Style = Literal["bar", "lines", "off"]
LINE_INTERVAL_S = 30.0
"""Seconds between two plain progress lines of one stage (CI logs)."""
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit}{postfix} |{bar}| [{elapsed}<{remaining}]"
COUNTER_FORMAT = "{desc}: {n_fmt} {unit}{postfix} [{elapsed}]"


class Progress:
    """Progress of one stage: ``done`` of ``total`` ``unit`` plus a short detail, shown as a tqdm bar
    (``bar``), as plain lines (``lines``: at the start, at most every ``interval`` seconds, at the end) or not
    at all (``off``). A context manager; :meth:`close` leaves the final state on screen."""

    def __init__(self, label: str, total: int | None, unit: str, *, style: Style = "lines",
                 stream: TextIO | None = None, interval: float = LINE_INTERVAL_S) -> None:
        self.label, self.total, self.unit, self.style = label, total, unit, style
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.done, self.detail = 0, ""
        self._start = self._last_line = self._last_refresh = time.monotonic()
        self._printed: str | None = None
        self._bar = (tqdm(total=total, desc=label, unit=unit, file=self.stream, dynamic_ncols=True,
                          leave=True, bar_format=BAR_FORMAT if total is not None else COUNTER_FORMAT)
                     if style == "bar" else None)
        if style == "lines":
            self._line()

    def update(self, done: int, detail: str | None = None) -> None:
        """Set the position to ``done`` (absolute) and, when given, the detail text."""
        self.done = done
        self.detail = self.detail if detail is None else detail
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(self.detail, refresh=False)
            self._refresh()
        self.tick()

    def tick(self) -> None:
        """Nothing new, but time passed: a plain line when one is due, a redrawn elapsed time on a bar."""
        if self.style == "lines" and time.monotonic() - self._last_line >= self.interval:
            self._line()
        elif self._bar is not None and time.monotonic() - self._last_refresh >= 1.0:
            self._refresh()

    def close(self) -> None:
        """Show the final state (once)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.style == "lines" and self._printed != self._text():
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refresh(self) -> None:
        assert self._bar is not None
        self._bar.refresh()
        self._last_refresh = time.monotonic()

    def _text(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        detail = f", {self.detail}" if self.detail else ""
        return f"{self.label}: {self.done}{of} {self.unit}{detail}"

    def _line(self) -> None:
        text = self._text()
        self._printed, self._last_line = text, time.monotonic()
        print(f"{text} [{_clock(self._last_line - self._start)}]", file=self.stream, flush=True)


ProgressFactory = Callable[[str, int | None, str], Progress]
"""``factory(label, total, unit)`` -> the :class:`Progress` of one stage."""


def no_progress(label: str, total: int | None, unit: str) -> Progress:
    """A :data:`ProgressFactory` that shows nothing (library callers, tests, ``--quiet``)."""
    return Progress(label, total, unit, style="off")


def progress_factory(*, enabled: bool = True, plain: bool = True, stream: TextIO | None = None,
                     interval: float = LINE_INTERVAL_S) -> ProgressFactory:
    """Bars when ``stream`` (default: stderr) is a terminal, plain lines otherwise (nothing unless ``plain``),
    nothing at all when not ``enabled``."""
    out = stream if stream is not None else sys.stderr
    style: Style = "bar" if enabled and _isatty(out) else "lines" if enabled and plain else "off"

    def factory(label: str, total: int | None, unit: str) -> Progress:
        return Progress(label, total, unit, style=style, stream=out, interval=interval)

    return factory


class ProgressTracker:
    """A Tracker that forwards everything to ``tracker`` and moves ``progress`` to the highest ``step`` logged
    (training loops log per-epoch metrics with ``step=epoch``). Other attributes are the wrapped tracker's."""

    def __init__(self, tracker: Any, progress: Progress) -> None:
        self._tracker, self._progress = tracker, progress

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._tracker.log_metrics(metrics, step=step)
        if step is not None and step > self._progress.done:
            self._progress.update(step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)


@contextmanager
def epoch_progress(tracker: Any, label: str, total: int | None, *, enabled: bool = True) -> Iterator[Any]:
    """``tracker``, wrapped so that the epochs logged to it move a bar on a terminal (with log records written
    above the bar). Elsewhere ``tracker`` itself: the training loops' per-epoch log lines are the progress."""
    bar = progress_factory(enabled=enabled, plain=False)(label, total, "epochs")
    if bar.style == "off":
        yield tracker
        return
    with bar, logging_redirect_tqdm():
        yield ProgressTracker(tracker, bar)


# ------------------------------------------------------------------------------------------ logs to a file


def log_file(output_dir: str | Path, command: str) -> Path:
    """``<output_dir>/logs/<command>-<YYYYmmdd-HHMMSS>.log`` (the directory is created)."""
    directory = Path(output_dir) / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"


@contextmanager
def logs_to_file(path: Path, loggers: Sequence[str] = ("",), *, console_level: int = logging.WARNING
                 ) -> Iterator[Path]:
    """Send the INFO-and-above records of ``loggers`` ("" is the root) to ``path`` (also when the console was
    set to show less), and only those at ``console_level`` and above to the console (written with
    ``tqdm.write`` so that they do not break a bar). Every logger's handlers and level are restored on
    exit."""
    file_handler = _FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    saved = [(logger, list(logger.handlers), logger.level) for logger in map(logging.getLogger, loggers)]
    try:
        for logger, handlers, level in saved:
            logger.handlers = _rerouted(handlers, file_handler, max(console_level, level))
            if level > logging.INFO:
                logger.setLevel(logging.INFO)
        yield path
    finally:
        for logger, handlers, level in saved:
            logger.handlers = handlers
            logger.setLevel(level)
        file_handler.close()


class _FileHandler(logging.FileHandler):
    """A file handler whose format stays :data:`FILE_FORMAT` (``ray.init`` re-formats every handler of the
    ``ray`` logger, and this one is shared by all the loggers moved to the file)."""

    def __init__(self, path: Path, encoding: str) -> None:
        super().__init__(path, encoding=encoding)
        super().setFormatter(logging.Formatter(FILE_FORMAT))

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        """Ignored: the format is fixed."""


class _ConsoleHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` through ``tqdm.write`` (above any active bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def _rerouted(handlers: list[logging.Handler], file_handler: logging.Handler,
              console_level: int) -> list[logging.Handler]:
    """``handlers`` without their console handlers, plus one console handler at ``console_level`` (with the
    first console handler's format) and ``file_handler``."""
    console = [h for h in handlers if _is_console(h)]
    kept = [h for h in handlers if not _is_console(h)]
    if not console:
        return [*kept, file_handler]
    replacement = _ConsoleHandler(level=max(console_level, console[0].level))
    replacement.setFormatter(console[0].formatter or logging.Formatter(FILE_FORMAT))
    return [*kept, replacement, file_handler]


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _isatty(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
