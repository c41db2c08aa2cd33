"""Ray adapters for the decode and embed steps.

The work itself lives in `decoding` and `embedder` (no Ray there); this module only turns
Ray Data batches into calls on them and back, in the row contract of `vmae_ray.schema`
(`DECODED_SCHEMA`: clip rows and error rows). Decode is a stateless function (Ray tasks,
CPU); embed is a callable class (a Ray actor that loads the model once).
"""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from vmae_ray.decoding import DecodeError, DecodeLimits, FrameGeometry, VideoDecoder
from vmae_ray.isolation import IsolatedDecoder
from vmae_ray.reconstruction import clip_mask, pack_mask
from vmae_ray.schema import DECODED_SCHEMA, KIND_CLIP, embedded_schema, error_row
from vmae_ray.storage import StorageOptions, classify_storage_error, open_input


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
    # A damaged video (`decoding.DamageLog`): embedded from what decodes and marked ("embed"),
    # or an error row of type `damaged` ("error"); see config.ON_DAMAGE.
    on_damage: str = "embed"


def decoded_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with `DECODED_SCHEMA` names; missing names are null) as a decoded-rows table."""
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


_PIXELS = DECODED_SCHEMA.get_field_index("pixels")


def clip_table(row: dict, pixels: np.ndarray) -> pa.Table:
    """One clip row whose `pixels` value is the clip's own buffer (no copy).

    The clip is the largest thing a row carries (2.4 MB at 16x224x224); building the value
    through Python bytes would copy it twice more per clip.
    """
    table = decoded_table([row])
    pixels = np.ascontiguousarray(pixels)
    offsets = pa.py_buffer(np.array([0, pixels.nbytes], dtype=np.int64))
    value = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(pixels)])
    return table.set_column(_PIXELS, DECODED_SCHEMA.field(_PIXELS), value)


def clip_pixels(batch: pa.Table, rows: list[int]) -> np.ndarray:
    """The uint8 clips of these clip rows of a decoded table, stacked: (len(rows), T, H, W, 3).

    Views of the Arrow buffers (as_buffer, not as_py: no bytes copy); np.stack makes the one
    contiguous batch the model reads.
    """
    pixels, shapes = batch.column("pixels"), batch.column("pixels_shape")
    return np.stack([np.frombuffer(pixels[i].as_buffer(), dtype=np.uint8).reshape(shapes[i].as_py()) for i in rows])


def error_table(item: dict, stage: str, error_type: str, message: str, decode_seconds: float = 0.0) -> pa.Table:
    """A one-row decoded table holding the error row of ``item`` (see `schema.error_row`)."""
    return decoded_table([error_row(item, stage=stage, error_type=error_type, message=message,
                                    decode_seconds=decode_seconds)])


def _base(item: dict) -> dict:
    return {
        "video_id": item["video_id"],
        "uri": item["uri"],
        "input_fingerprint": item.get("input_fingerprint"),
        "size_bytes": item.get("size_bytes"),
    }


def _video_facts(decoder: VideoDecoder, geometry: FrameGeometry) -> dict[str, Any]:
    """The video's facts for its rows; asked once a clip is decoded, so the first frame is known.

    Asked again for every clip: the damage met so far grows as decoding goes on (the video's
    row takes the facts of its last clip).
    """
    probe = decoder.probe
    width, height, display, sample_aspect_ratio = decoder.shown(geometry.apply_display)
    damage = decoder.damage_summary
    return {
        "duration_seconds": probe.duration_seconds, "width": width, "height": height,
        "fps": probe.fps, "codec": probe.codec, "stream_index": probe.stream_index,
        "num_streams": probe.num_video_streams, "display_rotation_degrees": display.rotation_degrees,
        "display_hflip": display.hflip, "sample_aspect_ratio": float(sample_aspect_ratio),
        "damaged": damage is not None, "damage": damage, "hdr": decoder.hdr,
    }


def decode_video(item: dict, params: DecodeParams, storage: StorageOptions) -> Iterator[pa.Table]:
    """Decode one input into its clip rows, or an error row.

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
    try:
        with open_input(item["uri"], storage, size=item.get("size_bytes")) as f:
            with VideoDecoder(f, limits=params.limits, size_bytes=item.get("size_bytes"),
                              threads=params.threads) as decoder:
                plans = decoder.plan(sampling=params.sampling, num_frames=params.num_frames,
                                     frame_stride=params.frame_stride, clips_per_video=params.clips_per_video)
                common = None
                last = started
                made = 0
                for clip in decoder.clips(plans, params.geometry):
                    if common is None:
                        common = {**_base(item), "kind": KIND_CLIP, "num_clips": len(plans)}
                    facts = _video_facts(decoder, params.geometry)
                    if facts["damaged"] and params.on_damage == "error":
                        raise DecodeError("damaged", "decode", f"damaged (--on-damage error): {facts['damage']}")
                    now = time.perf_counter()
                    yield clip_table({
                        **common, **facts, "clip_index": clip.clip_index,
                        "start_seconds": clip.start_seconds, "end_seconds": clip.end_seconds,
                        "frame_indices": clip.frame_indices, "pixels_shape": list(clip.pixels.shape),
                        "decode_seconds": now - last, "decoded_at": time.time(),
                    }, clip.pixels)
                    made += 1
                    last = time.perf_counter()
                if made != len(plans):
                    # Downstream a video is complete when all its planned clips arrived; one
                    # that can never be complete must end as an error, not hang unfinished.
                    raise DecodeError("corrupt", "decode", f"the decoder built {made} of {len(plans)} planned clips")
    except DecodeError as exc:
        yield error_table(item, exc.stage, exc.error_type, exc.message, time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - storage and unexpected errors: still one row
        kind = classify_storage_error(exc)
        if kind == "transient" and retrying:
            yield _RETRY
            return
        stage = "read" if kind else "decode"
        yield error_table(item, stage, kind or "unknown", f"{type(exc).__name__}: {exc}",
                          time.perf_counter() - started)


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
            decode_video, (params, storage), timeout_seconds=params.timeout_seconds, error_table=error_table,
        )
    return decoder


