"""Ray adapters for the decode and embed steps.

The work itself lives in `decoding` and `model` (no Ray there); this module only turns
Ray Data batches into calls on them and back. Decode is a stateless function (Ray tasks,
CPU); embed is a callable class (a Ray actor that loads the model once).

Rows between the stages have one schema, `DECODED_SCHEMA`, whatever their kind:
- ``clip``: one sampled clip; ``pixels`` holds uint8 (T,H,W,3) bytes (clips travel as uint8,
  never float: 4x less object-store traffic).
- ``done``: the video decoded fully; carries its probe facts and how many clips it made.
- ``error``: the video failed; carries stage, error_type, message. Clip rows of that video
  that were already sent are discarded downstream (a video is all or nothing).
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from vmae_ray.decoding import DecodeError, DecodeLimits, FrameGeometry, VideoDecoder
from vmae_ray.isolation import IsolatedDecoder
from vmae_ray.storage import StorageOptions, classify_storage_error, open_input

KIND_CLIP, KIND_DONE, KIND_ERROR = "clip", "done", "error"

DECODED_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("input_fingerprint", pa.string()),
        ("clip_index", pa.int32()),
        ("start_seconds", pa.float64()),
        ("end_seconds", pa.float64()),
        ("frame_indices", pa.list_(pa.int32())),
        ("pixels", pa.large_binary()),
        ("pixels_shape", pa.list_(pa.int32())),
        ("num_clips", pa.int32()),
        ("duration_seconds", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fps", pa.float64()),
        ("codec", pa.string()),
        ("stream_index", pa.int32()),
        ("num_streams", pa.int32()),
        ("size_bytes", pa.int64()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        # Seconds of work spent on this row in its stage: the driver sums them to report
        # each stage's throughput and which one bounded the run.
        ("decode_seconds", pa.float64()),
        ("embed_seconds", pa.float64()),
        # Wall-clock time (Unix seconds) a clip finished decoding: lets the driver tell clips
        # decoded after start-up from the backlog decoded while the model actors started.
        ("decoded_at", pa.float64()),
    ]
)


@dataclass(frozen=True)
class DecodeParams:
    """What a decode task needs; small and free of secrets (storage travels apart)."""

    sampling: str
    num_frames: int
    frame_stride: int
    clips_per_video: int | None
    geometry: FrameGeometry
    limits: DecodeLimits
    threads: int = 1
    # Decode each video in a child process (crash/hang isolation); a video that makes no
    # progress for timeout_seconds becomes a `timeout` error row.
    isolate: bool = True
    timeout_seconds: float = 300.0
    # Transient storage errors (throttling, 5xx, resets) are retried with backoff.
    transient_retries: int = 3


def _row_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


_PIXELS = DECODED_SCHEMA.get_field_index("pixels")


def _clip_table(row: dict, pixels: np.ndarray) -> pa.Table:
    """One clip row whose `pixels` value is the clip's own buffer (no copy).

    The clip is the largest thing a row carries (2.4 MB at 16x224x224); building the value
    through Python bytes would copy it twice more per clip.
    """
    table = _row_table([row])
    pixels = np.ascontiguousarray(pixels)
    offsets = pa.py_buffer(np.array([0, pixels.nbytes], dtype=np.int64))
    value = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(pixels)])
    return table.set_column(_PIXELS, DECODED_SCHEMA.field(_PIXELS), value)


def _base(item: dict) -> dict:
    return {
        "video_id": item["video_id"],
        "uri": item["uri"],
        "input_fingerprint": item.get("input_fingerprint"),
        "size_bytes": item.get("size_bytes"),
    }


def error_row(item: dict, stage: str, error_type: str, message: str, seconds: float = 0.0) -> dict:
    return {**_base(item), "kind": KIND_ERROR, "stage": stage, "error_type": error_type,
            "message": message[:2000], "decode_seconds": seconds}


def decode_video(item: dict, params: DecodeParams, storage: StorageOptions) -> Iterator[pa.Table]:
    """Decode one input into clip rows and a final done row, or an error row.

    Every failure of this video is caught here and becomes its error row, so one broken
    file never fails the task (and with it the other videos of the block). Transient
    storage errors are retried with exponential backoff; clip rows a failed attempt
    already sent are replaced downstream (same clip_index).
    """
    for attempt in range(params.transient_retries + 1):
        retry_allowed = attempt < params.transient_retries
        for table in _decode_attempt(item, params, storage, retrying=retry_allowed):
            if table is _RETRY:
                break
            yield table
        else:
            return
        time.sleep(min(0.5 * 2**attempt, 8.0))


_RETRY = object()


def _decode_attempt(item: dict, params: DecodeParams, storage: StorageOptions, *, retrying: bool) -> Iterator:
    started = time.perf_counter()
    clip_count = 0
    try:
        with open_input(item["uri"], storage, size=item.get("size_bytes")) as f:
            with VideoDecoder(f, limits=params.limits, size_bytes=item.get("size_bytes"),
                              threads=params.threads) as decoder:
                probe = decoder.probe
                plans = decoder.plan(sampling=params.sampling, num_frames=params.num_frames,
                                     frame_stride=params.frame_stride, clips_per_video=params.clips_per_video)
                last = time.perf_counter()
                for clip in decoder.clips(plans, params.geometry):
                    now = time.perf_counter()
                    yield _clip_table({
                        **_base(item), "kind": KIND_CLIP, "clip_index": clip.clip_index,
                        "start_seconds": clip.start_seconds, "end_seconds": clip.end_seconds,
                        "frame_indices": clip.frame_indices, "pixels_shape": list(clip.pixels.shape),
                        "decode_seconds": now - last, "decoded_at": time.time(),
                    }, clip.pixels)
                    clip_count += 1
                    last = time.perf_counter()
        yield _row_table([{
            **_base(item), "kind": KIND_DONE, "num_clips": clip_count,
            "duration_seconds": probe.duration_seconds, "width": probe.width, "height": probe.height,
            "fps": probe.fps, "codec": probe.codec, "stream_index": probe.stream_index,
            "num_streams": probe.num_video_streams, "decode_seconds": time.perf_counter() - last,
        }])
    except DecodeError as exc:
        yield _row_table([error_row(item, exc.stage, exc.error_type, exc.message, time.perf_counter() - started)])
    except Exception as exc:  # noqa: BLE001 - storage and unexpected errors: still one row
        kind = classify_storage_error(exc)
        if kind == "transient" and retrying:
            yield _RETRY
            return
        stage = "read" if kind else "decode"
        yield _row_table([error_row(item, stage, kind or "unknown", f"{type(exc).__name__}: {exc}",
                                    time.perf_counter() - started)])


def decode_batch(batch: pa.Table, *, params: DecodeParams, storage: StorageOptions) -> Iterator[pa.Table]:
    """Ray Data UDF (task pool): a batch of input records -> decoded rows, streamed.

    A generator, so Ray Data turns the output into blocks as it comes: a long video with
    hundreds of clips never sits in the task's memory at once.
    """
    if not params.isolate:
        for item in batch.to_pylist():
            yield from decode_video(item, params, storage)
        return
    decoder = _isolated_decoder(params, storage)
    for item in batch.to_pylist():
        yield from decoder.decode(item)


_DECODERS: dict[bytes, IsolatedDecoder] = {}


def _isolated_decoder(params: DecodeParams, storage: StorageOptions) -> IsolatedDecoder:
    """One child decoder per Ray worker process and settings, reused across tasks.

    Ray reuses worker processes, so the child's start-up (a Python interpreter importing
    PyAV) is paid once per worker, not per video or per task.
    """
    key = pickle.dumps((params, storage))
    decoder = _DECODERS.get(key)
    if decoder is None:
        for old in _DECODERS.values():
            old.close()
        _DECODERS.clear()
        decoder = _DECODERS[key] = IsolatedDecoder(
            decode_video, (params, storage), timeout_seconds=params.timeout_seconds,
            error_table=lambda item, stage, etype, msg: _row_table([error_row(item, stage, etype, msg)]),
        )
    return decoder


class EmbedActor:
    """Ray Data UDF (actor pool): loads VideoMAE once, embeds the clip rows of each batch.

    Non-clip rows pass through untouched. Pixels are dropped here, so only embeddings
    (D floats per clip) travel on to the driver.
    """

    def __init__(self, model_ref: str, *, storage: StorageOptions, cache_root: str | None,
                 device: str, dtype: str, compile: bool, with_logits: bool):
        from vmae_ray.model import VideoMAEEmbedder

        self.embedder = VideoMAEEmbedder(model_ref, storage=storage, cache_root=cache_root,
                                         device=device, dtype=dtype, compile=compile)
        self.dim = self.embedder.spec.hidden_size
        self.with_logits = with_logits

    def __call__(self, batch: pa.Table) -> pa.Table:
        kinds = batch.column("kind").to_pylist()
        clip_rows = [i for i, k in enumerate(kinds) if k == KIND_CLIP]
        n = batch.num_rows
        embed_seconds = [None] * n
        flat = np.zeros((n, self.dim), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        logits_out: list = [None] * n
        if clip_rows:
            started = time.perf_counter()
            pixels_col = batch.column("pixels")
            shapes = batch.column("pixels_shape")
            try:
                # Views of the Arrow buffers (as_buffer, not as_py: no bytes copy); np.stack
                # makes the one contiguous batch the model reads.
                clips = np.stack([
                    np.frombuffer(pixels_col[i].as_buffer(), dtype=np.uint8).reshape(shapes[i].as_py())
                    for i in clip_rows
                ])
                embeddings, logits = self.embedder.embed(clips)
                flat[clip_rows] = embeddings
                valid[clip_rows] = True
                if self.with_logits and logits is not None:
                    for j, i in enumerate(clip_rows):
                        logits_out[i] = logits[j].astype(np.float32).tolist()
            except Exception as exc:  # noqa: BLE001 - a failed batch becomes error rows, not a failed job
                batch = _as_embed_errors(batch, clip_rows, f"{type(exc).__name__}: {exc}")
            per_clip = (time.perf_counter() - started) / len(clip_rows)
            for i in clip_rows:
                embed_seconds[i] = per_clip
        emb_type = pa.list_(pa.float32(), self.dim)
        values = pa.array(flat.reshape(-1), type=pa.float32())
        embedding = pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(~valid))
        out = batch.drop_columns(["pixels", "embed_seconds"])
        out = out.append_column(pa.field("embed_seconds", pa.float64()), pa.array(embed_seconds, pa.float64()))
        out = out.append_column(pa.field("embedding", emb_type), embedding)
        if self.with_logits:
            out = out.append_column(pa.field("logits", pa.list_(pa.float32())), pa.array(logits_out, pa.list_(pa.float32())))
        return out


def _as_embed_errors(batch: pa.Table, rows: list[int], message: str) -> pa.Table:
    kinds = batch.column("kind").to_pylist()
    stage = batch.column("stage").to_pylist()
    etype = batch.column("error_type").to_pylist()
    msg = batch.column("message").to_pylist()
    for i in rows:
        kinds[i], stage[i], etype[i], msg[i] = KIND_ERROR, "embed", "embed_failed", message[:2000]
    for name, values in (("kind", kinds), ("stage", stage), ("error_type", etype), ("message", msg)):
        idx = batch.schema.get_field_index(name)
        batch = batch.set_column(idx, name, pa.array(values, pa.string()))
    return batch
