"""Decode step: probe a video with PyAV, decode what a clip plan needs, emit uint8 clips.

No Ray here: `VideoDecoder` works on any seekable binary file object (a local file, or the
ranged-read S3 file from `vmae_ray.storage`), so it is tested directly.

Performance choices (see DESIGN.md, performance model): only the frames a plan selects are
converted to RGB, and the conversion resizes in the same libswscale call, so the cost is
close to decoding alone; decoding stops as soon as the last target is filled. Frames are
matched to targets by timestamp (`sampling.FrameMatcher`), never by assuming a constant rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import av
import numpy as np

from vmae_ray.sampling import ClipPlan, FrameMatcher, plan_clips


# PIL resample codes (what preprocessor_config.json stores) -> the libswscale filter that
# comes closest; parity with the PIL resize is tested with a stated tolerance.
SWSCALE_FOR_PIL_RESAMPLE = {0: "POINT", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "AREA", 5: "BILINEAR"}


class DecodeError(Exception):
    """A video that cannot be turned into clips; becomes one row of `errors/`."""

    def __init__(self, error_type: str, stage: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.stage = stage
        self.message = message


@dataclass(frozen=True)
class DecodeLimits:
    """Refuse inputs whose header promises more than a decode task should hold.

    Checked from the probe, before a single frame is decoded, so a hostile header
    (claiming 30000x30000 pixels, or days of video) costs nothing.
    """

    max_frame_pixels: int = 8192 * 8192
    max_duration_seconds: float = 6 * 3600.0
    max_bytes: int = 64 * 2**30


@dataclass(frozen=True)
class FrameGeometry:
    """How a decoded frame becomes model input: resize the short side, then center-crop.

    Mirrors the Hugging Face VideoMAE image processor (resize with shortest_edge keeping
    the aspect ratio, then a center crop), with values from the checkpoint's
    preprocessor_config.json. ``interpolation`` is a libswscale filter name.
    """

    resize_shortest_edge: int
    crop_height: int
    crop_width: int
    interpolation: str = "BILINEAR"

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing the short side, as transformers computes it."""
        short, long = (width, height) if width <= height else (height, width)
        new_short = self.resize_shortest_edge
        new_long = int(new_short * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)


@dataclass(frozen=True)
class VideoProbe:
    """Facts about the chosen video stream, written to the `videos/` table."""

    stream_index: int
    num_video_streams: int
    width: int
    height: int
    fps: float
    codec: str
    pix_fmt: str
    duration_seconds: float
    start_seconds: float


@dataclass
class DecodedClip:
    clip_index: int
    start_seconds: float
    end_seconds: float
    frame_indices: list[int]
    pixels: np.ndarray = field(repr=False)  # uint8 (T, H, W, 3)


