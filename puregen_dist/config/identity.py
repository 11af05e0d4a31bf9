"""What a config class says about itself, declared on the class: which of its fields reference trained models
(and of which model kind), which fields are execution-only (how, not what, is computed: left out of content
keys), and, for defenses, how the pipeline runs it.

A new defense, attack or model job declares these facts once, with :func:`model_ref`, :func:`execution_only`
and the ``pipeline`` class variable of :class:`~puregen_dist.config.schema.DefenseConfig`; the planner, the
stages, the actors, the sweep labels and the model resolver all read them through the functions below::

    @dataclass(frozen=True, kw_only=True)
    class MyDefenseConfig(DefenseConfig):
        pipeline: ClassVar[PipelineKind] = "actor_pool"
        name: str = "my_defense"
        denoiser: str | None = model_ref("denoiser")     # a checkpoint directory, artifact key or model:<name>
        batch_size: int = execution_only(128)            # not part of the purified set's key
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Literal

EXECUTION_ONLY = "puregen_dist.execution_only"
"""Field metadata flag: the field changes how, not what, is computed (device, batch size, output paths)."""
KEY_NEUTRAL_DEFAULT = "puregen_dist.key_neutral_default"
"""Field metadata flag: the field is left out of content keys while it holds its default (see
:func:`key_neutral_default`)."""
MODEL_KIND = "puregen_dist.model_kind"
"""Field metadata: the model kind (``ebm``, ``ddpm``, ``classifier``, ...) the field references."""
FILE_REF = "puregen_dist.file_ref"
"""Field metadata flag: the field is the path of an input file or directory (imported poisons) whose content,
not only its path, identifies what is computed from it."""

PipelineKind = Literal["actor_pool", "task_pool", "whole_set", "none"]
"""How the pipeline runs a data defense: ``actor_pool`` (a stateful Ray Data actor pool that loads generative
models once per actor and calls ``defense.purifier``), ``task_pool`` (stateless CPU tasks calling
``defense.apply`` per batch), ``whole_set`` (one Ray task with a purifier actor's resources runs the defense on
the whole set at once: a filter that trains a detector on it), ``none`` (no purified set: the classifier trains
on the poison set, e.g. no defense or a training-time defense)."""

_MISSING: Any = dataclasses.MISSING


def execution_only(default: Any = _MISSING, *, default_factory: Any = _MISSING) -> Any:
    """A dataclass field that is left out of content keys (:func:`key_fields`)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={EXECUTION_ONLY: True})


def late_execution_option(default: Any) -> Any:
    """An :func:`execution_only` field added after sweeps were published: out of content keys always, and out of
    sweep cell ids while it holds ``default`` (cells hash execution fields; see ``key_neutral_default``)."""
    return dataclasses.field(default=default, metadata={EXECUTION_ONLY: True, KEY_NEUTRAL_DEFAULT: True})


def key_neutral_default(default: Any) -> Any:
    """A dataclass field added after content keys were published: it is left out of content keys while it
    holds ``default`` (so every earlier artifact keeps its key, and the new option at its default computes what
    the code computed before the field existed) and is keyed like any field once set to another value. The
    default must never change afterwards: artifacts made with it do not record it."""
    return dataclasses.field(default=default, metadata={KEY_NEUTRAL_DEFAULT: True})


def at_key_neutral_default(field: dataclasses.Field, value: Any) -> bool:
    """Whether ``field`` was declared key-neutral (:func:`key_neutral_default`) and holds its default."""
    return bool(field.metadata.get(KEY_NEUTRAL_DEFAULT, False)) and value == field.default


def left_out_of_key(field: dataclasses.Field, value: Any) -> bool:
    """Whether ``field`` holding ``value`` stays out of content keys: execution-only fields always, fields
    declared with :func:`key_neutral_default` while they hold their default."""
    return is_execution_only(field) or at_key_neutral_default(field, value)


def model_ref(kind: str, default: str | None = None, *, key_neutral: bool = False) -> Any:
    """A dataclass field (``str | None``) referencing a trained model (or another artifact) of ``kind``: a
    checkpoint directory, the key of an artifact (``<kind>-<hex16>``), or in a sweep file ``model:<name>``.
    ``key_neutral``: left out of content keys while unset (see :func:`key_neutral_default`)."""
    metadata = {MODEL_KIND: kind, **({KEY_NEUTRAL_DEFAULT: True} if key_neutral else {})}
    return dataclasses.field(default=default, metadata=metadata)


def model_refs_field(kind: str, *, key_neutral: bool = False) -> Any:
    """A dataclass field (``tuple[str, ...]``, default empty) referencing several trained models of ``kind`` (an
    ensemble), each written as for :func:`model_ref`; resolved, keyed and planned element by element.
    ``key_neutral``: left out of content keys while empty (see :func:`key_neutral_default`)."""
    return dataclasses.field(default=(), metadata={MODEL_KIND: kind, **({KEY_NEUTRAL_DEFAULT: True} if key_neutral
                                                                          else {})})


