"""The row contracts, defined once: the output tables, and the rows between the steps.

Everything that writes or checks `clips/`, `videos/` and `errors/` takes its names and types
from here, so the contract in DESIGN.md lives in one place. Embeddings are plain
`fixed_size_list<float32, D>` (not Ray's tensor extension) so pyarrow, pandas, DuckDB and
Spark read the tables without Ray installed.

Rows between the steps (decode -> embed and write) have one schema, `decoded_schema`, whatever
their kind; each row is a whole video, or a chunk of a long one:
- ``clip``: the clips of one video (or of a chunk of at most `MAX_CLIPS_PER_ROW` of them):
  ``pixels`` holds their uint8 (C, T, H, W, 3) bytes (clips travel as uint8, never float: 4x
  less object-store traffic) and the list columns (``clip_index``, ``start_seconds``, ...)
  one value per clip. Every row carries its video's facts and ``num_clips``, the number of
  clips the video's plan has, so a video is complete when that many distinct clips have
  arrived. Rows are videos, so Ray Data's blocks (sized by bytes) and batches (sized in
  rows) never cut a video that fits in one row.
- ``error``: the video failed; carries stage, error_type and message, built by `error_row`
  only. A video that fails sends no clip row (a chunked one may have sent some; they are
  never committed, see `vmae_ray.commit`).
Every row carries ``input_number``, the input's number in the run's to-do table: receipts
name inputs by it, so the driver keeps a bitmap, not ids.
The model actor turns clip rows into per-clip rows of `embedded_schema` (embedding, logits,
reconstruction), assembles whole videos into output rows and writes them itself
(`vmae_ray.staging`); only a receipt (`RECEIPT_SCHEMA`) travels back to the driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

# Table folders under --output.
CLIPS = "clips"
VIDEOS = "videos"
ERRORS = "errors"
TABLES = (CLIPS, VIDEOS, ERRORS)
SUCCESS_FILE = "_SUCCESS"

# Error stages and stable error types (users filter on these; never rename). `error_row`
# refuses any other value, so an unknown code fails a test instead of a user's query.
STAGES = ("list", "read", "probe", "decode", "embed")
ERROR_TYPES = (
    "not_found",
    "access_denied",
    "no_video_stream",
    "corrupt",
    "timeout",
    "too_large",
    "damaged",  # decodes, but damaged (--on-damage error); see `damage` on videos/
    "crashed",
    "transient",
    "embed_failed",
    "unknown",
)

# Columns the job owns; a manifest column with one of these names cannot pass through.
RESERVED_COLUMNS = frozenset(
    {
        "input_number", "kind", "pixels", "clip_shape", "decode_seconds", "decoded_at",
        "logits",
        "video_id", "uri", "clip_index", "start_seconds", "end_seconds", "frame_indices",
        "embedding", "top_labels", "top_scores", "num_clips", "duration_seconds", "width",
        "height", "fps", "codec", "stream_index", "num_streams", "stage", "error_type",
        "message", "run_id", "input_fingerprint", "settings_fingerprint", "size_bytes",
        "reconstruction_loss", "reconstruction_mask",
        "display_rotation_degrees", "display_hflip", "sample_aspect_ratio",
        "damaged", "damage", "hdr",
    }
)


# What turned the stored picture into the one the model's resize started from (`width` x
# `height` is that picture): the display matrix's counterclockwise quarter turns and left-right
# mirror (applied mirror first), and the sample aspect ratio. 0 / false / 1.0 when the file has
# none, or when the run kept the stored geometry (--geometry stored).
DISPLAY_FACT_FIELDS = (
    pa.field("display_rotation_degrees", pa.int32()),
    pa.field("display_hflip", pa.bool_()),
    pa.field("sample_aspect_ratio", pa.float64()),
)

# What the decoder met that the file did not promise, and how its colour was taken:
# ``damaged`` (the file is damaged; it was embedded from what decodes) and ``damage`` (what was
# wrong and where, e.g. "ends at 1.28 s of a 3.00 s header duration", null when whole; see
# `decoding.DamageLog`); ``hdr``: the HDR transfer function ("smpte2084" for PQ,
# "arib-std-b67" for HLG, as ffprobe names them; null for SDR), whose frames were tone-mapped
# to SDR BT.709 before the model saw them.
QUALITY_FACT_FIELDS = (
    pa.field("damaged", pa.bool_()),
    pa.field("damage", pa.string()),
    pa.field("hdr", pa.string()),
)

# Facts about a video's chosen stream, carried on each of its clip rows and written to videos/.
VIDEO_FACT_FIELDS = (
    pa.field("duration_seconds", pa.float64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("fps", pa.float64()),
    pa.field("codec", pa.string()),
    pa.field("stream_index", pa.int32()),
    pa.field("num_streams", pa.int32()),
    *DISPLAY_FACT_FIELDS,
    *QUALITY_FACT_FIELDS,
)
VIDEO_FACTS = tuple(f.name for f in VIDEO_FACT_FIELDS)


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def _label_fields(with_labels: bool) -> list[pa.Field]:
    if not with_labels:
        return []
    return [pa.field("top_labels", pa.list_(pa.string())), pa.field("top_scores", pa.list_(pa.float32()))]


def _reconstruction_fields(with_reconstruction: bool, *, with_mask: bool) -> list[pa.Field]:
    # --reconstruction: the pretraining loss of each clip (mean over its clips for a video) and
    # the clip's tube mask as numpy.packbits bytes (vmae_ray.reconstruction.pack_mask).
    if not with_reconstruction:
        return []
    fields = [pa.field("reconstruction_loss", pa.float32())]
    if with_mask:
        fields.append(pa.field("reconstruction_mask", pa.binary()))
    return fields


def _bookkeeping_fields() -> list[pa.Field]:
    # Identity of the input and of the settings that produced the row: resume and
    # incremental runs decide "already done" from these, and readers can tell runs apart.
    return [
        pa.field("run_id", pa.string()),
        pa.field("input_fingerprint", pa.string()),
        pa.field("settings_fingerprint", pa.string()),
    ]


def clips_schema(dim: int, *, with_labels: bool, passthrough: pa.Schema | None = None,
                 with_reconstruction: bool = False) -> pa.Schema:
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("clip_index", pa.int32(), nullable=False),
        pa.field("start_seconds", pa.float64()),
        pa.field("end_seconds", pa.float64()),
        pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("embedding", embedding_type(dim)),
        *_label_fields(with_labels),
        *_reconstruction_fields(with_reconstruction, with_mask=True),
        *_bookkeeping_fields(),
    ]
    return pa.schema(fields + list(passthrough or []))


def videos_schema(dim: int, *, with_labels: bool, passthrough: pa.Schema | None = None,
                  with_reconstruction: bool = False) -> pa.Schema:
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("num_clips", pa.int32()),
        pa.field("embedding", embedding_type(dim)),
        *_label_fields(with_labels),
        *_reconstruction_fields(with_reconstruction, with_mask=False),
        *VIDEO_FACT_FIELDS,
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


# Tables of `vmae-ray probe apply` (under its --output): labels at the head's level, and for a
# clip-level head also one row per video (labels from the mean of its clip logits).
LABELS = "labels"
VIDEO_LABELS = "video_labels"


def labels_schema(*, clip_level: bool) -> pa.Schema:
    """`labels/` rows: one per video, or per clip (with ``clip_index``) for a clip-level head."""
    fields = [pa.field("video_id", pa.string(), nullable=False), pa.field("uri", pa.string(), nullable=False)]
    if clip_level:
        fields.append(pa.field("clip_index", pa.int32(), nullable=False))
    return pa.schema(fields + _label_fields(True))


# --------------------------------------------------------------------------------------
# Rows between the steps

KIND_CLIP = "clip"
KIND_ERROR = "error"
ROW_KINDS = (KIND_CLIP, KIND_ERROR)

# Error messages are cut to this many characters: a decoder can produce pages of text.
MAX_MESSAGE_CHARS = 2000

# The columns that identify an input on every row between the steps.
INPUT_FIELDS = (
    pa.field("input_number", pa.int64()),  # the input's number in the run's to-do table
    pa.field("video_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("input_fingerprint", pa.string()),
    pa.field("size_bytes", pa.int64()),
)

DECODED_FIELDS = (
    pa.field("kind", pa.string()),
    *INPUT_FIELDS,
    pa.field("num_clips", pa.int32()),  # clips the video's plan has (every clip row carries it)
    # One value per clip of the row:
    pa.field("clip_index", pa.list_(pa.int32())),
    pa.field("start_seconds", pa.list_(pa.float64())),
    pa.field("end_seconds", pa.list_(pa.float64())),
    pa.field("frame_indices", pa.list_(pa.list_(pa.int32()))),
    pa.field("pixels", pa.large_binary()),  # uint8 (C, T, H, W, 3), C = len(clip_index)
    pa.field("clip_shape", pa.list_(pa.int32())),  # (T, H, W, 3) of each clip
    *VIDEO_FACT_FIELDS,
    pa.field("stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("message", pa.string()),
    # Seconds of decode work spent on this row: the workers sum them into receipts, so the
    # driver can report each stage's throughput and which one bounded the run.
    pa.field("decode_seconds", pa.float64()),
    # Wall-clock time (Unix seconds) the row finished decoding: tells clips decoded after the
    # model actors started from the backlog decoded while they started.
    pa.field("decoded_at", pa.float64()),
)
DECODED_SCHEMA = pa.schema(DECODED_FIELDS)


def decoded_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """Rows leaving the decode step: `DECODED_SCHEMA` plus the input's passthrough columns."""
    return pa.schema(list(DECODED_FIELDS) + list(passthrough or []))


