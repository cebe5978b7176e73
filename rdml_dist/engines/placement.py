"""Sizing and reserving the cohort's placement group: one bundle per coordinator shard, then one per Ray student.

The whole cohort is gang-scheduled, so it starts whole or not at all. A Ray Tune trial hands the
cohort a group it reserved itself (:class:`GivenPlacement`); the cohort never removes that one.
"""

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rdml_dist.config import ExperimentConfig, StudentConfig
from rdml_dist.errors import ClusterError

HEAD_NODE_RESOURCE = "node:__internal_head__"


class CohortDoesNotFit(ClusterError):
    """The cluster cannot hold the cohort's placement group within the timeout."""


@dataclass(frozen=True)
class GivenPlacement:
    """A placement group reserved by someone else (a Ray Tune trial), in which the cohort's bundles start at
    ``first_bundle``: coordinator shards first, then one bundle per Ray student. The cohort uses it as it
    is and never removes it; its owner does."""

    group: PlacementGroup
    first_bundle: int


def cohort_bundles(config: ExperimentConfig, bundles: dict[str, dict[str, float]]) -> list[dict[str, float]]:
    """The cohort's bundles in placement order: one per coordinator shard, then one per Ray student."""
    shards = config.runtime.coordinator.shards
    return [*(coordinator_resources(config) for _ in range(shards)), *(dict(bundle) for bundle in bundles.values())]


def student_cpus(config: ExperimentConfig, student: StudentConfig) -> float:
    """A Ray student's CPUs: its own ``resources.cpus``, else ``runtime.ray.cpus_per_student``."""
    return config.runtime.ray.cpus_per_student if student.resources.cpus is None else student.resources.cpus


def student_resources(config: ExperimentConfig) -> dict[str, dict[str, float]]:
    """Each Ray student's bundle: its own ``resources`` where set, else ``runtime.ray``'s defaults.

    By default a student gets a whole GPU when the cluster has GPUs; fractions let small students
    share one while a large student gets a GPU of its own.
    """
    settings = config.runtime.ray
    default_gpus = settings.gpus_per_student
    if default_gpus is None:
        default_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and config.runtime.device != "cpu" else 0.0
    bundles = {}
    for name, student in zip(config.student_names(), config.students):
        if student.external:
            continue
        own = student.resources
        gpus = default_gpus if own.gpus is None else own.gpus
        bundles[name] = {"CPU": student_cpus(config, student), **({"GPU": gpus} if gpus > 0 else {})}
    return bundles


def coordinator_resources(config: ExperimentConfig) -> dict[str, float]:
    """The coordinator's own bundle: its CPUs, optionally a GPU fraction, and optionally a place on the head node."""
    settings = config.runtime.coordinator
    bundle = {"CPU": settings.cpus, **({"GPU": settings.gpus} if settings.gpus > 0 else {})}
    if settings.on_head_node:
        bundle[HEAD_NODE_RESOURCE] = 0.001  # every head node has one unit of this resource
    return bundle


def reserve_cohort(config: ExperimentConfig, bundles: dict[str, dict[str, float]]) -> PlacementGroup:
    """Gang-schedule coordinator and students in one placement group: ready whole, or a clear failure."""
    settings = config.runtime.ray
    shards = config.runtime.coordinator.shards
    reserved = cohort_bundles(config, bundles)
    group = placement_group(reserved, strategy=settings.placement_strategy)
    ready, _ = ray.wait([group.ready()], timeout=settings.placement_timeout_s)
    if not ready:
        remove_placement_group(group)
        asked = ", ".join(f"{name} {bundle}" for name, bundle in bundles.items())
        raise CohortDoesNotFit(
            f"the cluster cannot hold the cohort: {shards} coordinator shard(s) of {reserved[0]} and {len(bundles)} students ({asked}) "
            f"with strategy {settings.placement_strategy} did not fit within {settings.placement_timeout_s:.0f} s "
            f"(cluster total: {ray.cluster_resources()}, available: {ray.available_resources()}); add nodes, lower "
            "runtime.ray.cpus_per_student/gpus_per_student, students[].resources or runtime.coordinator.cpus, "
            "or relax runtime.ray.placement_strategy"
        )
    return group


def bundle_strategy(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    """Schedule an actor into bundle ``index`` of ``group``."""
    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
