"""Shared helpers for the integration tests: real Ray processes, all on loopback, stopped afterwards.

The loopback switch must be set before anything imports ``ray`` (Ray reads it once, at import),
so it runs first, before every other import in this directory.
"""

from rdml_dist.engines.loopback import keep_local_ray_on_loopback

keep_local_ray_on_loopback()

import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import astuple  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import ray  # noqa: E402

from rdml_dist.config import ExperimentConfig, parse_config  # noqa: E402
from rdml_dist.run_records.step_log import COLUMNS, read_step_log  # noqa: E402
from rdml_dist.run_records.storage import Storage  # noqa: E402


# Modules whose tests split into one pytest-xdist group per value of this parameter: each group pays for its own
# Ray session and undisturbed run, and the halves run side by side.
SPLIT_BY_PARAMETER = {"test_failure_paths.py": "transport", "test_evaluation_timeout.py": "transport"}
# Modules whose tests share nothing (each starts its own driver and Ray in child processes): a group per test, so
# that their long tests spread over the workers.
ONE_GROUP_PER_TEST = {"test_external_students.py"}


# The groups that take longest (measured with --durations=0), handed to the workers first so that they end
# together; every other group follows in collection order, and the unit tests fill the gaps at the end.
LONGEST_GROUPS_FIRST = [
    "test_failure_paths-tcp", "test_failure_paths-actor_calls", "test_resume_and_jobs", "test_fault_tolerance",
    "test_ray_training", "test_external_students", "test_tune_faults", "test_evaluation_timeout-tcp",
    "test_tune_sweep", "test_concurrent_runs", "test_evaluation_timeout-actor_calls", "test_any_data_on_ray",
    "test_cluster_connection",
]


