"""One writer per run: a renewed lease on the run directory, with a fencing token every commit checks.

Each driver that opens a run takes the next token by creating ``lease/<token>.json`` exclusively
(``O_EXCL`` on a local or shared POSIX path, a create-if-absent put on an object store), so two
drivers can never hold one token. The newest token is the lease; its record says who holds it
and until when. A background thread renews it every third of its time to live. Before every write
of the run's files (:attr:`Storage.fence`), the holder checks that the newest token is still its
own and that its own renewal has not lapsed; a driver that lost its lease raises
:class:`LeaseLost` instead of writing, the fencing-token rule of lock services such as Chubby and
ZooKeeper, applied by the writer because plain files cannot check a token themselves.

A lease is live until it is released, its time to live passes without a renewal, or (on the
holder's own host) its process is gone. Expiry compares the record's wall-clock time with the
reader's clock: hosts sharing a run directory are assumed to keep their clocks within a few
seconds of each other (NTP), far below the time to live.
"""

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rdml_dist.run_records.storage import Storage

LEASE_DIR = "lease"
DEFAULT_TTL_S = 30.0
_FILE_SUFFIX = ".json"


class LeaseHeld(Exception):
    """Another live driver holds the run's lease (``holder`` says which)."""

    def __init__(self, location: str, holder: "LeaseRecord") -> None:
        super().__init__(f"{location} is being written by another driver ({holder.describe()})")
        self.holder = holder


class LeaseLost(RuntimeError):
    """This driver's lease was taken or lapsed: it must write nothing more into the run."""


@dataclass(frozen=True)
class LeaseRecord:
    """What a lease file holds: its token, who holds it, and when it was last renewed."""

    token: int
    holder: str
    host: str
    pid: int
    pid_started: str
    renewed_at: float
    ttl_s: float
    released: bool = False

    def describe(self) -> str:
        state = "released" if self.released else f"renewed {max(time.time() - self.renewed_at, 0.0):.0f} s ago"
        return f"pid {self.pid} on {self.host}, lease {self.token}, {state}"

    def live(self, now: float | None = None) -> bool:
        """Held, renewed within its time to live, and (when it is on this host) by a process that still exists."""
        if self.released or (now if now is not None else time.time()) > self.renewed_at + self.ttl_s:
            return False
        if self.host == socket.gethostname():
            started = _process_started(self.pid)
            return started == "unknown" or started == self.pid_started  # unreadable (another user's): assume it lives
        return True


def _process_started(pid: int) -> str:
    """A process's start time in clock ticks since boot (``/proc/PID/stat``): a reused pid differs; '' when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return "" if not _pid_exists(pid) else "unknown"
    return fields[19]


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def newest_lease(storage: Storage) -> LeaseRecord | None:
    """The run's current lease record (the newest token), or None when no driver ever took one."""
    tokens = _tokens(storage)
    if not tokens:
        return None
    return _read(storage, tokens[-1])


def _tokens(storage: Storage) -> list[int]:
    names = storage.list_files(LEASE_DIR)
    return sorted(int(name[:-len(_FILE_SUFFIX)]) for name in names if name.endswith(_FILE_SUFFIX) and name[:-len(_FILE_SUFFIX)].isdigit())


def _read(storage: Storage, token: int) -> LeaseRecord:
    """A lease record; one that cannot be read (a foreign or damaged file) counts as live, renewed now: never taken over."""
    try:
        return LeaseRecord(**json.loads(storage.read_bytes(_name(token))))
    except (ValueError, TypeError):
        return LeaseRecord(token, "unreadable", "unknown", 0, "", time.time(), DEFAULT_TTL_S)


def _name(token: int) -> str:
    return f"{LEASE_DIR}/{token:08d}{_FILE_SUFFIX}"


