"""The experiment schema: typed, validated fields with their defaults and descriptions, and nothing else.

A leaf: it imports pydantic and the package's errors, no model, data or torch code, so every module
that reads a config (the coordinator, the barrier, the metrics, rpc, ``rdml-dist status``) stays light.
Every field's description is the configuration reference's text. Loading a YAML file lives in
:mod:`rdml_dist.config.loading`, the checks that import models and data in :mod:`rdml_dist.config.checks`.
"""

import enum
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rdml_dist.config.defaults import RPC_CLIENT
from rdml_dist.errors import ConfigError

DEFAULT_STORAGE = "~/rdml_results"
RAY_JOB_ENVIRONMENT = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's entrypoint
STUDENT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DIVERGENCE_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?$")


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class OptimizerConfig(_Strict):
    """SGD (Nesterov by default, as in the DML/RDML papers) or Adam/AdamW."""

    name: Literal["sgd", "adam", "adamw"] = Field(
        "sgd",
        description="`sgd` (Nesterov by default, as in the DML/RDML papers), `adam` or `adamw`",
    )
    lr: float = Field(0.1, gt=0, description="learning rate at the start of the schedule")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum (SGD)")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay")


class LRScheduleConfig(_Strict):
    """Learning-rate schedule stepped once per epoch."""

    name: Literal["constant", "cosine", "multistep"] = Field(
        "cosine",
        description="`constant`, `cosine` or `multistep`, stepped once per epoch",
    )
    milestones: list[int] = Field(
        default_factory=list,
        description="`multistep`: the epochs at which the learning rate is multiplied by `gamma`",
    )
    gamma: float = Field(0.1, gt=0, le=1, description="`multistep`: the factor applied at each milestone")


class DataConfig(_Strict):
    """Which data set, where it lives, and the robustness settings (label noise, hidden labels)."""

    name: str = Field(
        "digits",
        description=(
            "a registered data source (the default, `digits`, is scikit-learn's bundled real 8×8 digits) or "
            "`package.module:function`"
        ),
    )
    root: str | None = Field(
        None,
        description="local folder of the data set (CIFAR python pickles, MNIST raw idx files, ImageFolder tree)",
    )
    download: bool = Field(
        False,
        description="download into `data.root` only when true; otherwise a missing file is an error naming the path",
    )
    val_fraction: float = Field(
        0.2, gt=0, lt=1,
        description="validation share for sets without a test split (digits, imagefolder)",
    )
    label_noise: float = Field(
        0.0, ge=0, lt=1,
        description="symmetric label noise: this fraction of training labels replaced by another class",
    )
    unlabeled_fraction: float = Field(
        0.0, ge=0, lt=1,
        description="semi-supervised: this fraction of training labels hidden (mimicry only)",
    )
    augment: bool | None = Field(
        None,
        description=(
            "crop + flip for images (unset: the data set's default, on for CIFAR), identical for every student; "
            "refused for inputs that are not images"
        ),
    )
    image_size: int | None = Field(None, gt=0, description="ImageFolder resize (unset: 32)")
    transform: str | None = Field(
        None,
        description=(
            "`package.module:function(batch, generator)` applied to every training batch, drawing from the step's"
            " generator (the same in every student): augmentation for any kind of input, e.g. token dropout"
        ),
    )
    memory_limit_mb: float = Field(
        2048.0, ge=0,
        description=(
            "an ImageFolder larger than this when decoded is streamed from disk through DataLoader workers "
            "instead of held in memory"
        ),
    )
    workers: int = Field(2, ge=0, description="DataLoader worker processes per student for streamed data")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a data factory")


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

    cpus: float | None = Field(None, gt=0, description="this student's CPUs (unset: `runtime.ray.cpus_per_student`)")
    gpus: float | None = Field(
        None, ge=0,
        description=(
            "this student's GPUs (unset: `runtime.ray.gpus_per_student`); fractions below 1, e.g. `0.25`, let "
            "small students share a GPU"
        ),
    )

    _gpus_schedulable = field_validator("gpus")(_whole_if_above_one)


