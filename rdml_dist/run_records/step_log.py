"""A run's per-step log as append-only parts: ``steps/part-<first step>-<last step>.csv``, one per chunk.

Object stores cannot append, and rewriting one growing file at every checkpoint costs the whole
run each time; so each chunk's rows become one part, written once, whole and atomically, and
never touched again. A rollback (or a resume after a crash between a part and its checkpoint)
removes the parts beyond the checkpoint. :func:`iter_step_log` reads the parts in step order as
one continuous log; when the last epoch is checkpointed the parts are also joined into
``steps.csv``, the whole log in one file.
"""

import csv
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, fields
from operator import attrgetter

from rdml_dist.messages import StepRecord
from rdml_dist.run_records.storage import Storage

PARTS = "steps"
WHOLE_LOG = "steps.csv"
COLUMNS = tuple(column.name for column in fields(StepRecord))
_KINDS = {column.name: column.type for column in fields(StepRecord)}
_DEFAULTS = {column.name: column.default for column in fields(StepRecord) if column.default is not MISSING}
_VALUES = attrgetter(*COLUMNS)
_PART = re.compile(r"part-(\d+)-(\d+)\.csv")


def part_name(first: int, last: int) -> str:
    """Where the part holding steps ``first`` to ``last`` (both included) goes."""
    return f"{PARTS}/part-{first:08d}-{last:08d}.csv"


def encode(records: Iterable[StepRecord], header: bool = True) -> bytes:
    """Records as CSV text (floats written exactly, as ``repr`` writes them)."""
    lines = io.StringIO()
    writer = csv.writer(lines)
    if header:
        writer.writerow(COLUMNS)
    writer.writerows(map(_VALUES, records))
    return lines.getvalue().encode()


def decode(data: bytes, source: str = "a step-log part") -> Iterator[StepRecord]:
    """Records by the columns the part's header names: a part written before a field existed reads it as the
    field's default (absent), so an older run still resumes; a column this version does not know is refused."""
    reader = csv.reader(io.StringIO(data.decode()))
    header = next(reader, None)
    if header is None:
        return
    unknown = [name for name in header if name not in _KINDS]
    missing = [name for name in COLUMNS if name not in header and name not in _DEFAULTS]
    if unknown or missing:
        problem = f"columns {unknown} that this rdml-dist does not know (a newer one wrote it)" if unknown else f"no columns {missing}"
        raise ValueError(f"{source} has {problem}")
    kinds = [_KINDS[name] for name in header]
    for row in reader:
        values = {name: kind(value) for name, kind, value in zip(header, kinds, row, strict=True)}
        yield StepRecord(**{**_DEFAULTS, **values})


def write_part(storage: Storage, records: list[StepRecord]) -> str | None:
    """Write a chunk's records as one new part; returns its name (None when there is nothing to write)."""
    if not records:
        return None
    steps = [record.step for record in records]
    name = part_name(min(steps), max(steps))
    storage.write_bytes(name, encode(records))
    return name


def parts(storage: Storage) -> list[tuple[int, int, str]]:
    """``(first step, last step, name)`` of every part, in step order."""
    found = []
    for file_name in storage.list_files(PARTS):
        match = _PART.fullmatch(file_name)
        if match:
            found.append((int(match[1]), int(match[2]), f"{PARTS}/{file_name}"))
    return sorted(found)


def iter_step_log(storage: Storage) -> Iterator[StepRecord]:
    """Every step record of the run in step order, one part at a time (a run from before parts: its ``steps.csv``)."""
    found = parts(storage)
    if found:
        for _, _, name in found:
            yield from decode(storage.read_bytes(name), name)
    elif storage.exists(WHOLE_LOG):
        yield from decode(storage.read_bytes(WHOLE_LOG), WHOLE_LOG)


def read_step_log(storage: Storage) -> list[StepRecord]:
    """The run's whole step log as records (empty when the run wrote none yet)."""
    return list(iter_step_log(storage))


def truncate(storage: Storage, step: int) -> None:
    """Forget the steps from ``step`` on: parts beyond it go, a part across it is rewritten with its earlier rows.

    A run from before parts (only ``steps.csv``) has its rows before ``step`` turned into one part.
    """
    found = parts(storage)
    if not found and storage.exists(WHOLE_LOG):
        write_part(storage, [record for record in decode(storage.read_bytes(WHOLE_LOG)) if record.step < step])
        found = parts(storage)
    storage.delete(WHOLE_LOG)
    for first, last, name in found:
        if first >= step:
            storage.delete(name)
        elif last >= step:
            write_part(storage, [record for record in decode(storage.read_bytes(name)) if record.step < step])
            storage.delete(name)  # after its earlier rows are safe under their new name


def clear(storage: Storage) -> None:
    """Remove the whole log (a fresh run in a directory an earlier run used)."""
    storage.delete(PARTS)
    storage.delete(WHOLE_LOG)


def write_whole_log(storage: Storage) -> None:
    """Join the parts into ``steps.csv`` (streamed: one part in memory at a time)."""

    current = encode([], header=True)

    def chunks() -> Iterator[bytes]:
        yield current
        for _, _, name in parts(storage):
            data = storage.read_bytes(name)
            if data.startswith(current):
                yield data[len(current):]
            else:  # a part of an earlier format: its rows in today's columns
                yield encode(decode(data, name), header=False)

    storage.write_chunks(WHOLE_LOG, chunks())
