"""Write step: Parquet shards staged per run, then committed; `_SUCCESS` written last.

Ray Data's `write_parquet` appends and is not atomic, so the job owns its commit:

1. While the run works, shards go to ``OUT/_staging/<run_id>/<table>/`` (a name starting
   with ``_``: pyarrow, DuckDB and Spark skip it when reading the folders).
2. To commit, a journal ``_staging/<run_id>/_COMMIT.json`` lists every move, the staged
   files are moved into ``clips/``, ``videos/``, ``errors/``, and ``_SUCCESS`` is rewritten
   (write-then-rename on local disk; a single PUT on S3) listing all committed files.
3. The next run first repairs an interrupted commit from its journal (rolls it forward),
   deletes files in the table folders that no ``_SUCCESS`` lists (rolls back anything
   else), and removes stale staging folders.

So the committed state is always the one `_SUCCESS` names, and a killed driver costs at
most the uncommitted work. Rows superseded by a run (an input that changed, or a failed
input retried) are removed by rewriting the shards that hold them, in the same commit.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vmae_ray.schema import SUCCESS_FILE, TABLES
from vmae_ray.storage import StorageOptions, is_local_fs, join, url_to_fs

log = logging.getLogger(__name__)

FORMAT = "vmae-ray/1"
STAGING = "_staging"
JOURNAL = "_COMMIT.json"
# The names of the shards vmae-ray writes: part-<run id>-<5+ digits>.parquet, or -rw<5+ digits>
# for a shard rewritten without superseded videos (Spark's part-00000-<uuid>-c000.snappy.parquet
# does not match). Nothing else in a table folder is ours, so nothing else is ever deleted.
SHARD_NAME = re.compile(r"^part-.+-(rw)?[0-9]{5,}[.]parquet$")


class ForeignFilesError(ValueError):
    """An output's table folders hold files vmae-ray did not write: nothing is written there."""


# The named points of a commit, in order (see `failpoint`).
FAILPOINTS = ("before_journal", "after_journal", "after_first_move", "before_success", "after_success")


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

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if "://" not in self.root else join(self.root, *parts)

    # -- reading -------------------------------------------------------------------------
    def read_state(self) -> CommittedState:
        p = self.path(SUCCESS_FILE)
        if not self.fs.exists(p):
            return CommittedState()
        with self.fs.open(p, "rb") as f:
            try:
                data = json.loads(f.read().decode("utf-8"))
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
        probe = self.path(STAGING, f".write-check-{uuid.uuid4().hex[:8]}")
        self._write_bytes(probe, b"ok")
        self.fs.rm(probe)
        staging = self.path(STAGING)
        if self.fs.exists(staging) and not self.fs.ls(staging, detail=False):
            self.fs.rm(staging, recursive=True)
        if created and self.fs.exists(self.root) and not self.fs.ls(self.root, detail=False):
            self.fs.rmdir(self.root)

    # -- commit --------------------------------------------------------------------------
    def commit(self, run_id: str, staged: dict[str, list[str]], manifest: dict[str, Any],
               previous: CommittedState, superseded_ids: set[str], *, replace_all: bool = False) -> dict[str, Any]:
        """Make the staged files of ``run_id`` the new committed state; returns _SUCCESS.

        ``replace_all`` drops every previously committed file (the settings changed, so
        old rows must not stay beside new ones).
        """
        files = {t: previous.files_of(t) for t in self.tables}
        staged = {t: list(staged.get(t, [])) for t in self.tables}
        moves: list[tuple[str, str]] = []
        dropped: list[str] = []
        if replace_all:
            dropped = [rel for rels in files.values() for rel in rels]
            files = {t: [] for t in self.tables}
        elif superseded_ids:
            files, rewrites, dropped = self._rewrite_without(run_id, files, superseded_ids)
            for table, rels in rewrites.items():
                staged[table].extend(rels)
        for table in self.tables:
            for rel in staged.get(table, []):
                final = posixpath.join(table, posixpath.basename(rel))
                moves.append((rel, final))
                files[table].append(final)
        success = {**manifest, "format": FORMAT, "files": files}
        plan = {"run_id": run_id, "moves": moves, "success": success, "delete": dropped}
        failpoint("before_journal")
        self._write_bytes(self.path(STAGING, run_id, JOURNAL), json.dumps(plan).encode())
        failpoint("after_journal")
        self._apply_commit(plan)
        return success

    def _apply_commit(self, plan: dict[str, Any]) -> None:
        run_id = plan["run_id"]
        for rel, final in plan["moves"]:
            src = self.path(STAGING, run_id, rel)
            dst = self.path(final)
            if self.fs.exists(src):
                self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                self.fs.mv(src, dst)
                failpoint("after_first_move")
            elif not self.fs.exists(dst):
                raise RuntimeError(f"commit of run {run_id}: staged file {rel} is missing")
        failpoint("before_success")
        self._write_bytes(self.path(SUCCESS_FILE), json.dumps(plan["success"], indent=1, default=str).encode())
        failpoint("after_success")
        # Superseded shards go only after _SUCCESS no longer lists them.
        for rel in plan.get("delete", []):
            p = self.path(rel)
            if self.fs.exists(p):
                self.fs.rm(p)
        if self.fs.exists(self.path(STAGING, run_id)):
            self.fs.rm(self.path(STAGING, run_id), recursive=True)
        staging = self.path(STAGING)
        if self.fs.exists(staging) and not self.fs.ls(staging, detail=False):
            self.fs.rm(staging, recursive=True)

    def _rewrite_without(self, run_id: str, files: dict[str, list[str]], ids: set[str]):
        """Copy-on-write: shards holding superseded video ids are rewritten without them."""
        keep: dict[str, list[str]] = {t: [] for t in self.tables}
        rewrites: dict[str, list[str]] = {t: [] for t in self.tables}
        dropped: list[str] = []
        id_array = pa.array(sorted(ids), pa.string())
        for table in self.tables:
            for rel in files[table]:
                with self.fs.open(self.path(rel), "rb") as f:
                    data = pq.read_table(f)
                mask = pc.is_in(data.column("video_id"), value_set=id_array)
                if not pc.any(mask).as_py():
                    keep[table].append(rel)
                    continue
                dropped.append(rel)
                remaining = data.filter(pc.invert(mask))
                if remaining.num_rows:
                    name = posixpath.join(table, f"part-{run_id}-rw{len(rewrites[table]):05d}.parquet")
                    self.write_table(run_id, name, remaining)
                    rewrites[table].append(name)
        return keep, rewrites, dropped

    # -- staging -------------------------------------------------------------------------
    def write_table(self, run_id: str, rel: str, table: pa.Table) -> None:
        p = self.path(STAGING, run_id, rel)
        self.fs.makedirs(posixpath.dirname(p), exist_ok=True)
        with self.fs.open(p, "wb") as f:
            pq.write_table(table, f, compression="zstd")

    def _write_bytes(self, p: str, data: bytes) -> None:
        write_bytes_atomic(self.fs, p, data)


