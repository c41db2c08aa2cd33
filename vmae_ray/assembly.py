"""Assemble output rows from embedded clips: pure logic (Arrow and numpy), no Ray and no I/O.

The model actor (and, for a video split across actor calls, the task that finishes it) holds
per-clip rows (`schema.embedded_schema`). A video is complete when its distinct clips number
the ``num_clips`` its plan announced. From a complete video come its clip rows and its video
row: the mean of the clip embeddings (`video_embedding`), labels from the mean of the clip
logits (the classifier's, or a linear head's on the clip embeddings), with reconstruction
the mean of the clip losses, and the video's facts. A clip that arrived twice (a retried
read) counts once: the last copy wins.

Everything here works on whole tables (numpy over Arrow buffers), never a dict per row:
it runs once per clip on the workers of a fleet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vmae_ray.heads import LinearHead
from vmae_ray.labels import top_k_labels
from vmae_ray.schema import check_error_code


def video_embedding(clip_embeddings: np.ndarray) -> np.ndarray:
    """A video's embedding from its clips' (C, D): their mean, summed in float64, as float32 (D,).

    The mean over clips is how VideoMAE's evaluation combines several clips of a video (the
    paper averages the clips' scores); the `videos/` table and a search query use this one.
    """
    return np.asarray(clip_embeddings, dtype=np.float64).mean(axis=0).astype(np.float32)


@dataclass(frozen=True)
class Labeler:
    """Where labels come from: a checkpoint's classifier (its per-clip ``logits``) or a linear
    ``head`` (`vmae-ray probe fit`) applied to the clip embeddings; ``top_k`` per clip and video."""

    id2label: dict[int, str]
    top_k: int
    head: LinearHead | None = None

    def clip_logits(self, clips: pa.Table, embeddings: np.ndarray) -> np.ndarray:
        """(C, L) float64 logits of the clips of ``clips`` (``embeddings``: their (C, D))."""
        if self.head is not None:
            return self.head.logits(embeddings)
        values = clips.column("logits")
        return np.asarray(pc.list_flatten(values).to_numpy(zero_copy_only=False),
                          dtype=np.float64).reshape(len(values), -1)


@dataclass(frozen=True)
class OutputSchemas:
    """The schemas of the tables a run writes (`schema.clips_schema` and friends)."""

    clips: pa.Schema
    videos: pa.Schema
    errors: pa.Schema


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column (fixed_size_list<float32, D>, no nulls) as float32 (N, D)."""
    column = table.column("embedding")
    dim = column.type.list_size
    if table.num_rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    arr = column.combine_chunks()
    values = arr.values.slice(arr.offset * dim, len(arr) * dim)
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(arr), dim)


def dedupe_clips(clips: pa.Table) -> pa.Table:
    """One row per (input_number, clip_index), the last of each, sorted by input then clip."""
    if clips.num_rows == 0:
        return clips
    numbers = clips.column("input_number").to_numpy(zero_copy_only=False)
    indices = clips.column("clip_index").to_numpy(zero_copy_only=False)
    position = np.arange(clips.num_rows)
    # Sort by (input, clip, position); the last of each run of equal (input, clip) is kept.
    order = np.lexsort((position, indices, numbers))
    n, k = numbers[order], indices[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (n[1:] != n[:-1]) | (k[1:] != k[:-1])
    return clips.take(pa.array(order[last]))


def video_groups(clips: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(start row, number of rows) of each video's run in a table sorted by input_number."""
    if clips.num_rows == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    numbers = clips.column("input_number").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, numbers[1:] != numbers[:-1]])
    counts = np.diff(np.r_[starts, len(numbers)])
    return starts, counts


