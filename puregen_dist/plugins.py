"""Registering what the registries hold: the built-in attacks, defenses, classifiers and model kinds, and
third-party plugin modules.

Registries are filled by importing the modules that define their entries. This is done here, by the entry
points (the CLI, the bodies of Ray tasks, actors and Tune trials, tests), never by the config or registry
modules themselves, so the import graph has no cycle. A plugin is any importable module that registers
entries with ``@ATTACKS.register`` / ``@DEFENSES.register`` / ``@CLASSIFIERS.register`` /
``@MODELS.register``; name it in ``$PUREGEN_DIST_PLUGINS`` (comma-separated module names) and every entry
point, on every node, imports it (on a cluster, ship it with the job's ``runtime_env``: ``py_modules`` or
``working_dir``, and ``env_vars``).
"""

from __future__ import annotations

import importlib
import os

from puregen_dist.config.errors import UserInputError

PLUGINS_ENV = "PUREGEN_DIST_PLUGINS"


def load_plugins() -> None:
    """Import the built-in entry modules and the modules named in ``$PUREGEN_DIST_PLUGINS`` (idempotent).

    Raises UserInputError naming the module when a plugin cannot be imported."""
    import puregen_dist.attacks  # noqa: F401  (each package registers its modules' entries)
    import puregen_dist.classifiers  # noqa: F401
    import puregen_dist.defenses  # noqa: F401
    import puregen_dist.jobs  # noqa: F401

    for module in plugin_modules():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserInputError(f"${PLUGINS_ENV}: cannot import plugin module {module!r} ({exc})") from None


def plugin_modules() -> list[str]:
    """The module names listed in ``$PUREGEN_DIST_PLUGINS``."""
    return [name.strip() for name in os.environ.get(PLUGINS_ENV, "").split(",") if name.strip()]