class ComputeConfig(_Strict):
    """How a student's forward and backward run on its device, as GPU users train.

    ``bf16`` autocasts the forward to bfloat16 (float32's range: no scaling needed); ``fp16`` to
    float16 with a gradient scaler, whose skipped steps (an overflowing scaled gradient) are the
    scaler's business, not failures. Both run on a CPU as well. The logits a student sends and the
    gradient it receives are float32 whatever the precision (``runtime.exchange.dtype`` says what
    travels).
    """

    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="`fp32`, `bf16` (autocast) or `fp16` (autocast with a gradient scaler)",
    )
    fp16_init_scale: float = Field(65536.0, gt=0, description="the gradient scaler's first scale (`fp16` only)")
    channels_last: bool = Field(False, description="image models and their inputs in the channels-last memory format")
    compile: bool = Field(
        False,
        description="`torch.compile` the student's model (compiled once at start; the time is reported, not timed as steps)",
    )
    compile_backend: str = Field("inductor", description="the `torch.compile` backend (`inductor`, `aot_eager`, …)")


class StudentConfig(_Strict):
    """One member of the cohort: a registry model name or ``package.module:function``."""

    model: str = Field(
        description=(
            "a registered model or `package.module:function`"
        ),
    )
    name: str | None = Field(None, description="unique label (metrics, checkpoints); unset: `<model>-<index>`")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="model keyword arguments (`hidden`, `width`, `dropout`, `width_mult` …)",
    )
    optimizer: OptimizerConfig | None = Field(
        None,
        description="per-student optimizer override (unset: `training.optimizer`)",
    )
    external: bool = Field(
        False,
        description="the student runs outside Ray (`rdml-dist student`) and joins over the gRPC cohort service",
    )
    resources: StudentResources = Field(
        default_factory=StudentResources,
        description="`{cpus, gpus}`: this Ray student's own bundle (unset values: `runtime.ray`'s)",
    )
    compute: ComputeConfig | None = Field(
        None,
        description="per-student precision, memory format and compilation (unset: `training.compute`)",
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_safe_label(cls, value: str | None) -> str | None:
        if value is not None and not STUDENT_NAME_PATTERN.match(value):
            raise ValueError("must be 1-63 letters, digits, '_', '.' or '-' (it becomes a metric label)")
        return value


class AlphaScheduleConfig(_Strict):
    """α over training: constant, or cosine-annealed from ``mimicry.alpha`` to ``floor``."""

    kind: Literal["constant", "cosine"] = Field(
        "constant",
        description="`constant`, or `cosine`: anneal α from `mimicry.alpha` to `floor` over training",
    )
    floor: float = Field(0.0, ge=0, description="`cosine`: the α reached at the end of training")


class MimicryConfig(_Strict):
    """The mutual-learning term: L_k = CE + λ·τ²·1/(K−1)·Σ_{j≠k} D(q_j ‖ q_k)."""

    divergence: str = Field(
        "renyi",
        description=(
            "a registered divergence or `package.module:name` naming a "
            "`rdml_dist.divergence.Divergence` of your own (a module beside the config is found)"
        ),
    )
    alpha: float = Field(2.0, ge=0, allow_inf_nan=False, description="Rényi order α ≥ 0 (0: no mimicry, 1: KL)")
    alpha_schedule: AlphaScheduleConfig = Field(
        default_factory=AlphaScheduleConfig,
        description="α over training: constant, or `{kind: cosine, floor: 0.0}` anneals α to the floor",
    )
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="τ > 0; the mimicry term is scaled by τ²")
    weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="λ, the mimicry term's weight")
    warmup_epochs: float = Field(
        0.0, ge=0,
        description="after the burn-in, λ ramps linearly to `weight` over this many epochs",
    )
    burn_in_epochs: float = Field(0.0, ge=0, description="λ = 0 for this many epochs (fractional allowed)")
    mode: Literal["pairwise", "ensemble"] = Field(
        "pairwise",
        description=(
            "`pairwise` (average over peers) or `ensemble` (the mean of the other students' probabilities as one "
            "teacher)"
        ),
    )
    update: Literal["simultaneous", "sequential"] = Field(
        "simultaneous",
        description=(
            "`simultaneous` (every student against its peers' pre-update outputs) or `sequential` (DML's "
            "Algorithm 1)"
        ),
    )

    @field_validator("divergence")
    @classmethod
    def _name_or_reference(cls, value: str) -> str:
        """Only the form here: what a name or reference stands for is checked by importing it (config.checks)."""
        if not DIVERGENCE_PATTERN.match(value):
            raise ValueError(f"{value!r} must be a registered divergence's name or look like 'package.module:name'")
        return value

    @model_validator(mode="after")
    def _floor_below_alpha(self) -> "MimicryConfig":
        if self.alpha_schedule.kind == "cosine" and self.alpha_schedule.floor > self.alpha:
            raise ValueError(f"alpha_schedule.floor ({self.alpha_schedule.floor}) must not exceed alpha ({self.alpha})")
        return self


