"""YAML -> frozen dataclasses, strictly: unknown keys, wrong types and out-of-range values are errors that
name the key and the file. Also dotted ``--set a.b=c`` overrides and ``flatten`` for logging params.

Besides each config class's own checks, the loader applies these to every config, by type or field name:

* a file must be UTF-8, must not repeat a key within one mapping, and must not be empty (unless the caller
  allows it: ``show-config``); ``1e-3`` is read as a number (YAML 1.2), not as a string;
* floats must be finite (no ``.inf`` / ``.nan``), integers must fit in int64;
* seeds (fields named ``seed``, ``*_seed``, ``seeds``) lie in [0, 2**32 - 1]; batch sizes (``batch_size``,
  ``*_batch_size``) in [1, 2**20]; image sizes (``image_size``) at most 4096;
* devices (fields named ``device``) are ``auto``, ``cpu`` or ``cuda`` / ``mps`` / ``xpu`` with an optional
  ``:<index>`` (whether that device exists is checked where the job runs: :mod:`puregen_dist.device`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from puregen_dist.config.errors import BATCH_MAX, IMAGE_SIZE_MAX, INT_MAX, SEED_MAX, ConfigError, FieldError
from puregen_dist.config.identity import at_key_neutral_default, config_fields, left_out_of_key
from puregen_dist.config.schema import ExperimentConfig, RegistryConfig
from puregen_dist.registry import UnknownNameError, registry_for

C = TypeVar("C")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated within one mapping (PyYAML keeps the last silently) and
    reads ``1e-3`` as a float (YAML 1.2; PyYAML's YAML 1.1 resolver wants ``1.0e-3``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first}); a key may appear once per mapping",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text strictly (:class:`_StrictLoader`: safe types only, no repeated keys)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path, *, allow_empty: bool = False) -> dict[str, Any]:
    """Read a YAML mapping; a missing or non-UTF-8 file, malformed YAML, a repeated key, a non-mapping top level
    or (unless ``allow_empty``) an empty file is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (expected a YAML file)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); save the config "
                          "as UTF-8") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        if allow_empty:
            return {}
        raise ConfigError(f"{path}: empty config (the file holds no keys, so every default would apply, e.g. "
                          "200 epochs of ResNet-18); write the sections you mean, or `{}` for all defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level, got {type(data).__name__}")
    return data


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict; values are parsed as YAML scalars/lists (``1`` -> int)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is already set to a value, not a section")
        node[parts[-1]] = value
    return nested


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. Changing a registry section's ``name`` drops the old fields."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            if "name" in value and old.get("name") != value["name"]:
                merged[key] = dict(value)
            else:
                merged[key] = deep_merge(old, value)
        else:
            merged[key] = value
    return merged


def build(cls: type[C], data: Any, *, source: str, path: str = "") -> C:
    """Build dataclass ``cls`` from plain data, strictly. Errors name ``source`` (the file) and the dotted key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {path or 'config'}: expected a mapping, got {_describe(data)}")
    if issubclass(cls, RegistryConfig):
        cls = _registry_config_class(cls, data, source=source, path=path)  # type: ignore[assignment]
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {_join(path, unknown[0])!r}; valid keys here: {', '.join(sorted(fields))}"
        )
    for name, value in data.items():  # before the type checks: a seed of 2**64 is a seed out of range
        _check_by_name(name, value, source=source, path=_join(path, name))
    kwargs = {name: _coerce(hints[name], value, source=source, path=_join(path, name))
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise ConfigError(f"{source}: {_join(path, exc.key)}: {exc.message}") from None
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{source}: {path or 'config'}: {exc}") from None


def load_config(cls: type[C], path: str | Path, overrides: Sequence[str] = (), *, allow_empty: bool = False) -> C:
    """Load a YAML file into config class ``cls`` with ``--set`` overrides applied, validated (an empty file is
    an error unless ``allow_empty``)."""
    data = deep_merge(load_yaml(path, allow_empty=allow_empty), parse_overrides(overrides))
    return build(cls, data, source=str(path))


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML file with ``--set`` overrides applied, validated."""
    return load_config(ExperimentConfig, path, overrides)


def experiment_from_dict(data: Mapping[str, Any], *, source: str = "<dict>") -> ExperimentConfig:
    """Build an ExperimentConfig from a nested dict (e.g. a sweep cell)."""
    return build(ExperimentConfig, data, source=source)


def to_dict(cfg: Any) -> Any:
    """A config dataclass as plain nested data (tuples become lists), ready for YAML or JSON."""
    return _plain(cfg, keyed=False)