class EmbedActor:
    """Ray Data UDF (actor pool): loads VideoMAE once, embeds the clip rows of each batch.

    A Ray Data batch may hold several model calls' worth of clips: they go to the model
    ``batch_size`` at a time (the last call of a batch takes the rest), so `--batch-size` is
    the clips per model call whatever Ray Data's batches are. Error rows pass through. Pixels
    are dropped here, so only embeddings (D floats per clip) travel on to the driver. A model
    call that fails makes its clips error rows (`embed_failed`), not a failed job.

    ``reconstruction`` = (mask_ratio, mask_seed): each clip also gets its pretraining loss under
    the tube mask `reconstruction.clip_mask` draws for its (video_id, clip_index), and the mask.
    """

    def __init__(self, model_ref: str, *, storage: StorageOptions, cache_root: str | None,
                 device: str, dtype: str, compile: bool, with_logits: bool, batch_size: int,
                 reconstruction: tuple[float, int] | None = None):
        from vmae_ray.embedder import VideoMAEEmbedder

        self.embedder = VideoMAEEmbedder(model_ref, storage=storage, cache_root=cache_root,
                                         device=device, dtype=dtype, compile=compile,
                                         reconstruction=reconstruction is not None)
        self.dim = self.embedder.spec.hidden_size
        self.with_logits = with_logits
        self.batch_size = batch_size
        self.reconstruction = reconstruction
        self.schema = embedded_schema(self.dim, with_logits=with_logits, with_reconstruction=reconstruction is not None)
        self._actor = uuid.uuid4().hex[:12]
        self._calls = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        kinds = batch.column("kind").to_pylist()
        clip_rows = [i for i, k in enumerate(kinds) if k == KIND_CLIP]
        n = batch.num_rows
        out = {
            "embedding": np.zeros((n, self.dim), dtype=np.float32), "valid": np.zeros(n, dtype=bool),
            "embed_seconds": [None] * n, "model_call": [None] * n, "model_call_clips": [None] * n,
            "logits": [None] * n, "reconstruction_loss": [None] * n, "reconstruction_mask": [None] * n,
        }
        failed: dict[int, str] = {}
        for start in range(0, len(clip_rows), self.batch_size):
            self._model_call(batch, clip_rows[start:start + self.batch_size], out, failed)
        table = batch.drop_columns(["pixels"])
        table = table.append_column(self.schema.field("embed_seconds"), pa.array(out["embed_seconds"], pa.float64()))
        table = table.append_column(self.schema.field("model_call"), pa.array(out["model_call"], pa.string()))
        table = table.append_column(self.schema.field("model_call_clips"), pa.array(out["model_call_clips"], pa.int32()))
        values = pa.array(out["embedding"].reshape(-1), type=pa.float32())
        embedding = pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(~out["valid"]))
        table = table.append_column(self.schema.field("embedding"), embedding)
        if self.with_logits:
            table = table.append_column(self.schema.field("logits"), pa.array(out["logits"], pa.list_(pa.float32())))
        if self.reconstruction is not None:
            table = table.append_column(self.schema.field("reconstruction_loss"),
                                        pa.array(out["reconstruction_loss"], pa.float32()))
            table = table.append_column(self.schema.field("reconstruction_mask"),
                                        pa.array(out["reconstruction_mask"], pa.binary()))
        return self._as_errors(table, failed) if failed else table

    def _model_call(self, batch: pa.Table, rows: list[int], out: dict, failed: dict[int, str]) -> None:
        """One model call on the clips of ``rows``; results go into ``out`` at those rows."""
        started = time.perf_counter()
        self._calls += 1
        call_id = f"{self._actor}:{self._calls}"
        try:
            clips = clip_pixels(batch, rows)
            if self.reconstruction is None:
                embeddings, logits = self.embedder.embed(clips)
            else:
                masks = self._masks(batch, rows)
                embeddings, logits, losses = self.embedder.embed_with_reconstruction(clips, masks)
                for j, i in enumerate(rows):
                    out["reconstruction_loss"][i], out["reconstruction_mask"][i] = float(losses[j]), pack_mask(masks[j])
        except Exception as exc:  # noqa: BLE001 - a failed call makes error rows, not a failed job
            for i in rows:
                failed[i] = f"{type(exc).__name__}: {exc}"
            return
        out["embedding"][rows] = embeddings
        out["valid"][rows] = True
        if self.with_logits and logits is not None:
            for j, i in enumerate(rows):
                out["logits"][i] = logits[j].astype(np.float32).tolist()
        per_clip = (time.perf_counter() - started) / len(rows)
        for i in rows:
            out["embed_seconds"][i], out["model_call"][i], out["model_call_clips"][i] = per_clip, call_id, len(rows)

    def _masks(self, batch: pa.Table, clip_rows: list[int]) -> np.ndarray:
        """(clips, N) bool tube masks of the batch's clip rows, from their video_id and clip_index."""
        mask_ratio, mask_seed = self.reconstruction
        spec = self.embedder.spec
        video_ids, clip_indices = batch.column("video_id"), batch.column("clip_index")
        return np.stack([
            clip_mask(video_ids[i].as_py(), clip_indices[i].as_py(), mask_seed=mask_seed, mask_ratio=mask_ratio,
                      num_time_slots=spec.num_time_slots, tokens_per_frame=spec.tokens_per_frame)
            for i in clip_rows
        ])

    def _as_errors(self, table: pa.Table, failed: dict[int, str]) -> pa.Table:
        """The embedded table with the rows of failed model calls turned into error rows."""
        rows = table.to_pylist()
        for i, message in failed.items():
            rows[i] = error_row(rows[i], stage="embed", error_type="embed_failed", message=message)
        return pa.Table.from_pylist(rows, schema=self.schema)