class TrainingConfig(_Strict):
    """Epochs, batch and optimisation shared by all students unless a student overrides its optimizer."""

    epochs: int = Field(10, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="every student sees the same batch of this size")
    drop_last: bool = Field(False, description="drop the last, smaller batch of each epoch")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig,
        description="every student's optimizer unless the student overrides it",
    )
    lr_schedule: LRScheduleConfig = Field(
        default_factory=LRScheduleConfig,
        description="learning-rate schedule, stepped once per epoch",
    )
    compute: ComputeConfig = Field(
        default_factory=ComputeConfig,
        description="every student's precision, memory format and compilation unless the student overrides it",
    )
    eval_batch_size: int = Field(512, ge=1, description="batch size of validation passes")
    last_epochs_reported: int = Field(5, ge=1, description="the papers' score: mean accuracy of the last k epochs")


class RayConfig(_Strict):
    """How the cohort is placed on a Ray cluster (ignored by the local engine)."""

    address: str | None = Field(
        None,
        description="`auto`, `HOST:PORT` or `ray://HOST:10001` (also `--address`); unset: start a local Ray",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="`PACK`, `SPREAD`, `STRICT_PACK` or `STRICT_SPREAD`",
    )
    gpus_per_student: float | None = Field(
        None, ge=0,
        description="every student's default GPUs (unset: 1 if the cluster has GPUs); fractions below 1 allowed",
    )
    cpus_per_student: float = Field(
        1.0, gt=0,
        description="every student's default CPUs; also its torch threads unless `runtime.torch_threads` is set",
    )
    placement_timeout_s: float = Field(
        60.0, gt=0,
        description="how long to wait for the placement group; then fail with a message naming what did not fit",
    )
    exchange_timeout_s: float = Field(300.0, gt=0, description="longest wait at the step barrier")
    start_timeout_s: float = Field(
        600.0, gt=0,
        description=(
            "longest wait for the cohort's actors to start (a student's data, model and `torch.compile`) and for each "
            "coordinator call while it starts; then the run ends naming the students that did not start"
        ),
    )

    _gpus_schedulable = field_validator("gpus_per_student")(_whole_if_above_one)


class CoordinatorConfig(_Strict):
    """The coordinator's own bundle in the cohort's placement group."""

    cpus: float = Field(1.0, gt=0, description="CPUs of the coordinator's own bundle in the cohort's placement group")
    gpus: float = Field(
        0.0, ge=0, le=1,
        description="GPUs of the coordinator's own bundle (with one, the batched computation runs there)",
    )
    on_head_node: bool = Field(False, description="pin the coordinator to the Ray head node (a stable metrics address)")
    inline_below_elements: int = Field(
        1 << 19, ge=0,
        description=(
            "a step whose logits hold fewer elements than this (students × rows × classes) is computed on the "
            "event loop itself, which saves two thread hops per step; a larger one on a worker thread, so that "
            "status calls are answered while it runs (0: always on the thread)"
        ),
    )
    shards: int = Field(
        1, ge=1,
        description=(
            "Ray: coordinator actors that split every step's batch rows, each with its own bundle of "
            "`cpus`/`gpus`"
        ),
    )


class CheckpointConfig(_Strict):
    """Cohort checkpoints: at every epoch end, and every ``every_steps`` steps when set; the last ``keep`` are kept."""

    every_steps: int | None = Field(
        None, ge=1,
        description="a cohort checkpoint every this many steps, besides every epoch end",
    )
    keep: int = Field(2, ge=1, description="complete cohort checkpoints kept")