def embedded_schema(dim: int, *, with_logits: bool, with_reconstruction: bool = False,
                    passthrough: pa.Schema | None = None) -> pa.Schema:
    """One row per embedded clip, inside the model actor and in the ``parts/`` files of videos
    split across actor calls: the input, the clip, the video's facts, the model's outputs.

    ``logits`` are the label logits of the clip (a checkpoint's classifier, or a `--head`'s on
    the clip's embedding), from which clip and video labels are drawn. With
    ``with_reconstruction``, ``reconstruction_loss`` and ``reconstruction_mask`` as in
    `clips_schema`.
    """
    fields = [
        *INPUT_FIELDS,
        pa.field("num_clips", pa.int32()),
        pa.field("clip_index", pa.int32()),
        pa.field("start_seconds", pa.float64()),
        pa.field("end_seconds", pa.float64()),
        pa.field("frame_indices", pa.list_(pa.int32())),
        *VIDEO_FACT_FIELDS,
        pa.field("embedding", embedding_type(dim)),
    ]
    if with_logits:
        fields.append(pa.field("logits", pa.list_(pa.float32())))
    fields += _reconstruction_fields(with_reconstruction, with_mask=True)
    return pa.schema(fields + list(passthrough or []))


# What a model actor call (or a task finishing split videos) sends back to the driver instead
# of rows: the files it staged and which inputs they finish. Small and fixed-size per call.
RECEIPT_SCHEMA = pa.schema([
    pa.field("attempt", pa.string()),  # unique per call attempt; the stem of its file names
    pa.field("files", pa.list_(pa.string())),  # staged files, relative to the run's staging folder
    pa.field("done", pa.list_(pa.int64())),  # input numbers finished: in videos/ or errors/ of these files
    # Inputs of which only some clips are here (in the parts/ file): (input, clips planned, clips here).
    pa.field("parts", pa.list_(pa.struct([
        pa.field("input_number", pa.int64()),
        pa.field("num_clips", pa.int32()),
        pa.field("clip_index", pa.list_(pa.int32())),
    ]))),
    pa.field("stats", pa.string()),  # JSON: rows, clips, error types, stage seconds, model call sizes
])


