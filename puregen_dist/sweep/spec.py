"""Sweep files (DESIGN §5): a base experiment config, a search space over dotted keys, the generative models
the sweep trains, and settings; expanded into an explicit, validated list of cells.

A sweep file::

    name: quickstart                  # the MLflow experiment; every cell's `name`
    base: {...}                       # an experiment config (`puregen-dist run` schema)
    models:                           # generative models, referenced as `model:<name>` in defense.ebm / .ddpm
      ebm: {kind: ebm, ...}           # a `train-ebm` config (kind: ebm) or a `train-ddpm` one (kind: ddpm)
      ddpm: {kind: ddpm, recipe: sweeps/ddpm_cifar10_cpu.yaml}  # or a recipe file (its keys, then these)
    space:                            # axes, expanded in file order into the cross product
      attack: {grid: [{name: badnets, trigger: patch}, ...]}  # a value replaces the key's whole value
      defense.name: [none, jpeg]                              # a bare list is a grid
      defense.langevin.steps: {range: [0, 1000, 250], when: {defense.name: [puregen_ebm]}}
      defense.quality: {choice: [25, 50, 75, 90], samples: 2, seed: 0}
    settings: {...}                   # SweepSettings

Axis kinds: ``grid`` (these values), ``range: [start, stop, step]`` (start, start + step, ... up to and
including stop), ``choice`` (``samples`` values drawn with a fixed ``seed``, without replacement while
possible). ``when: {dotted.key: value | [values]}`` makes an axis conditional: it expands only cells whose
config (base plus earlier axes, defaults filled in) has one of those values; other cells keep their value.
``settings.seeds`` and ``settings.targets`` append a seed axis and an ``attack.target_class`` axis (the latter only
for attacks that have a target class, i.e. triggered ones); ``settings.trials: N`` appends an ``attack.poison_key``
axis 0..N-1 for attacks drawn from a poison key (triggerless: each key its own target and poison set, crafted
once). ``space`` may also be a list of such mappings: the union of their cells, in order. Identical cells are
merged.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puregen_dist.config.errors import (
    ConfigError,
    FieldError,
    UserInputError,
    check,
    check_at_least,
    check_custom_resources,
    name_problem,
)
from puregen_dist.config.generative import ModelJob, PipelineConfig
from puregen_dist.config.identity import model_fields, replace_model_refs
from puregen_dist.config.loading import (
    build,
    cell_dict,
    deep_merge,
    key_dict,
    load_yaml,
    parse_overrides,
    to_dict,
)
from puregen_dist.config.schema import ExperimentConfig
from puregen_dist.pipeline.stages import model_artifact
from puregen_dist.pipeline.store import artifact_key
from puregen_dist.registry import MODELS, UnknownNameError

SWEEP_KEYS = ("name", "base", "models", "space", "settings")
AXIS_KINDS = ("grid", "range", "choice")
MODEL_PREFIX = "model:"
AGGREGATED = ("target_class", "poison_key")
"""The attack fields a sweep aggregates over (``settings.targets``, ``settings.trials``): never part of a column
label."""
SETTINGS_AXES = {"attack.target_class": "target_class", "attack.poison_key": "poison_key"}
"""Axes appended by settings, and the attack field an attack must have for them to apply."""


@dataclass(frozen=True, kw_only=True)
class SweepSettings:
    """How a sweep runs: trial resources and retries, seeds and target classes, where things are stored."""

    trial_cpus: float = 1.0
    """CPUs reserved per trial (Ray Tune ``with_resources``)."""
    trial_gpus: float = 0.0
    """GPUs per trial (fractions pack several trials on one GPU)."""
    trial_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per trial (e.g. ``{gpu_pool: 1}``): trials run only on nodes that offer them."""
    max_concurrent_trials: int = 0
    """0: as many as the trial resources allow."""
    max_failures: int = 1
    """Retries of a failed trial (Tune ``FailureConfig``); -1 retries forever."""
    reuse_actors: bool = True
    """Run the next trial in a finished trial's worker process (Tune ``reuse_actors``): saves the ~6 s of imports
    and start-up per trial measured by benchmarks/sweep_overhead.py (same results). False: a fresh process each."""
    seeds: tuple[int, ...] = ()
    """A seed axis appended to the space (empty: the base seed only)."""
    targets: tuple[int, ...] = ()
    """An ``attack.target_class`` axis for attacks that have a target class (empty: the configured one)."""
    trials: int = 0
    """Independent trials of attacks drawn from a poison key (Gradient Matching, Bullseye Polytope): an
    ``attack.poison_key`` axis 0..trials-1 (0: the configured key only). Each key is its own target and poison
    set, crafted once; the report's success rate and Wilson interval run over them."""
    storage: str = "outputs/sweeps"
    """Ray Tune ``storage_path`` (made absolute) or a pyarrow.fs URI shared by all nodes."""
    store: str = "outputs/store"
    """Artifact store (directory or pyarrow.fs URI) for models, poison sets and purified sets."""
    address: str | None = None
    """Ray cluster address; None: $RAY_ADDRESS, else a local Ray instance."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Purification actor pool and poison-crafting task resources."""

    def __post_init__(self) -> None:
        check(self.trial_cpus > 0, "trial_cpus", "must be > 0")
        check_at_least(self, trial_gpus=0, max_concurrent_trials=0, max_failures=-1)
        check_custom_resources(self.trial_resources, "trial_resources")
        check(all(s >= 0 for s in self.seeds), "seeds", "must be >= 0")
        check(all(t >= 0 for t in self.targets), "targets", "must be >= 0")
        check(self.trials >= 0, "trials", "must be >= 0 (0: the configured poison key only)")


