"""One writer per run: the lease on a run directory, its fencing of every write, and what a second driver does.

The leases are real files on the local file system, taken by this process or by real child processes.
"""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rdml_dist.run_records.checkpoints import CheckpointStore
from rdml_dist.cli import main
from rdml_dist.config import parse_config
from rdml_dist.engines.session import new_session, plan_run, resume_session
from rdml_dist.errors import ConfigError
from rdml_dist.run_records.run_lease import LeaseHeld, LeaseLost, RunLease, newest_lease
from rdml_dist.run_records.storage import Storage
from tests.unit.test_run_reuse import experiment, saved_run


def test_a_held_lease_refuses_a_second_driver_and_a_released_one_passes_to_the_next_token(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "run"))
    first = RunLease.acquire(storage, ttl_s=30)
    assert newest_lease(storage).token == first.token == 1 and newest_lease(storage).live()
    with pytest.raises(LeaseHeld, match=r"is being written by another driver \(pid \d+ on .+, lease 1, renewed 0 s ago\)"):
        RunLease.acquire(storage, ttl_s=30)
    first.release()
    assert not newest_lease(storage).live()
    with RunLease.acquire(storage, ttl_s=30) as second:
        assert second.token == 2
        second.check()
    assert sorted(path.name for path in (tmp_path / "run" / "lease").iterdir()) == ["00000001.json", "00000002.json"]


def test_drivers_racing_for_one_lease_get_exactly_one(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "run"))
    start, won, refused = threading.Barrier(6), [], []

    def race() -> None:
        start.wait()
        try:
            won.append(RunLease.acquire(storage, ttl_s=30))
        except LeaseHeld:
            refused.append(True)

    threads = [threading.Thread(target=race) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(won) == 1 and len(refused) == 5
    won[0].release()


def test_a_lapsed_driver_is_fenced_and_writes_nothing_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first driver's storage becomes unreachable for its renewals; once its lease lapses a second driver takes it,
    and every write or delete the first then tries raises LeaseLost and changes nothing."""
    storage = Storage(str(tmp_path / "run"))
    first = RunLease.acquire(storage, ttl_s=2.0)
    storage.fence = first.check
    storage.write_bytes("results.json", b"first")

    def unreachable(released: bool) -> None:
        raise OSError("storage unreachable")

    monkeypatch.setattr(first, "_write", unreachable)
    deadline = time.monotonic() + 10
    second = None
    while second is None and time.monotonic() < deadline:
        try:
            second = RunLease.acquire(Storage(str(tmp_path / "run")), ttl_s=30)
        except LeaseHeld:
            time.sleep(0.1)
    assert second is not None and second.token == 2
    with pytest.raises(LeaseLost, match="no longer holds the lease"):
        storage.write_bytes("results.json", b"stale")
    with pytest.raises(LeaseLost):
        storage.delete("results.json")
    assert (tmp_path / "run" / "results.json").read_bytes() == b"first"
    second.release()
    first.release()


def test_a_driver_whose_lease_was_taken_over_stops_writing(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "run"))
    first = RunLease.acquire(storage, ttl_s=30)
    storage.fence = first.check
    record = json.loads((tmp_path / "run" / "lease" / "00000001.json").read_text())
    (tmp_path / "run" / "lease" / "00000002.json").write_text(json.dumps({**record, "token": 2, "holder": "another"}))
    with pytest.raises(LeaseLost, match="another driver took it"):
        storage.write_bytes("config.yaml", b"x")
    assert not (tmp_path / "run" / "config.yaml").exists()
    first.release()
    assert json.loads((tmp_path / "run" / "lease" / "00000002.json").read_text())["holder"] == "another"  # not released by us


def test_the_lease_of_a_killed_driver_on_this_host_is_free_at_once(tmp_path: Path) -> None:
    script = ("import sys, os, signal; from rdml_dist.run_records.storage import Storage; from rdml_dist.run_records.run_lease import RunLease; "
              "RunLease.acquire(Storage(sys.argv[1]), ttl_s=3600); print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    assert child.stdout == "held\n" and child.returncode == -9
    holder = newest_lease(Storage(str(tmp_path / "run")))
    assert holder is not None and not holder.released and not holder.live()  # an hour to go, but its process is gone
    with RunLease.acquire(Storage(str(tmp_path / "run")), ttl_s=30) as lease:
        assert lease.token == 2


def test_a_plain_train_beside_a_live_driver_trains_a_sibling_and_says_why(tmp_path: Path) -> None:
    config = experiment(tmp_path / "run")
    saved_run(config, epochs_done=1)
    running = RunLease.acquire(Storage(str(tmp_path / "run")), ttl_s=30)  # the first driver, still training
    plan = plan_run(config)
    try:
        assert (plan.location, plan.resume) == (f"{tmp_path / 'run'}-2", False)
        assert plan.says.startswith(f"a new run at {tmp_path / 'run'}-2 ({tmp_path / 'run'} is being written by another driver (pid ")
    finally:
        plan.lease.release()
        running.release()
    assert CheckpointStore(Storage(str(tmp_path / "run"))).complete_steps() == [10]


def test_a_retried_job_waits_for_the_live_driver_then_continues_its_run(tmp_path: Path) -> None:
    config = experiment(tmp_path / "run")
    saved_run(config, epochs_done=1)
    running = RunLease.acquire(Storage(str(tmp_path / "run")), ttl_s=30)
    finishing = threading.Timer(1.5, running.release)  # the first driver ends while the retry waits
    finishing.start()
    started = time.monotonic()
    plan = plan_run(config, wait=True)
    try:
        assert time.monotonic() - started >= 1.0
        assert (plan.location, plan.resume) == (str(tmp_path / "run"), True)
        assert plan.lease.token == 2
    finally:
        plan.lease.release()
        finishing.join()


def test_a_wait_is_bounded_and_leaves_the_live_run_untouched(tmp_path: Path) -> None:
    raw = experiment(tmp_path / "run").model_dump(mode="json")
    raw["runtime"]["lease"]["wait_s"] = 1.0
    config = parse_config(raw)
    saved_run(config, epochs_done=1)
    with RunLease.acquire(Storage(str(tmp_path / "run")), ttl_s=30):
        with pytest.raises(ConfigError, match=r"is being written by another driver .* after waiting 1 s; it is left untouched"):
            plan_run(config, wait=True)
        with pytest.raises(ConfigError, match="is being written by another driver"):
            plan_run(config, overwrite=True)
        with pytest.raises(ConfigError, match="is being written by another driver"):
            new_session(config, tmp_path / "run", overwrite=True)
        with pytest.raises(ConfigError, match=r"after waiting 1 s"):
            resume_session(str(tmp_path / "run"))  # its saved config waits 1 s as well
    assert CheckpointStore(Storage(str(tmp_path / "run"))).complete_steps() == [10]


def test_a_driver_that_never_reaches_its_cluster_leaves_no_lease_and_no_directory(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on: no cluster there
        probe.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{probe.getsockname()[1]}"
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--engine", "ray", "--address", nowhere, "--no-progress",
                 "--set", "monitoring.enabled=false"])
    assert code == 1 and not (tmp_path / "run").exists()
