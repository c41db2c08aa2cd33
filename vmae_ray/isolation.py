"""Decode in a child process, so a decoder that crashes or hangs costs one video only.

FFmpeg decoders can segfault or spin on hostile input (PyAV has crashed on truncated first
frames); in-process, that would kill the Ray worker and, after retries, the job. Here a
long-lived child process (one per Ray worker process, reused across tasks) decodes videos
one at a time and streams the decoded rows back over a pipe as Arrow IPC messages. If the
child dies, the video it was on becomes an error row ``crashed``; if it makes no progress
for ``timeout_seconds``, it is killed and the video becomes ``timeout``. The next video gets a
fresh child. Clip rows already streamed for that video are dropped downstream, because
the error row finishes the video (see `tables.ResultAssembler`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator

import pyarrow as pa

DecodeFn = Callable[..., Iterator[pa.Table]]

_DONE = b""  # end of one item's tables (an IPC stream is never empty)


def _child_main(conn, decode_fn: DecodeFn, args: tuple) -> None:
    # Children ignore SIGINT: the parent decides when they stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if item is None:
            return
        for table in decode_fn(item, *args):
            conn.send_bytes(_to_ipc(table))
        conn.send_bytes(_DONE)


def _to_ipc(table: pa.Table) -> pa.Buffer:
    # Arrow's IPC format: one copy of the buffers into the message, read back zero-copy. A
    # pickled table costs several more copies per clip (about 3x the CPU for 2.4 MB clips).
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(message: bytearray) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(message)).read_all()


def _read_into(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.readv(fd, [view])
        if n == 0:
            raise EOFError("the decoder process closed the pipe")
        view = view[n:]


def _recv_message(conn) -> bytearray:
    """One `send_bytes` message, read straight into its final buffer.

    `Connection.recv_bytes` assembles a message from chunks in a BytesIO and copies it out;
    for 2.4 MB clips that is two extra copies per clip on the decode worker. This reads the
    same framing (a 4-byte big-endian size, or -1 and an 8-byte size) with readv into one
    buffer, which the Arrow table then uses without copying.
    """
    fd = conn.fileno()
    header = bytearray(4)
    _read_into(fd, memoryview(header))
    (size,) = struct.unpack("!i", header)
    if size == -1:
        header = bytearray(8)
        _read_into(fd, memoryview(header))
        (size,) = struct.unpack("!Q", header)
    message = bytearray(size)
    _read_into(fd, memoryview(message))
    return message


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "the decoder process stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the decoder process was killed by {name}"
    return f"the decoder process exited with status {exitcode}"


class IsolatedDecoder:
    """Runs ``decode_fn(item, *args)`` in a child process and streams its tables back.

    ``error_row(item, stage, error_type, message) -> dict`` builds the row for a crash or
    a timeout; ``make_table(rows)`` turns it into a table of the decode schema.
    """

    def __init__(self, decode_fn: DecodeFn, args: tuple, *, timeout_seconds: float,
                 error_table: Callable[[dict, str, str, str], pa.Table]):
        self._decode_fn = decode_fn
        self._args = args
        self._timeout = timeout_seconds
        self._error_table = error_table
        # spawn, not fork: a Ray worker has threads, and forking a threaded process can
        # deadlock the child.
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = None
        self._conn = None
        self.restarts = 0

    def _ensure_child(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._discard()
        parent, child = self._ctx.Pipe(duplex=True)
        self._proc = self._ctx.Process(target=_child_main, args=(child, self._decode_fn, self._args), daemon=True,
                                       name="vmae-ray-decoder")
        self._proc.start()
        child.close()
        self._conn = parent

    def _discard(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
                self.restarts += 1
            self._proc.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def decode(self, item: dict) -> Iterator[pa.Table]:
        self._ensure_child()
        started = time.perf_counter()
        self._conn.send(item)
        while True:
            if not self._conn.poll(self._timeout):
                self._discard()
                yield self._error_table(item, "decode", "timeout",
                                        f"no progress for {self._timeout:g}s; the decoder was stopped")
                return
            try:
                message = _recv_message(self._conn)
            except (EOFError, OSError):
                self._proc.join(timeout=5)
                reason = _describe_exit(self._proc.exitcode)
                self.restarts += 1
                self._discard()
                yield self._error_table(item, "decode", "crashed",
                                        f"{reason} after {time.perf_counter() - started:.1f}s")
                return
            if message == _DONE:
                return
            yield _from_ipc(message)

    def close(self) -> None:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=5)
            except (OSError, BrokenPipeError):
                pass
        self._discard()
