"""Errors that mean "the user's input is wrong": the CLI turns them into one paragraph and exit code 2."""

from __future__ import annotations

import math
import re


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


def check_eps(eps: float, typical: int = 16) -> None:
    """``eps`` (a perturbation bound in pixel units) must lie in (0, 1]; the message cites ``typical``/255."""
    check(0.0 < eps <= 1.0, "eps", f"must lie in (0, 1] (pixel units; {typical}/255 = {typical / 255:.4f})")


def check_budget(budget: float) -> None:
    """``budget`` (the poisoned fraction of the training set) must lie in (0, 1]."""
    check(0.0 < budget <= 1.0, "budget", "must lie in (0, 1] (a fraction of the training set)")


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_custom_resources(resources: dict[str, float], key: str) -> None:
    """``resources`` must name custom Ray resources (e.g. ``{accelerator_h200: 1}`` or a node's own label
    resource) with finite amounts >= 0 (fractions allowed); CPU and GPU have their own fields."""
    for name, amount in resources.items():
        check(bool(name) and name not in RAY_BUILTIN_RESOURCES, f"{key}.{name}",
              f"not a custom resource: {', '.join(RAY_BUILTIN_RESOURCES)} are set by the num_cpus / num_gpus fields")
        check(amount >= 0 and amount != float("inf"), f"{key}.{name}", "must be a finite number >= 0")



SEED_MAX = 2**32 - 1
"""Largest seed a config accepts (seeds are unsigned 32-bit integers: NumPy, torch and Philox all take them)."""
INT_MAX = 2**63 - 1
"""Largest magnitude of any config integer (torch and NumPy store them as int64)."""
BATCH_MAX = 2**20
"""Largest batch size a config accepts (1,048,576 rows: far above any real batch, below an overflow)."""
IMAGE_SIZE_MAX = 4096
"""Largest square image size a config accepts (pixels per side)."""
NAME_MAX = 128
"""Longest name (of a sweep, an experiment, a model, a job) a config accepts."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_finite(value: float, key: str) -> None:
    """``value`` must be a finite number (not NaN or +-inf)."""
    check(math.isfinite(value), key, f"expected a finite number, got {value}")


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name something that becomes a path component (a sweep's Tune directory, a
    reference model's folder, an MLflow run): None when it can."""
    if not isinstance(name, str) or not name.strip():
        return "must be a non-empty name"
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        return (f"{name!r} is not a plain name: it must not contain '/' or '\\' nor start with '.' (names "
                "become directory names; path traversal is refused)")
    if _CONTROL.search(name):
        return f"{name!r} contains control characters"
    if len(name) > NAME_MAX:
        return f"is {len(name)} characters long, at most {NAME_MAX} allowed"
    return None


def check_name(name: str, key: str = "name") -> None:
    """``name`` must be a plain, non-empty name usable as one path component (see :func:`name_problem`)."""
    problem = name_problem(name)
    check(problem is None, key, problem or "")
