"""One storage abstraction for a run's files: a local or shared path, or any fsspec URI (s3://, gs://, …).

fsspec is the file-system layer the PyData stack shares (pandas, Dask, Hugging Face datasets),
it is pure Python and already a dependency of torch, and every object store is one plugin away
(``s3fs``, ``gcsfs``, ``adlfs``). Writes are all-or-nothing: on a local or shared POSIX path a
temporary file is renamed over the target, on an object store a single put is atomic.
"""

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import fsspec

from rdml_dist.errors import ConfigError

LOCAL_PROTOCOLS = {"file", "local"}


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same directory, fsync it and rename it over ``path``.

    The file gets the mode a plain ``open`` would give it (0666 less the umask; ``mkstemp``'s 0600
    would hide results from the rest of a team on a shared file system), and the directory is
    fsynced after the rename so that the new name survives a crash of the machine.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _umask() -> int:
    """The process's umask, read from /proc on Linux (setting it to read it would race other threads' writes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Storage:
    """A run's directory on some file system; every path given to its methods is relative to it."""

    def __init__(self, url: str, field: str = "runtime.storage") -> None:
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as error:
            raise ConfigError(field, f"cannot open {url!r}: {error}") from None
        self.url = url
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.is_local = bool(protocols & LOCAL_PROTOCOLS)
        self.fence: Callable[[], None] | None = None  # called before every write or delete (a run's lease check)

    def check_writable(self) -> None:
        """Raise (the fence's error) when this process may no longer write the run: before others write for it."""
        if self.fence is not None:
            self.fence()

    def path(self, relative: str) -> str:
        """The full path (or object key) of a file in the run directory."""
        return f"{self.root.rstrip('/')}/{relative}" if relative else self.root

    def describe(self, relative: str = "") -> str:
        """Where a file is, as a user would type it (a local path, or the URI)."""
        if self.is_local:
            return self.path(relative)
        return f"{self.url.rstrip('/')}/{relative}" if relative else self.url

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Replace ``relative`` with ``data`` all at once: a reader sees the old file or the new one, never a part."""
        self.check_writable()
        if self.is_local:
            atomic_write(Path(self.path(relative)), lambda handle: handle.write(data))
        else:
            self.fs.pipe_file(self.path(relative), data)

    def write_chunks(self, relative: str, chunks: Iterable[bytes]) -> None:
        """Like :meth:`write_bytes` for data too large to hold at once: the whole is written under a temporary
        name and moved into place when complete (fsspec commits an upload on close even after an error, so
        writing the final name directly could leave a truncated object)."""
        self.check_writable()
        if self.is_local:
            atomic_write(Path(self.path(relative)), lambda handle: handle.writelines(chunks))
            return
        partial = self.path(f"{relative}.partial-{os.getpid()}")
        try:
            with self.fs.open(partial, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
            self.fs.mv(partial, self.path(relative))
        except BaseException:
            if self.fs.exists(partial):
                self.fs.rm(partial)
            raise

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def list_directories(self, relative: str) -> list[str]:
        """Names of the sub-directories of ``relative`` (empty if it does not exist)."""
        return self._names(relative, "directory")

    def list_files(self, relative: str) -> list[str]:
        """Names of the files directly in ``relative`` (empty if it does not exist)."""
        return self._names(relative, "file")

    def _names(self, relative: str, kind: str) -> list[str]:
        if not self.fs.exists(self.path(relative)):
            return []
        entries = self.fs.ls(self.path(relative), detail=True)
        return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == kind)

    def delete(self, relative: str) -> None:
        """Remove a file or a directory tree; a missing one is not an error."""
        self.check_writable()
        if self.fs.exists(self.path(relative)):
            self.fs.rm(self.path(relative), recursive=True)
