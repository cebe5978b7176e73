from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_DTYPE_UNSPECIFIED: _ClassVar[TensorDtype]
    TENSOR_DTYPE_FLOAT32: _ClassVar[TensorDtype]
    TENSOR_DTYPE_FLOAT16: _ClassVar[TensorDtype]
    TENSOR_DTYPE_BFLOAT16: _ClassVar[TensorDtype]
    TENSOR_DTYPE_FLOAT64: _ClassVar[TensorDtype]
    TENSOR_DTYPE_INT64: _ClassVar[TensorDtype]

class CohortPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COHORT_PHASE_UNSPECIFIED: _ClassVar[CohortPhase]
    COHORT_PHASE_FORMING: _ClassVar[CohortPhase]
    COHORT_PHASE_TRAINING: _ClassVar[CohortPhase]
    COHORT_PHASE_HALTED: _ClassVar[CohortPhase]
TENSOR_DTYPE_UNSPECIFIED: TensorDtype
TENSOR_DTYPE_FLOAT32: TensorDtype
TENSOR_DTYPE_FLOAT16: TensorDtype
TENSOR_DTYPE_BFLOAT16: TensorDtype
TENSOR_DTYPE_FLOAT64: TensorDtype
TENSOR_DTYPE_INT64: TensorDtype
COHORT_PHASE_UNSPECIFIED: CohortPhase
COHORT_PHASE_FORMING: CohortPhase
COHORT_PHASE_TRAINING: CohortPhase
COHORT_PHASE_HALTED: CohortPhase

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: TensorDtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[TensorDtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StepMeasures(_message.Message):
    __slots__ = ("step", "compute_seconds", "round_trip_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TRIP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    compute_seconds: float
    round_trip_seconds: float
    def __init__(self, step: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., round_trip_seconds: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("student", "num_train", "num_val", "num_classes", "steps_per_epoch", "data_fingerprint", "session_id")
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_FIELD_NUMBER: _ClassVar[int]
    NUM_VAL_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    student: str
    num_train: int
    num_val: int
    num_classes: int
    steps_per_epoch: int
    data_fingerprint: str
    session_id: str
    def __init__(self, student: _Optional[str] = ..., num_train: _Optional[int] = ..., num_val: _Optional[int] = ..., num_classes: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ..., data_fingerprint: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("cohort", "student", "session_id", "step", "epoch", "steps_per_epoch", "epochs", "data_fingerprint", "members")
    COHORT_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    cohort: str
    student: str
    session_id: str
    step: int
    epoch: int
    steps_per_epoch: int
    epochs: int
    data_fingerprint: str
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cohort: _Optional[str] = ..., student: _Optional[str] = ..., session_id: _Optional[str] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., data_fingerprint: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class ExchangeRequest(_message.Message):
    __slots__ = ("student", "session_id", "step", "batch_hash", "logits", "ce_loss", "correct", "labelled", "previous", "correct_clean")
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BATCH_HASH_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    CE_LOSS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CORRECT_CLEAN_FIELD_NUMBER: _ClassVar[int]
    student: str
    session_id: str
    step: int
    batch_hash: str
    logits: Tensor
    ce_loss: float
    correct: int
    labelled: int
    previous: StepMeasures
    correct_clean: int
    def __init__(self, student: _Optional[str] = ..., session_id: _Optional[str] = ..., step: _Optional[int] = ..., batch_hash: _Optional[str] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., ce_loss: _Optional[float] = ..., correct: _Optional[int] = ..., labelled: _Optional[int] = ..., previous: _Optional[_Union[StepMeasures, _Mapping]] = ..., correct_clean: _Optional[int] = ...) -> None: ...

class ExchangeResponse(_message.Message):
    __slots__ = ("step", "grad", "mimicry_loss", "alpha", "weight", "live_students")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    MIMICRY_LOSS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LIVE_STUDENTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    grad: Tensor
    mimicry_loss: float
    alpha: float
    weight: float
    live_students: int
    def __init__(self, step: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., mimicry_loss: _Optional[float] = ..., alpha: _Optional[float] = ..., weight: _Optional[float] = ..., live_students: _Optional[int] = ...) -> None: ...

class SubmitEvaluationRequest(_message.Message):
    __slots__ = ("student", "session_id", "epoch", "logits", "labels", "previous")
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    student: str
    session_id: str
    epoch: int
    logits: Tensor
    labels: Tensor
    previous: StepMeasures
    def __init__(self, student: _Optional[str] = ..., session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., previous: _Optional[_Union[StepMeasures, _Mapping]] = ...) -> None: ...

class SubmitEvaluationResponse(_message.Message):
    __slots__ = ("scored",)
    SCORED_FIELD_NUMBER: _ClassVar[int]
    scored: bool
    def __init__(self, scored: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("student", "session_id", "reason")
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    student: str
    session_id: str
    reason: str
    def __init__(self, student: _Optional[str] = ..., session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("live",)
    LIVE_FIELD_NUMBER: _ClassVar[int]
    live: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, live: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: CohortStatus
    def __init__(self, status: _Optional[_Union[CohortStatus, _Mapping]] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ("interval_seconds",)
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    interval_seconds: float
    def __init__(self, interval_seconds: _Optional[float] = ...) -> None: ...

class WatchStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: CohortStatus
    def __init__(self, status: _Optional[_Union[CohortStatus, _Mapping]] = ...) -> None: ...

class CohortStatus(_message.Message):
    __slots__ = ("cohort", "phase", "step", "epoch", "total_steps", "alpha", "weight", "students", "waiting_for", "last_evaluation", "driver_state")
    COHORT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STUDENTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    LAST_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    DRIVER_STATE_FIELD_NUMBER: _ClassVar[int]
    cohort: str
    phase: CohortPhase
    step: int
    epoch: int
    total_steps: int
    alpha: float
    weight: float
    students: _containers.RepeatedCompositeFieldContainer[StudentStatus]
    waiting_for: _containers.RepeatedScalarFieldContainer[str]
    last_evaluation: EpochEvaluation
    driver_state: str
    def __init__(self, cohort: _Optional[str] = ..., phase: _Optional[_Union[CohortPhase, str]] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., total_steps: _Optional[int] = ..., alpha: _Optional[float] = ..., weight: _Optional[float] = ..., students: _Optional[_Iterable[_Union[StudentStatus, _Mapping]]] = ..., waiting_for: _Optional[_Iterable[str]] = ..., last_evaluation: _Optional[_Union[EpochEvaluation, _Mapping]] = ..., driver_state: _Optional[str] = ...) -> None: ...

class StudentStatus(_message.Message):
    __slots__ = ("name", "model", "external", "live", "last_step", "ce_loss", "mimicry_loss", "samples_per_second")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    CE_LOSS_FIELD_NUMBER: _ClassVar[int]
    MIMICRY_LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    external: bool
    live: bool
    last_step: int
    ce_loss: float
    mimicry_loss: float
    samples_per_second: float
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., external: _Optional[bool] = ..., live: _Optional[bool] = ..., last_step: _Optional[int] = ..., ce_loss: _Optional[float] = ..., mimicry_loss: _Optional[float] = ..., samples_per_second: _Optional[float] = ...) -> None: ...

class EpochEvaluation(_message.Message):
    __slots__ = ("epoch", "accuracy", "ensemble_accuracy")
    class AccuracyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    accuracy: _containers.ScalarMap[str, float]
    ensemble_accuracy: float
    def __init__(self, epoch: _Optional[int] = ..., accuracy: _Optional[_Mapping[str, float]] = ..., ensemble_accuracy: _Optional[float] = ...) -> None: ...