@dataclass(frozen=True)
class Axis:
    """One dimension of the space: ``key`` takes each of ``values`` in cells matching ``when``."""

    key: str
    values: tuple[Any, ...]
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def applies(self, resolved: Mapping[str, Any]) -> bool:
        """Whether this axis expands a cell whose resolved config (plain dict) is ``resolved``."""
        return all(get_dotted(resolved, key, _MISSING) in accepted for key, accepted in self.when)


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: a validated experiment config and where it came from."""

    index: int
    cell_id: str
    config: ExperimentConfig
    assignments: dict[str, Any]
    """Dotted key -> value set by the axes (model references as written, before resolution)."""
    row: str
    """Defense label: the defense name plus what distinguishes same-named defenses in this sweep."""
    col: str
    """Attack label, likewise (target classes are aggregated over, never part of it)."""

    def describe(self) -> str:
        """A one-line summary: index, id, labels, classifier, seed and target class."""
        target = getattr(self.config.attack, "target_class", None)
        parts = [f"{self.index:>4}", self.cell_id, f"defense={self.row}", f"attack={self.col}",
                 f"classifier={self.config.classifier.name}", f"seed={self.config.seed}"]
        if target is not None:
            parts.append(f"target={target}")
        if (key := getattr(self.config.attack, "poison_key", None)) is not None:
            parts.append(f"poison_key={key}")
        return "  ".join(parts)


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep file: base config, models, axes, settings and the expanded cells."""

    name: str
    source: str
    raw: dict[str, Any]
    models: dict[str, ModelJob]
    axes: tuple[Axis, ...]
    settings: SweepSettings
    cells: tuple[Cell, ...]

    def model_keys(self) -> dict[str, str]:
        """Model name -> artifact key."""
        return {name: model_artifact(job)[1] for name, job in self.models.items()}


_MISSING = object()


