"""Decode stage against libavcodec: what the plan needs vs what vmae-ray's decoder spends.

For each video the clip plan (the job's own `plan_clips` + `select_frame_indices`) names the
frames every clip needs. Two baselines decode with the same PyAV/libavcodec build and the
same thread settings as `VideoDecoder` (``threads=1``: slice threading, one thread), with no
pixel conversion at all:

* ``straight``: decode packets from the start up to the last needed frame (the issue's
  definition of "what libavcodec needs just to decode the frames the plan requires" when
  decoding straight through).
* ``seek``: the least decoding the plan requires with keyframe access: for each needed frame
  not reachable by decoding on from the previous one within a GOP, seek to the keyframe at
  or before it and decode forward. This is the stricter floor once the decoder seeks.

``vmae-ray`` is `VideoDecoder(...).clips(plans, geometry)` consumed to the end: probe,
planning, index scan, seeks, conversion of the sampled frames (RGB + resize + crop), all of it.
Each measurement takes the best of ``repeats`` runs, interleaved, so that load from other
processes on a shared machine inflates all three alike rather than one of them.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import av

from vmae_ray.decoding import FrameGeometry, VideoDecoder
from vmae_ray.sampling import select_frame_indices


@dataclass
class DecodePlanFacts:
    path: str
    frames_in_file: int
    clips: int
    needed: list[list[int]]  # per clip, frame indices
    pts: list[int]  # presentation timestamps, sorted (index = frame index)
    keyframe_indices: list[int]
    time_base: float


def plan_facts(path: str, *, sampling: str, num_frames: int, frame_stride: int,
               clips_per_video: int | None) -> DecodePlanFacts:
    """The frames the job's plan needs, from packet timestamps (demux only)."""
    with VideoDecoder(path) as dec:
        plans = dec.plan(sampling=sampling, num_frames=num_frames, frame_stride=frame_stride,
                         clips_per_video=clips_per_video)
        stream_index = dec.probe.stream_index
    with av.open(path) as c:
        s = c.streams[stream_index]
        packets = [(p.pts, bool(p.is_keyframe)) for p in c.demux(s) if p.size and p.pts is not None
                   and not p.is_discard]
        tb = float(s.time_base)
    packets.sort()
    pts = [p for p, _ in packets]
    keys = [i for i, (_, k) in enumerate(packets) if k]
    needed = select_frame_indices([p * tb for p in pts], plans)
    return DecodePlanFacts(path, len(pts), len(plans), needed, pts, keys, tb)


def _open(path: str, stream_index: int | None = None, threads: int = 1):
    c = av.open(path)
    s = c.streams[stream_index] if stream_index is not None else c.streams.best("video")
    # Exactly what VideoDecoder sets.
    s.thread_type = "AUTO" if threads != 1 else "SLICE"
    s.codec_context.thread_count = threads
    return c, s


