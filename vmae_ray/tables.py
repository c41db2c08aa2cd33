"""Assemble the output tables from embedded rows: pure logic, no Ray and no I/O.

The driver feeds every embedded batch to `ResultAssembler`. A video is finished when its
``done`` row and all the clips it announced have arrived (in any order: an actor pool does
not keep order), or as soon as an error row for it arrives; then its clip rows, its video
row (mean of the clip embeddings; labels from the mean of the clip logits) or its error row
are released for writing. Rows for a video that is already finished are ignored, which
makes Ray's at-least-once retries (a restarted actor or decode task re-sending rows)
harmless: each input ends in exactly one of videos/ or errors/, and each clip once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from vmae_ray.listing import VideoInput
from vmae_ray.model import top_k_labels


@dataclass
class Finished:
    clips: list[dict] = field(default_factory=list)
    videos: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)

    def extend(self, other: "Finished") -> None:
        self.clips += other.clips
        self.videos += other.videos
        self.errors += other.errors


@dataclass
class _Pending:
    clips: dict[int, dict] = field(default_factory=dict)
    done: dict | None = None


@dataclass
class StageTimes:
    clips: int = 0
    decode_seconds: float = 0.0
    embed_seconds: float = 0.0


class ResultAssembler:
    """Turns the embedded row stream into finished clip, video and error rows."""

    def __init__(self, inputs: dict[str, VideoInput], *, id2label: dict[int, str] | None, top_k: int,
                 run_id: str, settings_fingerprint: str):
        self._inputs = inputs
        self._id2label = id2label
        self._k = top_k
        self._common = {"run_id": run_id, "settings_fingerprint": settings_fingerprint}
        self._pending: dict[str, _Pending] = {}
        self._finished: set[str] = set()
        self.times = StageTimes()
        self.num_videos = 0
        self.num_errors = 0
        self.num_clips = 0
        self.errors_by_type: dict[str, int] = {}

    @property
    def finished_count(self) -> int:
        return len(self._finished)

    def is_finished(self, video_id: str) -> bool:
        return video_id in self._finished

    def add(self, batch: pa.Table) -> Finished:
        out = Finished()
        cols = {name: batch.column(name) for name in batch.column_names}
        emb = cols["embedding"]
        dim = emb.type.list_size
        emb_values = None
        if emb.null_count < len(emb):
            # The child values of every slot (nulls included, unlike flatten()), so row i
            # is emb_values[i*dim:(i+1)*dim].
            arr = emb.combine_chunks() if isinstance(emb, pa.ChunkedArray) else emb
            child = arr.values.slice(arr.offset * dim, len(arr) * dim)
            emb_values = np.asarray(child.to_numpy(zero_copy_only=False), dtype=np.float32)
        rows = batch.drop_columns(["embedding"]).to_pylist()
        for i, row in enumerate(rows):
            vid = row["video_id"]
            if vid in self._finished:
                continue  # a retried task or actor re-sent it: already accounted for
            if row.get("decode_seconds"):
                self.times.decode_seconds += row["decode_seconds"]
            kind = row["kind"]
            if kind == "error":
                self._pending.pop(vid, None)
                out.errors.append(self._error(row))
                self._finish(vid)
                self.num_errors += 1
                continue
            pending = self._pending.setdefault(vid, _Pending())
            if kind == "clip":
                if row.get("embed_seconds"):
                    self.times.embed_seconds += row["embed_seconds"]
                row["embedding"] = emb_values[i * dim : (i + 1) * dim] if emb_values is not None else None
                pending.clips[row["clip_index"]] = row
            elif kind == "done":
                pending.done = row
            if pending.done is not None and len(pending.clips) >= (pending.done["num_clips"] or 0):
                self._pending.pop(vid)
                if not pending.clips:
                    out.errors.append(self._error({**pending.done, "stage": "decode", "error_type": "corrupt",
                                                   "message": "no clip could be built from the video"}))
                    self.num_errors += 1
                else:
                    self._release(vid, pending, out)
                self._finish(vid)
        return out

    def _finish(self, vid: str) -> None:
        self._finished.add(vid)

    def _passthrough(self, vid: str) -> dict[str, Any]:
        item = self._inputs.get(vid)
        return dict(item.passthrough) if item else {}

    def _error(self, row: dict) -> dict:
        error_type = row.get("error_type") or "unknown"
        self.errors_by_type[error_type] = self.errors_by_type.get(error_type, 0) + 1
        return {
            "video_id": row["video_id"], "uri": row["uri"], "stage": row.get("stage") or "decode",
            "error_type": row.get("error_type") or "unknown", "message": row.get("message") or "",
            "input_fingerprint": row.get("input_fingerprint"), **self._common, **self._passthrough(row["video_id"]),
        }

    def _release(self, vid: str, pending: _Pending, out: Finished) -> None:
        clips = [pending.clips[k] for k in sorted(pending.clips)]
        passthrough = self._passthrough(vid)
        embeddings = np.stack([c["embedding"] for c in clips]).astype(np.float64)
        for c in clips:
            clip_row = {
                "video_id": vid, "uri": c["uri"], "clip_index": c["clip_index"],
                "start_seconds": c["start_seconds"], "end_seconds": c["end_seconds"],
                "frame_indices": c["frame_indices"], "embedding": c["embedding"],
                "input_fingerprint": c.get("input_fingerprint"), **self._common, **passthrough,
            }
            if self._id2label is not None:
                labels, scores = top_k_labels(np.asarray(c["logits"])[None], self._id2label, self._k)
                clip_row["top_labels"], clip_row["top_scores"] = labels[0], scores[0]
            out.clips.append(clip_row)
        done = pending.done
        video_row = {
            "video_id": vid, "uri": done["uri"], "num_clips": len(clips),
            "duration_seconds": done["duration_seconds"],
            "embedding": embeddings.mean(axis=0).astype(np.float32),
            "width": done["width"], "height": done["height"], "fps": done["fps"], "codec": done["codec"],
            "stream_index": done["stream_index"], "num_streams": done["num_streams"],
            "size_bytes": done.get("size_bytes"), "input_fingerprint": done.get("input_fingerprint"),
            **self._common, **passthrough,
        }
        if self._id2label is not None:
            mean_logits = np.mean([np.asarray(c["logits"], dtype=np.float64) for c in clips], axis=0)
            labels, scores = top_k_labels(mean_logits[None], self._id2label, self._k)
            video_row["top_labels"], video_row["top_scores"] = labels[0], scores[0]
        out.videos.append(video_row)
        self.num_videos += 1
        self.num_clips += len(clips)
        self.times.clips += len(clips)

    def unfinished(self) -> list[str]:
        """Videos with rows but no conclusion (should be none once the stream ends)."""
        return sorted(self._pending)


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