# ------------------------------------------------------------------------------------------ loading


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Load, validate and expand a sweep file (``--set`` overrides apply to the file, e.g.
    ``settings.max_concurrent_trials=1`` or ``base.classifier.epochs=2``). Every cell is validated here,
    before anything is computed; errors name the file, the key and the cell."""
    data = deep_merge(load_yaml(path), parse_overrides(overrides))
    return sweep_from_dict(data, source=str(path))


ROOT_ENV = "PUREGEN_ROOT"
"""An absolute directory that relative output locations resolve under (:func:`rebase_on_root`)."""


def rebase_on_root(data: Mapping[str, Any], root: str | None, *, source: str) -> dict[str, Any]:
    """``data`` with its relative ``base.output_dir``, ``settings.store`` and ``settings.storage`` (written or
    default) placed under ``root`` (``$PUREGEN_ROOT``: a directory every node mounts, for Ray jobs, whose working
    directory is a per-job cache); the default sqlite database follows the output directory. Absolute paths and
    URIs are kept; ``root`` None or empty changes nothing."""
    if not root:
        return dict(data)
    if "://" in root or not Path(root).is_absolute():
        raise ConfigError(f"{ROOT_ENV}={root!r}: expected an absolute directory path (a shared mount such as "
                          "/mnt/nfs/puregen); object-store URIs go in settings.store and settings.storage")
    rebased = {**data, "base": dict(_mapping(data.get("base", {}), source, "base")),
               "settings": dict(_mapping(data.get("settings", {}), source, "settings"))}
    defaults = {("base", "output_dir"): ExperimentConfig.output_dir, ("settings", "store"): SweepSettings.store,
                ("settings", "storage"): SweepSettings.storage}
    for (section, key), default in defaults.items():
        path = rebased[section].get(key, default)
        if isinstance(path, str) and "://" not in path and not Path(path).is_absolute():
            rebased[section][key] = str(Path(root) / path)
    return rebased


def sweep_from_dict(data: Mapping[str, Any], *, source: str) -> Sweep:
    """:func:`load_sweep` on already-parsed data (relative output locations under ``$PUREGEN_ROOT`` when set)."""
    data = rebase_on_root(data, os.environ.get(ROOT_ENV), source=source)
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; valid keys here: {', '.join(SWEEP_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: name: required, a non-empty string (the MLflow experiment name)")
    if name_problem(name):  # the name is the Tune experiment's directory under settings.storage
        raise ConfigError(f"{source}: name: {name_problem(name)}")
    base = _mapping(data.get("base", {}), source, "base")
    settings = build(SweepSettings, data.get("settings", {}), source=source, path="settings")
    models = _models(_mapping(data.get("models", {}), source, "models"), source)
    spaces = _spaces(data.get("space", {}), source)
    cells = expand(name, base, spaces, settings, models, source)
    return Sweep(name, source, dict(data), models, tuple(a for axes in spaces for a in axes), settings, cells)


def _spaces(space: Any, source: str) -> list[tuple[Axis, ...]]:
    """The axes of ``space``: one mapping of axes, or a list of them (a union of cross products, e.g. some
    defenses crossed with every attack and others with a few)."""
    parts = space if isinstance(space, list) else [space]
    if not parts:
        raise ConfigError(f"{source}: space: an empty list (give a mapping of axes, or a list of them)")
    spaces = []
    for index, part in enumerate(parts):
        where = "space" if part is space else f"space[{index}]"
        flat = _flatten_space(_mapping(part, source, where))
        spaces.append(tuple(_axis(key, spec, source, where) for key, spec in flat.items()))
    return spaces


def _mapping(value: Any, source: str, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _flatten_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``space`` with nested mappings that are not axis specs turned into dotted keys (what ``--set
    space.defense.quality=[50,75]`` produces), a later entry replacing an earlier one of the same key."""
    flat: dict[str, Any] = {}
    for key, spec in space.items():
        name = f"{prefix}{key}"
        if isinstance(spec, Mapping) and not set(spec) & {*AXIS_KINDS, "when"}:
            for sub, value in _flatten_space(spec, f"{name}.").items():
                flat.pop(sub, None)
                flat[sub] = value
        else:
            flat.pop(name, None)
            flat[name] = spec
    return flat


def _models(specs: Mapping[str, Any], source: str) -> dict[str, ModelJob]:
    """``models:`` entries as the job configs of their ``kind`` (a model kind registered in ``MODELS``: ebm,
    ddpm, classifier, ...), named after their entry."""
    models = {}
    for name, spec in specs.items():
        if name_problem(name):
            raise ConfigError(f"{source}: models.{name}: {name_problem(name)}")
        spec = _with_recipe(_mapping(spec, source, f"models.{name}"), source, f"models.{name}")
        kind = spec.pop("kind", None)
        try:
            job_cls = MODELS.get(kind).config_cls
        except UnknownNameError:
            kinds = ", ".join(MODELS.in_registration_order())
            raise ConfigError(f"{source}: models.{name}.kind: expected one of {kinds}, got {kind!r}") from None
        models[name] = build(job_cls, {"name": name, **spec}, source=source, path=f"models.{name}")
    return models


def _with_recipe(spec: dict[str, Any], source: str, key: str) -> dict[str, Any]:
    """A ``models:`` entry with ``recipe: PATH`` expanded: the ``train-<kind>`` file at PATH, under the entry's own
    keys, which override it. Naming the recipe of a shipped reference model is how a sweep uses that reference
    instead of retraining it. The recipe's ``name``, ``output`` and ``tracking`` are the training command's own and
    are dropped (the sweep sets them).

    A relative PATH is looked up in the working directory (like every path in a config), then beside the sweep
    file, then in its parent (the project root of a file in ``sweeps/``), so a sweep that names
    ``sweeps/<recipe>.yaml`` also runs from another directory (``puregen-dist quickstart`` anywhere)."""
    if "recipe" not in spec:
        return spec
    path = spec.pop("recipe")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{source}: {key}.recipe: expected the path of a train-<kind> YAML file, got {path!r}")
    here = Path(source).resolve().parent
    found = next((c for c in (Path(path), here / path, here.parent / path) if c.is_file()), Path(path))
    try:
        recipe = load_yaml(found)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {key}.recipe: {exc}") from None
    for own in ("name", "output", "tracking"):
        recipe.pop(own, None)
    return deep_merge(recipe, spec)


