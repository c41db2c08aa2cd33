"""Ray adapters for the decode and embed steps.

The work itself lives in `decoding`, `embedder`, `assembly` and `staging` (no Ray there);
this module turns Ray Data batches into calls on them, in the row contract of
`vmae_ray.schema`. Decode is a stateless function (Ray tasks, CPU): each input becomes one
row of all its clips (`decoded_schema`; long videos several rows of at most `MAX_ROW_BYTES`
of clips), or an error row. Embed is a callable class (a Ray actor that loads the model once):
it embeds the clips of a batch of such rows in full model calls, assembles the finished
videos, writes them as Parquet shards into the run's staging folder and returns one small
receipt per batch (`vmae_ray.staging.Receipt`), so no row travels back to the driver.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vmae_ray.decoding import DecodedClip, DecodeError, DecodeLimits, FrameGeometry, VideoDecoder
from vmae_ray.isolation import IsolatedDecoder
from vmae_ray.reconstruction import clip_mask, pack_mask
from vmae_ray.schema import DECODED_SCHEMA, KIND_CLIP, KIND_ERROR, error_row
from vmae_ray.storage import StorageOptions, classify_storage_error, credential_sources, open_input

# The most bytes of clips one decoded row holds: a longer video is sent as several rows
# (chunks) so that no row, and no Ray object, grows with the video's length. 64 MiB is 26
# VideoMAE-B clips (16x224x224x3 uint8).
MAX_ROW_BYTES = 64 * 2**20


# Exit status of a model actor whose device failed (see `device_is_broken`).
EXIT_DEVICE_BROKEN = 70


def device_is_broken(exc: BaseException) -> bool:
    """Whether a model call's exception leaves the process's CUDA context unusable: a CUDA error
    (illegal memory access, ECC error, device lost: `torch.AcceleratorError`, or a RuntimeError
    that says "CUDA error" in older torch), not an out-of-memory error, which the next call may
    not meet. CUDA errors are sticky: the context stays failed until the process ends (CUDA
    Runtime API, "Error Handling")."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


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
    max_row_bytes: int = MAX_ROW_BYTES
    # A damaged video (`decoding.DamageLog`): embedded from what decodes and marked ("embed"),
    # or an error row of type `damaged` ("error"); see config.ON_DAMAGE.
    on_damage: str = "embed"


# ---------------------------------------------------------------------------------------------
# Decoded rows


