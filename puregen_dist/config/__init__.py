"""Typed configuration and strict YAML loading."""

from puregen_dist.config.errors import ConfigError, UserInputError
from puregen_dist.config.loading import (
    experiment_from_dict,
    flatten,
    load_experiment,
    load_yaml,
    to_dict,
    to_yaml,
)
from puregen_dist.config.schema import (
    AttackConfig,
    ClassifierConfig,
    DataConfig,
    DefenseConfig,
    EvalConfig,
    ExperimentConfig,
    TrackingConfig,
)

__all__ = [
    "AttackConfig", "ClassifierConfig", "ConfigError", "DataConfig", "DefenseConfig", "EvalConfig",
    "ExperimentConfig", "TrackingConfig", "UserInputError", "experiment_from_dict", "flatten",
    "load_experiment", "load_yaml", "to_dict", "to_yaml",
]
