"""Column names and Arrow schemas of the output tables, defined once.

Everything that writes or checks `clips/`, `videos/` and `errors/` takes its names and types
from here, so the contract in DESIGN.md lives in one place. Embeddings are plain
`fixed_size_list<float32, D>` (not Ray's tensor extension) so pyarrow, pandas, DuckDB and
Spark read the tables without Ray installed.
"""

from __future__ import annotations

import pyarrow as pa

# Table folders under --output.
CLIPS = "clips"
VIDEOS = "videos"
ERRORS = "errors"
TABLES = (CLIPS, VIDEOS, ERRORS)
SUCCESS_FILE = "_SUCCESS"

# Error stages and stable error types (users filter on these; never rename).
STAGES = ("list", "read", "probe", "decode", "embed")
ERROR_TYPES = (
    "not_found",
    "access_denied",
    "no_video_stream",
    "corrupt",
    "timeout",
    "too_large",
    "crashed",
    "transient",
    "embed_failed",
    "unknown",
)

# Columns the job owns; a manifest column with one of these names cannot pass through.
RESERVED_COLUMNS = frozenset(
    {
        "video_id", "uri", "clip_index", "start_seconds", "end_seconds", "frame_indices",
        "embedding", "top_labels", "top_scores", "num_clips", "duration_seconds", "width",
        "height", "fps", "codec", "stream_index", "num_streams", "stage", "error_type",
        "message", "run_id", "input_fingerprint", "settings_fingerprint", "size_bytes",
    }
)


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def _label_fields(with_labels: bool) -> list[pa.Field]:
    if not with_labels:
        return []
    return [pa.field("top_labels", pa.list_(pa.string())), pa.field("top_scores", pa.list_(pa.float32()))]


def _bookkeeping_fields() -> list[pa.Field]:
    # Identity of the input and of the settings that produced the row: resume and
    # incremental runs decide "already done" from these, and readers can tell runs apart.
    return [
        pa.field("run_id", pa.string()),
        pa.field("input_fingerprint", pa.string()),
        pa.field("settings_fingerprint", pa.string()),
    ]


def clips_schema(dim: int, *, with_labels: bool, passthrough: pa.Schema | None = None) -> pa.Schema:
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("clip_index", pa.int32(), nullable=False),
        pa.field("start_seconds", pa.float64()),
        pa.field("end_seconds", pa.float64()),
        pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("embedding", embedding_type(dim)),
        *_label_fields(with_labels),
        *_bookkeeping_fields(),
    ]
    return pa.schema(fields + list(passthrough or []))


def videos_schema(dim: int, *, with_labels: bool, passthrough: pa.Schema | None = None) -> pa.Schema:
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("num_clips", pa.int32()),
        pa.field("duration_seconds", pa.float64()),
        pa.field("embedding", embedding_type(dim)),
        *_label_fields(with_labels),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("fps", pa.float64()),
        pa.field("codec", pa.string()),
        pa.field("stream_index", pa.int32()),
        pa.field("num_streams", pa.int32()),
        pa.field("size_bytes", pa.int64()),
        *_bookkeeping_fields(),
    ]
    return pa.schema(fields + list(passthrough or []))


def errors_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        *_bookkeeping_fields(),
    ]
    return pa.schema(fields + list(passthrough or []))
