"""Worker-side writing: finished videos as Parquet shards in the run's staging folder, and the
receipt that names them.

A model actor call (or a task finishing videos split across calls) writes what it finished
into ``OUT/_staging/<run_id>/``: ``clips/``, ``videos/`` and ``errors/`` shards that share one
stem, ``part-<run_id>-<attempt>.parquet``, plus a ``parts/`` file with the clips of videos it
holds only some clips of. It returns a `Receipt`: the files, the input numbers it finished,
the parts, and counts. The driver (`vmae_ray.commit`) accepts or drops each receipt whole and
commits accepted files with the output's protocol (`vmae_ray.writing`). A file no accepted
receipt names is never committed: the run's staging folder is removed at its end, and by
the next run's recovery if the driver died.

Shards of one receipt share their stem, so the clips of a video in ``videos/part-S.parquet``
are in ``clips/part-S.parquet``: a superseded input costs a rewrite of that group only.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vmae_ray.assembly import Labeler, OutputSchemas, assemble, dedupe_clips, error_rows, split_complete
from vmae_ray.schema import CLIPS, ERRORS, RECEIPT_SCHEMA, VIDEOS, error_row
from vmae_ray.storage import StorageOptions, url_to_fs

PARTS = "parts"  # clips of videos split across calls: staged, never committed
STAGING = "_staging"


def shard_name(table: str, run_id: str, attempt: str) -> str:
    """The staged (and committed) name of a receipt's shard of ``table``: ``table/part-RUN-ATTEMPT.parquet``."""
    return posixpath.join(table, f"part-{run_id}-{attempt}.parquet")


def shard_stem(rel: str) -> str:
    """The group a committed shard belongs to: its file name (shared by the group's tables)."""
    return posixpath.basename(rel)


# ---------------------------------------------------------------------------------------------
# Failpoints in workers (crash-consistency tests)

FAILPOINT_ENV = "VMAE_RAY_FAILPOINT"
# A file whose creation arms a worker failpoint once: the first worker to create it fires,
# later ones (the retry) do not.
FAILPOINT_ONCE_ENV = "VMAE_RAY_FAILPOINT_ONCE"
WORKER_FAILPOINTS = ("worker_after_write", "worker_duplicate_receipt")


def failpoint_fires(name: str) -> bool:
    """Whether the worker failpoint ``name`` fires now: VMAE_RAY_FAILPOINT names it and this is
    the first time in the run (VMAE_RAY_FAILPOINT_ONCE, a path, is created atomically)."""
    assert name in WORKER_FAILPOINTS, name
    if os.environ.get(FAILPOINT_ENV) != name:
        return False
    once = os.environ.get(FAILPOINT_ONCE_ENV)
    if not once:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def failpoint_in_worker(name: str) -> None:
    """Kill this worker process here when `failpoint_fires(name)`."""
    if failpoint_fires(name):
        os._exit(87)


# ---------------------------------------------------------------------------------------------
# Receipts


