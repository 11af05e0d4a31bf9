"""MLflow behind the Tracker protocol: the writer (``tracking/reader.py`` is the reader).

Default backend: a sqlite database at an absolute path in the output directory (never the deprecated file
store). ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` override it (e.g. ``http://mlflow:5000`` on clusters).

Reliability (docs/sweeps.md, "Tracking store"):

- before a run is created, the store is checked (:func:`check_tracking_uri`): a read-only or unusable sqlite
  file or directory, an unsupported URI, or a tracking server that does not answer is a
  :class:`~puregen_dist.config.errors.UserInputError` naming it, raised before anything is computed;
- a new sqlite database is built privately and linked into place (:func:`ensure_sqlite_database`), before any
  ``MlflowClient`` touches it, so processes starting together on one new database all succeed;
- every write is retried with exponential backoff when the store is momentarily unavailable (sqlite
  "database is locked", a tracking server that is down or restarting): :data:`RETRIES_ENV` retries, the first
  after :data:`BACKOFF_ENV` seconds, doubling up to :data:`MAX_BACKOFF_S` (on top of MLflow's own HTTP
  retries). When they are exhausted a :class:`TrackingError` is raised: a metric is never dropped silently;
- nothing secret is logged: param and tag values, run names and text artifacts go through
  :func:`~puregen_dist.tracking.redaction.redact` (credentials in URIs, secret environment values, the Ray
  auth token);
- a run interrupted by Ctrl-C (KeyboardInterrupt) or SystemExit ends KILLED, one that raised FAILED.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from puregen_dist.config.errors import UserInputError
from puregen_dist.config.schema import TRACKING_SCHEMES
from puregen_dist.tracking.base import FINISHED, status_for
from puregen_dist.tracking.redaction import redact, redact_mapping, redact_uri, redacted_file

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PARAM_LENGTH = 6000  # MLflow 3.x param value limit
RETRIES_ENV = "PUREGEN_TRACKING_RETRIES"
"""Retries of a failed write to the tracking store (default :data:`DEFAULT_RETRIES`)."""
BACKOFF_ENV = "PUREGEN_TRACKING_BACKOFF_S"
"""Seconds before the first retry (default :data:`DEFAULT_BACKOFF_S`); doubled after each, at most
:data:`MAX_BACKOFF_S`."""
PROBE_ENV = "PUREGEN_TRACKING_PROBE_S"
"""Seconds a tracking server may take to answer before a run starts (default :data:`DEFAULT_PROBE_S`)."""
DEFAULT_RETRIES = 6
DEFAULT_BACKOFF_S = 2.0
MAX_BACKOFF_S = 60.0
DEFAULT_PROBE_S = 10.0
SQLITE_HEADER = b"SQLite format 3\x00"
SCHEMES = tuple(scheme for scheme in TRACKING_SCHEMES if scheme != "file")
"""Tracking URI schemes MLflow 3.17 accepts (a ``+driver`` suffix allowed): the config's list, less the deprecated
file store, which is refused here unless ``MLFLOW_ALLOW_FILE_STORE=true``."""

_NOT_SENT = ("Connection refused", "NewConnectionError", "Failed to establish a new connection",
             "ConnectTimeoutError", "Name or service not known", "Temporary failure in name resolution")
"""Errors of a request that never reached the server: safe to retry even a non-idempotent call."""
_MAYBE_SENT = ("Max retries exceeded", "Connection aborted", "RemoteDisconnected", "ConnectionResetError",
               "Connection reset", "Read timed out", "timeout exception", "error responses",
               "BrokenPipeError", "IncompleteRead", "ChunkedEncodingError")
"""Errors of a request the server may have received: retried for idempotent writes only."""
_TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED")


class TrackingError(RuntimeError):
    """A write to the tracking store still failed after every retry: the run cannot be recorded completely."""


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """``configured``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<abs output_dir>/mlflow.db``; a relative
    sqlite path is made absolute (every process of a sweep must write the same database)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        path = uri.removeprefix("sqlite:///")
        if uri.startswith("sqlite:///") and path and not path.startswith((":", "/", "file:")):
            return f"sqlite:///{Path(path).absolute().as_posix()}"
        return uri
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and not path.startswith(":") else None