def key_dict(cfg: Any) -> Any:
    """What identifies the result of ``cfg``: :func:`to_dict` without the fields declared execution-only
    (:func:`~puregen_dist.config.identity.execution_only`) and without key-neutral fields at their default
    (:func:`~puregen_dist.config.identity.key_neutral_default`), at every level. Content keys hash this."""
    return _plain(cfg, keyed=True)


def cell_dict(cfg: Any) -> Any:
    """:func:`to_dict` without key-neutral fields at their default: what a sweep cell's id hashes, so adding a
    key-neutral option never renames the cells (and re-runs the trials) of existing sweeps."""
    return _plain(cfg, keyed=False, neutral=True)


def _plain(cfg: Any, *, keyed: bool, neutral: bool = False) -> Any:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        dropped = left_out_of_key if keyed else at_key_neutral_default if neutral else None
        return {f.name: _plain(getattr(cfg, f.name), keyed=keyed, neutral=neutral) for f in config_fields(cfg)
                if dropped is None or not dropped(f, getattr(cfg, f.name))}
    if isinstance(cfg, (tuple, list)):
        return [_plain(v, keyed=keyed, neutral=neutral) for v in cfg]
    return cfg


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"classifier.lr": 0.1, ...}``: scalar leaves keyed by dotted path (lists become strings)."""
    flat: dict[str, Any] = {}
    data = to_dict(cfg) if not isinstance(cfg, Mapping) else cfg
    for key, value in data.items():
        dotted = _join(prefix, key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted))
        elif isinstance(value, list):
            flat[dotted] = ",".join(str(v) for v in value)
        else:
            flat[dotted] = value
    return flat


# --- internals ---------------------------------------------------------------------------------------------


def _registry_config_class(base: type, data: Mapping[str, Any], *, source: str, path: str) -> type:
    name = data.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{source}: {_join(path, 'name')}: required, a string naming the {base.registry}")
    try:
        entry = registry_for(base.registry).get(name)
    except UnknownNameError as exc:
        raise ConfigError(f"{source}: {_join(path, 'name')}: {exc}") from None
    return entry.config_cls


def _coerce(tp: Any, value: Any, *, source: str, path: str) -> Any:
    """Check ``value`` against type annotation ``tp`` and convert lists to tuples; no silent conversions
    except int -> float."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, source=source, path=path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{source}: {path}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {path}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]  # a lone number is a one-element list
            else:
                raise ConfigError(f"{source}: {path}: expected a list of {_type_name(get_args(tp)[0])}, "
                                  f"got {_describe(value)}")
        item = get_args(tp)[0]
        return tuple(_coerce(item, v, source=source, path=f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {path}: expected a mapping, got {_describe(value)}")
        key_type, value_type = get_args(tp)
        return {_coerce(key_type, k, source=source, path=path): _coerce(value_type, v, source=source,
                                                                         path=_join(path, str(k)))
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source=source, path=path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {path}: expected an integer, got {_describe(value)}")
        if abs(value) > INT_MAX:
            raise ConfigError(f"{source}: {path}: {value} is out of range (integers must lie within +-(2**63 - 1))")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {path}: expected a number, got {_describe(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{source}: {path}: expected a finite number, got {value}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {path}: expected a string, got {_describe(value)}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config type {tp!r} at {path} is not supported by the loader")


_DEVICE = re.compile(r"auto|cpu|(?:cuda|mps|xpu)(?::[0-9]+)?")


def _check_by_name(name: str, value: Any, *, source: str, path: str) -> None:
    """The rules every config field of a given name obeys (module docstring): seeds, batch and image sizes,
    devices."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    numbers = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    if name in ("seed", "seeds") or name.endswith("_seed"):
        bad = [v for v in numbers if not 0 <= v <= SEED_MAX]
        if bad:
            raise ConfigError(f"{source}: {path}: seed {bad[0]} is out of range (seeds lie in [0, 2**32 - 1 = "
                              f"{SEED_MAX}])")
    elif name == "batch_size" or name.endswith("_batch_size"):
        if any(v > BATCH_MAX for v in numbers):
            raise ConfigError(f"{source}: {path}: {max(numbers)} is too large (at most 2**20 = {BATCH_MAX} rows "
                              "per batch)")
    elif name == "image_size":
        if any(v > IMAGE_SIZE_MAX for v in numbers):
            raise ConfigError(f"{source}: {path}: {max(numbers)} pixels is too large (at most {IMAGE_SIZE_MAX})")
    elif name == "device" and isinstance(value, str) and not _DEVICE.fullmatch(value):
        raise ConfigError(f"{source}: {path}: expected auto, cpu, cuda or cuda:<index> (also mps, xpu), got "
                          f"{value!r}")


def _type_name(tp: Any) -> str:
    args = [a for a in get_args(tp) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args] or [getattr(tp, "__name__", str(tp))]
    return " or ".join(names) + (" or null" if type(None) in get_args(tp) else "")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