@dataclass
class CallStats:
    """What a call did (its receipt's ``stats``), and what the driver sums over accepted receipts
    (`add`): counts, stage seconds, model call sizes, when clips were decoded (clips per Unix second)."""

    clips: int = 0
    videos: int = 0
    errors: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    decode_seconds: float = 0.0
    embed_seconds: float = 0.0
    model_calls: dict[int, int] = field(default_factory=dict)  # {clips in a call: calls}
    decoded_at: dict[int, int] = field(default_factory=dict)  # {unix second: clips decoded then}

    def add_decoded(self, decoded: pa.Table) -> None:
        """Count the decode work of a batch of decoded rows."""
        seconds = decoded.column("decode_seconds").to_numpy(zero_copy_only=False)
        self.decode_seconds += float(np.nansum(np.asarray(seconds, dtype=np.float64)))
        at = decoded.column("decoded_at").to_pylist()
        clips = [len(v) if v is not None else 0 for v in decoded.column("clip_index").to_pylist()]
        for t, n in zip(at, clips):
            if t is not None and n:
                self.decoded_at[int(t)] = self.decoded_at.get(int(t), 0) + n

    def add(self, stats: dict[str, Any]) -> None:
        """Add a receipt's ``stats`` (`to_json`'s, parsed)."""
        self.clips += stats.get("clips", 0)
        self.videos += stats.get("videos", 0)
        self.errors += stats.get("errors", 0)
        for k, v in stats.get("errors_by_type", {}).items():
            self.errors_by_type[k] = self.errors_by_type.get(k, 0) + v
        self.decode_seconds += stats.get("decode_seconds", 0.0)
        self.embed_seconds += stats.get("embed_seconds", 0.0)
        for k, v in stats.get("model_calls", {}).items():
            self.model_calls[int(k)] = self.model_calls.get(int(k), 0) + v
        for k, v in stats.get("decoded_at", {}).items():
            self.decoded_at[int(k)] = self.decoded_at.get(int(k), 0) + v

    def clips_decoded_since(self, unix_seconds: float) -> int:
        return sum(v for k, v in self.decoded_at.items() if k >= unix_seconds)

    def to_json(self) -> str:
        return json.dumps({
            "clips": self.clips, "videos": self.videos, "errors": self.errors,
            "errors_by_type": self.errors_by_type, "decode_seconds": round(self.decode_seconds, 6),
            "embed_seconds": round(self.embed_seconds, 6),
            "model_calls": {str(k): v for k, v in self.model_calls.items()},
            "decoded_at": {str(k): v for k, v in self.decoded_at.items()},
        })


def receipts_table(receipts: list[dict]) -> pa.Table:
    """Receipt dicts (`RECEIPT_SCHEMA` names) as the table a call returns."""
    return pa.Table.from_pylist(receipts, schema=RECEIPT_SCHEMA)


