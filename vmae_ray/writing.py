"""Commit step: Parquet shards staged per run, then committed; `_SUCCESS` written last.

Ray Data's `write_parquet` appends and is not atomic, so the job owns its commit:

1. While the run works, the workers write shards to ``OUT/_staging/<run_id>/<table>/`` (a
   name starting with ``_``: pyarrow, DuckDB and Spark skip it when reading the folders) and
   send receipts; the driver accepts them (`vmae_ray.commit`).
2. To commit, a journal ``_staging/<run_id>/_COMMIT.json`` lists every move, the accepted
   files are moved into ``clips/``, ``videos/``, ``errors/`` (many at a time), and
   ``_SUCCESS`` is rewritten (write-then-rename on local disk; a single PUT on S3, conditional
   on the `_SUCCESS` the run last saw where the store supports it) listing all committed files.
3. The next run first repairs an interrupted commit from its journal (rolls it forward),
   deletes files in the table folders that no ``_SUCCESS`` lists (rolls back anything
   else), and removes stale staging folders (it holds the output's lease, `vmae_ray.lease`,
   so no other run is writing there).

So the committed state is always the one `_SUCCESS` names, and a killed driver costs at
most the uncommitted work. Rows superseded by a run (an input that changed, a failed input
retried, an input pruned) are removed by rewriting, in Ray tasks, only the shard groups that
hold them (`rewrite_group`); the rewritten files replace the old ones in the run's first
commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vmae_ray.schema import SUCCESS_FILE, TABLES
from vmae_ray.storage import StorageOptions, is_local_fs, join, url_to_fs

log = logging.getLogger(__name__)

FORMAT = "vmae-ray/1"
# 2: the shards of one receipt share their file name across clips/, videos/ and errors/ (a
# video's clips are in the clips/ shard named like its videos/ shard); 1 (absent): no relation.
LAYOUT = 2
STAGING = "_staging"
# Moves and deletes of a commit run this many at a time (an S3 move is a copy and a delete).
COMMIT_THREADS = 32
JOURNAL = "_COMMIT.json"
# The names of the shards vmae-ray writes: part-<run id>-<5+ digits>.parquet, or -rw<5+ digits>
# for a shard rewritten without superseded videos (Spark's part-00000-<uuid>-c000.snappy.parquet
# does not match). Nothing else in a table folder is ours, so nothing else is ever deleted.
SHARD_NAME = re.compile(r"^part-.+-(rw)?[0-9]{5,}[.]parquet$")


class ConcurrentCommitError(RuntimeError):
    """`_SUCCESS` changed since this run read it: another run committed to the output."""


def is_s3_fs(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in ("s3", "s3a") for p in protocols)


def precondition_failed(exc: BaseException) -> bool:
    """Whether a storage error is a failed conditional request (HTTP 412), however s3fs wrapped it."""
    seen = exc
    while seen is not None:
        if isinstance(seen, FileExistsError):
            return True
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def s3_get(fs, path: str) -> tuple[bytes, str | None] | None:
    """(content, ETag) of one S3 object from one GET (so the two agree), or None when absent."""
    from fsspec.asyn import sync

    bucket, _, key = path.partition("/")

    async def get():
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        try:
            data = await response["Body"].read()
        finally:
            response["Body"].close()
        return data, response.get("ETag")

    return sync(fs.loop, get)


def s3_put(fs, path: str, data: bytes, **condition) -> str | None:
    """PUT one S3 object (``condition``: IfNoneMatch="*" or IfMatch=etag); returns its new ETag.
    A failed condition raises (see `precondition_failed`)."""
    bucket, _, key = path.partition("/")
    response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    fs.invalidate_cache(path)
    return response.get("ETag")


_UNKNOWN = object()


class ForeignFilesError(ValueError):
    """An output's table folders hold files vmae-ray did not write: nothing is written there."""


# The named points of a commit, in order (see `failpoint`).
COMMIT_FAILPOINTS = ("before_journal", "after_journal", "after_first_move", "before_success", "after_success")
# after_accept: the driver accepted a receipt and has not committed it yet (`pipeline`).
FAILPOINTS = ("after_accept", *COMMIT_FAILPOINTS)