def split_complete(clips: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(rows of complete videos, rows of the others) of a `dedupe_clips` table: a video is
    complete when its rows number its ``num_clips``."""
    starts, counts = video_groups(clips)
    if len(starts) == 0:
        return clips, clips
    planned = clips.column("num_clips").to_numpy(zero_copy_only=False)[starts]
    complete = np.repeat(counts >= planned, counts)
    mask = pa.array(complete)
    return clips.filter(mask), clips.filter(pc.invert(mask))


def assemble(clips: pa.Table, *, schemas: OutputSchemas, common: dict[str, Any], labeler: Labeler | None,
             with_reconstruction: bool) -> tuple[pa.Table, pa.Table]:
    """(clip rows, video rows) of the complete videos of a `dedupe_clips` table.

    ``common`` holds the values every row gets (run_id, settings_fingerprint). Raises
    ValueError when a video's clips are not all there (a contract violation upstream).
    """
    starts, counts = video_groups(clips)
    if len(starts):
        planned = clips.column("num_clips").to_numpy(zero_copy_only=False)[starts]
        short = np.flatnonzero(counts != planned)
        if len(short):
            i = int(short[0])
            raise ValueError(f"video {clips.column('video_id')[int(starts[i])].as_py()} has {counts[i]} of its "
                             f"{planned[i]} clips")
    embeddings = embedding_matrix(clips)
    n = clips.num_rows
    constant = {name: pa.array([value] * n, pa.string()) for name, value in common.items()}
    clip_columns: dict[str, pa.Array | pa.ChunkedArray] = {name: clips.column(name) for name in clips.column_names}
    clip_columns.update(constant)
    video_columns: dict[str, Any] = {}
    # A video's facts from its last clip: damage is learned while decoding, so the last clip's
    # row knows all of it.
    last = pa.array(starts + counts - 1)
    for name in schemas.videos.names:
        if name in clips.column_names and name not in ("embedding", "num_clips", "reconstruction_loss"):
            video_columns[name] = clips.column(name).take(last)
    video_columns.update({name: pa.array([value] * len(starts), pa.string()) for name, value in common.items()})
    video_columns["num_clips"] = pa.array(counts, pa.int32())
    means = np.stack([video_embedding(embeddings[s:s + c]) for s, c in zip(starts, counts)]) if len(starts) else \
        np.zeros((0, embeddings.shape[1]), dtype=np.float32)
    video_columns["embedding"] = _fixed_size(means)
    if labeler is not None:
        logits = labeler.clip_logits(clips, embeddings)
        labels, scores = top_k_labels(logits, labeler.id2label, labeler.top_k) if n else ([], [])
        clip_columns["top_labels"], clip_columns["top_scores"] = _labels(labels, scores)
        mean_logits = np.stack([logits[s:s + c].mean(axis=0) for s, c in zip(starts, counts)]) if len(starts) else logits
        labels, scores = top_k_labels(mean_logits, labeler.id2label, labeler.top_k) if len(starts) else ([], [])
        video_columns["top_labels"], video_columns["top_scores"] = _labels(labels, scores)
    if with_reconstruction:
        losses = clips.column("reconstruction_loss").to_numpy(zero_copy_only=False).astype(np.float64)
        video_columns["reconstruction_loss"] = pa.array(
            [float(losses[s:s + c].mean()) for s, c in zip(starts, counts)], pa.float32())
    return _conform(clip_columns, schemas.clips, n), _conform(video_columns, schemas.videos, len(starts))


def error_rows(errors: pa.Table, *, schema: pa.Schema, common: dict[str, Any]) -> pa.Table:
    """The errors/ rows of decoded (or embed-failed) error rows, one per input.

    Raises ValueError for a stage or error_type outside the stable lists (`schema.check_error_code`).
    """
    for stage, error_type in zip(errors.column("stage").to_pylist(), errors.column("error_type").to_pylist()):
        check_error_code(stage=stage, error_type=error_type)
    columns: dict[str, Any] = {name: errors.column(name) for name in errors.column_names}
    columns.update({name: pa.array([value] * errors.num_rows, pa.string()) for name, value in common.items()})
    if "message" in columns:
        columns["message"] = pc.fill_null(columns["message"], "")
    return _conform(columns, schema, errors.num_rows)


def _labels(labels: list[list[str]], scores: list[list[float]]) -> tuple[pa.Array, pa.Array]:
    return pa.array(labels, pa.list_(pa.string())), pa.array(scores, pa.list_(pa.float32()))


def _fixed_size(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _conform(columns: dict[str, Any], schema: pa.Schema, num_rows: int) -> pa.Table:
    """A table with exactly ``schema``'s columns, in order, cast to its types (absent: null)."""
    arrays = []
    for f in schema:
        value = columns.get(f.name)
        if value is None:
            value = pa.nulls(num_rows, f.type)
        if isinstance(value, pa.ChunkedArray):
            value = value.combine_chunks() if value.num_chunks != 1 else value.chunk(0)
        if not value.type.equals(f.type):
            value = value.cast(f.type)
        arrays.append(value)
    return pa.Table.from_arrays(arrays, schema=schema)