def decoded_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with `DECODED_SCHEMA` names; missing names are null) as a decoded-rows table."""
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


_PIXELS = DECODED_SCHEMA.get_field_index("pixels")


def clips_row(common: dict, clips: list[DecodedClip], *, decode_seconds: float) -> pa.Table:
    """One decoded row holding ``clips`` (of one video) and the video's ``common`` facts.

    The clips' pixels become one contiguous uint8 buffer (C, T, H, W, 3) that the Arrow value
    uses without a further copy; the model actor reads it back as a view (`row_clips`).
    """
    pixels = np.stack([c.pixels for c in clips]) if len(clips) > 1 else np.ascontiguousarray(clips[0].pixels)[None]
    row = {
        **common, "kind": KIND_CLIP,
        "clip_index": [c.clip_index for c in clips],
        "start_seconds": [c.start_seconds for c in clips],
        "end_seconds": [c.end_seconds for c in clips],
        "frame_indices": [list(c.frame_indices) for c in clips],
        "clip_shape": list(pixels.shape[1:]),
        "decode_seconds": decode_seconds, "decoded_at": time.time(),
    }
    table = decoded_table([row])
    offsets = pa.py_buffer(np.array([0, pixels.nbytes], dtype=np.int64))
    value = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(pixels)])
    return table.set_column(_PIXELS, DECODED_SCHEMA.field(_PIXELS), value)


def row_clips(batch: pa.Table, row: int) -> np.ndarray:
    """The uint8 clips of a decoded clip row, (C, T, H, W, 3): a view of the Arrow buffer, no copy."""
    shape = batch.column("clip_shape")[row].as_py()
    data = np.frombuffer(batch.column("pixels")[row].as_buffer(), dtype=np.uint8)
    return data.reshape(-1, *shape)


def error_table(item: dict, stage: str, error_type: str, message: str, decode_seconds: float = 0.0) -> pa.Table:
    """A one-row decoded table holding the error row of ``item`` (see `schema.error_row`)."""
    return decoded_table([error_row(item, stage=stage, error_type=error_type, message=message,
                                    decode_seconds=decode_seconds)])


def video_clips(tables: list[pa.Table]) -> tuple[list[dict], np.ndarray] | dict:
    """One video's decoded rows (as `decode_video` yields them), gathered in this process: (one
    dict per clip in clip order: clip_index, start_seconds, end_seconds, frame_indices and the
    video's facts; their uint8 clips (C, T, H, W, 3)), or the error row's dict when it failed.

    A clip sent twice (a retried read) counts once: the last one wins, as in the job.
    """
    by_index: dict[int, tuple[dict, np.ndarray]] = {}
    for table in tables:
        for r in range(table.num_rows):
            facts = table.slice(r, 1).drop_columns(["pixels"]).to_pylist()[0]
            if facts["kind"] == KIND_ERROR:
                return facts
            pixels = row_clips(table, r)
            for j, k in enumerate(facts["clip_index"]):
                clip = {name: value for name, value in facts.items()
                        if name not in ("clip_index", "start_seconds", "end_seconds", "frame_indices")}
                clip.update(clip_index=k, start_seconds=facts["start_seconds"][j], end_seconds=facts["end_seconds"][j],
                            frame_indices=facts["frame_indices"][j])
                by_index[k] = (clip, pixels[j])
    order = sorted(by_index)
    if not order:
        return [], np.zeros((0,), dtype=np.uint8)
    return [by_index[k][0] for k in order], np.stack([by_index[k][1] for k in order])


def _base(item: dict) -> dict:
    return {
        "input_number": item.get("input_number"),
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


# ---------------------------------------------------------------------------------------------
# Decode


def decode_video(item: dict, params: DecodeParams, storage: StorageOptions) -> Iterator[pa.Table]:
    """Decode one input into its decoded rows: one row of all its clips (several rows, in clip
    order, of at most ``params.max_row_bytes`` each for a long video), or an error row.

    Every failure of this video is caught here and becomes its error row, so one broken
    file never fails the task (and with it the other videos of the block). Transient
    storage errors are retried with exponential backoff; a retry sends only the clips the
    failed attempt had not sent.
    """
    sent: set[int] = set()
    for attempt in range(params.transient_retries + 1):
        retry_allowed = attempt < params.transient_retries
        for table in _decode_attempt(item, params, storage, retrying=retry_allowed, sent=sent):
            if table is _RETRY:
                break
            yield table
        else:
            return
        time.sleep(min(0.5 * 2**attempt, 8.0))


_RETRY = object()


def _decode_attempt(item: dict, params: DecodeParams, storage: StorageOptions, *, retrying: bool,
                    sent: set[int]) -> Iterator:
    started = time.perf_counter()
    made = 0
    planned = None
    try:
        with open_input(item["uri"], storage, size=item.get("size_bytes")) as f:
            with VideoDecoder(f, limits=params.limits, size_bytes=item.get("size_bytes"),
                              threads=params.threads) as decoder:
                plans = decoder.plan(sampling=params.sampling, num_frames=params.num_frames,
                                     frame_stride=params.frame_stride, clips_per_video=params.clips_per_video)
                planned = len(plans)
                pending: list[DecodedClip] = []
                pending_bytes = 0
                last = started

                def row(clips: list[DecodedClip], seconds: float) -> pa.Table:
                    # The video's facts as known now: damage is learned while decoding, so a
                    # later row (and the video row, from its last clip) knows more.
                    facts = _video_facts(decoder, params.geometry)
                    if facts["damaged"] and params.on_damage == "error":
                        raise DecodeError("damaged", "decode", f"damaged (--on-damage error): {facts['damage']}")
                    return clips_row({**_base(item), "num_clips": planned, **facts}, clips, decode_seconds=seconds)

                for clip in decoder.clips(plans, params.geometry):
                    made += 1
                    if clip.clip_index in sent:
                        continue  # an earlier attempt sent it
                    if pending and pending_bytes + clip.pixels.nbytes > params.max_row_bytes:
                        now = time.perf_counter()
                        yield row(pending, now - last)
                        sent.update(c.clip_index for c in pending)
                        pending, pending_bytes, last = [], 0, now
                    pending.append(clip)
                    pending_bytes += clip.pixels.nbytes
                if made != planned:
                    # A video is complete when all its planned clips arrived; one that can
                    # never be complete must end as an error, not hang unfinished.
                    raise DecodeError("corrupt", "decode", f"the decoder built {made} of {planned} planned clips")
                if pending:
                    yield row(pending, time.perf_counter() - last)
                    sent.update(c.clip_index for c in pending)
    except DecodeError as exc:
        yield error_table(item, exc.stage, exc.error_type, exc.message, time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - storage and unexpected errors: still one row
        if planned is not None and made == planned and len(sent) == planned:
            return  # every clip was sent: a failure while closing the file changes nothing
        kind = classify_storage_error(exc)
        if kind == "transient" and retrying:
            yield _RETRY
            return
        stage = "read" if kind else "decode"
        message = f"{type(exc).__name__}: {exc}"
        if kind == "access_denied" and str(item["uri"]).startswith(("s3://", "s3a://")):
            message += f"; {credential_sources(storage)}"  # this worker's sources, not the driver's
        yield error_table(item, stage, kind or "unknown", message, time.perf_counter() - started)


INPUT_COLUMNS = ("input_number", "video_id", "uri", "input_fingerprint", "size_bytes")


def decode_batch(batch: pa.Table, *, params: DecodeParams, storage: StorageOptions) -> Iterator[pa.Table]:
    """Ray Data UDF (task pool): a block of to-do rows (one per input) -> decoded rows, streamed.

    A generator, so Ray Data turns the output into blocks (of Ray Data's target size) as it
    comes: a long video never sits in the task's memory at once. The input's other columns
    (a manifest's passthrough columns) are appended to each of its rows.
    """
    passthrough = [name for name in batch.column_names if name not in INPUT_COLUMNS]
    decode = _isolated_decoder(params, storage).decode if params.isolate else (
        lambda item: decode_video(item, params, storage))
    for i, item in enumerate(batch.select(list(INPUT_COLUMNS)).to_pylist()):
        for table in decode(item):
            for name in passthrough:
                column = batch.column(name).slice(i, 1)
                table = table.append_column(batch.schema.field(name),
                                            pa.repeat(column[0], table.num_rows).cast(column.type))
            yield table


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


# ---------------------------------------------------------------------------------------------
# Embed, assemble, write


class EmbedActor:
    """Ray Data UDF (actor pool): loads VideoMAE once; for each batch of decoded rows, embeds
    their clips, writes the finished videos into the run's staging folder and returns one
    receipt row (`schema.RECEIPT_SCHEMA`).

    A batch's clips go to the model ``batch_size`` at a time (only the batch's last call may
    be smaller), so `--batch-size` is the clips per model call whatever Ray Data's batches
    are. A model call that fails makes its videos error rows (`embed_failed`), not a failed
    job. A video whose clips are all in the batch is assembled here (`assembly`); one split
    across batches (a long video sent as several rows) goes to the ``parts/`` file and is
    finished once the driver has seen all its parts (`staging.finish_split_videos`).

    ``reconstruction`` = (mask_ratio, mask_seed): each clip also gets its pretraining loss under
    the tube mask `reconstruction.clip_mask` draws from its pixels, and the mask.
    """

    def __init__(self, model_ref: str, *, storage: StorageOptions, cache_root: str | None,
                 device: str, dtype: str, compile: bool, batch_size: int, writer: Any,
                 reconstruction: tuple[float, int] | None = None):
        from vmae_ray.embedder import VideoMAEEmbedder

        self.embedder = VideoMAEEmbedder(model_ref, storage=storage, cache_root=cache_root,
                                         device=device, dtype=dtype, compile=compile,
                                         reconstruction=reconstruction is not None)
        self.dim = self.embedder.spec.hidden_size
        self.writer = writer  # staging.VideoWriter: what to assemble and where to write it
        self.with_logits = writer.labels is not None and writer.labels.head is None
        self.batch_size = batch_size
        self.reconstruction = reconstruction
        self.schema = writer.embedded_schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vmae_ray import staging

        started = time.perf_counter()
        decoded = batch
        kinds = decoded.column("kind").to_pylist()
        clip_rows = [i for i, k in enumerate(kinds) if k == KIND_CLIP]
        errors = decoded.filter(pc.equal(decoded.column("kind"), KIND_ERROR))
        embedded, failed, calls = self._embed_rows(decoded, clip_rows)
        stats = staging.CallStats(embed_seconds=time.perf_counter() - started, model_calls=calls)
        stats.add_decoded(decoded)
        receipt = self.writer.write(embedded, errors, failed=failed, stats=stats)
        staging.failpoint_in_worker("worker_after_write")
        rows = [receipt]
        if staging.failpoint_fires("worker_duplicate_receipt"):
            rows.append(self.writer.duplicate(receipt))
        return staging.receipts_table(rows)

    def _embed_rows(self, batch: pa.Table, clip_rows: list[int]) -> tuple[pa.Table, dict[int, str], dict[int, int]]:
        """(per-clip embedded rows of the batch's clip rows, {input_number: why} for videos one of
        whose model calls failed, {clips in a model call: number of such calls})."""
        from vmae_ray import staging

        if not clip_rows:
            return staging.empty_embedded(self.schema), {}, {}
        rows = batch.take(clip_rows)
        clips_per_row = np.array([len(v) for v in rows.column("clip_index").to_pylist()], dtype=np.int64)
        total = int(clips_per_row.sum())
        owner = np.repeat(np.arange(rows.num_rows), clips_per_row)  # row of each clip
        first = np.concatenate([[0], np.cumsum(clips_per_row)[:-1]])
        views = [row_clips(rows, r) for r in range(rows.num_rows)]
        embeddings = np.zeros((total, self.dim), dtype=np.float32)
        logits: list | None = [None] * total if self.with_logits else None
        losses = np.full(total, np.nan, dtype=np.float32) if self.reconstruction else None
        masks: list | None = [None] * total if self.reconstruction else None
        failed: dict[int, str] = {}
        calls: dict[int, int] = {}
        numbers = rows.column("input_number").to_numpy(zero_copy_only=False)
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            clip_ids = np.arange(start, stop)
            try:
                clips = np.concatenate([views[owner[c]][c - first[owner[c]]][None] for c in clip_ids]) \
                    if len(clip_ids) > 1 else views[owner[start]][start - first[owner[start]]][None]
                if self.reconstruction is None:
                    emb, lgt = self.embedder.embed(clips)
                else:
                    mask = self._masks(clips)
                    emb, lgt, loss = self.embedder.embed_with_reconstruction(clips, mask)
                    losses[start:stop] = loss
                    for j, c in enumerate(clip_ids):
                        masks[c] = pack_mask(mask[j])
            except Exception as exc:  # noqa: BLE001 - a failed call makes error rows, not a failed job
                if device_is_broken(exc):
                    # Every later call of this process would fail too: its inputs are not
                    # broken. The actor exits; Ray restarts it and retries its calls, and
                    # receipts keep the result exactly once.
                    logging.getLogger("vmae_ray").error("model actor: %s: %s; restarting the actor",
                                                        type(exc).__name__, exc)
                    os._exit(EXIT_DEVICE_BROKEN)
                for c in clip_ids:
                    failed.setdefault(int(numbers[owner[c]]), f"{type(exc).__name__}: {exc}")
                continue
            embeddings[start:stop] = emb
            if logits is not None and lgt is not None:
                for j, c in enumerate(clip_ids):
                    logits[c] = lgt[j]
            calls[len(clip_ids)] = calls.get(len(clip_ids), 0) + 1
        table = staging.explode_clip_rows(rows, self.schema, embeddings=embeddings, logits=logits,
                                          losses=losses, masks=masks)
        # Rows of failed calls stay (with a zero embedding): the writer turns their videos into
        # error rows whole, as it does for any video with a failed clip.
        return table, failed, calls

    def _masks(self, clips: np.ndarray) -> np.ndarray:
        """(clips, N) bool tube masks of uint8 clips (B, T, H, W, 3), drawn from their pixels."""
        mask_ratio, mask_seed = self.reconstruction
        spec = self.embedder.spec
        return np.stack([clip_mask(clip, mask_seed=mask_seed, mask_ratio=mask_ratio,
                                   num_time_slots=spec.num_time_slots, tokens_per_frame=spec.tokens_per_frame)
                         for clip in clips])

