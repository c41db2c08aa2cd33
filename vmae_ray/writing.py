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
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vmae_ray.schema import SUCCESS_FILE, TABLES
from vmae_ray.storage import StorageOptions, join, url_to_fs
from vmae_ray.tables import rows_to_table

log = logging.getLogger(__name__)

FORMAT = "vmae-ray/1"
STAGING = "_staging"
JOURNAL = "_COMMIT.json"


def failpoint(name: str) -> None:
    """Crash here when VMAE_RAY_FAILPOINT names this point (crash-consistency tests).

    The commit protocol must leave the previous or the new committed state whatever
    instant the driver dies at; tests kill it at each named point of the commit, on top
    of killing it at random times.
    """
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
        return {t: list(self.manifest.get("files", {}).get(t, [])) for t in TABLES}

    @property
    def settings_fingerprint(self) -> str | None:
        return self.manifest.get("settings_fingerprint")


class OutputStore:
    """All reads and writes under ``--output``."""

    def __init__(self, output: str, storage: StorageOptions):
        self.output = output.rstrip("/")
        self.storage = storage
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
            data = json.loads(f.read().decode("utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"--output: {self.output}/_SUCCESS is not a vmae-ray manifest (format {data.get('format')!r})")
        return CommittedState(data)

    def read_committed_column_table(self, state: CommittedState, table: str, columns: list[str]) -> pa.Table:
        files = state.files[table]
        if not files:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        parts = []
        for rel in files:
            with self.fs.open(self.path(rel), "rb") as f:
                parts.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(parts, promote_options="permissive")

    # -- recovery ------------------------------------------------------------------------
    def recover(self) -> CommittedState:
        """Finish or undo what a killed run left, and return the committed state."""
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
        for table in TABLES:
            folder = self.path(table)
            if not self.fs.exists(folder):
                continue
            for p in self.fs.ls(folder, detail=False):
                rel = posixpath.join(table, posixpath.basename(p))
                if rel not in committed:
                    log.warning("removing %s: not part of any committed run", rel)
                    self.fs.rm(p)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        return state

    def check_writable(self) -> None:
        """Fail fast (before any work) when --output cannot be written."""
        probe = self.path(STAGING, f".write-check-{uuid.uuid4().hex[:8]}")
        self._write_bytes(probe, b"ok")
        self.fs.rm(probe)
        staging = self.path(STAGING)
        if self.fs.exists(staging) and not self.fs.ls(staging, detail=False):
            self.fs.rm(staging, recursive=True)

    def wipe(self) -> None:
        """--overwrite: remove the tables and manifest (only the job's own names)."""
        for name in (*TABLES, STAGING, SUCCESS_FILE):
            p = self.path(name)
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)

    # -- commit --------------------------------------------------------------------------
    def commit(self, run_id: str, staged: dict[str, list[str]], manifest: dict[str, Any],
               previous: CommittedState, superseded_ids: set[str], *, replace_all: bool = False) -> dict[str, Any]:
        """Make the staged files of ``run_id`` the new committed state; returns _SUCCESS.

        ``replace_all`` drops every previously committed file (the settings changed, so
        old rows must not stay beside new ones).
        """
        files = previous.files
        moves: list[tuple[str, str]] = []
        dropped: list[str] = []
        if replace_all:
            dropped = [rel for rels in files.values() for rel in rels]
            files = {t: [] for t in TABLES}
        elif superseded_ids:
            files, rewrites, dropped = self._rewrite_without(run_id, files, superseded_ids)
            for table, rels in rewrites.items():
                staged.setdefault(table, []).extend(rels)
        for table in TABLES:
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
        keep: dict[str, list[str]] = {t: [] for t in TABLES}
        rewrites: dict[str, list[str]] = {t: [] for t in TABLES}
        dropped: list[str] = []
        id_array = pa.array(sorted(ids), pa.string())
        for table in TABLES:
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
        self.fs.makedirs(posixpath.dirname(p), exist_ok=True)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if "file" in protocols:
            tmp = p + f".tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)  # atomic on POSIX: readers see the old or the new file
        else:
            with self.fs.open(p, "wb") as f:  # object stores: one PUT, atomic
                f.write(data)


class ShardWriter:
    """Buffers finished rows per table and stages a Parquet shard per ``rows_per_shard``."""

    def __init__(self, store: OutputStore, run_id: str, schemas: dict[str, pa.Schema], rows_per_shard: int):
        self.store = store
        self.run_id = run_id
        self.schemas = schemas
        self.rows_per_shard = rows_per_shard
        self._buffers: dict[str, list[dict]] = {t: [] for t in TABLES}
        self.staged: dict[str, list[str]] = {t: [] for t in TABLES}
        # Shards written by this run so far, per table. Not reset when a periodic commit
        # empties `staged`: a name must never repeat within a run, or the next commit's
        # move would overwrite a committed shard (and _SUCCESS would list it twice).
        self._shards: dict[str, int] = {t: 0 for t in TABLES}

    def add(self, table: str, rows: list[dict]) -> None:
        if not rows:
            return
        buf = self._buffers[table]
        buf.extend(rows)
        while len(buf) >= self.rows_per_shard:
            self._flush(table, buf[: self.rows_per_shard])
            del buf[: self.rows_per_shard]

    def flush(self) -> None:
        for table, buf in self._buffers.items():
            if buf:
                self._flush(table, buf)
                buf.clear()

    def _flush(self, table: str, rows: list[dict]) -> None:
        rel = posixpath.join(table, f"part-{self.run_id}-{self._shards[table]:05d}.parquet")
        self._shards[table] += 1
        self.store.write_table(self.run_id, rel, rows_to_table(rows, self.schemas[table]))
        self.staged[table].append(rel)