class OnStudentFailure(str, enum.Enum):
    """``runtime.fault.on_student_failure``: what a failure costs. Decided on in one place, the failure policy."""

    RESTART_COHORT = "restart_cohort"
    CONTINUE = "continue"
    FAIL = "fail"


FAILURE_POLICY_MEANINGS = {
    OnStudentFailure.RESTART_COHORT: "roll back to the latest checkpoint",
    OnStudentFailure.CONTINUE: "the live students go on",
    OnStudentFailure.FAIL: "the run stops",
}


class FaultConfig(_Strict):
    """What a failure costs: a cohort rollback (default), the live students carrying on, or the run."""

    on_student_failure: OnStudentFailure = Field(
        OnStudentFailure.RESTART_COHORT,
        description=", ".join(f"`{policy.value}` ({meaning})" for policy, meaning in FAILURE_POLICY_MEANINGS.items()),
    )
    max_failures: int = Field(3, ge=0, description="failures survived before the run stops, listing every cause")
    nan_lr_backoff: float = Field(
        1.0, gt=0, le=1,
        description="learning-rate factor for a student restored after a non-finite loss",
    )


class LeaseConfig(_Strict):
    """The driver's lease on its run directory: one writer per run.

    A plain ``rdml-dist train`` that finds its run's lease live trains a numbered sibling instead;
    a retried job (``--if-running wait``, the default inside a Ray job) waits up to ``wait_s`` for
    the earlier driver to finish or its lease to lapse, then continues the run.
    """

    ttl_s: float = Field(
        30.0, ge=2.0, le=3600.0,
        description="the lease lapses this long after its holder's last renewal (renewed every third of it)",
    )
    wait_s: float = Field(
        300.0, ge=0.0,
        description="how long a driver told to wait (`--if-running wait`, `--resume`) waits for a live lease",
    )


class ExchangeConfig(_Strict):
    """How a Ray student's step reaches the coordinator, and what its frames carry.

    ``transport``: ``tcp`` is the frame lane (one persistent socket per student into the same
    barrier); ``actor_calls`` one Ray actor call per step. ``dtype``: ``float16``/``bfloat16``
    halve the logits and gradients on the wire. The coordinator always computes in float32;
    float16 logits beyond ±65504 become inf and are refused as non-finite, so bfloat16 (float32's
    range, 3 significant digits) is the safer half.
    """

    transport: Literal["tcp", "actor_calls"] = Field(
        "tcp",
        description="how a Ray student's step reaches the coordinator: `tcp` (the frame lane) or `actor_calls`",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description=(
            "what a step's logits and gradients travel as: `float16` or `bfloat16` halve the bytes; the "
            "coordinator still computes in float32 (float16 logits beyond ±65504 are refused as non-finite, so "
            "prefer `bfloat16`)"
        ),
    )
    allow_plaintext: bool = Field(
        False,
        description=(
            "let the frame lane listen on the coordinator's node address, for Ray students on other nodes: no secret "
            "crosses it, but the logits and gradients travel in clear and frames after the handshake carry no MAC; "
            "only on a network you trust. Unset, the lane listens on loopback and students on other nodes exchange "
            "through Ray's actor calls (under Ray's own token and TLS)"
        ),
    )