# ------------------------------------------------------------------------------------------ checks


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking store that cannot be written, before anything is computed: for ``sqlite:///`` a
    database or directory that is read-only, not a directory, or a file that is no SQLite database; for
    ``http(s)://`` a server that does not answer within :data:`PROBE_ENV` seconds (in a Ray worker, i.e. a
    sweep's trial or task, only a warning: the driver reached it, so it is an outage that the writes' retries
    wait out); an unsupported URI.

    Raises:
        UserInputError: naming the file, directory or URI (credentials masked).
    """
    database = sqlite_path(uri)
    if database is not None:
        _check_sqlite_path(database)
    elif uri.startswith(("http://", "https://")):
        _probe_server(uri)
    else:
        _client(uri)


def _check_sqlite_path(path: Path) -> None:
    shown = f"MLflow database {path}"
    advice = "make it writable, or choose another tracking.uri / output directory"
    try:
        if path.exists():
            if not path.is_file():
                raise UserInputError(f"{shown}: not a file (tracking.uri must name an SQLite database file)")
            if not os.access(path, os.R_OK | os.W_OK):
                raise UserInputError(f"{shown} is read-only: {advice}")
            if not os.access(path.parent, os.W_OK | os.X_OK):
                raise UserInputError(f"{shown}: its directory {path.parent} is read-only (SQLite writes its "
                                     f"journal beside the database): {advice}")
            with open(path, "rb") as file:
                header = file.read(len(SQLITE_HEADER))
            if header and header != SQLITE_HEADER:
                raise UserInputError(f"{shown}: not an SQLite database (tracking.uri names some other file)")
            return
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UserInputError(f"{shown} cannot be created: {ancestor} is a file, not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UserInputError(f"{shown} cannot be created: directory {ancestor} is read-only: {advice}")
    except OSError as exc:
        raise UserInputError(f"{shown}: {exc.strerror or exc}") from None


def _probe_server(uri: str) -> None:
    """A tracking server answers at ``uri`` (any HTTP answer counts, even 401/404: a server is there)."""
    import requests

    deadline = time.monotonic() + _env_float(PROBE_ENV, DEFAULT_PROBE_S)
    verify: bool | str = True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    delay = 0.25
    while True:
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=5, verify=verify)
            return
        except requests.exceptions.RequestException as exc:
            if time.monotonic() + delay > deadline:
                if _in_ray_worker():  # a sweep's trial or task: the driver reached the server, so this is an
                    log.warning("MLflow tracking server %s does not answer (%s); waiting for it", redact_uri(uri),
                                _cause(exc))  # outage: the writes' retries wait for it (or fail loudly)
                    return
                raise UserInputError(
                    f"MLflow tracking server {redact_uri(uri)} does not answer ({_cause(exc)}): start it (e.g. "
                    "bash cluster/mlflow/server.sh) or fix tracking.uri / $MLFLOW_TRACKING_URI") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _in_ray_worker() -> bool:
    """Whether this process is a Ray worker (a trial, a task); Ray is not imported here."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        from ray._private import worker

        return worker.global_worker.mode == worker.WORKER_MODE
    except (ImportError, AttributeError):
        return False


