"""Prometheus metrics of a cohort, kept by the coordinator, which sees every student's every step.

One scrape target covers the whole cohort. Names follow Prometheus conventions: the ``rdml_``
prefix, base units (``_seconds``), ``_total`` counters, and bounded labels only (``run``,
``student``, ``model``, ``reason``; never a step number). Losses are exported twice: a gauge
with the last step's value, and a summary of every step's value, whose ``rate(_sum) /
rate(_count)`` is the exact mean over any window (the smoothed curve).

Each scrape is taken under the coordinator's lock, so the values of one scrape all belong to
the same completed step.
"""

import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import HTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, start_http_server
from prometheus_client.metrics_core import Metric

from rdml_dist.config import ExperimentConfig
from rdml_dist.errors import ClusterError
from rdml_dist.logs import logger
from rdml_dist.messages import REJECTION_REASONS, EpochEvaluation, StepRecord, StepMeasures
from rdml_dist.run_records.storage import atomic_write

# Per-step times on CPUs and GPUs range from sub-millisecond exchanges to multi-second steps.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# each value a student measures (a field of rdml_dist.messages.StepMeasures): its per-student histogram and buckets
MEASURE_METRICS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "compute_seconds": ("rdml_student_compute_seconds", "Forward and backward time of a step", SECONDS_BUCKETS),
    "round_trip_seconds": ("rdml_student_exchange_round_trip_seconds", "Exchange round trip of a step, as the student measured it",
                           SECONDS_BUCKETS),
}
STUDENT_LABELS = ("run", "student", "model")


