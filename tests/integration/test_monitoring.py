"""Monitoring for real: a Prometheus server (the Debian package) scrapes the coordinator of a live run.

The test checks the exported series against the run's own ``steps.csv``, runs every query of the
provisioned Grafana dashboard against that Prometheus, and follows the metrics through a student
that is SIGKILLed and restarted.
"""

import contextlib
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rdml_dist.engines.ray_engine import train_ray
from tests.integration.cli_process import free_port, kill_actor_process
from tests.integration.conftest import make_config, read_json, read_steps, wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "rdml-cohort.json"
STUDENTS = [{"name": "mlp", "model": "mlp"}, {"name": "cnn", "model": "small_cnn"}]


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_session: None) -> None:
    """Every test here shares the module's Ray session."""


def _get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - loopback only
        return response.read()


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    """A real Prometheus on loopback scraping ``target`` every 250 ms; yields its base URL and stops it."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: .ci/run installs the Debian package"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 250ms, scrape_timeout: 250ms}\n"
        f"scrape_configs:\n  - job_name: rdml\n    static_configs:\n      - targets: ['{target}']\n"
    )
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), "Prometheus is ready", 30)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(url: str) -> bool:
    try:
        return _get(f"{url}/-/ready") is not None
    except OSError:
        return False


def _query(url: str, expression: str, at: float) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": expression, "time": f"{at:.3f}"})
    answer = json.loads(_get(f"{url}/api/v1/query?{query}"))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.timeout(300)
def test_prometheus_scrapes_every_student_and_every_dashboard_query_has_data(tmp_path: Path) -> None:
    metrics_port = free_port()
    markers, scraped = tmp_path / "markers", tmp_path / "scraped"
    markers.mkdir()
    # mlp holds the cohort at step 20 until Prometheus has scraped the run: a loaded machine may miss
    # the scrapes of a whole run this short otherwise
    hold = {"faults": [{"how": "wait_for", "where": "step", "after": 20, "path": str(scraped), "seconds": 60}],
            "markers": str(markers), "run_dir": str(tmp_path / "run")}
    students = [{"name": "mlp", "model": "tests.integration.faulty_models:mlp_with_faults", "options": hold}, STUDENTS[1]]
    config = make_config(tmp_path / "run", students, training={"epochs": 3, "batch_size": 64},
                         monitoring={"port": metrics_port})
    with prometheus(tmp_path, f"127.0.0.1:{metrics_port}") as url:
        error: list[BaseException] = []

        def train() -> None:
            try:
                train_ray(config, tmp_path / "run", show_progress=False).finish()
            except BaseException as failure:  # noqa: BLE001 - handed to the test
                error.append(failure)

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        wait_until(lambda: bool(_query(url, "rdml_cohort_step", time.time())), "Prometheus scrapes the run", 120)
        scraped.touch()
        thread.join(240)
        assert not thread.is_alive() and not error, error
        time.sleep(0.5)  # the coordinator is gone: the target's last scrape is final
        now = time.time()
        steps = _query(url, "last_over_time(rdml_cohort_step[10m])", now)
        assert len(steps) == 1 and steps[0]["metric"]["run"] == "integration"
        last_step = int(float(steps[0]["value"][1])) - 1
        assert last_step >= 20, "Prometheus saw too little of the run"
        models = {entry["name"]: entry["model"] for entry in students}
        rows = {row["student"]: row for row in read_steps(tmp_path / "run") if int(row["step"]) == last_step}
        for metric, column in (("rdml_student_cross_entropy_loss", "ce_loss"), ("rdml_student_mimicry_loss", "mimicry_loss")):
            series = {item["metric"]["student"]: item for item in _query(url, f"last_over_time({metric}[10m])", now)}
            assert set(series) == {"mlp", "cnn"}, metric
            for student, item in series.items():
                assert item["metric"]["model"] == models[student]
                assert float(item["value"][1]) == pytest.approx(float(rows[student][column]), rel=1e-9, abs=1e-12), (metric, student)

        # Every panel of the provisioned dashboard returns data from the same Prometheus.
        (samples,) = _query(url, "rdml_cohort_step[10m]", now)  # every scraped sample of the series, with its time
        last_scrape = max(float(timestamp) for timestamp, _ in samples["values"])  # later instants see a stale target
        dashboard = json.loads(DASHBOARD.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expression = target["expr"].replace("$run", "integration")
                assert _query(url, expression, last_scrape), f"panel {panel['title']!r}: no data for {expression}"


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = _get(f"http://127.0.0.1:{port}/metrics", timeout_s=2).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict, name: str, student: str) -> float | None:
    return next((value for (sample, labels), value in samples.items() if sample == name and ("student", student) in labels), None)


@pytest.mark.timeout(300)
def test_metrics_through_a_student_restart(tmp_path: Path) -> None:
    metrics_port = free_port()
    markers = tmp_path / "markers"
    markers.mkdir()
    # cnn holds the cohort at step 6 until the test kills it (a whole run can end between two polls of the
    # checkpoint otherwise); its restarted process takes 2 s to load its checkpoint, so its restart is long
    # enough to be scraped whatever the machine's load (a restart alone takes about a second)
    hold_then_slow_restore = [{"how": "wait_for", "where": "step", "after": 6, "path": str(tmp_path / "never"), "seconds": 60},
                              {"how": "hang", "where": "restore", "seconds": 2.0}]
    slow_restore = {"faults": hold_then_slow_restore, "markers": str(markers), "run_dir": str(tmp_path / "run")}
    students = [STUDENTS[0], {"name": "cnn", "model": "tests.integration.faulty_models:mlp_with_faults", "options": slow_restore}]
    # a run name of its own: once the coordinator has exited, its free port may answer for another test's process
    config = make_config(tmp_path / "run", students, name="restart-watch", training={"epochs": 2, "batch_size": 128},
                         monitoring={"port": metrics_port}, runtime={"checkpoint": {"every_steps": 4}})
    error: list[BaseException] = []

    def train() -> None:
        try:
            train_ray(config, tmp_path / "run", show_progress=False).finish()
        except BaseException as failure:  # noqa: BLE001 - handed to the test
            error.append(failure)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    # held at step 6 (past checkpoint 4): killed before, its new process would hold the cohort again at its own 6th step
    wait_until(lambda: (markers / "fault-0").exists() or not thread.is_alive(), "cnn holds the cohort at step 6", 120)
    assert not error, error
    assert kill_actor_process(read_json(tmp_path / "run" / "placements.json")["students"]["cnn"]["pid"], "StudentActor")
    history = []
    while thread.is_alive():
        with contextlib.suppress(OSError, ValueError):  # ValueError: whatever answers the port after the run is not Prometheus
            samples = _scrape(metrics_port)
            if ("rdml_cohort_step", (("run", "restart-watch"),)) in samples:
                history.append(samples)
        time.sleep(0.02)
    thread.join(5)
    assert not error, error

    steps = [_value(samples, "rdml_student_steps_total", "cnn") for samples in history]
    steps = [value for value in steps if value is not None]
    assert steps and all(later >= earlier for earlier, later in zip(steps, steps[1:]))  # never goes backwards
    liveness = [_value(samples, "rdml_student_live", "cnn") for samples in history]
    assert 0.0 in liveness and liveness[-1] == 1.0  # dead while restarting, live again afterwards
    assert _value(history[-1], "rdml_student_restarts_total", "cnn") == 1.0
    assert _value(history[-1], "rdml_student_restarts_total", "mlp") == 0.0
    states = [next((dict(labels)["state"] for (sample, labels), value in samples.items()
                    if sample == "rdml_driver_state" and value == 1.0), None) for samples in history]
    seen = [state for index, state in enumerate(states) if state is not None and (index == 0 or state != states[index - 1])]
    assert {"running", "restoring"} <= set(seen), seen  # the driver's states, as the coordinator was told them
    assert seen.index("restoring") > seen.index("running"), seen
