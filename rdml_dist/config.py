"""Experiment configuration: one YAML file, validated into typed objects before anything runs.

Every problem is reported as a :class:`~rdml_dist.errors.ConfigError` naming the dotted field
(``mimicry.alpha``, ``students.1.model``) and what is allowed, so a bad file never reaches a
cluster.
"""

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rdml_dist.data import DataSpec, check_data_spec
from rdml_dist.errors import ConfigError
from rdml_dist.models import check_model_name

DEFAULT_CONFIG_NAME = "digits_renyi.yaml"
DEFAULT_STORAGE = "~/rdml_results"
RAY_JOB_ENVIRONMENT = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's entrypoint
STUDENT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(_Strict):
    """SGD (Nesterov by default, as in the DML/RDML papers) or Adam/AdamW."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)


class LRScheduleConfig(_Strict):
    """Learning-rate schedule stepped once per epoch."""

    name: Literal["constant", "cosine", "multistep"] = "cosine"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)


class DataConfig(_Strict):
    """Which data set, where it lives, and the robustness settings (label noise, hidden labels)."""

    name: str = "digits"
    root: str | None = None
    download: bool = False
    val_fraction: float = Field(0.2, gt=0, lt=1)
    label_noise: float = Field(0.0, ge=0, lt=1)
    unlabeled_fraction: float = Field(0.0, ge=0, lt=1)
    augment: bool | None = None
    image_size: int | None = Field(None, gt=0)
    transform: str | None = None  # package.module:function, called on each training batch with a seeded generator
    memory_limit_mb: float = Field(2048.0, ge=0)  # image folders larger than this decoded are streamed
    workers: int = Field(2, ge=0)  # DataLoader worker processes per student for streamed data
    options: dict[str, Any] = Field(default_factory=dict)


def _whole_if_above_one(gpus: float | None) -> float | None:
    """Ray schedules GPU fractions below one only: 0.25, 0.5 or 2 GPUs fit a bundle, 1.5 does not."""
    if gpus is not None and gpus > 1 and not float(gpus).is_integer():
        raise ValueError(f"{gpus} GPUs: a fraction must be below 1 (e.g. 0.5); above 1 use a whole number")
    return gpus


class StudentResources(_Strict):
    """One student's own Ray bundle; unset values fall back to ``runtime.ray.cpus_per_student``/``gpus_per_student``.

    Small students can share a GPU (``gpus: 0.25``) while a large one gets a whole one, so the
    cohort's step is not held back by the slowest member waiting for a device.
    """

    cpus: float | None = Field(None, gt=0)
    gpus: float | None = Field(None, ge=0)

    _gpus_schedulable = field_validator("gpus")(_whole_if_above_one)


class StudentConfig(_Strict):
    """One member of the cohort: a registry model name or ``package.module:function``."""

    model: str
    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    optimizer: OptimizerConfig | None = None
    external: bool = False  # runs outside Ray (``rdml-dist student``) and joins over the gRPC cohort service
    resources: StudentResources = Field(default_factory=StudentResources)  # Ray students only

    @field_validator("name")
    @classmethod
    def _name_is_a_safe_label(cls, value: str | None) -> str | None:
        if value is not None and not STUDENT_NAME_PATTERN.match(value):
            raise ValueError("must be 1-63 letters, digits, '_', '.' or '-' (it becomes a metric label)")
        return value


class AlphaScheduleConfig(_Strict):
    """α over training: constant, or cosine-annealed from ``mimicry.alpha`` to ``floor``."""

    kind: Literal["constant", "cosine"] = "constant"
    floor: float = Field(0.0, ge=0)


class MimicryConfig(_Strict):
    """The mutual-learning term: L_k = CE + λ·τ²·1/(K−1)·Σ_{j≠k} D(q_j ‖ q_k)."""

    divergence: Literal["renyi", "kl", "js", "mse_logits"] = "renyi"
    alpha: float = Field(2.0, ge=0, allow_inf_nan=False)
    alpha_schedule: AlphaScheduleConfig = Field(default_factory=AlphaScheduleConfig)
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    warmup_epochs: float = Field(0.0, ge=0)
    burn_in_epochs: float = Field(0.0, ge=0)
    mode: Literal["pairwise", "ensemble"] = "pairwise"
    update: Literal["simultaneous", "sequential"] = "simultaneous"

    @model_validator(mode="after")
    def _floor_below_alpha(self) -> "MimicryConfig":
        if self.alpha_schedule.kind == "cosine" and self.alpha_schedule.floor > self.alpha:
            raise ValueError(f"alpha_schedule.floor ({self.alpha_schedule.floor}) must not exceed alpha ({self.alpha})")
        return self


class TrainingConfig(_Strict):
    """Epochs, batch and optimisation shared by all students unless a student overrides its optimizer."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    drop_last: bool = False
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    eval_batch_size: int = Field(512, ge=1)
    last_epochs_reported: int = Field(5, ge=1)