class LockedRegistry(CollectorRegistry):
    """A registry whose every collection runs under ``lock``: a scrape never mixes two steps."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__(auto_describe=True)
        self._scrape_lock = lock

    def collect(self) -> Iterator[Metric]:
        with self._scrape_lock:
            metrics = list(super().collect())
        yield from metrics


class CohortMetrics:
    """Every metric of one run, updated from the coordinator's records, scores and membership changes."""

    @classmethod
    def for_config(cls, config: ExperimentConfig, registry: CollectorRegistry) -> "CohortMetrics":
        """The metrics of ``config``'s run, labelled with its name and each student's model."""
        models = {name: student.model for name, student in zip(config.student_names(), config.students)}
        return cls(config.name, models, registry)

    def __init__(self, run: str, models: dict[str, str], registry: CollectorRegistry) -> None:
        self.run = run
        self.models = models
        self.registry = registry
        self._epoch_counts: dict[str, tuple[int, int, int]] = {}  # student -> (epoch, correct, labelled)
        self._children: dict[tuple[int, str], Any] = {}

        def per_student(kind: type, name: str, documentation: str, **options: Any) -> Any:
            return kind(name, documentation, STUDENT_LABELS, registry=registry, **options)

        def per_cohort(kind: type, name: str, documentation: str, labels: Iterable[str] = (), **options: Any) -> Any:
            return kind(name, documentation, ("run", *labels), registry=registry, **options)

        self.ce_loss = per_student(Gauge, "rdml_student_cross_entropy_loss", "Cross-entropy loss of the last step")
        self.mimicry_loss = per_student(Gauge, "rdml_student_mimicry_loss", "Mimicry loss (lambda * tau^2 * divergence) of the last step")
        self.divergence = per_student(Gauge, "rdml_student_divergence", "Mean divergence to the peers at the last step")
        self.ce_steps = per_student(Summary, "rdml_student_step_cross_entropy_loss", "Cross-entropy loss of every step")
        self.mimicry_steps = per_student(Summary, "rdml_student_step_mimicry_loss", "Mimicry loss of every step")
        self.divergence_steps = per_student(Summary, "rdml_student_step_divergence", "Divergence to the peers of every step")
        self.train_accuracy = per_student(Gauge, "rdml_student_train_accuracy", "Training accuracy over the current epoch so far")
        self.val_accuracy = per_student(Gauge, "rdml_student_val_accuracy", "Validation accuracy of the last evaluated epoch")
        self.steps = per_student(Counter, "rdml_student_steps", "Training steps completed")
        self.samples = per_student(Counter, "rdml_student_samples", "Training samples processed")
        self.samples_per_second = per_student(Gauge, "rdml_student_samples_per_second", "Samples of the last step over the time since the one before")
        self.measured = {measure: per_student(Histogram, name, documentation, buckets=buckets)
                         for measure, (name, documentation, buckets) in MEASURE_METRICS.items()}
        self.wait = per_student(Histogram, "rdml_student_straggler_wait_seconds", "Time a student's frame waited for the slowest peer", buckets=SECONDS_BUCKETS)
        self.live = per_student(Gauge, "rdml_student_live", "1 while the student takes part in the steps, 0 while it is dead or restarting")
        self.restarts = per_student(Counter, "rdml_student_restarts", "Times the student's process died and was restarted")
        self.rejected = per_cohort(Counter, "rdml_rejected_frames", "Frames the coordinator refused", ("student", "reason"))
        self.ensemble_accuracy = per_cohort(Gauge, "rdml_cohort_ensemble_val_accuracy", "Validation accuracy of the cohort ensemble")
        self.live_students = per_cohort(Gauge, "rdml_cohort_live_students", "Students taking part in the steps")
        self.alpha = per_cohort(Gauge, "rdml_cohort_alpha", "Current Renyi order alpha")
        self.weight = per_cohort(Gauge, "rdml_cohort_mimicry_weight", "Current mimicry weight lambda")
        self.epoch = per_cohort(Gauge, "rdml_cohort_epoch", "Epoch in progress (0-based)")
        self.step = per_cohort(Gauge, "rdml_cohort_step", "Steps completed by the cohort (the next step's index)")
        self.coordinator_seconds = per_cohort(Histogram, "rdml_coordinator_computation_seconds", "Batched mimicry computation of a step", buckets=SECONDS_BUCKETS)
        for student in models:  # every series exists from the start, so rates and sums work before the first event
            self.live.labels(*self._labels(student)).set(0)
            self.restarts.labels(*self._labels(student))
            for reason in REJECTION_REASONS:
                self.rejected.labels(run, student, reason)

    def _labels(self, student: str) -> tuple[str, str, str]:
        return (self.run, student, self.models.get(student, "unknown"))

    def _bound(self, metric: Any, student: str) -> Any:
        """``metric`` for ``student``'s labels, looked up once (label lookups dominate the per-step cost)."""
        key = (id(metric), student)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*self._labels(student))
        return child

    def step_computed(
        self, step: int, epoch: int, records: dict[str, StepRecord], batch: int, samples_per_second: dict[str, float]
    ) -> None:
        """The cohort finished ``step``: per-student losses, throughput (as the core measured it) and waits; cohort position."""
        for name, record in records.items():
            self._bound(self.ce_loss, name).set(record.ce_loss)
            self._bound(self.mimicry_loss, name).set(record.mimicry_loss)
            self._bound(self.divergence, name).set(record.divergence)
            self._bound(self.ce_steps, name).observe(record.ce_loss)
            self._bound(self.mimicry_steps, name).observe(record.mimicry_loss)
            self._bound(self.divergence_steps, name).observe(record.divergence)
            self._bound(self.steps, name).inc()
            self._bound(self.samples, name).inc(batch)
            self._bound(self.wait, name).observe(record.wait_seconds)
            if name in samples_per_second:
                self._bound(self.samples_per_second, name).set(samples_per_second[name])
            counted_epoch, correct, labelled = self._epoch_counts.get(name, (epoch, 0, 0))
            if counted_epoch != epoch:
                correct, labelled = 0, 0
            correct, labelled = correct + record.correct, labelled + record.labelled
            self._epoch_counts[name] = (epoch, correct, labelled)
            if labelled:
                self._bound(self.train_accuracy, name).set(correct / labelled)
        if records:
            record = next(iter(records.values()))
            self.alpha.labels(self.run).set(record.alpha)
            self.weight.labels(self.run).set(record.weight)
            self.coordinator_seconds.labels(self.run).observe(record.coordinator_seconds)
        self.epoch.labels(self.run).set(epoch)
        self.step.labels(self.run).set(step + 1)

    def measures_reported(self, student: str, measures: StepMeasures) -> None:
        """A student's own measures of a step (its compute, its exchange round trip, …), each into its histogram."""
        for measure, value in measures.values().items():
            self._bound(self.measured[measure], student).observe(value)

    def frame_rejected(self, student: str, reason: str) -> None:
        known = student if student in self.models else "unknown"  # a stranger's name must not become a label
        self.rejected.labels(self.run, known, reason).inc()

    def epoch_scored(self, evaluation: EpochEvaluation) -> None:
        for name, accuracy in evaluation.accuracy.items():
            self.val_accuracy.labels(*self._labels(name)).set(accuracy)
        self.ensemble_accuracy.labels(self.run).set(evaluation.ensemble_accuracy)

    def membership(self, live: Iterable[str]) -> None:
        """Which students take part now (after a registration, a death, a revival or a restore)."""
        live = set(live)
        for name in self.models:
            self.live.labels(*self._labels(name)).set(1 if name in live else 0)
        self.live_students.labels(self.run).set(len(live))

    def restarted(self, student: str) -> None:
        self.restarts.labels(*self._labels(student)).inc()
        self.live.labels(*self._labels(student)).set(0)

    def rolled_back(self, step: int, epoch: int) -> None:
        self.step.labels(self.run).set(step)
        self.epoch.labels(self.run).set(epoch)
        self._epoch_counts.clear()