class _Timer:
    """Wall and CPU seconds of this process (decode with threads=1 runs on the calling thread,
    so CPU time is the decode work itself, and is far less disturbed by other load)."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def baseline_straight(path: str, last_index: int, threads: int = 1) -> tuple[_Timer, int]:
    """Decode frames 0..last_index with no conversion; returns (timer, frames)."""
    timer = _Timer().__enter__()
    c, s = _open(path, threads=threads)
    n = 0
    try:
        for _frame in c.decode(s):
            n += 1
            if n > last_index:
                break
    finally:
        c.close()
    timer.__exit__()
    return timer, n


def baseline_seek(facts: DecodePlanFacts, threads: int = 1) -> tuple[_Timer, int]:
    """The least decoding with keyframe seeks (no conversion); returns (timer, frames)."""
    wanted = sorted({i for clip in facts.needed for i in clip})
    timer = _Timer().__enter__()
    c, s = _open(facts.path, threads=threads)
    decoded = 0
    try:
        pos = -1  # index of the last frame decoded
        it = None
        for target in wanted:
            if target <= pos:
                continue
            k = facts.keyframe_indices[bisect.bisect_right(facts.keyframe_indices, target) - 1]
            if it is None or k > pos + 1:
                c.seek(facts.pts[k], stream=s, backward=True, any_frame=False)
                it = c.decode(s)
                pos = k - 1
                skip_before = facts.pts[k]
            else:
                skip_before = None
            for frame in it:
                if skip_before is not None and frame.pts is not None and frame.pts < skip_before:
                    continue
                skip_before = None
                decoded += 1
                pos = bisect.bisect_left(facts.pts, frame.pts) if frame.pts is not None else pos + 1
                if pos >= target:
                    break
    finally:
        c.close()
    timer.__exit__()
    return timer, decoded


def vmae_decode(path: str, *, sampling: str, num_frames: int, frame_stride: int, clips_per_video: int | None,
                geometry: FrameGeometry, threads: int = 1, decoder_cls=VideoDecoder) -> tuple[_Timer, int]:
    """vmae-ray's decoder producing every clip of the plan; returns (timer, clips)."""
    with _Timer() as timer:
        with decoder_cls(path, threads=threads) as dec:
            plans = dec.plan(sampling=sampling, num_frames=num_frames, frame_stride=frame_stride,
                             clips_per_video=clips_per_video)
            n = sum(1 for _ in dec.clips(plans, geometry))
    return timer, n


def compare(paths: list[str], *, sampling: str, num_frames: int, frame_stride: int, clips_per_video: int | None,
            geometry: FrameGeometry, repeats: int = 3, threads: int = 1, decoder_cls=VideoDecoder) -> dict:
    """Per video and in total: vmae-ray decode time vs both libavcodec baselines.

    Times are the best of ``repeats`` interleaved runs, both wall and CPU seconds.
    """
    rows = []
    for path in paths:
        facts = plan_facts(path, sampling=sampling, num_frames=num_frames, frame_stride=frame_stride,
                           clips_per_video=clips_per_video)
        last = max(max(c) for c in facts.needed)
        best = {f"{k}_{m}": float("inf") for k in ("straight", "seek", "vmae") for m in ("wall", "cpu")}
        frames: dict[str, int] = {}
        clips = 0
        for _ in range(repeats):
            runs = {
                "straight": baseline_straight(path, last, threads),
                "seek": baseline_seek(facts, threads),
                "vmae": vmae_decode(path, sampling=sampling, num_frames=num_frames, frame_stride=frame_stride,
                                    clips_per_video=clips_per_video, geometry=geometry, threads=threads,
                                    decoder_cls=decoder_cls),
            }
            for k, (timer, count) in runs.items():
                best[f"{k}_wall"] = min(best[f"{k}_wall"], timer.wall)
                best[f"{k}_cpu"] = min(best[f"{k}_cpu"], timer.cpu)
                frames[k] = count
            clips = frames.pop("vmae")
        rows.append({"path": path, "frames_in_file": facts.frames_in_file, "clips": clips,
                     "last_needed_frame": last, "frames_straight": frames["straight"],
                     "frames_seek": frames["seek"], **best})
    total = {k: sum(r[k] for r in rows) for k in rows[0] if k.endswith(("_wall", "_cpu"))} if rows else {}
    clips = max(sum(r["clips"] for r in rows), 1)
    out = {"rows": rows, "clips": sum(r["clips"] for r in rows), "videos": len(rows)}
    for m in ("wall", "cpu"):
        for k in ("straight", "seek", "vmae"):
            out[f"{k}_ms_per_clip_{m}"] = 1000 * total.get(f"{k}_{m}", 0.0) / clips
        out[f"ratio_vs_straight_{m}"] = total[f"vmae_{m}"] / total[f"straight_{m}"] if total.get(f"straight_{m}") else None
        out[f"ratio_vs_seek_{m}"] = total[f"vmae_{m}"] / total[f"seek_{m}"] if total.get(f"seek_{m}") else None
    return out
