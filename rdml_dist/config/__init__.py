"""Experiment configuration: one YAML file, validated into typed objects before anything runs.

``schema`` holds the typed fields (a leaf: no model, data or torch imports), ``loading`` reads a
file and its ``--set`` overrides, ``checks`` asks the model and data code whether what a config
names exists (importing that code only when it runs). Every name is importable from here.
"""

from rdml_dist.config.checks import check_resources, data_spec
from rdml_dist.config.loading import DEFAULT_CONFIG_NAME, apply_overrides, load_config, parse_config, read_raw_config
from rdml_dist.config.schema import (
    DEFAULT_STORAGE,
    AlphaScheduleConfig,
    CheckpointConfig,
    CoordinatorConfig,
    DataConfig,
    ExchangeConfig,
    ExperimentConfig,
    FaultConfig,
    LRScheduleConfig,
    MimicryConfig,
    MonitoringConfig,
    OptimizerConfig,
    RayConfig,
    RpcConfig,
    RuntimeConfig,
    StudentConfig,
    StudentResources,
    TrainingConfig,
)
from rdml_dist.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "DEFAULT_STORAGE",
    "AlphaScheduleConfig",
    "CheckpointConfig",
    "ConfigError",
    "CoordinatorConfig",
    "DataConfig",
    "ExchangeConfig",
    "ExperimentConfig",
    "FaultConfig",
    "LRScheduleConfig",
    "MimicryConfig",
    "MonitoringConfig",
    "OptimizerConfig",
    "RayConfig",
    "RpcConfig",
    "RuntimeConfig",
    "StudentConfig",
    "StudentResources",
    "TrainingConfig",
    "apply_overrides",
    "check_resources",
    "data_spec",
    "load_config",
    "parse_config",
    "read_raw_config",
]