def _group(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("xdist_group")
    return None if marker is None else str(marker.args[0] if marker.args else marker.kwargs.get("name"))


@pytest.hookimpl(wrapper=True)  # around the other implementations: pytest-xdist's reads the groups into the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> Iterator[None]:
    """Everything under tests/integration carries the ``integration`` marker (``-m "not integration"`` skips it),
    and a pytest-xdist group: its module's (or its module half's), unless it names one itself, so that a module's
    shared Ray session and module fixtures are made once, on one worker. The longest groups go first."""
    for item in items:
        if "tests/integration" not in str(item.path).replace("\\", "/"):
            continue
        item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("xdist_group") is None:
            group = item.path.stem
            split = SPLIT_BY_PARAMETER.get(item.path.name)
            callspec = getattr(item, "callspec", None)
            if split is not None and callspec is not None and split in callspec.params:
                group = f"{group}-{callspec.params[split]}"
            elif item.path.name in ONE_GROUP_PER_TEST:
                group = f"{group}-{item.name}"
            item.add_marker(pytest.mark.xdist_group(group))
    rank = {group: position for position, group in enumerate(LONGEST_GROUPS_FIRST)}
    def position(item: pytest.Item) -> int:  # a group split per test ranks as its module
        group = _group(item) or ""
        return rank.get(group, rank.get(group.split("-")[0], len(rank)))

    items.sort(key=position)  # stable: the rest keep their order
    yield


def wait_until_stopped(node: Any, timeout_s: float = 15.0) -> None:
    """Fail if any process of a Ray node we started outlives its shutdown."""
    deadline = time.monotonic() + timeout_s
    while node.any_processes_alive():
        if time.monotonic() > deadline:
            raise AssertionError(f"Ray processes of node {node.unique_id} still alive after shutdown")
        time.sleep(0.1)


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Poll ``predicate`` (Ray releases resources and placement groups asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting until {what}")
        time.sleep(0.1)


def cohort_released() -> bool:
    """No placement group is left and every resource of the cluster is available again."""
    groups = [group for group in ray.util.placement_group_table().values() if group["state"] != "REMOVED"]
    total, available = ray.cluster_resources(), ray.available_resources()
    return not groups and all(available.get(key, 0) == total[key] for key in ("CPU", "GPU") if key in total)


def assert_loopback_nodes(expected: int) -> list[dict[str, Any]]:
    """The live Ray nodes, checked to be ``expected`` many and all bound to a 127.x address."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    assert len(nodes) == expected, nodes
    for node in nodes:
        assert node["NodeManagerAddress"].startswith("127."), f"Ray node left loopback: {node['NodeManagerAddress']}"
    return nodes


@contextlib.contextmanager
def local_ray(**init_args: Any) -> Iterator[None]:
    """One single-node Ray session on loopback; every process it started is stopped on exit."""
    assert not ray.is_initialized(), "a previous test module left Ray running"
    assert not ray._private.ray_constants.ENABLE_RAY_CLUSTER, (
        "ray was imported before keep_local_ray_on_loopback() ran (or RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is set): "
        "a local Ray would bind to the external address"
    )
    # address="local": a new instance, never a cluster another process left in Ray's current-cluster file
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **init_args)
    node = ray._private.worker._global_node
    try:
        assert_loopback_nodes(1)
        yield
    finally:
        ray.shutdown()
        wait_until_stopped(node)


@contextlib.contextmanager
def simulated_cluster(workers: int, cpus: int = 1, dashboard: bool = False) -> Iterator[Any]:
    """A ``ray.cluster_utils.Cluster`` on loopback: a head and ``workers`` nodes, ``cpus`` logical CPUs each.

    The driver joins it; every node's processes are stopped on exit. ``dashboard`` starts the head's
    dashboard (on a free port), through which Ray's state API (``ray.util.state``) answers.
    """
    from ray.cluster_utils import Cluster

    from tests.integration.cli_process import free_port

    assert not ray.is_initialized(), "a previous test module left Ray running"
    head = {"num_cpus": cpus, "include_dashboard": dashboard, **({"dashboard_port": free_port()} if dashboard else {})}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = list(cluster.list_all_nodes())
    try:
        nodes.extend(cluster.add_node(num_cpus=cpus) for _ in range(workers))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for node in nodes:
            wait_until_stopped(node)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A shared single-node session with 4 logical CPUs (more than the cores: each student runs one torch thread)."""
    with local_ray(num_cpus=4):
        yield


def make_config(run_dir: Path, students: list[dict[str, Any]], **sections: Any) -> ExperimentConfig:
    """A small digits experiment: one torch thread per student, results under ``run_dir``.

    ``sections`` are merged one level deep into the defaults (``training={...}``, ``ray={...}``
    goes to ``runtime.ray``).
    """
    raw: dict[str, Any] = {
        "name": "integration",
        "seed": 0,
        "data": {"name": "digits", "val_fraction": 0.2},
        "students": students,
        "training": {
            "epochs": 1,
            "batch_size": 64,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4},
            "lr_schedule": {"name": "cosine"},
            "last_epochs_reported": 1,
        },
        "mimicry": {"divergence": "renyi", "alpha": 2.0, "temperature": 1.0, "weight": 1.0, "mode": "pairwise"},
        "runtime": {
            "engine": "ray",
            "run_dir": str(run_dir),
            "device": "auto",
            "torch_threads": 1,
            "ray": {"placement_timeout_s": 60, "exchange_timeout_s": 120},
        },
        "monitoring": {"port": 0},  # any free port: a killed coordinator's port may not be free yet
        "rpc": {"port": 0},
    }
    for section, values in sections.items():
        if section == "ray":
            raw["runtime"]["ray"].update(values)
        elif section == "runtime":
            raw["runtime"].update(values)
        elif isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return parse_config(raw)


def read_steps(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's step log (its parts, through the documented reader), as ``steps.csv`` writes them."""
    return [{column: str(value) for column, value in zip(COLUMNS, astuple(record))} for record in read_step_log(Storage(str(run_dir)))]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