def serve(registry: CollectorRegistry, host: str, port: int) -> HTTPServer:
    """Serve ``/metrics`` over HTTP on ``host:port`` from a daemon thread; when that port is taken (another run on
    the node), on any free port instead: nobody has to agree on it, the driver prints it and file_sd lists it."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        if error.errno != errno.EADDRINUSE or port == 0:
            raise ClusterError(
                f"monitoring: cannot serve metrics on {host}:{port} ({error.strerror or error}); choose another "
                "monitoring.host or set monitoring.enabled: false"
            ) from None
        return serve(registry, host, 0)
    return server


class FileSdEntry:
    """This run's target in a Prometheus ``file_sd_configs`` file that several runs (or a sweep's trials) share.

    Each run keeps its own entry (``{"targets": [address], "labels": {"run": run}}``) current: it
    replaces its previous address after the coordinator restarts and removes it when the run ends,
    leaving the other runs' entries alone. Writers take an exclusive lock on the file's directory around each
    read-modify-write, and the file itself is replaced atomically, so Prometheus never reads a part.
    """

    def __init__(self, path: str, run: str) -> None:
        self.path = Path(path).expanduser()
        self.run = run
        self.address: str | None = None

    def point_at(self, address: str) -> None:
        """List this run at ``address`` (dropping its previous address, and any stale entry of that address)."""
        stale = {address, self.address}
        self._update(lambda entries: [entry for entry in entries if not stale & set(entry["targets"])]
                     + [{"targets": [address], "labels": {"run": self.run}}])
        self.address = address

    def remove(self) -> None:
        """The run ended: its target goes."""
        if self.address is not None:
            mine = self.address
            self._update(lambda entries: [entry for entry in entries if mine not in entry["targets"]])
            self.address = None

    def _update(self, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        directory = os.open(self.path.parent, os.O_RDONLY)  # the lock: the file itself is replaced, and no lock file stays
        try:
            fcntl.flock(directory, fcntl.LOCK_EX)
            entries = self._entries()
            document = json.dumps(change(entries), indent=2).encode()
            atomic_write(self.path, lambda handle: handle.write(document))
        finally:
            os.close(directory)  # closing the descriptor releases the lock

    def _entries(self) -> list[dict[str, Any]]:
        """The listed targets (under the lock); a file that is not a target list is moved aside whole, not lost."""
        if not self.path.exists() or not self.path.stat().st_size:
            return []
        text = self.path.read_bytes()
        try:
            entries = json.loads(text)
            if isinstance(entries, list) and all(
                isinstance(entry, dict) and isinstance(entry.get("targets"), list)
                and all(isinstance(target, str) for target in entry["targets"]) for entry in entries
            ):
                return entries
            problem = "not a list of target groups"
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            problem = f"not JSON: {error}"
        aside = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns()}")
        os.replace(self.path, aside)
        logger.warning(f"monitoring.file_sd: {self.path} was {problem}; it is kept as {aside} and a new one is written")
        return []


def reachable_address(host: str, port: int, node_address: str) -> str:
    """``host:port`` where clients reach a server bound to ``host`` (a wildcard bind is reached at the node's address).

    Serves the metrics endpoint and the gRPC cohort service alike.
    """
    reachable = node_address if host in ("0.0.0.0", "::", "") else host
    return f"{reachable}:{port}"


def metrics_address(host: str, server: HTTPServer, node_address: str) -> str:
    """``host:port`` where Prometheus reaches the metrics server."""
    return reachable_address(host, server.server_address[1], node_address)
