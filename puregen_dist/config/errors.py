"""Errors that mean "the user's input is wrong": the CLI turns them into one paragraph and exit code 2."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input (config, dataset, checkpoint) detected before any compute; exit code 2."""


class ConfigError(UserInputError):
    """A config file or override that does not match the schema."""


class FieldError(ValueError):
    """Raised by a config dataclass's validation; ``key`` is the field name, the loader adds the path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`FieldError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise FieldError(key, message)


def check_at_least(cfg: object, **minimums: float) -> None:
    """``check(cfg.key >= minimum, key, "must be >= minimum")`` for each keyword, in order."""
    for key, minimum in minimums.items():
        check(getattr(cfg, key) >= minimum, key, f"must be >= {minimum}")
