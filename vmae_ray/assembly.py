"""Assemble the output rows from the embedded row stream: pure logic, no Ray and no I/O.

The driver feeds every embedded batch to `ResultAssembler`. A video is finished when all
the clips its plan announced (`num_clips` on every clip row) have arrived, in any order (an
actor pool does not keep order), or as soon as an error row for it arrives; then its clip
rows and its video row (mean of the clip embeddings; labels from the mean of the clip
logits: the classifier's, or a linear head's on the clip embeddings; with reconstruction,
the mean of the clip losses), or its error row, are released for writing. Rows for a video
that is already finished are ignored, which makes Ray's at-least-once retries (a restarted
actor or decode task re-sending rows) harmless: each input ends in exactly one of videos/ or
errors/, and each clip once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from vmae_ray.heads import LinearHead
from vmae_ray.labels import top_k_labels
from vmae_ray.listing import VideoInput
from vmae_ray.schema import KIND_CLIP, KIND_ERROR, VIDEO_FACTS, check_error_code


def video_embedding(clip_embeddings: np.ndarray) -> np.ndarray:
    """A video's embedding from its clips' (C, D): their mean, summed in float64, as float32 (D,).

    The mean over clips is how VideoMAE's evaluation combines several clips of a video (the
    paper averages the clips' scores); the `videos/` table and a search query use this one.
    """
    return np.asarray(clip_embeddings, dtype=np.float64).mean(axis=0).astype(np.float32)


@dataclass
class Finished:
    """Rows released by one `ResultAssembler.add` call, per output table."""

    clips: list[dict] = field(default_factory=list)
    videos: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


@dataclass
class _Pending:
    num_clips: int
    clips: dict[int, dict] = field(default_factory=dict)


@dataclass
class StageTimes:
    """Busy seconds measured inside the stages (summed over the rows that arrived) and the
    clips of the videos that finished well."""

    clips: int = 0
    decode_seconds: float = 0.0
    embed_seconds: float = 0.0
    # model call id -> clips it embedded (duplicates from retries count once)
    model_calls: dict[str, int] = field(default_factory=dict)

    def model_call_sizes(self) -> dict[int, int]:
        """{clips in a model call: number of such calls}."""
        sizes: dict[int, int] = {}
        for n in self.model_calls.values():
            sizes[n] = sizes.get(n, 0) + 1
        return dict(sorted(sizes.items()))


class ResultAssembler:
    """Turns the embedded row stream into finished clip, video and error rows."""

    def __init__(self, inputs: dict[str, VideoInput], *, id2label: dict[int, str] | None, top_k: int,
                 run_id: str, settings_fingerprint: str, head: LinearHead | None = None,
                 with_reconstruction: bool = False):
        """``id2label`` None: no labels. With a ``head``, clip logits are the head's logits of the
        clip embeddings; otherwise the classifier's, from each row's ``logits``. With
        ``with_reconstruction``, clip rows carry their loss and mask and videos the mean loss."""
        self._inputs = inputs
        self._with_reconstruction = with_reconstruction
        self._id2label = id2label
        self._head = head
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

    def unfinished(self) -> list[str]:
        """Videos with rows but no conclusion (should be none once the stream ends)."""
        return sorted(self._pending)

    def add(self, batch: pa.Table) -> Finished:
        """Take one batch of embedded rows (`schema.embedded_schema`); return what it finished.

        Raises ValueError for a row whose kind is not in `schema.ROW_KINDS`.
        """
        out = Finished()
        emb = batch.column("embedding")
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
            # Work done for a video counts when it arrives, whether or not the video ends well.
            self.times.decode_seconds += row.get("decode_seconds") or 0.0
            kind = row["kind"]
            if kind == KIND_ERROR:
                self._pending.pop(vid, None)
                out.errors.append(self._error(row))
                self._finished.add(vid)
                continue
            if kind != KIND_CLIP:
                raise ValueError(f"row of video {vid} has unknown kind {kind!r}")
            if emb_values is None or row.get("model_call") is None:
                raise ValueError(f"clip {row['clip_index']} of video {vid} arrived without an embedding")
            if self._with_reconstruction and (row.get("reconstruction_loss") is None
                                              or row.get("reconstruction_mask") is None):
                raise ValueError(f"clip {row['clip_index']} of video {vid} arrived without a reconstruction loss")
            self.times.embed_seconds += row.get("embed_seconds") or 0.0
            self.times.model_calls[row["model_call"]] = row["model_call_clips"]
            pending = self._pending.setdefault(vid, _Pending(num_clips=row["num_clips"]))
            row["embedding"] = emb_values[i * dim : (i + 1) * dim]
            pending.clips[row["clip_index"]] = row
            if len(pending.clips) >= pending.num_clips:
                self._pending.pop(vid)
                self._release(vid, pending, out)
                self._finished.add(vid)
        return out

    def _clip_logits(self, clips: list[dict], embeddings: np.ndarray) -> np.ndarray | None:
        """(clips, L) float64 logits of a video's clips (``embeddings``: theirs, stacked), or None
        without labels. The one source of labels for both producers: a video's labels come from
        the mean of these."""
        if self._id2label is None:
            return None
        if self._head is not None:
            return self._head.logits(embeddings)
        return np.stack([np.asarray(c["logits"], dtype=np.float64) for c in clips])

    def _passthrough(self, vid: str) -> dict[str, Any]:
        item = self._inputs.get(vid)
        return dict(item.passthrough) if item else {}

    def _error(self, row: dict) -> dict:
        stage, error_type = row["stage"], row["error_type"]
        check_error_code(stage=stage, error_type=error_type)
        self.errors_by_type[error_type] = self.errors_by_type.get(error_type, 0) + 1
        self.num_errors += 1
        return {
            "video_id": row["video_id"], "uri": row["uri"], "stage": stage, "error_type": error_type,
            "message": row.get("message") or "", "input_fingerprint": row.get("input_fingerprint"),
            **self._common, **self._passthrough(row["video_id"]),
        }

    def _release(self, vid: str, pending: _Pending, out: Finished) -> None:
        clips = [pending.clips[k] for k in sorted(pending.clips)]
        passthrough = self._passthrough(vid)
        embeddings = np.stack([c["embedding"] for c in clips])
        clip_logits = self._clip_logits(clips, embeddings)
        if clip_logits is not None:
            clip_labels, clip_scores = top_k_labels(clip_logits, self._id2label, self._k)
        for i, c in enumerate(clips):
            clip_row = {
                "video_id": vid, "uri": c["uri"], "clip_index": c["clip_index"],
                "start_seconds": c["start_seconds"], "end_seconds": c["end_seconds"],
                "frame_indices": c["frame_indices"], "embedding": c["embedding"],
                "input_fingerprint": c.get("input_fingerprint"), **self._common, **passthrough,
            }
            if clip_logits is not None:
                clip_row["top_labels"], clip_row["top_scores"] = clip_labels[i], clip_scores[i]
            if self._with_reconstruction:
                clip_row["reconstruction_loss"] = c["reconstruction_loss"]
                clip_row["reconstruction_mask"] = c["reconstruction_mask"]
            out.clips.append(clip_row)
        first = clips[0]
        video_row = {
            "video_id": vid, "uri": first["uri"], "num_clips": len(clips),
            "embedding": video_embedding(embeddings),
            # The last clip's facts: the decoder learns of damage as it goes (stages._video_facts).
            **{name: clips[-1][name] for name in VIDEO_FACTS},
            "size_bytes": first.get("size_bytes"), "input_fingerprint": first.get("input_fingerprint"),
            **self._common, **passthrough,
        }
        if clip_logits is not None:
            labels, scores = top_k_labels(clip_logits.mean(axis=0)[None], self._id2label, self._k)
            video_row["top_labels"], video_row["top_scores"] = labels[0], scores[0]
        if self._with_reconstruction:
            video_row["reconstruction_loss"] = float(np.mean([c["reconstruction_loss"] for c in clips], dtype=np.float64))
        out.videos.append(video_row)
        self.num_videos += 1
        self.num_clips += len(clips)
        self.times.clips += len(clips)