def check_error_code(*, stage: str, error_type: str) -> None:
    """Raise ValueError unless ``stage`` is in STAGES and ``error_type`` in ERROR_TYPES."""
    if stage not in STAGES:
        raise ValueError(f"unknown error stage {stage!r}; expected one of {', '.join(STAGES)}")
    if error_type not in ERROR_TYPES:
        raise ValueError(f"unknown error_type {error_type!r}; expected one of {', '.join(ERROR_TYPES)}")


def error_row(item: Mapping[str, Any], *, stage: str, error_type: str, message: str,
              decode_seconds: float = 0.0) -> dict[str, Any]:
    """The one way to build an error row between the steps.

    ``item`` is the input record (``video_id``, ``uri``, optional ``input_number``,
    ``input_fingerprint`` and ``size_bytes``) or any row of that video. Raises ValueError for a stage or error_type
    outside the stable lists; the message is cut to MAX_MESSAGE_CHARS.
    """
    check_error_code(stage=stage, error_type=error_type)
    return {
        "kind": KIND_ERROR, "input_number": item.get("input_number"), "video_id": item["video_id"], "uri": item["uri"],
        "input_fingerprint": item.get("input_fingerprint"), "size_bytes": item.get("size_bytes"),
        "stage": stage, "error_type": error_type, "message": str(message)[:MAX_MESSAGE_CHARS],
        "decode_seconds": decode_seconds,
    }