def _client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` for ``uri``; an unsupported URI is a UserInputError naming it."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    file_store = scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true"
    if scheme not in SCHEMES and not file_store:
        raise UserInputError(f"tracking URI {redact_uri(uri)!r}: unsupported; use sqlite:///<absolute path>/mlflow.db, "
                             "http(s)://<server>:<port> (cluster/mlflow/server.sh) or a database URI "
                             f"({', '.join(s for s in SCHEMES if s not in ('http', 'https', 'sqlite'))})")
    try:
        return MlflowClient(uri)
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"tracking URI {redact_uri(uri)}: {redact(first)[:300]}") from None


def _cause(exc: BaseException) -> str:
    """A short, redacted description of a connection error."""
    text = str(exc)
    for marker in (*_NOT_SENT, *_MAYBE_SENT):
        if marker in text:
            return marker
    return redact(f"{type(exc).__name__}: {text}")[:200]


# ------------------------------------------------------------------------------------------ retries


def _env_float(name: str, default: float) -> float:
    try:
        return max(float(os.environ.get(name, default)), 0.0)
    except ValueError:
        log.warning("$%s=%r is not a number; using %s", name, os.environ.get(name), default)
        return default


def transient(exc: BaseException, *, idempotent: bool = True) -> bool:
    """Whether ``exc`` is the store being momentarily unavailable (sqlite busy/locked, a tracking server that
    does not answer or is restarting). A non-``idempotent`` call is retried only when the failed request
    cannot have reached the store."""
    import requests

    text = str(exc)
    if "database is locked" in text or "database is busy" in text or "database table is locked" in text:
        return True  # sqlite: the transaction was rolled back, nothing was written
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return idempotent or any(m in text for m in _NOT_SENT)
    if not isinstance(exc, MlflowException):
        return False
    if any(m in text for m in _NOT_SENT):
        return True
    if not idempotent:
        return False
    if any(m in text for m in _MAYBE_SENT):
        return True
    return exc.error_code in _TRANSIENT_CODES and "OperationalError" not in text  # a server's 503/429


def with_retry(uri: str, what: str, call: Callable[[], T], *, idempotent: bool = True,
               retries: int | None = None) -> T:
    """``call()``, retried with exponential backoff while the store at ``uri`` is momentarily unavailable
    (:func:`transient`); :class:`TrackingError` once ``retries`` (default :data:`RETRIES_ENV`) retries failed
    too."""
    retries = int(_env_float(RETRIES_ENV, DEFAULT_RETRIES)) if retries is None else retries
    backoff = _env_float(BACKOFF_ENV, DEFAULT_BACKOFF_S)
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if not transient(exc, idempotent=idempotent):
                raise
            cause = _cause(exc)
            if attempt == retries:
                raise TrackingError(
                    f"MLflow at {redact_uri(uri)}: {what} still failed after {attempt + 1} attempts over "
                    f"{time.monotonic() - start:.0f} s ({cause}); the run is incomplete (retries: ${RETRIES_ENV}, "
                    f"${BACKOFF_ENV})") from exc
            delay = min(backoff * 2 ** attempt, MAX_BACKOFF_S)
            log.warning("MLflow at %s: %s failed (%s); retry %d of %d in %.1f s", redact_uri(uri), what, cause,
                        attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------------------------------ experiments


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Create (once, on the driver) the experiment ``name``; its id. Its artifacts go to ``artifact_root``,
    by default ``mlartifacts`` beside a sqlite database (never ``./mlruns`` of whatever directory the process
    runs in, such as a Ray job's working-dir cache) and the server's own store for a tracking server.

    Raises:
        UserInputError: an unusable store (:func:`check_tracking_uri`), an empty name, or an experiment of that
            name that was deleted.
    """
    if not name or not name.strip():
        raise UserInputError("tracking.experiment: the MLflow experiment name is empty")
    database = sqlite_path(uri)
    if database is not None:
        ensure_sqlite_database(database)
        artifact_root = artifact_root or database.parent / "mlartifacts"
    else:
        check_tracking_uri(uri)
    client = _client(uri)
    experiment = with_retry(uri, f"looking up experiment {name!r}", lambda: client.get_experiment_by_name(name))
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise UserInputError(f"MLflow experiment {name!r} at {redact_uri(uri)} was deleted: restore it "
                                 f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or "
                                 "choose another tracking.experiment")
        return experiment.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    try:
        return with_retry(uri, f"creating experiment {name!r}",
                          lambda: client.create_experiment(name, artifact_location=location))
    except MlflowException:  # another process created it meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def ensure_sqlite_database(path: Path) -> None:
    """An MLflow sqlite database at ``path`` with its whole schema. A new one is built in a private file
    beside ``path`` and hard-linked into place, so a killed or concurrent creator never leaves a half-created
    database there (two processes migrating one new file fail with "table ... already exists"); the first link
    wins, the others use it. A file at ``path`` without MLflow's tables (left by an older, interrupted run:
    it holds no runs) is moved aside to ``<name>.incomplete-<time>`` with a warning, and rebuilt.

    Raises:
        UserInputError: ``path`` or its directory is read-only, or not a file / directory, or not SQLite
            (:func:`check_tracking_uri`).
    """
    _check_sqlite_path(path)
    try:
        if path.exists():
            if _is_complete(path):
                return
            aside = path.with_name(f"{path.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            log.warning("%s had no complete MLflow schema (an interrupted creation); moved to %s and rebuilt",
                        path, aside)
        path.parent.mkdir(parents=True, exist_ok=True)
        private = path.with_name(f".{path.name}.{secrets.token_hex(6)}.creating")
        try:
            MlflowClient(f"sqlite:///{private}").search_experiments(max_results=1)  # runs MLflow's migrations
            try:
                os.link(private, path)
            except FileExistsError:
                pass  # another process linked its complete database first
        finally:
            private.unlink(missing_ok=True)
    except PermissionError as exc:
        raise UserInputError(f"MLflow database {path}: {exc.strerror or exc} ({exc.filename or path})") from None


def _is_complete(path: Path) -> bool:
    """Whether the sqlite file at ``path`` holds MLflow's schema (a recorded migration, experiments, runs)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"alembic_version", "experiments", "runs"} <= tables:
                return False
            return conn.execute("SELECT COUNT(*) FROM alembic_version").fetchone()[0] > 0
    except sqlite3.DatabaseError:
        return False


# ------------------------------------------------------------------------------------------ the tracker


class MLflowTracker:
    """One MLflow run; logs through an explicit client (no global active-run state, safe in Ray workers).

    Every write is retried while the store is momentarily unavailable (:func:`with_retry`) and every logged
    string is redacted (:mod:`puregen_dist.tracking.redaction`). As a context manager the run ends FINISHED,
    FAILED (an exception) or KILLED (Ctrl-C)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        artifact_root: Path | None = None,
    ) -> None:
        self.tracking_uri = uri
        # The store is checked (and a new sqlite database built) before any MlflowClient opens it: a client
        # migrates a new database itself, racing every other process starting on it.
        self.experiment_id = ensure_experiment(uri, experiment, artifact_root)
        self.client = _client(uri)
        all_tags = redact_mapping(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        name = redact(run_name) if run_name else None
        run = self._retry("creating the run", lambda: self.client.create_run(
            self.experiment_id, run_name=name, tags=all_tags), idempotent=False)
        self.run_id: str = run.info.run_id
        self._closed = False

    def _retry(self, what: str, call: Callable[[], T], *, idempotent: bool = True) -> T:
        return with_retry(self.tracking_uri, what, call, idempotent=idempotent)

    def log_params(self, params: Mapping[str, Any]) -> None:
        values = redact_mapping({k: _param_value(v) for k, v in params.items()})
        batch = [mlflow.entities.Param(k, _param_value(v)) for k, v in values.items()]
        for i in range(0, len(batch), 100):
            chunk = batch[i:i + 100]
            self._retry("logging params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        _log_metric_batches(self.tracking_uri, self.client, self.run_id, metrics, step or 0)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        batch = [mlflow.entities.RunTag(k, v) for k, v in redact_mapping(tags).items()]
        if batch:
            self._retry("setting tags", lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload ``path`` (a text file with credentials in it: a redacted copy of the same name)."""
        with redacted_file(Path(path)) as upload:
            self._retry(f"uploading {Path(path).name}",
                        lambda: self.client.log_artifact(self.run_id, str(upload), artifact_path))

    def log_image(self, image: np.ndarray, name: str) -> None:
        """(H, W, C) uint8 image as ``images/<name>.png``."""
        pixels = image if image.shape[2] == 3 else image[:, :, 0]
        self._retry(f"uploading images/{name}.png",
                    lambda: self.client.log_image(self.run_id, pixels, artifact_file=f"images/{name}.png"))

    def close(self, status: str = FINISHED, *, retries: int | None = None) -> None:
        if not self._closed:
            with_retry(self.tracking_uri, f"ending the run {status}",
                       lambda: self.client.set_terminated(self.run_id, status=status), retries=retries)
            self._closed = True

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        status = status_for(exc_type)
        if exc_type is None:
            self.close(status)
            return
        try:  # the block's own exception is what the caller must see (soon): a failure to close is only logged
            self.close(status, retries=1)
        except Exception as exc:  # noqa: BLE001
            log.error("MLflow run %s could not be marked %s: %s", self.run_id, status, _cause(exc))


def log_metrics_to_run(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Add ``metrics`` to the existing run ``run_id`` (finished or not; its status is unchanged): results
    computed after a run ended, such as a sweep cell's floor."""
    _log_metric_batches(uri, _client(uri), run_id, metrics, step)


def _log_metric_batches(uri: str, client: MlflowClient, run_id: str, metrics: Mapping[str, float],
                        step: int) -> None:
    """The finite values of ``metrics`` at ``step``, in batches of MLflow's 1,000-metric limit; each batch
    retried (same timestamps: a retried batch that had reached the store is not stored twice)."""
    now = mlflow.utils.time.get_current_time_millis()
    batch = [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()
             if v is not None and math.isfinite(float(v))]
    for i in range(0, len(batch), 1000):
        chunk = batch[i:i + 1000]
        with_retry(uri, f"logging metrics (step {step})",
                   lambda chunk=chunk: client.log_batch(run_id, metrics=chunk))


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