class ShardWriter:
    """Buffers finished rows per table and stages a Parquet shard per ``rows_per_shard``.

    `take_staged` hands the names staged since the last call to a commit; shard numbers go
    on across commits, so a name never repeats within a run (a repeated name would make a
    commit's move overwrite a committed shard, and _SUCCESS list it twice).
    """

    def __init__(self, store: OutputStore, run_id: str, schemas: dict[str, pa.Schema], rows_per_shard: int):
        self.store = store
        self.run_id = run_id
        self.schemas = schemas
        self.rows_per_shard = rows_per_shard
        self._buffers: dict[str, list[dict]] = {t: [] for t in schemas}
        self._staged: dict[str, list[str]] = {t: [] for t in schemas}
        self._shards: dict[str, int] = {t: 0 for t in schemas}

    def add(self, table: str, rows: list[dict]) -> None:
        if not rows:
            return
        buf = self._buffers[table]
        buf.extend(rows)
        while len(buf) >= self.rows_per_shard:
            self._flush(table, buf[: self.rows_per_shard])
            del buf[: self.rows_per_shard]

    @property
    def has_rows(self) -> bool:
        """Whether rows were added since the last `take_staged` (buffered or staged)."""
        return any(self._buffers.values()) or any(self._staged.values())

    def take_staged(self) -> dict[str, list[str]]:
        """Stage what is buffered, and return (and forget) every shard staged since the last call."""
        for table, buf in self._buffers.items():
            if buf:
                self._flush(table, buf)
                buf.clear()
        staged, self._staged = self._staged, {t: [] for t in self.schemas}
        return staged

    def _flush(self, table: str, rows: list[dict]) -> None:
        rel = posixpath.join(table, f"part-{self.run_id}-{self._shards[table]:05d}.parquet")
        self._shards[table] += 1
        self.store.write_table(self.run_id, rel, rows_to_table(rows, self.schemas[table]))
        self._staged[table].append(rel)


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


def rows_to_table(rows: Iterable[dict], schema: pa.Schema) -> pa.Table:
    """Build an Arrow table with exactly ``schema``; embeddings become fixed_size_list."""
    rows = list(rows)
    arrays = []
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if pa.types.is_fixed_size_list(f.type):
            dim = f.type.list_size
            mask = np.array([v is None for v in values], dtype=bool)
            flat = np.zeros((len(values), dim), dtype=np.float32)
            for i, v in enumerate(values):
                if v is not None:
                    flat[i] = v
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim,
                                                             mask=pa.array(mask) if mask.any() else None))
        else:
            arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


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
    return store.commit(run_id, staged, {"run_id": run_id, **manifest}, previous, set(), replace_all=True)

