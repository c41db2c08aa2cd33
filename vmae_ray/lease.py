"""One writer per output: a run holds a lease on ``--output`` from before recovery to its end.

Two runs committing into one output would each commit their own rows for the same inputs (an
overrunning nightly cron job does exactly this). So a run takes a lease first, and a second
run is refused with a message naming the holder (or waits, ``--wait-for-lock``):

- local disk: ``OUT/_LOCK`` held with ``flock`` (the kernel releases it when the holder dies,
  so a lease is never stale; NFS v4 supports it across machines);
- S3: the object ``OUT/_LOCK`` created with a conditional PUT (``If-None-Match: *``), renewed
  every third of ``--lease-seconds`` with a compare-and-swap (``If-Match`` on its ETag); a
  lease not renewed for ``--lease-seconds`` is stale (its holder died) and is taken over with a
  compare-and-swap, so of two runs that see it stale exactly one wins. Every commit checks
  the lease first, and `_SUCCESS` itself is written conditionally on the version the run
  last saw (`writing.OutputStore`), so even a run that lost its lease unknowingly (a long
  pause) cannot commit over another's;
- other object stores (no conditional writes through fsspec): a best-effort lock object,
  with a warning.

The lock file holds who holds it (run id, host, pid, since when), which the refusal names.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from vmae_ray.storage import is_local_fs
from vmae_ray.writing import OutputStore, is_s3_fs, precondition_failed, s3_get, s3_put

log = logging.getLogger(__name__)

LOCK_FILE = "_LOCK"


class LeaseHeldError(RuntimeError):
    """Another run holds the output's lease; ``holder`` says who (the lock's JSON)."""

    def __init__(self, output: str, holder: dict[str, Any]):
        self.holder = holder
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else "?"
        super().__init__(f"{output} is being written by run {holder.get('run_id', '?')} (pid {holder.get('pid', '?')} "
                         f"on {holder.get('host', '?')}, since {when}); one run writes an output at a time: wait for "
                         "it to finish, or pass --wait-for-lock to wait")


class LeaseLostError(RuntimeError):
    """This run no longer holds the output's lease: it must not commit."""