def failpoint(name: str) -> None:
    """Crash here when VMAE_RAY_FAILPOINT names this point (crash-consistency tests).

    The commit protocol must leave the previous or the new committed state whatever
    instant the driver dies at; tests kill it at each named point of the commit, on top
    of killing it at random times.
    """
    assert name in FAILPOINTS, name
    if os.environ.get("VMAE_RAY_FAILPOINT") == name:
        os._exit(86)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


@dataclass
class CommittedState:
    """What `_SUCCESS` says is committed under an output (empty for a new output)."""

    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Identity of this state: a journal names the state its commit was built on."""
        return manifest_digest(self.manifest)

    @property
    def exists(self) -> bool:
        return bool(self.manifest)

    @property
    def files(self) -> dict[str, list[str]]:
        """Committed files (relative paths) per table, for every table the manifest names."""
        return {t: list(rels) for t, rels in self.manifest.get("files", {}).items()}

    def files_of(self, table: str) -> list[str]:
        return list(self.manifest.get("files", {}).get(table, []))

    @property
    def settings_fingerprint(self) -> str | None:
        return self.manifest.get("settings_fingerprint")

    @property
    def layout(self) -> int:
        return int(self.manifest.get("layout", 1))


class OutputStore:
    """All reads and writes under an output folder whose tables are committed by `_SUCCESS`.

    ``tables`` are the folder names this store owns (the job's clips/, videos/, errors/ by
    default; other commands commit their own tables with the same protocol).
    """

    def __init__(self, output: str, storage: StorageOptions, tables: tuple[str, ...] = TABLES):
        self.output = output.rstrip("/")
        self.storage = storage
        self.tables = tuple(tables)
        self.fs, self.root = url_to_fs(self.output, storage)
        self.root = self.root.rstrip("/")
        # On S3, _SUCCESS is replaced only if it is still the version this store last read or
        # wrote (a compare-and-swap on its ETag): a run that lost its lease cannot commit over
        # another's. _UNKNOWN until read.
        self._success_etag: Any = _UNKNOWN

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_success_etag"] = _UNKNOWN  # a worker's copy never writes _SUCCESS
        return state

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if "://" not in self.root else join(self.root, *parts)

    # -- reading -------------------------------------------------------------------------
    def read_state(self) -> CommittedState:
        p = self.path(SUCCESS_FILE)
        if is_s3_fs(self.fs):
            found = s3_get(self.fs, p)
            self._success_etag = None if found is None else found[1]
            if found is None:
                return CommittedState()
            raw = found[0]
        else:
            if not self.fs.exists(p):
                return CommittedState()
            with self.fs.open(p, "rb") as f:
                raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # another tool's _SUCCESS (Spark's is empty)
            raise ValueError(f"{self.output}/_SUCCESS is not a vmae-ray manifest (not JSON: {exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            data = data if isinstance(data, dict) else {}
            raise ValueError(f"{self.output}/_SUCCESS is not a vmae-ray manifest (format {data.get('format')!r})")
        return CommittedState(data)

    def foreign_files(self) -> list[str]:
        """Relative paths in this store's table folders that vmae-ray did not write (sorted):
        anything not named like a shard, sub-folders, or a table name that is a file."""
        out = []
        for table in self.tables:
            folder = self.path(table)
            if not self.fs.exists(folder):
                continue
            if not self.fs.isdir(folder):
                out.append(table)
                continue
            for info in self.fs.ls(folder, detail=True):
                if info["name"].rstrip("/") == folder.rstrip("/"):
                    continue  # an object store's folder marker ("clips/", made by consoles and rclone)
                name = posixpath.basename(info["name"].rstrip("/"))
                if info["type"] != "file" or not SHARD_NAME.match(name):
                    out.append(posixpath.join(table, name))
        return sorted(out)

    def check_owned(self) -> None:
        """Raise ForeignFilesError when a table folder holds a file vmae-ray did not write
        (ValueError when the output is a file).

        Recovery deletes what `_SUCCESS` does not list in the table folders, and a commit that
        replaces all rows deletes what the old `_SUCCESS` listed: pointed by mistake at a folder
        of videos (a ``videos/`` sub-folder is common), either would delete the user's files.
        Checked before anything is touched.
        """
        if self.fs.exists(self.root) and not self.fs.isdir(self.root):
            raise ValueError(f"{self.output} is a file; an output is a folder")
        foreign = self.foreign_files()
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
            raise ForeignFilesError(
                f"{self.output} holds files vmae-ray did not write in its table folders ({shown}); "
                f"vmae-ray removes what its commits do not list in {', '.join(t + '/' for t in self.tables)}, "
                "so it writes nothing here: choose a new or empty folder, or move those files away")

    # -- recovery ------------------------------------------------------------------------
    def recover(self) -> CommittedState:
        """Finish or undo what a killed run left, and return the committed state.

        Raises ForeignFilesError (before touching anything) when a table folder holds files
        vmae-ray did not write, and ValueError when `_SUCCESS` is not a vmae-ray manifest.
        """
        self.check_owned()
        staging = self.path(STAGING)
        if self.fs.exists(staging):
            for run_dir in sorted(self.fs.ls(staging, detail=False)):
                journal = posixpath.join(run_dir, JOURNAL)
                if self.fs.exists(journal):
                    with self.fs.open(journal, "rb") as f:
                        plan = json.loads(f.read().decode("utf-8"))
                    current = self.read_state().digest
                    if "base" in plan and current not in (plan["base"], manifest_digest(plan["success"])):
                        # Another run committed after this journal was written (it took over a
                        # lease that had expired): rolling it forward would undo that commit.
                        log.warning("dropping the interrupted commit of run %s: %s/_SUCCESS has changed since",
                                    plan.get("run_id"), self.output)
                        self.fs.rm(journal)
                        continue
                    log.warning("rolling forward the interrupted commit of run %s", plan.get("run_id"))
                    self._apply_commit(plan)
        state = self.read_state()
        committed = {rel for files in state.files.values() for rel in files}
        for table in self.tables:
            folder = self.path(table)
            if not self.fs.exists(folder):
                continue
            for p in self.fs.ls(folder, detail=False):
                if p.rstrip("/") == folder.rstrip("/"):
                    continue  # the folder's own marker object
                rel = posixpath.join(table, posixpath.basename(p))
                if rel not in committed:
                    log.warning("removing %s: not part of any committed run", rel)
                    self.fs.rm(p)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        return state

    def check_writable(self) -> None:
        """Fail fast (before any work) when --output cannot be written; leaves nothing behind
        (a folder the check had to create is removed again: a run refused later, say for its
        --device, leaves no empty output)."""
        created = not self.fs.exists(self.root)
        # At the top, not in _staging: another run may be writing there (it holds the lease).
        probe = self.path(f".write-check-{uuid.uuid4().hex[:8]}")
        self._write_bytes(probe, b"ok")
        self.fs.rm(probe)
        if created and is_local_fs(self.fs):
            try:
                os.rmdir(self.root)  # only if still empty: never a recursive delete
            except OSError:
                pass

    # -- commit --------------------------------------------------------------------------
    def commit(self, run_id: str, staged: dict[str, list[str]], manifest: dict[str, Any],
               previous: CommittedState, *, replace_all: bool = False,
               replaced: dict[str, str | None] | None = None, final: bool = True) -> dict[str, Any]:
        """Make the staged files of ``run_id`` the new committed state; returns _SUCCESS.

        ``staged``: {table: [paths relative to the run's staging folder, e.g. clips/part-...]}.
        ``replace_all`` drops every previously committed file (the settings changed, so old
        rows must not stay beside new ones). ``replaced`` maps committed files to their
        rewritten versions (staged paths) or None (the file is dropped): superseded rows.
        ``final`` removes the run's staging folder afterwards (workers may still be writing
        there before the run's last commit).
        """
        files = {t: previous.files_of(t) for t in self.tables}
        staged = {t: list(staged.get(t, [])) for t in self.tables}
        moves: list[tuple[str, str]] = []
        dropped: list[str] = []
        if replace_all:
            dropped = [rel for rels in files.values() for rel in rels]
            files = {t: [] for t in self.tables}
        for old, new in (replaced or {}).items():
            table = old.split("/", 1)[0]
            if old in files.get(table, []):
                files[table].remove(old)
                dropped.append(old)
            if new is not None:
                staged[table].append(new)
        for table in self.tables:
            for rel in staged.get(table, []):
                final_rel = posixpath.join(table, posixpath.basename(rel))
                moves.append((rel, final_rel))
                files[table].append(final_rel)
        success = {**manifest, "format": FORMAT, "layout": LAYOUT, "files": files}
        # "base": the state this commit replaces. Recovery rolls the journal forward only while
        # _SUCCESS is still that state (or already this commit's): never over a later commit.
        plan = {"run_id": run_id, "moves": moves, "success": success, "delete": dropped, "final": final,
                "base": previous.digest}
        failpoint("before_journal")
        self._write_bytes(self.path(STAGING, run_id, JOURNAL), json.dumps(plan).encode())
        failpoint("after_journal")
        self._apply_commit(plan)
        return success

    def _apply_commit(self, plan: dict[str, Any]) -> None:
        run_id = plan["run_id"]

        def move(pair: tuple[str, str]) -> None:
            rel, final = pair
            src = self.path(STAGING, run_id, rel)
            dst = self.path(final)
            if self.fs.exists(src):
                self.fs.mv(src, dst)
                failpoint("after_first_move")
            elif not self.fs.exists(dst):
                raise RuntimeError(f"commit of run {run_id}: staged file {rel} is missing")

        for folder in sorted({posixpath.dirname(final) for _, final in plan["moves"]}):
            self.fs.makedirs(self.path(folder), exist_ok=True)
        self._parallel(move, plan["moves"])
        failpoint("before_success")
        try:
            self._write_success(json.dumps(plan["success"], indent=1, default=str).encode())
        except ConcurrentCommitError:
            # Another run's commit stands; this journal must never be rolled forward over it.
            journal = self.path(STAGING, run_id, JOURNAL)
            if self.fs.exists(journal):
                self.fs.rm(journal)
            raise
        failpoint("after_success")

        def delete(rel: str) -> None:
            p = self.path(rel)
            if self.fs.exists(p):
                self.fs.rm(p)

        # Superseded shards go only after _SUCCESS no longer lists them.
        self._parallel(delete, plan.get("delete", []))
        journal = self.path(STAGING, run_id, JOURNAL)
        if self.fs.exists(journal):
            self.fs.rm(journal)
        if plan.get("final", True):
            if self.fs.exists(self.path(STAGING, run_id)):
                self.fs.rm(self.path(STAGING, run_id), recursive=True)
            staging = self.path(STAGING)
            if self.fs.exists(staging) and not self.fs.ls(staging, detail=False):
                self.fs.rm(staging, recursive=True)

    def _write_success(self, data: bytes) -> None:
        p = self.path(SUCCESS_FILE)
        if not is_s3_fs(self.fs) or self._success_etag is _UNKNOWN:
            self._write_bytes(p, data)
            return
        condition = {"IfMatch": self._success_etag} if self._success_etag else {"IfNoneMatch": "*"}
        try:
            self._success_etag = s3_put(self.fs, p, data, **condition)
        except Exception as exc:
            if precondition_failed(exc):
                raise ConcurrentCommitError(f"{self.output}/_SUCCESS changed since this run read it: another run "
                                            "committed there; this run's commit is dropped (rerun to resume)") from exc
            raise

    @staticmethod
    def _parallel(fn, items: list) -> None:
        """``fn`` over ``items``, COMMIT_THREADS at a time (object-store requests wait on the
        network); the first exception is raised once all are done."""
        if len(items) <= 1:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(min(COMMIT_THREADS, len(items))) as pool:
            for future in [pool.submit(fn, item) for item in items]:
                future.result()

    def remove_staged(self, run_id: str, rels: list[str]) -> None:
        """Delete staged files of ``run_id`` (a dropped receipt's); missing ones are fine."""
        def delete(rel: str) -> None:
            p = self.path(STAGING, run_id, rel)
            if self.fs.exists(p):
                self.fs.rm(p)

        self._parallel(delete, rels)

    # -- staging -------------------------------------------------------------------------
    def write_table(self, run_id: str, rel: str, table: pa.Table) -> None:
        p = self.path(STAGING, run_id, rel)
        self.fs.makedirs(posixpath.dirname(p), exist_ok=True)
        with self.fs.open(p, "wb") as f:
            pq.write_table(table, f, compression="zstd")

    def _write_bytes(self, p: str, data: bytes) -> None:
        write_bytes_atomic(self.fs, p, data)


def manifest_digest(manifest: dict[str, Any] | None) -> str:
    """sha256 of a `_SUCCESS` manifest's canonical JSON (keys sorted): the same for the dict a
    run built and for that dict read back from storage."""
    text = json.dumps(manifest or {}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write a small file so that a reader sees the old content or the new, never a part.

    Local: a temporary file renamed over the target (atomic on POSIX); object stores: one PUT,
    which is atomic. ``path`` is a path of ``fs`` (as `url_to_fs` returns it).
    """
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if is_local_fs(fs):
        tmp = path + f".tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):  # never leave the temporary file behind
                os.remove(tmp)
            raise
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def check_committed_output(output: str, storage: StorageOptions, tables: tuple[str, ...]) -> OutputStore:
    """Check, before any work, that `write_committed` may write ``tables`` under ``output``.

    Raises ValueError when ``output`` is a file, holds another committed output (refused before
    recovery, which would clear its staging: that of a job writing there right now, say), or
    holds files vmae-ray did not write in those table folders (ForeignFilesError); OSError when
    it cannot be written. Returns the store.
    """
    store = OutputStore(output, storage, tables=tables)
    store.check_owned()
    others = sorted(t for t, rels in store.read_state().files.items() if rels and t not in tables)
    if others:
        raise ValueError(f"{output} holds another committed output (tables {', '.join(others)}); "
                         "use a folder of its own")
    store.check_writable()
    return store


def write_committed(output: str, storage: StorageOptions, tables: dict[str, pa.Table], manifest: dict[str, Any],
                    *, run_id: str | None = None, rows_per_shard: int = 500_000,
                    owns: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Write whole tables as a committed output, replacing what ``output`` held before.

    For commands whose result is small enough to hold (labels, duplicate groups): the same
    staging, journal and `_SUCCESS`-last commit as the job, so a reader following `_SUCCESS`
    sees the old result or the new one, never a mix. ``owns`` names every table folder the
    command may write (default: those of ``tables``), so a result without one of them replaces
    one with it. Returns the `_SUCCESS` manifest written. Raises as `check_committed_output`.
    """
    run_id = run_id or new_run_id()
    owns = tuple(owns or tables)
    assert set(tables) <= set(owns), (tables.keys(), owns)
    store = check_committed_output(output, storage, owns)
    previous = store.recover()
    staged: dict[str, list[str]] = {t: [] for t in tables}
    for name, table in tables.items():
        for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
            rel = posixpath.join(name, f"part-{run_id}-{i:05d}.parquet")
            store.write_table(run_id, rel, table.slice(start, rows_per_shard))
            staged[name].append(rel)
    return store.commit(run_id, staged, {"run_id": run_id, **manifest}, previous, replace_all=True)


def rewrite_group(store: OutputStore, run_id: str, rels: list[str], video_ids: set[str]) -> dict[str, str | None]:
    """Copy-on-write of one shard group without the rows of ``video_ids``; runs in a Ray task.

    ``rels`` are committed files (relative to the output) rewritten together: a receipt's
    clips/, videos/ and errors/ shards, which share a name, get one new shared name so that
    stays true. Returns {old file: its rewritten staged file, or None when no row is left};
    files that hold none of ``video_ids`` are still rewritten when another file of the group is,
    and left out of the result when none is."""
    ids = pa.array(sorted(video_ids), pa.string())
    tables = {}
    touched = False
    for rel in rels:
        with store.fs.open(store.path(rel), "rb") as f:
            data = pq.read_table(f)
        mask = pc.is_in(data.column("video_id"), value_set=ids)
        touched = touched or pc.any(mask).as_py()
        tables[rel] = data.filter(pc.invert(mask))
    if not touched:
        return {}
    stem = f"{run_id}-{uuid.uuid4().hex[:10]}-rw00000"
    out: dict[str, str | None] = {}
    for rel, remaining in tables.items():
        if remaining.num_rows == 0:
            out[rel] = None
            continue
        new = posixpath.join(posixpath.dirname(rel), f"part-{stem}.parquet")
        store.write_table(run_id, new, remaining)
        out[rel] = new
    return out