def empty_embedded(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def explode_clip_rows(rows: pa.Table, schema: pa.Schema, *, embeddings: np.ndarray, logits: list | None,
                      losses: np.ndarray | None, masks: list | None) -> pa.Table:
    """Per-clip rows (``schema``, an `embedded_schema`) of decoded clip rows: the list columns
    flattened, the per-video columns repeated, the model's outputs added (in clip order)."""
    parent = pc.list_parent_indices(rows.column("clip_index"))
    columns: dict[str, Any] = {}
    for f in schema:
        name = f.name
        if name in ("clip_index", "start_seconds", "end_seconds", "frame_indices"):
            columns[name] = pc.list_flatten(rows.column(name))
        elif name == "embedding":
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1])
        elif name == "logits":
            columns[name] = pa.array([None if v is None else np.asarray(v, np.float32) for v in logits],
                                     pa.list_(pa.float32()))
        elif name == "reconstruction_loss":
            columns[name] = pa.array(losses, pa.float32())
        elif name == "reconstruction_mask":
            columns[name] = pa.array(masks, pa.binary())
        elif name in rows.column_names:
            columns[name] = rows.column(name).take(parent)
        else:
            columns[name] = pa.nulls(len(parent), f.type)
    arrays = []
    for f in schema:
        value = columns[f.name]
        if isinstance(value, pa.ChunkedArray):
            value = value.combine_chunks()
        arrays.append(value if value.type.equals(f.type) else value.cast(f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# ---------------------------------------------------------------------------------------------
# The writer


@dataclass
class VideoWriter:
    """What a worker needs to turn embedded clips into staged shards: where (``output``,
    ``run_id``), which tables (``schemas``), the labels and reconstruction settings, and the
    values every row carries. Picklable: built on the driver, used in actors and tasks.
    """

    output: str
    storage: StorageOptions
    run_id: str
    schemas: OutputSchemas
    embedded_schema: pa.Schema
    settings_fingerprint: str
    labels: Labeler | None = None
    with_reconstruction: bool = False
    _fs: Any = field(default=None, repr=False, compare=False)
    _root: str = field(default="", repr=False, compare=False)
    _writer_id: str = field(default="", repr=False, compare=False)
    _calls: int = field(default=0, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_fs=None, _root="", _writer_id="", _calls=0)  # per process
        return state

    @property
    def common(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "settings_fingerprint": self.settings_fingerprint}

    def _staging(self):
        if self._fs is None:
            self._fs, root = url_to_fs(self.output.rstrip("/"), self.storage)
            self._root = posixpath.join(root.rstrip("/"), STAGING, self.run_id)
            self._writer_id = uuid.uuid4().hex[:10]
        return self._fs, self._root

    def next_attempt(self, prefix: str = "") -> str:
        """A name for this call's files that no other call or attempt uses: this process's
        random id and a counter (SHARD_NAME: the name ends in 5+ digits)."""
        self._staging()
        self._calls += 1
        return f"{prefix}{self._writer_id}-{self._calls:05d}"

    def write_table(self, rel: str, table: pa.Table) -> None:
        fs, root = self._staging()
        path = posixpath.join(root, rel)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, compression="zstd")

    def write(self, embedded: pa.Table, errors: pa.Table, *, failed: dict[int, str], stats: CallStats,
              attempt: str | None = None) -> dict:
        """Assemble and stage what a call finished; returns its receipt (a dict of `RECEIPT_SCHEMA`).

        ``embedded``: per-clip rows of the call (`embedded_schema`, the clips whose model call
        worked); ``errors``: decoded error rows; ``failed``: {input_number: message} of videos
        a model call failed for (they become ``embed_failed`` error rows, made from their
        ``failed_rows``)."""
        attempt = attempt or self.next_attempt()
        error_tables = [errors] if errors.num_rows else []
        bad = set(int(n) for n in errors.column("input_number").to_pylist())
        if failed:
            error_tables.append(self._failed_rows(embedded, errors.schema, failed))
            bad |= set(failed)
        if bad:
            keep = pc.invert(pc.is_in(embedded.column("input_number"), value_set=pa.array(sorted(bad), pa.int64())))
            embedded = embedded.filter(keep)
        clips = dedupe_clips(embedded)
        complete, partial = split_complete(clips)
        files: list[str] = []
        done: list[int] = []
        if complete.num_rows:
            clip_rows, video_rows = assemble(complete, schemas=self.schemas, common=self.common,
                                             labeler=self.labels, with_reconstruction=self.with_reconstruction)
            for table, rows in ((CLIPS, clip_rows), (VIDEOS, video_rows)):
                rel = shard_name(table, self.run_id, attempt)
                self.write_table(rel, rows)
                files.append(rel)
            done += video_rows_numbers(complete)
            stats.clips += clip_rows.num_rows
            stats.videos += video_rows.num_rows
        if error_tables:
            decoded_errors = pa.concat_tables(error_tables, promote_options="permissive")
            # One error row per input (a video may have failed twice in one call).
            numbers = decoded_errors.column("input_number").to_pylist()
            firsts = sorted({n: i for i, n in reversed(list(enumerate(numbers)))}.values())
            decoded_errors = decoded_errors.take(pa.array(firsts, pa.int64()))
            rows = error_rows(decoded_errors, schema=self.schemas.errors, common=self.common)
            rel = shard_name(ERRORS, self.run_id, attempt)
            self.write_table(rel, rows)
            files.append(rel)
            done += [int(n) for n in decoded_errors.column("input_number").to_pylist()]
            stats.errors += rows.num_rows
            for t in rows.column("error_type").to_pylist():
                stats.errors_by_type[t] = stats.errors_by_type.get(t, 0) + 1
        parts = []
        if partial.num_rows:
            rel = shard_name(PARTS, self.run_id, attempt)
            self.write_table(rel, partial)
            files.append(rel)
            parts = parts_of(partial)
        return {"attempt": attempt, "files": files, "done": done, "parts": parts, "stats": stats.to_json()}

    def _failed_rows(self, embedded: pa.Table, schema: pa.Schema, failed: dict[int, str]) -> pa.Table:
        """Decoded error rows (``embed_failed``) for the videos a model call failed for."""
        numbers = embedded.column("input_number").to_pylist()
        first = {}
        for i, n in enumerate(numbers):
            if n in failed and n not in first:
                first[n] = i
        rows = embedded.take(pa.array(list(first.values()), pa.int64())).drop_columns(["embedding"]).to_pylist()
        from vmae_ray.schema import DECODED_SCHEMA

        # The input's identity and its passthrough columns; the per-clip columns are not the row's.
        keep = [n for n in schema.names if n not in DECODED_SCHEMA.names]
        out = []
        for row in rows:
            out.append({**{k: row.get(k) for k in keep},
                        **error_row(row, stage="embed", error_type="embed_failed",
                                    message=failed[row["input_number"]])})
        return pa.Table.from_pylist(out, schema=schema)

    def duplicate(self, receipt: dict) -> dict:
        """A second receipt for the same inputs with copies of its files under a new stem: what a
        retried call whose first attempt also reported would send (failpoint tests)."""
        attempt = self.next_attempt()
        fs, root = self._staging()
        files = []
        for rel in receipt["files"]:
            table = posixpath.dirname(rel)
            new = shard_name(table, self.run_id, attempt)
            fs.copy(posixpath.join(root, rel), posixpath.join(root, new))
            files.append(new)
        return {**receipt, "attempt": attempt, "files": files}

    def finish(self, videos: list[tuple[int, list[str]]]) -> dict:
        """Finish videos split across calls: read their clips from the ``parts/`` files that hold
        them, keep one copy of each clip, assemble and stage them like a call's complete videos.

        ``videos``: (input number, parts files) of videos whose parts cover all their clips.
        Returns the receipt of these videos (only those whose clips are all there are done)."""
        started = time.perf_counter()
        wanted = pa.array(sorted({n for n, _ in videos}), pa.int64())
        fs, root = self._staging()
        tables = []
        for rel in sorted({rel for _, rels in videos for rel in rels}):
            with fs.open(posixpath.join(root, rel), "rb") as f:
                table = pq.read_table(f, schema=self.embedded_schema)
            tables.append(table.filter(pc.is_in(table.column("input_number"), value_set=wanted)))
        stats = CallStats()
        clips = pa.concat_tables(tables) if tables else empty_embedded(self.embedded_schema)
        receipt = self.write(clips, _empty_errors(), failed={}, stats=stats, attempt=self.next_attempt("fin"))
        stats = json.loads(receipt["stats"])
        stats["embed_seconds"] = 0.0
        stats["finish_seconds"] = round(time.perf_counter() - started, 6)
        receipt["stats"] = json.dumps(stats)
        return receipt


def _empty_errors() -> pa.Table:
    from vmae_ray.schema import DECODED_SCHEMA

    return DECODED_SCHEMA.empty_table()


def video_rows_numbers(complete: pa.Table) -> list[int]:
    """The input numbers of the videos of a `dedupe_clips` table, once each."""
    numbers = complete.column("input_number").to_numpy(zero_copy_only=False)
    if len(numbers) == 0:
        return []
    return [int(n) for n in numbers[np.r_[True, numbers[1:] != numbers[:-1]]]]


def parts_of(partial: pa.Table) -> list[dict]:
    """The receipt's ``parts`` entries of a `dedupe_clips` table of incomplete videos."""
    numbers = partial.column("input_number").to_numpy(zero_copy_only=False)
    indices = partial.column("clip_index").to_numpy(zero_copy_only=False)
    planned = partial.column("num_clips").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, numbers[1:] != numbers[:-1]])
    ends = np.r_[starts[1:], len(numbers)]
    return [{"input_number": int(numbers[s]), "num_clips": int(planned[s]),
             "clip_index": [int(k) for k in indices[s:e]]} for s, e in zip(starts, ends)]