class OutputLease:
    """The lease of one run on one output (see the module docstring). Use as a context manager
    or call `acquire` / `release`; `check` before every commit."""

    def __init__(self, store: OutputStore, run_id: str, *, lease_seconds: float = 120.0,
                 wait_seconds: float | None = None, poll_seconds: float = 2.0):
        self.store = store
        self.run_id = run_id
        self.lease_seconds = float(lease_seconds)
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self.path = store.path(LOCK_FILE)
        self.local = is_local_fs(store.fs)
        self.s3 = is_s3_fs(store.fs)
        self._fd: int | None = None
        self._etag: str | None = None
        self._expires = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created_root = False

    # -- what the lock says ------------------------------------------------------------------
    def _holder(self, expires: float | None = None) -> dict[str, Any]:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "since": round(self._since, 3), "expires": round(expires or 0.0, 3)}

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- acquire -----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease, waiting up to ``wait_seconds`` (None: not at all) for a holder.

        Raises LeaseHeldError naming the holder when it is held (after the wait)."""
        self._since = time.time()
        deadline = None if self.wait_seconds is None else time.monotonic() + self.wait_seconds
        announced = False
        while True:
            holder = self._try_acquire()
            if holder is None:
                break
            if deadline is None or time.monotonic() >= deadline:
                raise LeaseHeldError(self.store.output, holder)
            if not announced:
                log.warning("waiting for run %s to release %s (--wait-for-lock)", holder.get("run_id"),
                            self.store.output)
                announced = True
            time.sleep(self.poll_seconds)
        if not self.local:
            self._thread = threading.Thread(target=self._renew_loop, name="vmae-ray-lease", daemon=True)
            self._thread.start()

    def _try_acquire(self) -> dict[str, Any] | None:
        """Take the lease now; returns None, or the holder's JSON when another run holds it."""
        if self.local:
            return self._try_local()
        if self.s3:
            return self._try_s3()
        return self._try_best_effort()

    def _try_local(self) -> dict[str, Any] | None:
        import fcntl

        root = self.store.root
        if not os.path.exists(root):
            os.makedirs(root, exist_ok=True)
            self._created_root = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                return self._read_local()
            # The holder before us may have removed the file after we opened it: then we hold
            # a lock on a file nobody else will open. Lock the file at the path, or try again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self._holder()).encode(), 0)
            self._fd = fd
            return None

    def _read_local(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def _read_s3(self) -> tuple[dict[str, Any], str | None]:
        found = s3_get(self.store.fs, self.path)
        if found is None:
            return {}, None
        try:
            holder = json.loads(found[0].decode("utf-8") or "{}")
        except (UnicodeDecodeError, ValueError):
            holder = {}
        return holder, found[1]

    def _put_s3(self, **condition) -> bool:
        """PUT our lock with ``condition`` (IfNoneMatch / IfMatch); False when the condition failed."""
        expires = time.time() + self.lease_seconds
        try:
            etag = s3_put(self.store.fs, self.path, json.dumps(self._holder(expires)).encode(), **condition)
        except Exception as exc:
            if precondition_failed(exc):
                return False
            raise
        self._etag, self._expires = etag, expires
        return True

    def _try_s3(self) -> dict[str, Any] | None:
        for _ in range(5):
            if self._put_s3(IfNoneMatch="*"):
                return None
            holder, etag = self._read_s3()
            if etag is None:
                continue  # released meanwhile: try to create it again
            if float(holder.get("expires") or 0) > time.time():
                return holder
            # Stale: its holder stopped renewing. Take it over only if it is still that lock.
            log.warning("taking over the stale lease of run %s on %s (not renewed since %s)", holder.get("run_id"),
                        self.store.output, time.strftime("%H:%M:%S", time.gmtime(float(holder.get("expires") or 0))))
            if self._put_s3(IfMatch=etag):
                return None
        return holder

    def _try_best_effort(self) -> dict[str, Any] | None:
        fs = self.store.fs
        if fs.exists(self.path):
            with fs.open(self.path, "rb") as f:
                holder = json.loads(f.read().decode("utf-8") or "{}")
            if float(holder.get("expires") or 0) > time.time():
                return holder
        log.warning("%s: this store offers no conditional writes through fsspec; the lease on it is best effort "
                    "(two runs started within a second may both run)", self.store.output)
        expires = time.time() + self.lease_seconds
        with fs.open(self.path, "wb") as f:
            f.write(json.dumps(self._holder(expires)).encode())
        self._expires = expires
        return None

    # -- renew, check, release ----------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                if self.s3:
                    if not self._put_s3(IfMatch=self._etag) and not self._adopt_own_renewal():
                        self._lost = "another run took over the lease (it was not renewed in time)"
                        return
                else:
                    expires = time.time() + self.lease_seconds
                    with self.store.fs.open(self.path, "wb") as f:
                        f.write(json.dumps(self._holder(expires)).encode())
                    self._expires = expires
            except Exception as exc:  # noqa: BLE001 - a network hiccup: try again at the next tick
                log.warning("could not renew the lease on %s: %s: %s", self.store.output, type(exc).__name__, exc)

    def _adopt_own_renewal(self) -> bool:
        """After a failed conditional renewal: True (and the lock's new ETag taken) when the lock
        is still ours. A renewal whose response was lost is retried by botocore and then fails
        its own condition, since the first attempt already changed the ETag."""
        holder, etag = self._read_s3()
        ours = (etag is not None and holder.get("run_id") == self.run_id and holder.get("pid") == os.getpid()
                and holder.get("host") == socket.gethostname() and holder.get("since") == round(self._since, 3))
        if ours:
            self._etag, self._expires = etag, float(holder.get("expires") or 0.0)
        return ours

    def check(self) -> None:
        """Raise LeaseLostError unless this run still holds the lease with a safe margin left."""
        if self.local:
            if self._fd is None:
                raise LeaseLostError(f"run {self.run_id} holds no lease on {self.store.output}")
            return
        if self._lost:
            raise LeaseLostError(f"run {self.run_id} lost its lease on {self.store.output}: {self._lost}")
        if time.time() > self._expires - self.lease_seconds / 6:
            raise LeaseLostError(f"run {self.run_id} could not renew its lease on {self.store.output} in time")

    def release(self) -> None:
        """Give the lease back (idempotent). Removes the lock, and a folder the lease created if
        nothing else was written there."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.local:
            if self._fd is not None:
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                os.close(self._fd)  # unlocks
                self._fd = None
                if self._created_root:
                    try:
                        os.rmdir(self.store.root)  # only if empty
                    except OSError:
                        pass
            return
        if self._etag is not None and self.s3:
            bucket, _, key = self.path.partition("/")
            try:
                self.store.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
            except Exception as exc:  # noqa: BLE001
                if not precondition_failed(exc):
                    try:  # a store without conditional deletes: ours if it still names this run
                        holder, _ = self._read_s3()
                        if holder.get("run_id") == self.run_id:
                            self.store.fs.call_s3("delete_object", Bucket=bucket, Key=key)
                    except Exception:  # noqa: BLE001 - an expired lock is harmless
                        pass
            self.store.fs.invalidate_cache(self.path)
            self._etag = None
        elif not self.s3 and self._expires:
            try:
                self.store.fs.rm(self.path)
            except OSError:
                pass
            self._expires = 0.0