def _create_exclusively(storage: Storage, relative: str, data: bytes) -> bool:
    """Create ``relative`` holding ``data`` only if it does not exist yet; False when someone else created it first."""
    if storage.is_local:  # written whole under a private name, then linked: the name appears complete, once
        path = Path(storage.path(relative))
        path.parent.mkdir(parents=True, exist_ok=True)
        private = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        try:
            with open(private, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(private, path)
        except FileExistsError:
            return False
        finally:
            private.unlink(missing_ok=True)
        return True
    try:
        with storage.fs.open(storage.path(relative), "xb") as handle:  # S3/GCS: a put with If-None-Match
            handle.write(data)
    except FileExistsError:
        return False
    return True


class RunLease:
    """This driver's lease on one run directory: taken, renewed in the background, checked before writes, released."""

    def __init__(self, storage: Storage, record: LeaseRecord) -> None:
        self._storage = Storage(storage.url, field="runtime.run_dir")  # unfenced: the lease's own files
        self.record = record
        self._renewed = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._renew_until_stopped, name="rdml-run-lease", daemon=True)
        self._thread.start()

    @property
    def token(self) -> int:
        return self.record.token

    @classmethod
    def acquire(
        cls, storage: Storage, ttl_s: float = DEFAULT_TTL_S, wait_s: float = 0.0,
        on_wait: Callable[[LeaseRecord], None] | None = None,
    ) -> "RunLease":
        """Take the run's lease, waiting up to ``wait_s`` for a live holder to release it or let it lapse.

        Raises :class:`LeaseHeld` when a live driver still holds it after ``wait_s``. ``on_wait`` is
        called once, with the holder, when this driver starts waiting.
        """
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            newest = newest_lease(storage)
            if newest is not None and newest.live():
                if time.monotonic() >= deadline:
                    raise LeaseHeld(storage.describe(), newest)
                if on_wait is not None and not told:
                    on_wait(newest)
                    told = True
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0), max(newest.ttl_s / 10, 0.05)))
                continue
            token = 1 if newest is None else newest.token + 1
            record = LeaseRecord(token, uuid.uuid4().hex, socket.gethostname(), os.getpid(),
                                 _process_started(os.getpid()), time.time(), ttl_s)
            if _create_exclusively(storage, _name(token), _encode(record)) and _tokens(storage)[-1] == token:
                _remove_older(storage, token)
                return cls(storage, record)
            # another driver took this token (or a newer one) first: look again

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this driver still holds the lease (the fence before every write)."""
        if self._lost is None:
            if time.monotonic() - self._renewed > self.record.ttl_s:
                self._lost = f"it was not renewed for {self.record.ttl_s:.0f} s"
            else:
                newest = newest_lease(self._storage)
                if newest is None or newest.token != self.token:
                    self._lost = f"another driver took it ({newest.describe() if newest else 'its file is gone'})"
        if self._lost is not None:
            raise LeaseLost(f"this driver no longer holds the lease on {self._storage.describe()}: {self._lost}")

    def release(self, forget: bool = False) -> None:
        """Stop renewing and mark the lease released, so the next driver need not wait for it to lapse.

        ``forget``: this driver wrote nothing into the run (its cluster could not be reached, say), so
        its lease file goes too, and a directory the lease alone had created is removed with it.
        """
        self._stop.set()
        self._thread.join()
        if self._lost is not None:
            return
        try:
            self.check()
            if forget:
                self._storage.delete(_name(self.token))
                if not _tokens(self._storage):
                    _remove_if_empty(self._storage, LEASE_DIR)
                    _remove_if_empty(self._storage)
            else:
                self._write(released=True)
        except (LeaseLost, OSError):
            pass  # taken or unreachable: nothing of ours to release

    def __enter__(self) -> "RunLease":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def _renew_until_stopped(self) -> None:
        interval = self.record.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                self.check()
                self._write(released=False)
            except LeaseLost:
                return
            except Exception:  # noqa: BLE001 - storage briefly unreachable or a file unreadable: check() fences once
                continue  # the renewal has lapsed, so a failing renewal can never leave a writer unfenced

    def _write(self, released: bool) -> None:
        with self._lock:
            record = LeaseRecord(**{**asdict(self.record), "renewed_at": time.time(), "released": released})
            self._storage.write_bytes(_name(self.token), _encode(record))
            self.record = record
            self._renewed = time.monotonic()


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record), indent=2).encode()


def _remove_if_empty(storage: Storage, relative: str = "") -> None:
    """Remove a local directory that holds nothing (object stores have no directories to remove)."""
    if storage.is_local:
        try:
            Path(storage.path(relative)).rmdir()
        except OSError:
            pass  # not empty, or already gone


def _remove_older(storage: Storage, token: int) -> None:
    """Drop lease files older than the previous one (kept: it says whom this lease followed)."""
    for older in _tokens(storage):
        if older < token - 1:
            storage.delete(_name(older))