class RayConfig(_Strict):
    """How the cohort is placed on a Ray cluster (ignored by the local engine)."""

    address: str | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    gpus_per_student: float | None = Field(None, ge=0)
    cpus_per_student: float = Field(1.0, gt=0)
    placement_timeout_s: float = Field(60.0, gt=0)
    exchange_timeout_s: float = Field(300.0, gt=0)

    _gpus_schedulable = field_validator("gpus_per_student")(_whole_if_above_one)


class CoordinatorConfig(_Strict):
    """The coordinator's own bundle in the cohort's placement group."""

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0, le=1)
    on_head_node: bool = False  # a stable address for Prometheus: the coordinator runs on the Ray head
    shards: int = Field(1, ge=1)  # Ray: coordinator actors, each serving its rows of every step's batch (rdml_dist.shards)


class CheckpointConfig(_Strict):
    """Cohort checkpoints: at every epoch end, and every ``every_steps`` steps when set; the last ``keep`` are kept."""

    every_steps: int | None = Field(None, ge=1)
    keep: int = Field(2, ge=1)


class FaultConfig(_Strict):
    """What a failure costs: a cohort rollback (default), the live students carrying on, or the run."""

    on_student_failure: Literal["restart_cohort", "continue", "fail"] = "restart_cohort"
    max_failures: int = Field(3, ge=0)
    nan_lr_backoff: float = Field(1.0, gt=0, le=1)


class ExchangeConfig(_Strict):
    """How a Ray student's step reaches the coordinator, and what its frames carry.

    ``transport``: ``tcp`` is the frame lane (one persistent socket per student into the same
    barrier); ``actor_calls`` one Ray actor call per step. ``dtype``: ``float16``/``bfloat16``
    halve the logits and gradients on the wire. The coordinator always computes in float32;
    float16 logits beyond ±65504 become inf and are refused as non-finite, so bfloat16 (float32's
    range, 3 significant digits) is the safer half.
    """

    transport: Literal["tcp", "actor_calls"] = "tcp"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class RuntimeConfig(_Strict):
    """Where it runs, where results go, and how failures are survived."""

    engine: Literal["local", "ray"] = "ray"
    storage: str = DEFAULT_STORAGE
    run_dir: str = "{storage}/{name}"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(None, ge=1)
    ray: RayConfig = Field(default_factory=RayConfig)
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    exchange: ExchangeConfig = Field(default_factory=ExchangeConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)


class MonitoringConfig(_Strict):
    """Where the coordinator serves its Prometheus metrics (``/metrics``)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)  # 0: any free port (the driver prints the one taken)
    file_sd: str | None = None  # a Prometheus file_sd JSON file the driver keeps pointing at the coordinator


class RpcConfig(_Strict):
    """The coordinator's gRPC cohort service: external students join it, ``rdml-dist status`` asks it.

    Off loopback it needs a token (``token``, or the environment variable ``token_env``) and TLS,
    or an explicit ``allow_plaintext`` for a private network.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(50151, ge=0, le=65535)  # 0: any free port (the driver prints the one taken)
    token: str | None = None
    token_env: str = "RDML_RPC_TOKEN"
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    allow_plaintext: bool = False
    max_message_mb: int = Field(256, ge=4, le=2047)
    join_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _certificate_with_key(self) -> "RpcConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both for TLS, or neither")
        return self


