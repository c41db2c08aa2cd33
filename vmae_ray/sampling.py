"""Clip plans: which moments of a video become the frames of each clip.

Pure logic, no decoding and no I/O. Plans are in seconds, not frame numbers, so variable
frame rate video and containers that do not report a frame count (AV1 in MKV) are sampled
correctly: the decoder matches each target time to the frame on screen at that time
(`FrameMatcher`). A target past the last frame takes the last frame, so a video shorter
than a clip repeats its last frame instead of failing, as the VideoMAE reference loaders do.

Two policies, as in the VideoMAE paper's code:
- ``uniform`` (Something-Something v2): ``num_frames`` equal segments over the whole video,
  the middle frame of each, one clip per video.
- ``stride`` (Kinetics): dense clips of ``num_frames`` frames every ``frame_stride`` frames;
  ``clips_per_video`` clips evenly spaced over the video, or back-to-back clips covering the
  whole video when ``clips_per_video`` is None.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SAMPLING_POLICIES = ("uniform", "stride")


@dataclass(frozen=True)
class ClipPlan:
    """One clip to build: the target time of each of its frames, non-decreasing."""

    clip_index: int
    target_seconds: tuple[float, ...]


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def plan_uniform(*, duration_seconds: float, num_frames: int, start_seconds: float = 0.0) -> list[ClipPlan]:
    """Segment-based sampling: the midpoint of each of ``num_frames`` equal segments.

    A zero or unknown-length video (duration <= 0) gets all targets at its start: the
    matcher then repeats its only frame.
    """
    _check_positive("num_frames", num_frames)
    duration = max(float(duration_seconds), 0.0)
    segment = duration / num_frames
    targets = tuple(start_seconds + (i + 0.5) * segment for i in range(num_frames))
    return [ClipPlan(clip_index=0, target_seconds=targets)]


def plan_stride(
    *,
    duration_seconds: float,
    fps: float,
    num_frames: int,
    frame_stride: int,
    clips_per_video: int | None,
    start_seconds: float = 0.0,
) -> list[ClipPlan]:
    """Dense clips: ``num_frames`` frames ``frame_stride`` frames apart.

    The frame period comes from the stream's average rate; targets sit half a period after
    the nominal frame time so that, on constant-rate video, each target lands on exactly the
    frame index ``start + k * frame_stride`` despite rounding in timestamps.

    ``clips_per_video=N`` spaces N clip starts evenly from the start to the last start that
    still fits the video (one clip when the video is shorter than a clip, since N identical
    clips would add nothing). ``clips_per_video=None`` lays clips back to back over the whole
    video; the last one repeats the last frame where it runs past the end.
    """
    _check_positive("num_frames", num_frames)
    _check_positive("frame_stride", frame_stride)
    _check_positive("fps", fps)
    if clips_per_video is not None:
        _check_positive("clips_per_video", clips_per_video)
    duration = max(float(duration_seconds), 0.0)
    period = 1.0 / fps
    span = num_frames * frame_stride * period
    if clips_per_video is None:
        # Back to back; the small epsilon keeps a video of exactly k spans at k clips.
        count = max(1, math.ceil(duration / span - 1e-9))
        starts = [i * span for i in range(count)]
    else:
        last_start = duration - span
        if last_start <= 0 or clips_per_video == 1:
            starts = [max(last_start, 0.0) / 2.0] if clips_per_video == 1 else [0.0]
        else:
            step = last_start / (clips_per_video - 1)
            starts = [i * step for i in range(clips_per_video)]
    plans = []
    for clip_index, offset in enumerate(starts):
        targets = tuple(
            start_seconds + offset + (k * frame_stride + 0.5) * period for k in range(num_frames)
        )
        plans.append(ClipPlan(clip_index=clip_index, target_seconds=targets))
    return plans


def plan_clips(
    *,
    sampling: str,
    duration_seconds: float,
    fps: float,
    num_frames: int,
    frame_stride: int,
    clips_per_video: int | None,
    start_seconds: float = 0.0,
) -> list[ClipPlan]:
    """Dispatch on the sampling policy name (``uniform`` or ``stride``)."""
    if sampling == "uniform":
        return plan_uniform(duration_seconds=duration_seconds, num_frames=num_frames, start_seconds=start_seconds)
    if sampling == "stride":
        return plan_stride(
            duration_seconds=duration_seconds,
            fps=fps,
            num_frames=num_frames,
            frame_stride=frame_stride,
            clips_per_video=clips_per_video,
            start_seconds=start_seconds,
        )
    raise ValueError(f"sampling must be one of {', '.join(SAMPLING_POLICIES)}; got {sampling!r}")


class FrameMatcher:
    """Streams decoded frames against the targets of a set of clip plans.

    Each target takes the last frame whose timestamp is <= the target (the frame on screen
    at that moment); targets before the first frame take the first frame, and targets after
    the last frame take the last one. Frames arrive in presentation order. The matcher only
    needs the previous frame, so a decoder can convert just the frames it is told to keep.

    Usage: for each decoded frame call ``push(frame_index, pts_seconds)``; it returns the
    target slots (clip position, frame position) that the *previous* frame fills. When the
    stream ends call ``finish()`` for the slots the last frame fills. ``done`` turns true
    once every target is filled, so the decoder can stop early.
    """

    def __init__(self, plans: Sequence[ClipPlan]):
        slots = [
            (t, clip_pos, frame_pos)
            for clip_pos, plan in enumerate(plans)
            for frame_pos, t in enumerate(plan.target_seconds)
        ]
        slots.sort()
        self._times = [s[0] for s in slots]
        self._slots = [(s[1], s[2]) for s in slots]
        self._next = 0
        self._prev_index: int | None = None

    @property
    def done(self) -> bool:
        return self._next >= len(self._slots)

    @property
    def next_target_seconds(self) -> float | None:
        return None if self.done else self._times[self._next]

    def push(self, frame_index: int, pts_seconds: float) -> list[tuple[int, int, int]]:
        """Feed the next frame; returns ``(clip_pos, frame_pos, frame_index)`` slots filled."""
        filled = []
        # Slots whose time is before this frame belong to the frame on screen until now:
        # the previous one, or this one when it is the very first frame.
        owner = self._prev_index if self._prev_index is not None else frame_index
        stop = bisect_right(self._times, pts_seconds - 1e-9, lo=self._next)
        for i in range(self._next, stop):
            filled.append((*self._slots[i], owner))
        self._next = stop
        self._prev_index = frame_index
        return filled

    def finish(self) -> list[tuple[int, int, int]]:
        """End of stream: every remaining target takes the last frame seen."""
        if self._prev_index is None:
            return []
        filled = [(*self._slots[i], self._prev_index) for i in range(self._next, len(self._slots))]
        self._next = len(self._slots)
        return filled


def select_frame_indices(frame_pts_seconds: Iterable[float], plans: Sequence[ClipPlan]) -> list[list[int]]:
    """The frame index chosen for every target of every plan, for a full list of frame times.

    The same matcher the decoder streams with, run over known timestamps; used by tests and
    by anyone who wants a plan's frame indices without decoding.
    """
    matcher = FrameMatcher(plans)
    chosen = [[-1] * len(p.target_seconds) for p in plans]
    for index, pts in enumerate(frame_pts_seconds):
        for clip_pos, frame_pos, owner in matcher.push(index, pts):
            chosen[clip_pos][frame_pos] = owner
        if matcher.done:
            break
    for clip_pos, frame_pos, owner in matcher.finish():
        chosen[clip_pos][frame_pos] = owner
    return chosen