def _axis(key: str, spec: Any, source: str, space: str = "space") -> Axis:
    """Parse one ``space`` entry (a list is a grid)."""
    where = f"{source}: {space}.{key}"
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a list or a mapping with one of {', '.join(AXIS_KINDS)}")
    kinds = [k for k in AXIS_KINDS if k in spec]
    extra = sorted(set(spec) - {*AXIS_KINDS, "when", "samples", "seed"})
    if len(kinds) != 1 or extra:
        raise ConfigError(f"{where}: expected exactly one of {', '.join(AXIS_KINDS)} (plus optional when, "
                          f"and samples/seed for choice); got keys {sorted(spec)}")
    values = _axis_values(kinds[0], spec, where)
    if not values:
        raise ConfigError(f"{where}: no values")
    return Axis(key, tuple(values), _when(spec.get("when", {}), where))


def _axis_values(kind: str, spec: Mapping[str, Any], where: str) -> list[Any]:
    if kind == "grid":
        if not isinstance(spec["grid"], list):
            raise ConfigError(f"{where}.grid: expected a list")
        return list(spec["grid"])
    if kind == "range":
        bounds = spec["range"]
        if (not isinstance(bounds, list) or len(bounds) != 3
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
                or bounds[2] <= 0 or bounds[1] < bounds[0]):
            raise ConfigError(f"{where}.range: expected [start, stop, step] numbers with step > 0 and "
                              f"stop >= start, got {bounds!r}")
        start, stop, step = bounds
        count = int((stop - start) / step + 1e-9) + 1
        return [start + i * step for i in range(count)]
    options = spec["choice"]
    samples = spec.get("samples", 1)
    if not isinstance(options, list) or not options or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"{where}: choice needs a non-empty list and samples >= 1")
    rng = random.Random(spec.get("seed", 0))
    if samples <= len(options):
        return rng.sample(options, samples)
    return [rng.choice(options) for _ in range(samples)]


def _when(spec: Any, where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}.when: expected a mapping of dotted key -> value or list of values")
    return tuple((key, tuple(v if isinstance(v, list) else [v])) for key, v in spec.items())


# ------------------------------------------------------------------------------------------ expansion


def expand(name: str, base: Mapping[str, Any], spaces: Sequence[Sequence[Axis]], settings: SweepSettings,
           models: Mapping[str, ModelJob], source: str) -> tuple[Cell, ...]:
    """The explicit cells: for each space, the cross product of its axes (conditional ones only where they
    apply) and the seed and target axes of ``settings``; the spaces' cells in order, duplicates merged; each
    validated as an ExperimentConfig."""
    base = deep_merge(base, {"name": name, "tracking": {**base.get("tracking", {}), "experiment": name}})
    configs = [cell for axes in spaces for cell in _cross(base, [*axes, *_settings_axes(settings)], models, source)]
    return _label(_dedupe(configs))


def _cross(base: Mapping[str, Any], axes: Sequence[Axis], models: Mapping[str, ModelJob], source: str
           ) -> list[tuple[dict[str, Any], dict[str, Any], ExperimentConfig]]:
    """(assigned axis values, raw config, built config) of every cell of one space."""
    partials: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, dict(base))]
    for axis in axes:
        expanded = []
        for assigned, raw in partials:
            if axis.when or axis.key in SETTINGS_AXES:
                resolved = _resolved(raw, assigned, models, source)
                if not axis.applies(resolved) or (axis.key in SETTINGS_AXES
                                                  and SETTINGS_AXES[axis.key] not in resolved["attack"]):
                    expanded.append((assigned, raw))
                    continue
            expanded += [({**assigned, axis.key: v}, set_dotted(raw, axis.key, v)) for v in axis.values]
        partials = expanded
    return [(assigned, raw, _build_cell(raw, assigned, models, source)) for assigned, raw in partials]


def _settings_axes(settings: SweepSettings) -> list[Axis]:
    axes = []
    if settings.seeds:
        axes.append(Axis("seed", tuple(settings.seeds)))
    if settings.targets:
        axes.append(Axis("attack.target_class", tuple(settings.targets)))
    if settings.trials:
        axes.append(Axis("attack.poison_key", tuple(range(settings.trials))))
    return axes


def _resolved(raw: Mapping[str, Any], assigned: Mapping[str, Any], models: Mapping[str, ModelJob],
              source: str) -> dict[str, Any]:
    return to_dict(_build_cell(raw, assigned, models, source))