class ExperimentConfig(_Strict):
    """A whole experiment: data, cohort, training, mimicry, runtime and monitoring."""

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    students: list[StudentConfig] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    mimicry: MimicryConfig = Field(default_factory=MimicryConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    rpc: RpcConfig = Field(default_factory=RpcConfig)

    @model_validator(mode="after")
    def _student_names_unique(self) -> "ExperimentConfig":
        names = self.student_names()
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"student names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _external_students_need_the_service(self) -> "ExperimentConfig":
        if self.external_students() and (not self.rpc.enabled or self.rpc.port == 0):
            raise ValueError(
                "external students need the cohort service at a fixed address: set rpc.enabled: true and a "
                "non-zero rpc.port"
            )
        return self

    @model_validator(mode="after")
    def _external_students_take_no_bundle(self) -> "ExperimentConfig":
        outside = [name for name, student in zip(self.student_names(), self.students)
                   if student.external and (student.resources.cpus, student.resources.gpus) != (None, None)]
        if outside:
            raise ValueError(f"students.N.resources places Ray students only; external students ({', '.join(outside)}) "
                             "run wherever they are started")
        return self

    @model_validator(mode="after")
    def _sequential_updates_need_no_external_students(self) -> "ExperimentConfig":
        if self.mimicry.update == "sequential" and self.external_students():
            raise ValueError(
                "mimicry.update: sequential runs with Ray and local students only; external students "
                f"({', '.join(self.external_students())}) exchange simultaneously"
            )
        return self

    @model_validator(mode="after")
    def _coordinator_shards_serve_ray_students_with_rows_to_share(self) -> "ExperimentConfig":
        shards = self.runtime.coordinator.shards
        if shards > 1 and self.external_students():
            raise ValueError(
                f"runtime.coordinator.shards: {shards} splits the exchange between Ray actors; external students "
                f"({', '.join(self.external_students())}) join one coordinator: use shards: 1"
            )
        if shards > self.training.batch_size:
            raise ValueError(f"runtime.coordinator.shards: {shards} is more than training.batch_size "
                             f"({self.training.batch_size}): every shard needs rows of the batch")
        return self

    def external_students(self) -> list[str]:
        """Names of the students that run outside Ray and join over gRPC."""
        return [name for name, student in zip(self.student_names(), self.students) if student.external]

    def student_names(self) -> list[str]:
        """Explicit names, or ``<model>-<index>`` (factory references reduced to the function name)."""
        return [
            student.name or f"{re.sub(r'[^A-Za-z0-9_.-]', '_', student.model.rsplit(':', 1)[-1])}-{index}"
            for index, student in enumerate(self.students)
        ]

    def resolved_run_dir(self) -> str:
        """This run's location: an absolute local path or a URI (``runtime.run_dir`` with its placeholders filled).

        A relative path is taken from the current directory, except inside a Ray job, whose
        working directory is a temporary copy deleted with the session: there it is an error.
        """
        location = self.runtime.run_dir.replace("{storage}", self.runtime.storage).replace("{name}", self.name)
        if "://" in location:
            return location
        path = Path(location).expanduser()
        if not path.is_absolute():
            if os.environ.get(RAY_JOB_ENVIRONMENT):
                raise ConfigError(
                    "runtime.run_dir",
                    f"{location!r} is relative, and this driver runs as a Ray job whose working directory is "
                    "temporary; use an absolute path on shared storage or a URI (default runtime.storage: ~/rdml_results)",
                )
            path = Path.cwd() / path
        return str(path)


def _field_path(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location) or "config"


def _describe(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling; see the config reference in the README)"
    if error["type"] == "missing":
        return "required field is missing"
    return str(error["msg"]).removeprefix("Value error, ")


def parse_config(raw: Any) -> ExperimentConfig:
    """Validate a mapping into an :class:`ExperimentConfig` (types and ranges only, no file system)."""
    if not isinstance(raw, dict):
        raise ConfigError("config", f"must be a mapping at the top level, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        problems = [(_field_path(problem["loc"]), _describe(problem)) for problem in error.errors()]
        raise ConfigError(*problems[0], more=problems[1:]) from None


def check_resources(config: ExperimentConfig) -> None:
    """Checks that need imports or the file system: model names/factories exist, data is where it is said to be.

    Every student and the data are checked, and all their problems reported together.
    """
    errors = _model_problems([(student.model, student.options) for student in config.students])
    try:
        check_data_spec(data_spec(config), field="data")
    except ConfigError as error:
        errors.append(error)
    if errors:
        raise ConfigError.combine(errors)


def _model_problems(students: list[tuple[Any, Any]]) -> list[ConfigError]:
    """The problems of each student's model reference and options (checked without building anything)."""
    errors = []
    for index, (model, options) in enumerate(students):
        if not isinstance(model, str) or not isinstance(options, dict):
            continue  # a type problem, which validation reports
        try:
            check_model_name(model, field=f"students.{index}.model", options=options)
        except ConfigError as error:
            errors.append(error)
    return errors


def data_spec(config: ExperimentConfig) -> DataSpec:
    """The data layer's plain description of ``config.data``."""
    return DataSpec(**config.data.model_dump())


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML; list items by index) to a raw mapping."""
    for override in overrides:
        path, separator, text = override.partition("=")
        if not separator or not path:
            raise ConfigError("--set", f"{override!r} must look like key.path=value")
        value = yaml.safe_load(text)
        node: Any = raw
        parts = path.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: depth + 1]))
        _assign(node, parts[-1], value, path)
    return raw


def _child(node: Any, key: str, path: str) -> Any:
    if isinstance(node, list):
        index = _list_index(node, key, path)
        return node[index]
    if not isinstance(node, dict):
        raise ConfigError(path, "cannot descend into a non-mapping value")
    return node.setdefault(key, {})


def _assign(node: Any, key: str, value: Any, path: str) -> None:
    if isinstance(node, list):
        node[_list_index(node, key, path)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise ConfigError(path, "cannot set a field inside a non-mapping value")


def _list_index(node: list[Any], key: str, path: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(path, f"list index must be 0..{len(node) - 1}, got {key!r}")
    return int(key)


def read_raw_config(path: str | Path | None) -> dict[str, Any]:
    """The YAML mapping of ``path``, or of the packaged default experiment when ``path`` is None."""
    if path is None:
        text = resources.files("rdml_dist.configs").joinpath(DEFAULT_CONFIG_NAME).read_text()
        source = f"packaged {DEFAULT_CONFIG_NAME}"
    else:
        file = Path(path)
        if not file.is_file():
            raise ConfigError("config", f"file not found: {file}")
        text, source = file.read_text(), str(file)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("config", f"{source} is not valid YAML ({error})") from None
    return raw if raw is not None else {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override, validate and check an experiment: the one entry point used before launching."""
    raw = apply_overrides(read_raw_config(path), overrides or [])
    try:
        config = parse_config(raw)
    except ConfigError as invalid:  # report the models' problems too, all at once
        students = raw.get("students") if isinstance(raw, dict) else None
        entries = [(entry.get("model"), entry.get("options", {})) if isinstance(entry, dict) else (None, None)
                   for entry in students] if isinstance(students, list) else []
        raise ConfigError.combine([invalid, *_model_problems(entries)]) from None
    check_resources(config)
    return config
