"""Credentials never reach MLflow: what the tracker logs (param and tag values, run names, text artifacts) is
passed through :func:`redact` first.

Masked (replaced by :data:`MASK`):

- the user-info part of any URI (``http://user:secret@host`` -> ``http://***@host``,
  ``postgresql+psycopg2://u:p@db/x`` -> ``postgresql+psycopg2://***@db/x``);
- the values of query parameters whose name looks secret (``?token=...``, ``&X-Amz-Signature=...``, ``sig=``);
- every occurrence of a secret value of the environment: the value of each variable whose name looks secret
  (:data:`SECRET_NAME`: ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ``RAY_AUTH_TOKEN``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``*_API_KEY``, ...; at least :data:`MIN_SECRET_LENGTH`
  characters) and the Ray auth token file (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``).

Pure standard library: importing this module imports neither MLflow nor Ray.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

MASK = "***"
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|SESSION_?KEY"
                         r"|AUTH_?KEY|SAS_?KEY", re.IGNORECASE)
"""Environment variables whose values are secrets."""
NOT_SECRET_SUFFIXES = ("_PATH", "_FILE", "_MODE", "_DIR", "_ENABLED", "_TYPE", "_URL_ONLY")
"""...unless the name ends like this (``RAY_AUTH_TOKEN_PATH`` holds a path, not the token)."""
MIN_SECRET_LENGTH = 6
"""Shorter values are not masked wherever they occur (``true``, ``1``, ``none`` would mask half a config)."""
MAX_TEXT_ARTIFACT_BYTES = 16 * 2**20
"""Text artifacts up to this size are redacted before upload; larger (or binary) files are uploaded as they are."""
RAY_TOKEN_FILES = ("RAY_AUTH_TOKEN_PATH",)

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#'\"<>]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;](?:[A-Za-z0-9_.\-]*?)(?:token|password|passwd|secret|signature|sig|key|credential|auth)"
    r"[A-Za-z0-9_.\-]*=)(?P<value>[^&#;\s'\"<>]+)", re.IGNORECASE)


def secret_name(name: str) -> bool:
    """Whether the environment variable ``name`` holds a secret (see :data:`SECRET_NAME`)."""
    return bool(SECRET_NAME.search(name)) and not name.upper().endswith(NOT_SECRET_SUFFIXES)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The secret values to mask, longest first: secret-named variables of ``environ`` (default
    ``os.environ``) and the Ray auth token (its file)."""
    env = os.environ if environ is None else environ
    values = {v.strip() for k, v in env.items() if secret_name(k) and len(v.strip()) >= MIN_SECRET_LENGTH}
    token_files = [env.get(name) for name in RAY_TOKEN_FILES] + [str(Path.home() / ".ray" / "auth_token")]
    for file in filter(None, token_files):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            path = Path(file)
            if path.is_file() and path.stat().st_size <= 4096:
                token = path.read_text(encoding="utf-8").strip()
                if len(token) >= MIN_SECRET_LENGTH:
                    values.add(token)
    return sorted(values, key=len, reverse=True)


def redact_uri(uri: str) -> str:
    """``uri`` with its user info and secret query values masked (for messages and logs)."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", uri)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}{MASK}", text)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every URI credential (:func:`redact_uri`) and every secret value of the environment
    (:func:`secret_values`, or ``secrets``) masked."""
    text = redact_uri(text)
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
    return text


def redact_mapping(values: Mapping[str, Any]) -> dict[str, str]:
    """``values`` as strings with :func:`redact` applied to each value (keys are names, kept)."""
    secrets = secret_values()
    return {k: redact(str(v), secrets) for k, v in values.items()}


@contextlib.contextmanager
def redacted_file(path: Path) -> Iterator[Path]:
    """``path`` itself when it holds nothing to mask (or is binary, or larger than
    :data:`MAX_TEXT_ARTIFACT_BYTES`), else a redacted copy with the same name in a temporary directory
    (removed on exit)."""
    path = Path(path)
    try:
        small = path.is_file() and path.stat().st_size <= MAX_TEXT_ARTIFACT_BYTES
        data = path.read_bytes() if small else b""
        text = data.decode("utf-8") if small and b"\0" not in data else None
    except (OSError, UnicodeDecodeError):
        text = None
    clean = redact(text) if text is not None else None
    if clean is None or clean == text:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="puregen-redacted-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(clean, encoding="utf-8")
        yield copy


__all__ = ["MASK", "redact", "redact_mapping", "redact_uri", "redacted_file", "secret_name", "secret_values"]


def browse_hint(uri: str, experiment: str | None = None) -> str:
    """How to look at the runs, credentials masked: the server's own page for a tracking server, else
    ``mlflow ui`` on the database (bound to 127.0.0.1, MLflow's default)."""
    shown = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        return f"browse: {shown.rstrip('/')}" + (f" (experiment {experiment!r})" if experiment else "")
    return f"browse: mlflow ui --backend-store-uri {shown}"
