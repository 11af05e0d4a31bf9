"""Name -> (config class, builder) registries for every pluggable family.

A registry is the only module-level mutable state in the package, and only the ``register`` decorator writes
to it. Lookup of an unknown name raises :class:`UnknownNameError` listing the valid names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered builder and the frozen dataclass that configures it."""

    name: str
    config_cls: type
    builder: Callable[..., T]


class Registry(Generic[T]):
    """A named family of builders, e.g. ``CLASSIFIERS`` or ``ATTACKS``."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config_cls: type) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``builder`` under ``name``; a duplicate name is an error."""

        def decorate(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.family} registry already has an entry named {name!r}")
            self._entries[name] = Entry(name, config_cls, builder)
            return builder

        return decorate

    def get(self, name: str) -> Entry[T]:
        """The entry for ``name``; raises :class:`UnknownNameError` naming the valid choices."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self.names()) or ("(none registered: call puregen_dist.plugins.load_plugins() "
                                                "to register the built-in entries)")
            raise UnknownNameError(f"unknown {self.family} {name!r}; valid names: {valid}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Call the builder registered under ``name``."""
        return self.get(name).builder(*args, **kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def in_registration_order(self) -> list[str]:
        """Registered names in the order they were registered (built-ins in their documented order)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


ATTACKS: Registry[Any] = Registry("attack")
"""Attack builders: ``builder(cfg: AttackConfig) -> Attack``."""
DEFENSES: Registry[Any] = Registry("defense")
"""Data/training defense builders: ``builder(cfg: DefenseConfig) -> DataDefense | TrainingDefense``."""
CLASSIFIERS: Registry[Any] = Registry("classifier")
"""Classifier builders: ``builder(in_channels: int, num_classes: int, image_size: int) -> nn.Module``."""
MODELS: Registry[Any] = Registry("model kind")
"""Model kinds (``ebm``, ``ddpm``, ``classifier``, ...): the job config class that trains one (a
:class:`~puregen_dist.config.generative.ModelJob` subclass) and its trainer
``trainer(job, tracker, data: tuple[ImageSet, ImageSet]) -> Path`` (the checkpoint directory)."""

_BY_FAMILY = {"attack": ATTACKS, "defense": DEFENSES, "classifier": CLASSIFIERS, "model": MODELS}


def registry_for(family: str) -> Registry[Any]:
    """The registry of ``family`` ("attack", "defense", "classifier", "model"). Built-in entries are
    registered by :func:`puregen_dist.plugins.load_plugins`, which every entry point calls."""
    return _BY_FAMILY[family]
