"""Experiment configuration: one YAML file, validated into typed objects before anything runs.

``schema`` holds the typed fields (a leaf: no model, data or torch imports), ``loading`` reads a
file and its ``--set`` overrides, ``checks`` asks the model and data code whether what a config
names exists (importing that code only when it runs). Every name is importable from here, and loads
on first use: ``defaults`` (what ``rdml-dist status`` needs) comes without pydantic.
"""

from rdml_dist.lazy import lazy_names

_HOMES = {
    "check_resources": "rdml_dist.config.checks",
    "data_spec": "rdml_dist.config.checks",
    "DEFAULT_CONFIG_NAME": "rdml_dist.config.loading",
    "apply_overrides": "rdml_dist.config.loading",
    "load_config": "rdml_dist.config.loading",
    "parse_config": "rdml_dist.config.loading",
    "read_raw_config": "rdml_dist.config.loading",
    "DEFAULT_STORAGE": "rdml_dist.config.schema",
    "AlphaScheduleConfig": "rdml_dist.config.schema",
    "CheckpointConfig": "rdml_dist.config.schema",
    "CoordinatorConfig": "rdml_dist.config.schema",
    "DataConfig": "rdml_dist.config.schema",
    "ExchangeConfig": "rdml_dist.config.schema",
    "ExperimentConfig": "rdml_dist.config.schema",
    "FaultConfig": "rdml_dist.config.schema",
    "LRScheduleConfig": "rdml_dist.config.schema",
    "MimicryConfig": "rdml_dist.config.schema",
    "MonitoringConfig": "rdml_dist.config.schema",
    "OptimizerConfig": "rdml_dist.config.schema",
    "RayConfig": "rdml_dist.config.schema",
    "RpcConfig": "rdml_dist.config.schema",
    "RuntimeConfig": "rdml_dist.config.schema",
    "StudentConfig": "rdml_dist.config.schema",
    "StudentResources": "rdml_dist.config.schema",
    "TrainingConfig": "rdml_dist.config.schema",
    "ConfigError": "rdml_dist.errors",
}

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

__getattr__ = lazy_names(__name__, _HOMES, globals())
