"""The Ray engine's driver: connect to a cluster, gang-schedule the cohort, run epochs, write the run directory.

Images never pass through here: each student actor loads its own data; the driver only starts
epochs, shows progress, and collects step records, scores and checkpoints.
"""

import time
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from rdml_dist.config import ExperimentConfig
from rdml_dist.engines.progress import describe_epoch
from rdml_dist.engines.ray_actors import CoordinatorActor, StudentActor
from rdml_dist.engines.ray_cluster import connect
from rdml_dist.errors import ClusterError
from rdml_dist.run_directory import RunDirectory

POLL_SECONDS = 0.25


class CohortDoesNotFit(ClusterError):
    """The cluster cannot hold the cohort's placement group within the timeout."""


def student_resources(config: ExperimentConfig) -> dict[str, float]:
    """One bundle per student: a whole GPU each when the cluster has GPUs (unless configured), CPUs as set."""
    settings = config.runtime.ray
    gpus = settings.gpus_per_student
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and config.runtime.device != "cpu" else 0.0
    bundle = {"CPU": settings.cpus_per_student}
    if gpus > 0:
        bundle["GPU"] = gpus
    return bundle


def reserve_cohort(config: ExperimentConfig, bundle: dict[str, float]) -> PlacementGroup:
    """Gang-schedule the whole cohort: the placement group is ready whole, or we fail with a clear message."""
    settings = config.runtime.ray
    group = placement_group([dict(bundle) for _ in config.students], strategy=settings.placement_strategy)
    ready, _ = ray.wait([group.ready()], timeout=settings.placement_timeout_s)
    if not ready:
        remove_placement_group(group)
        raise CohortDoesNotFit(
            f"the cluster cannot hold the cohort: {len(config.students)} students × {bundle} with strategy "
            f"{settings.placement_strategy} did not fit within {settings.placement_timeout_s:.0f} s "
            f"(cluster total: {ray.cluster_resources()}, available: {ray.available_resources()}); "
            "add nodes, lower runtime.ray.cpus_per_student/gpus_per_student, or relax runtime.ray.placement_strategy"
        )
    return group


class RayCohort:
    """The live actors of one run: a coordinator and one student actor per placement-group bundle."""

    def __init__(self, config: ExperimentConfig, group: PlacementGroup, bundle: dict[str, float]) -> None:
        self.config = config
        self.group = group
        payload = config.model_dump(mode="json")
        self.coordinator = CoordinatorActor.remote(payload)
        threads = config.runtime.torch_threads or max(1, int(bundle["CPU"]))
        self.students = [
            StudentActor.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            ).remote(payload, index, threads)
            for index in range(len(config.students))
        ]
        self.names = config.student_names()
        try:
            infos = ray.get([student.info.remote() for student in self.students])
            ray.get([self.coordinator.register.remote(info) for info in infos])
        except BaseException:
            self.shutdown()  # a student that cannot start must not leave the cohort's actors and reservation behind
            raise
        self.steps_per_epoch = infos[0].steps_per_epoch

    def placements(self) -> dict[str, dict[str, Any]]:
        """Where each student runs (node id, GPU ids, device)."""
        return dict(zip(self.names, ray.get([student.placement.remote() for student in self.students])))

    def run_epoch(self, epoch: int, bar: tqdm) -> None:
        """Start the epoch on every student and wait, advancing the progress bar from the coordinator's step."""
        pending = [student.run_epoch.remote(epoch, self.coordinator) for student in self.students]
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_SECONDS)
            for reference in done:
                ray.get(reference)  # re-raises a student's failure with its traceback
            step = ray.get(self.coordinator.state.remote())["step"]
            bar.update(max(step - bar.n, 0))

    def shutdown(self) -> None:
        for actor in [*self.students, self.coordinator]:
            ray.kill(actor)
        remove_placement_group(self.group)


def train_ray(config: ExperimentConfig, run_dir: Path, show_progress: bool = True) -> RunDirectory:
    """Train the cohort as Ray actors; returns the finished run directory."""
    connection = connect(config.runtime.ray.address, len(config.students) * config.runtime.ray.cpus_per_student)
    print(f"rdml-dist: {connection.description}", flush=True)
    try:
        bundle = student_resources(config)
        cohort = RayCohort(config, reserve_cohort(config, bundle), bundle)
        try:
            return _train(config, cohort, run_dir, show_progress)
        finally:
            cohort.shutdown()
    finally:
        if connection.started:
            ray.shutdown()


def _train(config: ExperimentConfig, cohort: RayCohort, run_dir: Path, show_progress: bool) -> RunDirectory:
    run = RunDirectory(run_dir, config, engine="ray")
    run.write_placements(cohort.placements())
    total = config.training.epochs * cohort.steps_per_epoch
    with tqdm(total=total, disable=not show_progress, unit="step") as bar:
        for epoch in range(config.training.epochs):
            started = time.perf_counter()
            cohort.run_epoch(epoch, bar)
            evaluation = ray.get(cohort.coordinator.evaluation.remote(epoch, config.runtime.ray.exchange_timeout_s))
            records = ray.get(cohort.coordinator.pop_records.remote((epoch + 1) * cohort.steps_per_epoch))
            entry = run.record_epoch(epoch, records, evaluation, time.perf_counter() - started)
            states = ray.get([student.state_dict.remote() for student in cohort.students])
            for name, state in zip(cohort.names, states):
                run.save_checkpoint(name, state)
            bar.set_postfix_str(describe_epoch(entry))
    return run