def _build_cell(raw: Mapping[str, Any], assigned: Mapping[str, Any], models: Mapping[str, ModelJob],
                source: str) -> ExperimentConfig:
    """The ExperimentConfig of a cell with ``model:<name>`` references replaced by model artifact keys."""
    where = f"{source}: cell {_describe(assigned)}"
    try:
        cfg = build(ExperimentConfig, raw, source=where)
    except (ConfigError, FieldError) as exc:
        raise ConfigError(str(exc)) from None
    return replace_model_refs(cfg, lambda path, kind, ref: _model_key(path, kind, ref, models, where))


def _model_key(path: str, kind: str, ref: str, models: Mapping[str, ModelJob], where: str) -> str:
    """The artifact key of a ``model:<name>`` reference at ``path`` (a field referencing ``kind`` models);
    other references (directories, keys) as they are."""
    if not ref.startswith(MODEL_PREFIX):
        return ref
    model = ref[len(MODEL_PREFIX):]
    if model not in models:
        raise ConfigError(f"{where}: {path}: {ref!r} names no entry of `models:` "
                          f"(defined: {', '.join(sorted(models)) or 'none'})")
    found, key, _ = model_artifact(models[model])
    if found != kind:
        raise ConfigError(f"{where}: {path}: {ref!r} is a {found} model, expected {kind}")
    return key


def _describe(assigned: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in assigned.items()) + ")" if assigned else "(base)"


Built = tuple[dict[str, Any], dict[str, Any], ExperimentConfig]
"""(assignments, raw config as written, validated config) of one cell."""


def cell_id_of(cfg: ExperimentConfig) -> str:
    """A cell's id: the content key of its keyed config (key-neutral fields at their default left out)."""
    return artifact_key("cell", cell_dict(cfg))


def _dedupe(configs: list[Built]) -> list[tuple[str, Built]]:
    seen: dict[str, Built] = {}
    for built in configs:
        seen.setdefault(cell_id_of(built[2]), built)
    return list(seen.items())


def _label(cells: list[tuple[str, Built]]) -> tuple[Cell, ...]:
    """Row (defense) and column (attack) labels: the name plus the fields in which same-named configs of
    this sweep differ (model references by their ``models:`` name)."""
    rows = _labels([_label_fields(cfg.defense, raw.get("defense")) for _, (_, raw, cfg) in cells])
    cols = _labels([_label_fields(cfg.attack, raw.get("attack")) for _, (_, raw, cfg) in cells])
    return tuple(Cell(i, cell_id, cfg, assigned, rows[i], cols[i])
                 for i, (cell_id, (assigned, _, cfg)) in enumerate(cells))


def _label_fields(cfg: Any, written: Any) -> dict[str, Any]:
    """Flattened keyed fields (no execution-only ones, no target class) of a defense/attack config for
    labelling; model references shown as written (``model:<name>`` by its name)."""
    fields = {k: v for k, v in flatten_dict(key_dict(cfg)).items() if k not in AGGREGATED}
    for name in model_fields(cfg):
        ref = written.get(name) if isinstance(written, Mapping) else None
        if isinstance(ref, str) and name in fields:
            fields[name] = ref.removeprefix(MODEL_PREFIX)
    return fields


def _labels(all_fields: list[dict[str, Any]]) -> list[str]:
    varying: dict[str, set[str]] = {}
    for fields in all_fields:
        for key, value in fields.items():
            varying.setdefault(f"{fields['name']}|{key}", set()).add(repr(value))
    labels = []
    for fields in all_fields:
        shown = [f"{k}={_short(v)}" for k, v in fields.items()
                 if k != "name" and len(varying[f"{fields['name']}|{k}"]) > 1]
        labels.append(fields["name"] + (f" ({', '.join(shown)})" if shown else ""))
    return labels


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------ dotted keys


def get_dotted(data: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``data["a"]["b"]`` for ``key == "a.b"``; ``default`` when a level is missing."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def set_dotted(data: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``key`` (dotted) set to ``value`` (intermediate mappings created/copied)."""
    head, _, rest = key.partition(".")
    out = dict(data)
    if not rest:
        out[head] = value
        return out
    child = data.get(head, {})
    if not isinstance(child, Mapping):
        raise UserInputError(f"space.{key}: {head!r} is not a mapping in the base config")
    out[head] = set_dotted(child, rest, value)
    return out


def flatten_dict(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_dict(value, f"{name}."))
        else:
            out[name] = value
    return out