def file_ref(members: tuple[str, ...] = (), *, optional: bool = False) -> Any:
    """A ``str`` dataclass field holding the path of an input file or directory (required; with ``optional``,
    ``str | None`` defaulting to None, keyed only when set); content keys include a digest of its content
    (:func:`~puregen_dist.pipeline.models.file_fingerprints`), so replacing the file in place never serves a
    stale cached result. ``members``: for a directory, the files in it that are read (empty: every file)."""
    if optional:
        return dataclasses.field(default=None, metadata={FILE_REF: tuple(members), KEY_NEUTRAL_DEFAULT: True})
    return dataclasses.field(metadata={FILE_REF: tuple(members)})


def file_refs(cfg: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{field name: (path, members)}`` of the fields of ``cfg`` (this level) declared with :func:`file_ref`."""
    return {f.name: (getattr(cfg, f.name), f.metadata[FILE_REF]) for f in config_fields(cfg)
            if FILE_REF in f.metadata and getattr(cfg, f.name) is not None}


def is_execution_only(field: dataclasses.Field) -> bool:
    """Whether ``field`` was declared with :func:`execution_only`."""
    return bool(field.metadata.get(EXECUTION_ONLY, False))


def model_kind_of(field: dataclasses.Field) -> str | None:
    """The model kind a field declared with :func:`model_ref` references, else None."""
    return field.metadata.get(MODEL_KIND)


def config_fields(cfg: Any) -> tuple[dataclasses.Field, ...]:
    """The init fields of config instance or class ``cfg`` (empty for non-dataclasses)."""
    return tuple(f for f in dataclasses.fields(cfg) if f.init) if dataclasses.is_dataclass(cfg) else ()


def model_fields(cfg: Any) -> dict[str, str]:
    """``{field name: model kind}`` of the model-reference fields declared on ``cfg``'s class."""
    return {f.name: kind for f in config_fields(cfg) if (kind := model_kind_of(f)) is not None}


def model_refs(cfg: Any) -> dict[str, str]:
    """``{field name: reference}`` of the model-reference fields set on ``cfg`` (this level only)."""
    return {name: ref for name in model_fields(cfg) if (ref := getattr(cfg, name))}


def iter_model_refs(cfg: Any, path: str = "") -> Iterator[tuple[str, str, str]]:
    """``(dotted path, kind, reference)`` of every model reference set in ``cfg`` and its nested sections."""
    for f in config_fields(cfg):
        value = getattr(cfg, f.name)
        dotted = f"{path}.{f.name}" if path else f.name
        if (kind := model_kind_of(f)) is not None:
            if isinstance(value, tuple):
                yield from ((f"{dotted}.{i}", kind, ref) for i, ref in enumerate(value))  # MLflow tag-safe
            elif value:
                yield dotted, kind, value
        elif dataclasses.is_dataclass(value):
            yield from iter_model_refs(value, dotted)


def replace_model_refs(cfg: Any, resolve: Callable[[str, str, str], str], path: str = "") -> Any:
    """``cfg`` with every model reference ``ref`` (at dotted ``path`` with ``kind``, nested sections too)
    replaced by ``resolve(path, kind, ref)``; unchanged configs are returned as they are."""
    changes = {}
    for f in config_fields(cfg):
        value = getattr(cfg, f.name)
        dotted = f"{path}.{f.name}" if path else f.name
        if isinstance(value, tuple) and model_kind_of(f) is not None:
            resolved = tuple(resolve(f"{dotted}.{i}", model_kind_of(f), ref) for i, ref in enumerate(value))
            new = value if resolved == value else resolved
        elif (kind := model_kind_of(f)) is not None:
            new = resolve(dotted, kind, value) if value else value
        elif dataclasses.is_dataclass(value):
            new = replace_model_refs(value, resolve, dotted)
        else:
            continue
        if new is not value:
            changes[f.name] = new
    return dataclasses.replace(cfg, **changes) if changes else cfg


def with_device(cfg: Any, device: str, *, only_auto: bool = False) -> Any:
    """``cfg`` with every ``device`` field (nested sections too) set to ``device``; ``only_auto`` changes only
    fields whose value is ``"auto"``. Configs without such fields are returned unchanged."""
    changes = {}
    for f in config_fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "device" and isinstance(value, str) and (value == "auto" or not only_auto):
            changes[f.name] = device
        elif dataclasses.is_dataclass(value):
            new = with_device(value, device, only_auto=only_auto)
            if new is not value:
                changes[f.name] = new
    return dataclasses.replace(cfg, **changes) if changes else cfg