def center_crop(rgb: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Center crop with transformers' rounding (top = (h - ch) // 2); zero-pads if smaller."""
    height, width = rgb.shape[:2]
    if height < crop_height or width < crop_width:
        padded = np.zeros((max(height, crop_height), max(width, crop_width), 3), dtype=rgb.dtype)
        top, left = (padded.shape[0] - height) // 2, (padded.shape[1] - width) // 2
        padded[top : top + height, left : left + width] = rgb
        rgb, height, width = padded, padded.shape[0], padded.shape[1]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    return rgb[top : top + crop_height, left : left + crop_width]


def _error_from_av(exc: BaseException, stage: str) -> DecodeError:
    if isinstance(exc, DecodeError):
        return exc
    if isinstance(exc, (FileNotFoundError, av.error.FileNotFoundError)):
        return DecodeError("not_found", "read", str(exc))
    if isinstance(exc, (PermissionError, av.error.PermissionError)):
        return DecodeError("access_denied", "read", str(exc))
    if isinstance(exc, MemoryError):
        return DecodeError("too_large", stage, f"out of memory while decoding: {exc}")
    if isinstance(exc, (av.error.FFmpegError, EOFError, ValueError, IndexError, OSError)):
        return DecodeError("corrupt", stage, f"{type(exc).__name__}: {exc}")
    return DecodeError("unknown", stage, f"{type(exc).__name__}: {exc}")


class VideoDecoder:
    """Probe and decode one video. Use as a context manager; errors raise `DecodeError`.

    ``threads`` is libavcodec's thread count per decode (1 keeps one Ray task on one core).
    """

    def __init__(self, file: BinaryIO | str, *, limits: DecodeLimits = DecodeLimits(),
                 size_bytes: int | None = None, threads: int = 1):
        self._limits = limits
        if size_bytes is not None and size_bytes > limits.max_bytes:
            raise DecodeError("too_large", "probe", f"{size_bytes} bytes exceeds max_bytes={limits.max_bytes}")
        if size_bytes == 0:
            raise DecodeError("corrupt", "probe", "empty file (0 bytes)")
        try:
            self._container = av.open(file, mode="r", metadata_errors="ignore")
        except Exception as exc:  # noqa: BLE001 - every open failure is a per-video error
            raise _error_from_av(exc, "probe") from exc
        try:
            self._stream = self._choose_stream()
            self._stream.thread_type = "AUTO" if threads != 1 else "SLICE"
            self._stream.codec_context.thread_count = threads
            self.probe = self._probe()
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> "VideoDecoder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def _choose_stream(self):
        videos = [s for s in self._container.streams.video]
        if not videos:
            raise DecodeError("no_video_stream", "probe", "the file has no video stream")
        # libavformat's av_find_best_stream: the default/most suitable stream, so a file
        # with several video streams gets the one a player would show; we record which.
        try:
            return self._container.streams.best("video") or videos[0]
        except Exception:  # noqa: BLE001 - older PyAV without best(): take the first
            return videos[0]

    def _probe(self) -> VideoProbe:
        stream, limits = self._stream, self._limits
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width <= 0 or height <= 0:
            raise DecodeError("corrupt", "probe", f"video stream reports no size ({width}x{height})")
        if width * height > limits.max_frame_pixels:
            raise DecodeError(
                "too_large", "probe",
                f"{width}x{height} = {width * height} pixels per frame exceeds max_frame_pixels={limits.max_frame_pixels}",
            )
        time_base = stream.time_base
        start = float(stream.start_time * time_base) if stream.start_time is not None and time_base else 0.0
        duration = None
        if stream.duration is not None and time_base:
            duration = float(stream.duration * time_base)
        elif self._container.duration is not None:
            duration = self._container.duration / av.time_base
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if duration is None or duration <= 0 or fps <= 0:
            duration, fps = self._scan_timing(duration, fps)
        if duration > limits.max_duration_seconds:
            raise DecodeError(
                "too_large", "probe",
                f"duration {duration:.1f}s exceeds max_duration_seconds={limits.max_duration_seconds}",
            )
        return VideoProbe(
            stream_index=stream.index,
            num_video_streams=len(self._container.streams.video),
            width=width,
            height=height,
            fps=fps,
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt or "",
            duration_seconds=duration,
            start_seconds=start,
        )

    def _scan_timing(self, duration: float | None, fps: float) -> tuple[float, float]:
        """Duration and rate from packet timestamps when the container does not say.

        Demuxing reads packets without decoding them, so this costs I/O, not decode time.
        """
        stream = self._stream
        first = last = None
        count = 0
        for packet in self._container.demux(stream):
            if packet.pts is None:
                continue
            t = float(packet.pts * stream.time_base)
            end = t + float((packet.duration or 0) * stream.time_base)
            first = t if first is None else min(first, t)
            last = end if last is None else max(last, end)
            count += 1
        self._container.seek(0)
        if count == 0:
            raise DecodeError("corrupt", "probe", "no video packets with timestamps")
        scanned = max((last or 0.0) - (first or 0.0), 0.0)
        if not duration or duration <= 0:
            duration = scanned
        if fps <= 0:
            fps = count / scanned if scanned > 0 else 30.0
        return duration, fps

    def plan(self, *, sampling: str, num_frames: int, frame_stride: int, clips_per_video: int | None) -> list[ClipPlan]:
        p = self.probe
        return plan_clips(
            sampling=sampling,
            duration_seconds=p.duration_seconds,
            fps=p.fps,
            num_frames=num_frames,
            frame_stride=frame_stride,
            clips_per_video=clips_per_video,
            start_seconds=p.start_seconds,
        )

    def clips(self, plans: list[ClipPlan], geometry: FrameGeometry) -> Iterator[DecodedClip]:
        """Decode once, straight through, and yield each clip as soon as its frames are in.

        Only frames some target selects are converted (RGB + resize in one swscale call);
        clips leave as soon as complete, so a long video with many clips holds only the
        frames of the clips still open, never the whole video.
        """
        probe = self.probe
        out_w, out_h = geometry.resized_size(probe.width, probe.height)
        matcher = FrameMatcher(plans)
        num_frames = [len(p.target_seconds) for p in plans]
        chosen: list[list[int | None]] = [[None] * n for n in num_frames]
        remaining = list(num_frames)
        converted: dict[int, tuple[np.ndarray, float]] = {}  # index -> (rgb crop, seconds)
        next_clip = 0
        prev = None  # (index, frame) not yet known to be needed
        period = 1.0 / probe.fps if probe.fps > 0 else 0.0

        def convert(index: int, frame, seconds: float) -> None:
            if index not in converted:
                rgb = frame.reformat(width=out_w, height=out_h, format="rgb24",
                                     interpolation=geometry.interpolation).to_ndarray()
                converted[index] = (center_crop(rgb, geometry.crop_height, geometry.crop_width), seconds)

        def fill(slots, frames_by_index) -> None:
            for clip_pos, frame_pos, owner in slots:
                convert(owner, *frames_by_index[owner])
                chosen[clip_pos][frame_pos] = owner
                remaining[clip_pos] -= 1

        def ready() -> Iterator[DecodedClip]:
            nonlocal next_clip
            # Clips complete in order (their last targets are increasing).
            while next_clip < len(plans) and remaining[next_clip] == 0:
                indices = [int(i) for i in chosen[next_clip]]
                pixels = np.stack([converted[i][0] for i in indices])
                start = converted[indices[0]][1] - probe.start_seconds
                end = converted[indices[-1]][1] - probe.start_seconds + period
                yield DecodedClip(next_clip, start, end, indices, pixels)
                next_clip += 1
                still_needed = {i for c in chosen[next_clip:] for i in c if i is not None}
                for i in list(converted):
                    if i not in still_needed:
                        del converted[i]

        index = -1
        last_time = None
        try:
            for frame in self._container.decode(self._stream):
                index += 1
                t = frame.time
                if t is None:  # no timestamp: continue the previous one at the nominal rate
                    t = (last_time + period) if last_time is not None else probe.start_seconds
                last_time = t
                frames_by_index = {index: (frame, t)}
                if prev is not None:
                    frames_by_index[prev[0]] = prev[1:]
                fill(matcher.push(index, t), frames_by_index)
                yield from ready()
                if matcher.done:
                    break
                prev = (index, frame, t)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken stream is a per-video error
            raise _error_from_av(exc, "decode") from exc
        if index < 0:
            raise DecodeError("corrupt", "decode", "no frame could be decoded")
        if not matcher.done and prev is not None:
            fill(matcher.finish(), {prev[0]: prev[1:]})
            yield from ready()
