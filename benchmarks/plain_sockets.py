"""Blocking-socket helpers for the benchmarks' plain processes (the floors and the machine's limits)."""

import socket


def receive_exactly(connection: socket.socket, size: int, buffer: bytearray) -> None:
    """Fill the first ``size`` bytes of ``buffer`` from ``connection``; ``ConnectionError`` if the peer closes first."""
    view, received = memoryview(buffer), 0
    while received < size:
        count = connection.recv_into(view[received:size])
        if count == 0:
            raise ConnectionError("closed")
        received += count