class RuntimeConfig(_Strict):
    """Where it runs, where results go, and how failures are survived."""

    engine: Literal["local", "ray"] = Field(
        "ray",
        description="`ray` or `local` (all students in one process; same math)",
    )
    storage: str = Field(
        DEFAULT_STORAGE,
        description=(
            "where runs live: a local path, a shared file system, or an fsspec URI (`s3://…`, `gs://…`, with "
            "`s3fs`/`gcsfs` installed)"
        ),
    )
    run_dir: str = Field(
        "{storage}/{name}",
        description=(
            "this run's directory; a relative path is taken from the current directory, and refused inside a Ray "
            "job (its working directory is temporary)"
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="`auto` (the actor's GPU when it has one), `cpu` or `cuda`",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch threads per student process (unset: its CPUs)")
    ray: RayConfig = Field(
        default_factory=RayConfig,
        description="how the cohort is placed on a Ray cluster (ignored by the local engine)",
    )
    coordinator: CoordinatorConfig = Field(
        default_factory=CoordinatorConfig,
        description="the coordinator's bundle and shards",
    )
    exchange: ExchangeConfig = Field(
        default_factory=ExchangeConfig,
        description="the per-step transport and its wire dtype",
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig,
        description="when cohort checkpoints are written and how many are kept",
    )
    fault: FaultConfig = Field(default_factory=FaultConfig, description="what a failure costs")
    lease: LeaseConfig = Field(default_factory=LeaseConfig, description="the driver's lease on its run directory")


class MonitoringConfig(_Strict):
    """Where the coordinator serves its Prometheus metrics (``/metrics``)."""

    enabled: bool = Field(True, description="serve Prometheus metrics from the coordinator")
    host: str = Field("127.0.0.1", description="where `/metrics` is served")
    port: int = Field(
        9464, ge=0, le=65535,
        description="the metrics port (0: any free port; the driver prints the address)",
    )
    file_sd: str | None = Field(
        None,
        description="a Prometheus `file_sd_configs` JSON file the driver keeps pointing at the coordinator",
    )


class RpcConfig(_Strict):
    """The coordinator's gRPC cohort service: external students join it, ``rdml-dist status`` asks it.

    Off loopback it needs a token (``token``, or the environment variable ``token_env``) and TLS,
    or an explicit ``allow_plaintext`` for a private network.
    """

    enabled: bool = Field(
        True,
        description="serve the gRPC cohort service from the coordinator (external students, `rdml-dist status`)",
    )
    host: str = Field("127.0.0.1", description="where the cohort service listens")
    port: int = Field(
        50151, ge=0, le=65535,
        description="the cohort service's port (0: any free port; external students need a fixed one)",
    )
    token: str | None = Field(None, description="the bearer token every call must carry")
    token_env: str = Field(
        RPC_CLIENT.token_env,
        description="the environment variable read for the token when `token` is unset",
    )
    tls_cert_file: str | None = Field(None, description="serve TLS with this certificate (PEM; with `tls_key_file`)")
    tls_key_file: str | None = Field(None, description="the TLS certificate's private key (PEM; with `tls_cert_file`)")
    allow_plaintext: bool = Field(
        False,
        description="allow a non-loopback bind with a token but without TLS (private networks)",
    )
    max_message_mb: int = Field(
        RPC_CLIENT.max_message_mb, ge=4, le=2047,
        description="send/receive limit per message (1024×21,841 float32 logits are 85 MiB)",
    )
    join_timeout_s: float = Field(300.0, gt=0, description="how long the driver waits for external students to join")

    @model_validator(mode="after")
    def _certificate_with_key(self) -> "RpcConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both for TLS, or neither")
        return self


class ExperimentConfig(_Strict):
    """A whole experiment: data, cohort, training, mimicry, runtime and monitoring."""

    name: str = Field("experiment", description="run name, used in `runtime.run_dir`")
    seed: int = Field(0, description="drives the split, the batch plan, augmentation and each student's initialisation")
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="which data set, where it lives, and its robustness settings",
    )
    students: list[StudentConfig] = Field(min_length=1, description="the cohort: one entry per student")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="epochs, batches and optimisation")
    mimicry: MimicryConfig = Field(default_factory=MimicryConfig, description="the mutual-learning term")
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig,
        description="where it runs, where results go, and how failures are survived",
    )
    monitoring: MonitoringConfig = Field(
        default_factory=MonitoringConfig,
        description="the coordinator's Prometheus endpoint",
    )
    rpc: RpcConfig = Field(default_factory=RpcConfig, description="the coordinator's gRPC cohort service")

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

    def without_credentials(self) -> dict[str, Any]:
        """The config as plain data, less ``rpc.token``: what is written to a file (a run's ``config.yaml``, a sweep's
        ``best.yaml``), where a credential never goes (a run reads it again from ``rpc.token_env`` or its config)."""
        saved = self.model_dump(mode="json")
        saved["rpc"]["token"] = None
        return saved

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
