"""Synthetic media for tests, the demo and benchmarks, made with PyAV only (no ffmpeg CLI, no Ray).

Four kinds of files:

* `make_video`: a real encoded video whose every frame carries its own frame number ``k`` as
  a black/white block code in the middle of the picture, on top of a moving background. The
  code survives encoding, resizing to ~1/4 size and a center crop to the short side, so a
  test can read back *which* frames a decoder returned (`frame_number_from_rgb`) instead of
  only checking shapes.
* `make_audio_only`: a file with an audio stream and no video stream.
* `make_hostile_corpus`: broken inputs derived from a good video, each with the error type a
  robust job must report for it (including a tiny file whose header claims a frame size that
  must be refused before decoding).
* `make_tiny_checkpoint`: a small randomly initialised VideoMAE checkpoint (classifier,
  pretraining with its decoder, or a bare encoder), saved as hub checkpoints are;
  `train_tiny_pretraining`: one whose decoder learned `texture_clip`s, so that reconstruction
  scores mean something in tests.
* `transcode_video`: a near-duplicate of a video (re-encoded at another size and quality,
  optionally trimmed), as uploads of the same clip appear in real corpora.
* `clustered_unit_vectors`: embedding-like unit vectors with cluster structure and planted
  near-duplicates, for vector search and dedup tests and benchmarks.

Frame code layout (the contract between `make_video` and `frame_number_from_rgb`):
a square of side ``CODE_FRACTION * min(width, height)`` centred in the frame, split into a
``CODE_GRID x CODE_GRID`` grid of cells, each white (bit 1) or black (bit 0). The four corner
cells hold a 4-bit check value, the 12 other cells hold ``k mod CODE_PERIOD`` (LSB first, raster
order). Every code is read as a whole: a wrong read almost always fails the check and raises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from vmae_ray.checkpoint import PREPROCESSOR_FILE

__all__ = [
    "CODE_FRACTION",
    "CODE_GRID",
    "CODE_PERIOD",
    "SCENES",
    "SCENE_TINTS",
    "HUGE_WIDTH",
    "HUGE_HEIGHT",
    "coded_frames",
    "frame_number_from_rgb",
    "make_audio_only",
    "make_displayed_video",
    "make_hostile_corpus",
    "make_scene_corpus",
    "make_huge_dims_video",
    "clustered_unit_vectors",
    "make_resolution_change_video",
    "remux_with_display_geometry",
    "make_tiny_checkpoint",
    "make_video",
    "texture_clip",
    "train_tiny_pretraining",
    "transcode_video",
]

# Side of the code square as a fraction of the frame's short side. 0.6 keeps the whole code
# inside a center crop of 80% of the short side (the 256 -> 224 style crop) while leaving the
# moving background visible around it; cells stay >= 3 px when a 120 px short side is resized
# to 1/4 and cropped.
CODE_FRACTION = 0.6
CODE_GRID = 4
# Corner cells carry the check bits: a read at the wrong scale errs first at the corners (they
# are the farthest from the centre), so errors there are caught by the check itself.
_CHECK_CELLS = ((0, 0), (0, CODE_GRID - 1), (CODE_GRID - 1, 0), (CODE_GRID - 1, CODE_GRID - 1))
_DATA_CELLS = tuple((r, c) for r in range(CODE_GRID) for c in range(CODE_GRID) if (r, c) not in _CHECK_CELLS)
_DATA_BITS = len(_DATA_CELLS)  # 12
CODE_PERIOD = 1 << _DATA_BITS  # frame numbers wrap at 4096
# XOR-ed into the check so that an all-black (or all-white) picture is not a valid code.
_CHECK_SALT = 0b0101

# Scale hypotheses tried when reading a code, as (code side in the input) / (CODE_FRACTION *
# input short side). 1.0 is an uncropped or short-side-square-cropped frame; < 1 and > 1 cover
# crops tighter than the short side (e.g. 224 of 256 -> 1.14) or frames padded around.
_READ_SCALES = (1.0, 1.07, 0.93, 1.14, 0.87, 1.25, 0.8, 1.4, 0.7, 1.6, 0.6)
_MIN_MARGIN = 24.0  # a cell read within this many grey levels of the threshold is not trusted

# The size `make_huge_dims_video` claims. 30000x30000 cannot be used: libavcodec's
# av_image_check_size rejects any frame with (w+128)*(h+128) >= INT_MAX/8 (~16.2k square), and a
# demuxer's stream with such a size is reset to 0x0 ("no size", i.e. corrupt) rather than
# reported. 16000x16000 = 256 Mpx is accepted by FFmpeg and is 3.8x the job's default
# max_frame_pixels (8192*8192), so the only correct answer is a probe-time refusal.
HUGE_WIDTH = 16000
HUGE_HEIGHT = 16000

# Container -> default audio codec for `audio=True` / `make_audio_only` (what the container
# normally carries; Opus is the only common choice WebM allows). AVI gets PCM: AVI cannot store
# negative timestamps, so an encoder delay (MP3/AAC priming samples) makes the muxer shift every
# stream, and in 1/fps ticks that shift rounds into a fake dropped video frame.
_AUDIO_FOR_EXT = {
    ".mp4": "aac", ".m4v": "aac", ".mov": "aac", ".mkv": "aac", ".m4a": "aac",
    ".webm": "libopus", ".ogg": "libopus", ".opus": "libopus",
    ".avi": "pcm_s16le", ".mp3": "libmp3lame",
    ".wav": "pcm_s16le", ".flac": "flac",
}


# Scenes for labelled videos (`make_video(scene=...)`, `make_scene_corpus`): an RGB shift added to
# the random background colours (drawn from 40..215 per channel). A scene is a colour cast, the
# one content difference a randomly initialised encoder keeps: its patch embedding is linear in
# the pixels, so a clip's mean colour survives mean pooling, while stripe direction or motion
# of a random phase average out (measured with 30 prototype clips per class on the tests' random
# 32-pixel checkpoint: a linear probe separates colour casts at 0.99 cross-validated accuracy,
# stripe direction and still-vs-moving at chance).
SCENE_TINTS: dict[str, tuple[int, int, int]] = {
    "sunset": (70, 10, -60),
    "ocean": (-60, 0, 70),
    "forest": (-40, 60, -40),
    "night": (-70, -70, -40),
}
SCENES = tuple(SCENE_TINTS)


# --------------------------------------------------------------------------------------------
# Frame code
# --------------------------------------------------------------------------------------------


def _check_nibble(data: int) -> int:
    # XOR of the three data nibbles: every single-bit error changes exactly one check bit.
    return ((data & 0xF) ^ ((data >> 4) & 0xF) ^ ((data >> 8) & 0xF) ^ _CHECK_SALT) & 0xF


def _code_bits(k: int) -> np.ndarray:
    """The CODE_GRID x CODE_GRID bit grid that encodes frame number k."""
    data = k % CODE_PERIOD
    check = _check_nibble(data)
    grid = np.zeros((CODE_GRID, CODE_GRID), dtype=bool)
    for i, (r, c) in enumerate(_DATA_CELLS):
        grid[r, c] = bool((data >> i) & 1)
    for i, (r, c) in enumerate(_CHECK_CELLS):
        grid[r, c] = bool((check >> i) & 1)
    return grid


def _code_edges(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel boundaries (x edges, y edges) of the code cells in a width x height frame."""
    side = CODE_FRACTION * min(width, height)
    steps = np.arange(CODE_GRID + 1) - CODE_GRID / 2
    xs = np.round(width / 2 + steps * side / CODE_GRID).astype(int)
    ys = np.round(height / 2 + steps * side / CODE_GRID).astype(int)
    return xs, ys


def _draw_code(rgb: np.ndarray, k: int) -> None:
    height, width = rgb.shape[:2]
    xs, ys = _code_edges(width, height)
    bits = _code_bits(k)
    for r in range(CODE_GRID):
        for c in range(CODE_GRID):
            # Full black / full white: the largest luma gap, and no chroma to smear in 4:2:0.
            rgb[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = 255 if bits[r, c] else 0


def _read_code(gray: np.ndarray, scale: float) -> tuple[int | None, float]:
    """(frame number or None if the check fails, margin) for one scale hypothesis."""
    height, width = gray.shape
    cell = CODE_FRACTION * min(height, width) * scale / CODE_GRID
    # Average the middle ~40% of each cell: away from edges blurred by the scaler and the codec,
    # but more than one pixel so that ringing does not decide a bit.
    half = max(0.5, 0.2 * cell)
    values = np.empty((CODE_GRID, CODE_GRID), dtype=np.float64)
    for r in range(CODE_GRID):
        cy = height / 2 + (r + 0.5 - CODE_GRID / 2) * cell
        for c in range(CODE_GRID):
            cx = width / 2 + (c + 0.5 - CODE_GRID / 2) * cell
            # Pixel i covers [i, i+1): take the pixels whose centres lie within `half`.
            y0, y1 = int(np.ceil(cy - half - 0.5)), int(np.floor(cy + half - 0.5)) + 1
            x0, x1 = int(np.ceil(cx - half - 0.5)), int(np.floor(cx + half - 0.5)) + 1
            y0, x0 = min(y0, int(cy)), min(x0, int(cx))
            y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
            if y0 < 0 or x0 < 0 or y1 > height or x1 > width:
                return None, 0.0
            values[r, c] = gray[y0:y1, x0:x1].mean()
    bits = values >= 127.5
    margin = float(np.abs(values - 127.5).min())
    data = sum(int(bits[rc]) << i for i, rc in enumerate(_DATA_CELLS))
    check = sum(int(bits[rc]) << i for i, rc in enumerate(_CHECK_CELLS))
    return (data if check == _check_nibble(data) else None), margin


def frame_number_from_rgb(rgb: np.ndarray) -> int:
    """Recover the frame number k (mod CODE_PERIOD = 4096) drawn by `make_video` from a frame.

    ``rgb`` is an (H, W, 3) or (H, W, 4) RGB(A) array (uint8, or float in [0, 1] or [0, 255]) or
    an (H, W) grey image: a decoded frame at full size, or after any sane resize that keeps the
    aspect ratio (down to ~1/4 of a 120 px short side) and/or a center crop, down to a square
    of ~80% of the short side. The code sits in the middle of the frame, so center crops keep it;
    since the scale of a cropped input is not known, a few scales are tried and the reading
    that passes the check with the clearest black/white separation wins.

    Raises ValueError when no reading passes the check (not a `make_video` frame, or a frame
    too small or too distorted to read).
    """
    a = np.asarray(rgb)
    if a.ndim == 3:
        gray = a[..., :3].astype(np.float64).mean(axis=-1)
    elif a.ndim == 2:
        gray = a.astype(np.float64)
    else:
        raise ValueError(f"expected an (H, W, 3) RGB or (H, W) grey image, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating) and gray.size and gray.max() <= 1.0:
        gray = gray * 255.0  # normalised float input
    best_k, best_margin = None, -1.0
    for scale in _READ_SCALES:
        k, margin = _read_code(gray, scale)
        if k is not None and margin > best_margin:
            best_k, best_margin = k, margin
    if best_k is None or best_margin < _MIN_MARGIN:
        raise ValueError(
            f"no frame code found in a {gray.shape[1]}x{gray.shape[0]} image"
            + (f" (best margin {best_margin:.1f} < {_MIN_MARGIN})" if best_k is not None else "")
        )
    return best_k


# --------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------


class _Background:
    """A cheap moving picture (seeded): drifting diagonal stripes over a gradient and a bouncing
    square, so that consecutive frames differ everywhere, like real motion, and the encoder has
    real inter-frame work to do (not just a still image with a changing code)."""

    def __init__(self, width: int, height: int, seed: int, tint: tuple[int, int, int] | None = None):
        rng = np.random.default_rng(seed)
        self.width, self.height = width, height
        yy, xx = np.mgrid[0:height, 0:width]
        diag = xx * int(rng.integers(1, 4)) + yy * int(rng.integers(1, 4))
        self.period = int(rng.integers(10, 28))
        self.speed = int(rng.integers(1, 5))
        # Stripe membership is a table lookup on (diagonal coordinate + shift): ~4x cheaper per
        # frame than integer division over the whole picture, which matters for 640x360 demos.
        self.diag = diag.astype(np.intp)
        self.stripe_of = (np.arange(int(diag.max()) + 2 * self.period + 1) // self.period) % 2 == 1
        colors = rng.integers(40, 216, size=(2, 3)).astype(np.int16)
        if tint is not None:  # a scene's palette (see SCENE_TINTS); drawn after, so seeds keep their pictures
            colors += np.asarray(tint, dtype=np.int16)
        ramp = (np.arange(width, dtype=np.int16) * 40 // max(width - 1, 1) - 20)[None, :, None]
        # Two full-size stripe colourings; a frame is one of them with the other copied in
        # where the stripe mask is set (np.copyto with `where` beats np.where's broadcasting).
        self.layers = [np.ascontiguousarray(np.broadcast_to(np.clip(c + ramp, 0, 255).astype(np.uint8),
                                                            (height, width, 3))) for c in colors]
        self.square = max(4, min(width, height) // 5)
        square_color = rng.integers(0, 256, size=3)
        if tint is not None:
            square_color = np.clip(square_color + np.asarray(tint), 0, 255)
        self.square_color = square_color.astype(np.uint8)
        self.velocity = (int(rng.integers(2, 7)), int(rng.integers(2, 7)))

    def frame(self, k: int) -> np.ndarray:
        stripes = self.stripe_of[self.diag + (k * self.speed) % (2 * self.period)]
        rgb = self.layers[1].copy()
        np.copyto(rgb, self.layers[0], where=stripes[..., None])
        size = self.square
        # Triangle-wave position: the square bounces off the frame edges.
        x = _bounce(k * self.velocity[0], self.width - size)
        y = _bounce(k * self.velocity[1], self.height - size)
        rgb[y : y + size, x : x + size] = self.square_color
        return rgb


def coded_frames(width: int, height: int, num_frames: int, *, seed: int = 0, first_code: int = 0,
                 tint: tuple[int, int, int] | None = None) -> Iterator[np.ndarray]:
    """The pictures `make_video` encodes: frame k is a moving background (seeded by ``seed``)
    with the block code of ``first_code + k`` in its centre, (height, width, 3) uint8 RGB.

    For encoders other than PyAV's (e.g. ffmpeg's command line, fed raw rgb24 frames)."""
    background = _Background(width, height, seed, tint=tint)
    for k in range(num_frames):
        rgb = background.frame(k)
        _draw_code(rgb, first_code + k)
        yield rgb


def _bounce(travel: int, span: int) -> int:
    if span <= 0:
        return 0
    t = travel % (2 * span)
    return t if t <= span else 2 * span - t


def _rational(value) -> Fraction:
    # Fraction(29.97) would be a binary-float monster; go through the decimal string instead.
    if isinstance(value, Fraction):
        return value
    if isinstance(value, float):
        return Fraction(str(value)).limit_denominator(1001000)
    return Fraction(value)


def _video_encoder_options(codec_name: str, bit_rate: int | None) -> dict[str, str]:
    # Fast presets: test media must be cheap to make; the encoders stay real (B-frames for
    # x264 "veryfast", alt-ref frames for VP9), so decoders see realistic streams.
    if codec_name == "libx264":
        options = {"preset": "veryfast"}
        if bit_rate is None:
            options["crf"] = "23"
        return options
    if codec_name == "libx265":
        options = {"preset": "ultrafast", "x265-params": "log-level=error"}
        if bit_rate is None:
            options["crf"] = "28"
        return options
    if codec_name in ("libvpx-vp9", "libvpx"):
        options = {"deadline": "realtime", "cpu-used": "8"}
        if bit_rate is None:
            options["crf"] = "32"
            options["b"] = "0"  # constant quality mode in libvpx needs bitrate 0
        return options
    # Others (mpeg4, mpeg2video, mjpeg, ...): the encoder's default rate control (mpeg4: 200 kb/s),
    # which keeps the block code readable at test sizes.
    return {}


def _muxer_options(options: dict[str, str] | None, bit_exact: bool) -> dict[str, str]:
    """Muxer options; with ``bit_exact`` no random segment UID or version strings (Matroska and
    WebM write them otherwise)."""
    out = dict(options or {})
    if bit_exact:
        out.setdefault("fflags", "+bitexact")
    return out


def _make_bit_exact(codec_context, options: dict[str, str]) -> None:
    """One encoder thread, and x264 without assembly: the same input gives the same bytes (see
    `make_video`'s ``bit_exact``)."""
    codec_context.thread_count = 1
    if codec_context.name == "libx264":
        options["x264-params"] = "threads=1:lookahead-threads=1:sliced-threads=0:asm=0"
    elif codec_context.name.startswith("libvpx"):
        options["row-mt"] = "0"


def _audio_codec_for(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    try:
        return _AUDIO_FOR_EXT[ext]
    except KeyError:
        raise ValueError(f"no default audio codec for {ext!r}; use one of {sorted(_AUDIO_FOR_EXT)}") from None


def _add_audio_stream(container, codec: str, seed: int):
    # Opus only runs at 48 kHz; 44.1 kHz elsewhere is the common real-world rate.
    rate = 48000 if codec == "libopus" else 44100
    stream = container.add_stream(codec, rate=rate)
    stream.layout = "mono"
    freq = 220.0 + 40.0 * (seed % 11)
    return stream, rate, freq


def _audio_frames(stream, rate: int, freq: float, start_sample: int, end_sample: int):
    """Encode samples [start_sample, end_sample) of a sine tone in 1024-sample frames."""
    # PyAV's encoder converts sample format and re-chunks to the codec's frame size (1152 for
    # MP3, 960 for Opus) itself, so one frame layout serves every codec.
    packets = []
    for s0 in range(start_sample, end_sample, 1024):
        n = min(1024, end_sample - s0)
        t = (np.arange(s0, s0 + n) / rate).astype(np.float64)
        wave = (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = s0
        frame.time_base = Fraction(1, rate)
        packets.extend(stream.encode(frame))
    return packets


def make_video(path, *, codec="h264", width=320, height=240, fps=30, num_frames=60, gop_size=30,
               pix_fmt="yuv420p", vfr=False, seed=0, bit_rate=None, audio=False, scene: str | None = None,
               start_seconds=0.0, audio_seconds=None, max_b_frames=None, container_options=None,
               cover_art=False, bit_exact=False) -> str:
    """Encode a synthetic video whose frames are distinguishable; return ``path``.

    Frame k shows a moving background (seeded by ``seed``) and, in the centre, a 4x4 black/white
    block code of k (see the module docstring) that `frame_number_from_rgb` reads back after
    decoding, resizing to ~1/4 size and/or a center crop to the short side.

    The container comes from the extension (.mp4, .mkv, .webm, .avi, .mov, ...). ``codec`` is a
    PyAV/FFmpeg encoder name: 'h264' (libx264), 'hevc'/'libx265', 'libvpx-vp9' (for .webm),
    'mpeg4', ... ``pix_fmt`` must be one the encoder supports (e.g. 'yuv444p', 'yuv420p10le'
    for x265). ``gop_size`` is the maximum keyframe interval. ``bit_rate`` (bits/s) switches
    from constant quality to a target bitrate.

    ``vfr=True`` makes a variable-frame-rate stream: time base 1/1000 and frame durations of 20,
    60 or 33 ms chosen pseudo-randomly from ``seed`` (``fps`` is then only the encoder's rate
    hint); otherwise frame k has pts k in time base 1/fps. ``audio=True`` adds a sine-tone audio
    stream as long as the video (AAC in mp4/mkv/mov, Opus in webm, PCM in avi), or
    ``audio_seconds`` long (e.g. longer than the video, as in a recording whose audio runs on).

    ``scene`` (one of `SCENES`) tints the background's palette (`SCENE_TINTS`): videos of one
    scene share a colour cast and differ in everything else the seed draws (stripe direction,
    width and speed, colours, the bouncing square), which makes labelled classes for probes.

    Real-world timing: ``start_seconds`` shifts every timestamp (a chunk cut from a longer
    recording; whole frames at constant rate); ``max_b_frames`` sets the encoder's B-frames
    (e.g. 'mpeg4' in .avi: the first frame is then presented one tick after the header's
    start, as in UCF101/HMDB51); ``container_options`` are muxer options (e.g.
    ``{"use_editlist": "0"}`` keeps an MP4's B-frame delay visible instead of hiding it
    behind an edit list). ``bit_exact=True`` gives the same bytes on every run and machine, at
    a cost in encoding time (one encoder thread, and x264 without its assembly: with either, a
    few of 24 small x264 encodes came out differently from one run to the next, measured on
    this project's machine; libvpx gets one thread); the demo uses it so that its printed
    numbers are the README's. ``cover_art=True`` adds a still picture stream (attached_pic), as
    downloaders embed a thumbnail.
    """
    path = os.fspath(path)
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    if scene is not None and scene not in SCENE_TINTS:
        raise ValueError(f"scene={scene!r}; expected one of {', '.join(SCENES)}")
    rate = _rational(fps)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    if vfr:
        rng = np.random.default_rng(seed + 7919)  # offset: independent of the picture's rng
        durations_ms = rng.choice(np.array([20, 60, 33]), size=num_frames)
        time_base = Fraction(1, 1000)
        offset = int(round(start_seconds * 1000))
        pts = (offset + np.concatenate([[0], np.cumsum(durations_ms)[:-1]])).astype(int).tolist()
        end_seconds = float(np.sum(durations_ms)) / 1000.0
    else:
        time_base = 1 / rate
        offset = int(round(start_seconds * rate))
        pts = list(range(offset, offset + num_frames))
        end_seconds = float(num_frames / rate)
    audio_end_seconds = end_seconds if audio_seconds is None else float(audio_seconds)

    pictures = coded_frames(width, height, num_frames, seed=seed, tint=SCENE_TINTS[scene] if scene else None)
    with av.open(path, mode="w", options=_muxer_options(container_options, bit_exact)) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        stream.codec_context.gop_size = gop_size
        stream.codec_context.time_base = time_base
        if bit_rate is not None:
            stream.codec_context.bit_rate = int(bit_rate)
        if max_b_frames is not None:
            stream.codec_context.max_b_frames = int(max_b_frames)
        options = _video_encoder_options(stream.codec_context.name, bit_rate)
        if bit_exact:
            _make_bit_exact(stream.codec_context, options)
        stream.codec_context.options = options
        if vfr:
            stream.time_base = time_base  # mkv/mp4 keep 1 ms ticks: the irregular pts survive

        audio_stream = None
        if audio:
            audio_stream, audio_rate, freq = _add_audio_stream(container, _audio_codec_for(path), seed)
            audio_done = 0
        if cover_art:
            _add_cover_art(container, seed)

        for k, rgb in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
            frame.pts = pts[k]
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
            if audio_stream is not None:
                # Interleave audio up to this frame's time so the file is muxed like a real one.
                upto = int(round(float((pts[k] - pts[0]) * time_base) * audio_rate))
                if upto > audio_done:
                    for packet in _audio_frames(audio_stream, audio_rate, freq, audio_done, upto):
                        container.mux(packet)
                    audio_done = upto
        for packet in stream.encode(None):
            container.mux(packet)
        if audio_stream is not None:
            end = int(round(audio_end_seconds * audio_rate))
            for packet in _audio_frames(audio_stream, audio_rate, freq, audio_done, end):
                container.mux(packet)
            for packet in audio_stream.encode(None):
                container.mux(packet)
    return path


def make_scene_corpus(directory, *, per_scene: int, scenes: tuple[str, ...] = SCENES, seed: int = 0,
                      **video_kwargs) -> list[tuple[str, str]]:
    """``per_scene`` videos of each scene in ``directory``: [(path, scene)], scenes interleaved.

    Video i gets seed ``seed + i``, so no two videos share stripes, colours or motion; other
    keyword arguments go to `make_video` (default 64x48, 24 frames at 12 fps, H.264). Files
    that exist are kept (the recipe is deterministic).
    """
    kwargs = {"codec": "h264", "width": 64, "height": 48, "fps": 12, "num_frames": 24, "gop_size": 12, **video_kwargs}
    os.makedirs(directory, exist_ok=True)
    out = []
    for i in range(per_scene * len(scenes)):
        scene = scenes[i % len(scenes)]
        path = os.path.join(os.fspath(directory), f"{scene}_{i // len(scenes):02d}.mp4")
        if not os.path.exists(path):
            make_video(path, seed=seed + i, scene=scene, **kwargs)
        out.append((path, scene))
    return out


def transcode_video(source, path, *, width: int, height: int, codec: str = "h264", crf: int | None = 35,
                    bit_rate: int | None = None, start_frame: int = 0, end_frame: int | None = None,
                    bit_exact: bool = False) -> str:
    """Re-encode ``source`` as ``path``: frames [start_frame, end_frame) of its first video stream,
    resized to width x height (libswscale bicubic), at another quality; return ``path``.

    What a corpus holds when the same clip is uploaded twice: another size, another encoder
    quality (x264 ``crf``, or a target ``bit_rate``), or a trimmed copy. The frame-number code of
    `make_video` survives, so a test can tell which source frames a copy holds. Output frames
    keep consecutive pts at the source's average rate. ``bit_exact`` as in `make_video`.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(os.fspath(source)) as src, av.open(path, mode="w", options=_muxer_options(None, bit_exact)) as dst:
        in_stream = src.streams.video[0]
        rate = in_stream.average_rate or Fraction(25, 1)
        stream = dst.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / _rational(rate)
        if bit_rate is not None:
            stream.codec_context.bit_rate = int(bit_rate)
        options = _video_encoder_options(stream.codec_context.name, bit_rate)
        if crf is not None and bit_rate is None and stream.codec_context.name == "libx264":
            options["crf"] = str(crf)
        if bit_exact:
            _make_bit_exact(stream.codec_context, options)
        stream.codec_context.options = options
        written = 0
        for k, frame in enumerate(src.decode(in_stream)):
            if k < start_frame:
                continue
            if end_frame is not None and k >= end_frame:
                break
            out = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
            out.pts = written
            out.time_base = stream.codec_context.time_base
            for packet in stream.encode(out):
                dst.mux(packet)
            written += 1
        for packet in stream.encode(None):
            dst.mux(packet)
    if written == 0:
        raise ValueError(f"{source}: no frame in [{start_frame}, {end_frame})")
    return path


def clustered_unit_vectors(num_rows: int, dim: int, *, num_clusters: int, cluster_cosine: float = 0.5,
                           intrinsic_dim: int | None = None, duplicate_fraction: float = 0.0,
                           duplicate_cosine: float = 0.98, seed: int = 0,
                           block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (num_rows, dim) float32 with cluster structure, like embeddings of a corpus.

    Row i is normalize(center[c_i] + s * g_i / sqrt(dim)) with random unit centers, c_i uniform
    over ``num_clusters`` and g_i standard normal, where s = sqrt(1 / cluster_cosine - 1): two rows
    of one cluster then have cosine about ``cluster_cosine`` (rows of different clusters about
    0). With ``intrinsic_dim`` m, centers and noise live in a random m-dimensional subspace
    (rows = Q x, Q a random orthonormal dim x m basis), as embeddings of real corpora occupy a
    low-dimensional part of their space: neighbourhoods then vary continuously across the space
    (what approximate search relies on). A ``duplicate_fraction`` of the rows are
    near-duplicates: row i copies another row j (one that is not itself a copy) plus noise
    scaled so that cosine(i, j) is about ``duplicate_cosine``. Returns (vectors, source) where
    source[i] is the row that i copies, or -1. Built in blocks of ``block_rows`` (float32
    throughout), so 1M x 768 needs 3 GB and little more.
    """
    if not 0 < cluster_cosine <= 1 or not 0 < duplicate_cosine <= 1:
        raise ValueError("cluster_cosine and duplicate_cosine must be in (0, 1]")
    rng = np.random.default_rng(seed)
    latent = intrinsic_dim or dim
    centers = rng.standard_normal((num_clusters, latent), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    spread = np.float32(np.sqrt(1.0 / cluster_cosine - 1.0) / np.sqrt(latent))
    dup_spread = np.float32(np.sqrt(1.0 / duplicate_cosine**2 - 1.0) / np.sqrt(dim))
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].astype(np.float32) if intrinsic_dim else None
    out = np.empty((num_rows, dim), dtype=np.float32)
    for start in range(0, num_rows, block_rows):
        n = min(block_rows, num_rows - start)
        block = centers[rng.integers(0, num_clusters, n)]
        block += spread * rng.standard_normal(block.shape, dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + n] = block if basis is None else block @ basis.T
    source = np.full(num_rows, -1, dtype=np.int64)
    is_copy = rng.random(num_rows) < duplicate_fraction
    copies, originals = np.nonzero(is_copy)[0], np.nonzero(~is_copy)[0]
    if copies.size and originals.size:
        source[copies] = originals[rng.integers(0, originals.size, copies.size)]
        for start in range(0, copies.size, block_rows):
            rows = copies[start:start + block_rows]
            block = out[source[rows]] + dup_spread * rng.standard_normal((rows.size, dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[rows] = block
    return out, source


# Markers of `make_displayed_video`, on the picture as displayed: a red bar across the top and
# a blue bar across the bottom (MARKER_FRACTION of the height each), and a green square at the
# left end of the red bar, so a test can tell every rotation and mirror apart.
MARKER_FRACTION = 0.1
MARKER_RED, MARKER_GREEN, MARKER_BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _draw_markers(rgb: np.ndarray) -> None:
    height = rgb.shape[0]
    bar = max(2, int(round(MARKER_FRACTION * height)))
    rgb[:bar] = MARKER_RED
    rgb[-bar:] = MARKER_BLUE
    rgb[:bar, :bar] = MARKER_GREEN


def _stored_size(display_width: int, display_height: int, quarter_turn: bool,
                 sample_aspect_ratio: Fraction) -> tuple[int, int]:
    """The stored size that a player shows as display_width x display_height (players widen a
    picture whose pixels are wider than tall, and heighten one whose pixels are taller)."""
    width, height = (display_height, display_width) if quarter_turn else (display_width, display_height)
    if sample_aspect_ratio > 1:
        width = width / sample_aspect_ratio
    elif sample_aspect_ratio < 1:
        height = height * sample_aspect_ratio
    if width != int(width) or height != int(height) or int(width) % 2 or int(height) % 2:
        raise ValueError(f"choose a display size whose stored size is whole and even, got {width}x{height}")
    return int(width), int(height)


def make_displayed_video(path, *, display_width=180, display_height=320, rotation_degrees=0, hflip=False,
                         vflip=False, sample_aspect_ratio=None, codec="h264", fps=30, num_frames=60,
                         gop_size=30, seed=0) -> str:
    """A video whose picture *as a player shows it* carries the frame code and the markers; return ``path``.

    Frame k as displayed is ``display_width`` x ``display_height``: the moving background, the
    code of k in the centre and the markers (`MARKER_FRACTION`: red bar on top, blue at the
    bottom, a green square at the top-left). What is stored is that picture taken back through
    the display geometry: un-mirrored (``hflip``/``vflip``), rotated clockwise by
    ``rotation_degrees`` and squeezed by ``sample_aspect_ratio`` (a Fraction, pixel width /
    pixel height). The stream then carries a display matrix (libavutil's
    av_display_rotation_set and av_display_matrix_flip, through PyAV's
    ``set_display_rotation``: rotate counterclockwise by ``rotation_degrees``, then mirror, as
    ffmpeg and players read it) and the sample aspect ratio, as phone videos (rotation 90 or
    270) and DVD/broadcast captures (8:9, 32:27) do. A decoder that ignores them returns a
    sideways, mirrored or squeezed picture, whose code does not read and whose markers are
    elsewhere. Constant rate, frame k at pts k in time base 1/fps.
    """
    if rotation_degrees % 90:
        raise ValueError(f"rotation_degrees must be a multiple of 90, got {rotation_degrees}")
    sar = _rational(sample_aspect_ratio) if sample_aspect_ratio is not None else Fraction(1)
    quarter_turns = (rotation_degrees // 90) % 4
    stored_w, stored_h = _stored_size(display_width, display_height, quarter_turns % 2 == 1, sar)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rate = _rational(fps)
    background = _Background(display_width, display_height, seed)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = stored_w, stored_h
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop_size
        stream.codec_context.time_base = 1 / rate
        stream.codec_context.options = _video_encoder_options(stream.codec_context.name, None)
        if sample_aspect_ratio is not None:
            stream.codec_context.sample_aspect_ratio = sar
        if quarter_turns or hflip or vflip:
            if not hasattr(stream, "set_display_rotation"):
                raise RuntimeError("writing a display matrix needs PyAV >= 18 (VideoStream.set_display_rotation)")
            stream.set_display_rotation(rotation_degrees, hflip=hflip, vflip=vflip)
        for k in range(num_frames):
            shown = background.frame(k)
            _draw_code(shown, k)
            _draw_markers(shown)
            if hflip:
                shown = shown[:, ::-1]
            if vflip:
                shown = shown[::-1]
            stored = np.ascontiguousarray(np.rot90(shown, -quarter_turns))
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            if (frame.width, frame.height) != (stored_w, stored_h):  # undo the sample aspect ratio
                frame = frame.reformat(width=stored_w, height=stored_h, interpolation="AREA")
            frame = frame.reformat(format="yuv420p")
            frame.pts = k
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def remux_with_display_geometry(source, path, *, rotation_degrees=0, hflip=False, vflip=False,
                                sample_aspect_ratio=None, max_frames=None) -> str:
    """Copy the best video stream of ``source`` (no re-encoding) into ``path`` with a display
    matrix and/or a container sample aspect ratio; return ``path``.

    Real footage as a phone or an anamorphic capture would store it: the same coded pictures,
    shown rotated (counterclockwise ``rotation_degrees``, then mirrored, as
    `make_displayed_video`) or stretched. ``max_frames`` stops at the first keyframe from that
    many packets on, so the copy is whole GOPs. Use .mp4/.mov (the ``tkhd`` matrix and ``pasp``
    box) or .mkv.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(os.fspath(source)) as source_container, av.open(path, mode="w") as container:
        original = source_container.streams.best("video")
        stream = container.add_stream_from_template(original)
        if sample_aspect_ratio is not None:
            stream.codec_context.sample_aspect_ratio = _rational(sample_aspect_ratio)
        if rotation_degrees or hflip or vflip:
            if not hasattr(stream, "set_display_rotation"):
                raise RuntimeError("writing a display matrix needs PyAV >= 18 (VideoStream.set_display_rotation)")
            stream.set_display_rotation(rotation_degrees, hflip=hflip, vflip=vflip)
        for count, packet in enumerate(source_container.demux(original)):
            if packet.dts is None:
                continue  # the flush packet
            if max_frames is not None and count >= max_frames and packet.is_keyframe:
                break
            packet.stream = stream
            container.mux(packet)
    return path


def make_resolution_change_video(path, *, sizes=((320, 240), (480, 270)), frames_per_size=30, fps=30,
                                 gop_size=15, seed=0, start_seconds=0.0) -> str:
    """One H.264 stream whose frame size changes mid-stream; return ``path``.

    Frames ``i * frames_per_size`` to ``(i + 1) * frames_per_size - 1`` are ``sizes[i]`` (width,
    height), each carrying its frame code on its own background, as a WebRTC or broadcast
    recording that switches resolution: every size is its own libx264 encode whose keyframes
    carry their parameter sets in-band (Annex B), and the packets follow each other in one
    stream of the container (use .ts, as broadcasts are; the stream's header says the first
    size). Frame k has pts ``start_seconds * fps + k`` in time base 1/fps.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rate = _rational(fps)
    offset = int(round(start_seconds * rate))
    with av.open(path, mode="w") as container:
        stream = container.add_stream("h264", rate=rate)
        stream.width, stream.height = sizes[0]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        k = 0
        for i, (width, height) in enumerate(sizes):
            if i == 0:
                encoder = stream.codec_context
            else:
                encoder = av.CodecContext.create("libx264", "w")
                encoder.width, encoder.height = width, height
                encoder.pix_fmt = "yuv420p"
                encoder.time_base = 1 / rate
                encoder.framerate = rate
            encoder.gop_size = gop_size
            encoder.options = _video_encoder_options("libx264", None)
            background = _Background(width, height, seed + i)

            def mux(packets):
                for packet in packets:
                    packet.stream = stream
                    container.mux(packet)

            for _ in range(frames_per_size):
                rgb = background.frame(k)
                _draw_code(rgb, k)
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
                frame.pts = offset + k
                frame.time_base = 1 / rate
                mux(encoder.encode(frame))
                k += 1
            mux(encoder.encode(None))
    return path


def _add_cover_art(container, seed: int, size: int = 96) -> None:
    """Store a JPEG picture as music files and downloaders do: a one-frame MJPEG stream with the
    attached_pic disposition (MP4 ``covr``, MP3 ID3 APIC). Players show it as artwork; it is not
    video."""
    stream = container.add_stream("mjpeg", rate=1)
    stream.width = stream.height = size
    stream.pix_fmt = "yuvj420p"
    stream.disposition = av.stream.Disposition.attached_pic
    rgb = _Background(size, size, seed).frame(0)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    frame.pts = 0
    for packet in [*stream.encode(frame), *stream.encode(None)]:
        container.mux(packet)


def make_audio_only(path, *, seconds=2.0, cover_art=False) -> str:
    """Write a sine-tone file with an audio stream and no video stream; return ``path``.

    The codec follows the extension: .mp3 (MP3), .m4a (AAC), .ogg/.opus (Opus), .wav (PCM),
    .flac (FLAC); also .mp4/.mkv/.webm, which makes a video container with no video in it.
    ``cover_art=True`` adds album art as a still picture stream (attached_pic; .mp3 and .mp4).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream, rate, freq = _add_audio_stream(container, _audio_codec_for(path), seed=0)
        if cover_art:
            _add_cover_art(container, seed=0)
        for packet in _audio_frames(stream, rate, freq, 0, int(round(seconds * rate))):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


# --------------------------------------------------------------------------------------------
# Hostile inputs
# --------------------------------------------------------------------------------------------


def make_huge_dims_video(path, *, width=HUGE_WIDTH, height=HUGE_HEIGHT) -> str:
    """Write a tiny (< 1 KB as .mkv) video whose header claims a ``width`` x ``height`` frame.

    How: a rawvideo (gray) stream declared at that size, muxed with one 64-byte packet written
    directly (nothing is encoded, so no frame is ever allocated). Rawvideo is chosen because the
    container header alone gives FFmpeg everything it needs (size, pixel format), so
    ``av.open`` does not decode a frame during probing: PyAV reports the claimed size right
    away (``stream.codec_context.width/height``), opening costs microseconds, and decoding the
    packet fails cleanly ("Invalid data") instead of allocating 256 MB. A codec whose probe
    decodes a frame (H.264, MJPEG) would either overwrite the claimed size with the bitstream's
    or allocate the huge frame inside ``av.open``. Use .mkv (smallest), .avi, .mov or .nut.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # bitexact: no random segment UID / muxer version string, so the file is byte-reproducible.
    with av.open(path, mode="w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("rawvideo", rate=1)
        stream.width, stream.height = int(width), int(height)
        stream.pix_fmt = "gray"
        stream.time_base = Fraction(1, 1)
        packet = av.Packet(bytes(64))
        packet.stream = stream
        packet.pts = packet.dts = 0
        packet.duration = 1
        packet.time_base = Fraction(1, 1)
        container.mux(packet)
    return path


def _video_packet_ranges(source: str) -> list[tuple[int, int]]:
    """Byte ranges [pos, pos + size) of the source's video packets (where the demuxer knows)."""
    ranges = []
    with av.open(source) as container:
        for packet in container.demux(video=0):
            if packet.size and packet.pos is not None and packet.pos >= 0:
                ranges.append((int(packet.pos), int(packet.pos) + int(packet.size)))
    return ranges


def _opens(path: str) -> bool:
    try:
        with av.open(path):
            return True
    except Exception:  # noqa: BLE001 - any failure to open is what we are looking for
        return False


def make_hostile_corpus(directory, *, source_video: str, seed=0) -> list[tuple[str, str]]:
    """Write broken inputs derived from a good ``source_video``; return ``[(path, expected_error_type)]``.

    Expected types: an error type the job must report, or ``'ok_or_corrupt'`` where either a
    valid (partial) result or a ``'corrupt'`` error row is acceptable:

    * ``zero_bytes.mp4`` -> corrupt
    * ``random_bytes.mp4`` (32 KiB of seeded noise, checked not to be openable by FFmpeg: noise
      can, rarely, be probed as an audio format, which would be a different error) -> corrupt
    * ``truncated_01pct``: the first 1% of the source's bytes, cut before the first video packet
      so that no frame data at all survives -> corrupt
    * ``truncated_30pct`` / ``truncated_70pct`` -> ok_or_corrupt (an mp4 whose index is at the
      end fails to open; a file indexed up front decodes the frames before the cut)
    * ``bitflip``: ~50 random bits flipped after the first 10% of bytes, only inside video
      packet payloads, so that the container's metadata (sizes, durations) stays intact and the
      damage is bit rot in the picture data -> ok_or_corrupt
    * ``audio_only.mp3`` -> no_video_stream
    * ``huge_dims.mkv`` (header claims 16000x16000, see `make_huge_dims_video`) -> too_large

    Truncated and bit-flipped files keep the source's extension.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(source_video, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"source video {source_video} is empty")
    ext = os.path.splitext(source_video)[1] or ".mp4"
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str]] = []

    def write(name: str, payload: bytes, expected: str) -> None:
        p = os.path.join(directory, name)
        with open(p, "wb") as f:
            f.write(payload)
        out.append((p, expected))

    write("zero_bytes.mp4", b"", "corrupt")

    # Noise rarely but possibly probes as e.g. MP3/ADTS (an audio-only "success"); take the first
    # seeded variant FFmpeg refuses so the expected type holds on every FFmpeg build we meet.
    noise_path = os.path.join(directory, "random_bytes.mp4")
    for attempt in range(32):
        noise = np.random.default_rng([seed, attempt]).integers(0, 256, size=32 * 1024, dtype=np.uint8).tobytes()
        with open(noise_path, "wb") as f:
            f.write(noise)
        if not _opens(noise_path):
            break
    else:
        raise RuntimeError("could not make random bytes that FFmpeg refuses to open")
    out.append((noise_path, "corrupt"))

    ranges = _video_packet_ranges(source_video)
    first_packet = min((start for start, _ in ranges), default=len(data))
    cut_header = max(1, min(len(data) // 100, first_packet))
    write(f"truncated_01pct{ext}", data[:cut_header], "corrupt")
    write(f"truncated_30pct{ext}", data[: int(len(data) * 0.30)], "ok_or_corrupt")
    write(f"truncated_70pct{ext}", data[: int(len(data) * 0.70)], "ok_or_corrupt")

    flipped = bytearray(data)
    lo = len(data) // 10
    candidates = [(max(s, lo), e) for s, e in ranges if e > max(s, lo)]
    if candidates:
        sizes = np.array([e - s for s, e in candidates], dtype=np.int64)
        # Pick packets weighted by size so the flips spread like random bit rot would.
        which = rng.choice(len(candidates), size=50, p=sizes / sizes.sum())
        offsets = [candidates[i][0] + int(rng.integers(0, candidates[i][1] - candidates[i][0])) for i in which]
    else:  # no packet positions known: anywhere after the first 10%
        offsets = rng.integers(lo, len(data), size=50).tolist()
    for offset in offsets:
        flipped[offset] ^= 1 << int(rng.integers(0, 8))
    write(f"bitflip{ext}", bytes(flipped), "ok_or_corrupt")

    out.append((make_audio_only(os.path.join(directory, "audio_only.mp3"), seconds=1.0), "no_video_stream"))
    out.append((make_huge_dims_video(os.path.join(directory, "huge_dims.mkv")), "too_large"))
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

_DEMO_ACTIONS = ("juggling", "surfing", "cooking", "dancing", "archery", "skiing", "drumming", "knitting")


def make_tiny_checkpoint(
    path,
    *,
    classifier: bool = True,
    num_frames: int = 8,
    image_size: int = 64,
    patch_size: int = 16,
    tubelet_size: int = 2,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 128,
    num_labels: int = 5,
    pretraining_layout: bool = False,
    seed: int = 0,
) -> str:
    """Write a small randomly initialised VideoMAE checkpoint for tests and the demo.

    The directory holds what a hub checkpoint holds: config.json, model.safetensors (with the
    original q_bias/v_bias key names) and a preprocessor_config.json whose values are NOT the
    library defaults (shortest_edge = image_size + 8 then a center crop, ImageNet mean/std,
    bilinear), so code that hard-codes constants fails its tests.

    - pretraining_layout=True: a VideoMAEForPreTraining checkpoint (encoder + decoder,
      use_mean_pooling=false, no labels) like MCG-NJU/videomae-base-short-ssv2;
    - else classifier=True: a VideoMAEForVideoClassification with fc_norm and labels
      'label_0_juggling', ...;
    - else: a bare VideoMAEModel.
    Every bias (including the attention q/v biases) and every layernorm is random and
    non-trivial, so a weight that silently fails to load changes the outputs. Deterministic
    in `seed`; the global torch RNG is left untouched.
    """
    import torch
    from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification, VideoMAEModel

    is_classifier = classifier and not pretraining_layout
    config_kwargs: dict[str, Any] = dict(
        num_frames=num_frames,
        image_size=image_size,
        patch_size=patch_size,
        tubelet_size=tubelet_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        qv_bias=True,
        # The MCG-NJU pretraining checkpoints use a final encoder layernorm instead of mean
        # pooling + fc_norm; mirror that so both code paths are exercised.
        use_mean_pooling=not pretraining_layout,
        decoder_hidden_size=max(hidden_size // 2, num_attention_heads),
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=num_attention_heads,
        decoder_intermediate_size=max(intermediate_size // 2, 1),
    )
    if is_classifier:
        id2label = {i: f"label_{i}_{_DEMO_ACTIONS[i % len(_DEMO_ACTIONS)]}" for i in range(num_labels)}
        config_kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    config = VideoMAEConfig(**config_kwargs)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if pretraining_layout:
            model = VideoMAEForPreTraining(config)
        elif is_classifier:
            model = VideoMAEForVideoClassification(config)
        else:
            model = VideoMAEModel(config)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                if name.endswith("bias"):
                    param.copy_(0.1 * noise)  # zero biases would hide a bias that failed to load
                elif param.ndim == 1:  # layernorm scales
                    param.copy_(1.0 + 0.1 * noise)
    model.eval()

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # save_original_format writes q_bias/v_bias like the hub checkpoints do, so loading
    # exercises transformers' renaming of those keys.
    from transformers.utils import logging as hf_logging

    # Its "Writing model shards" progress bar is noise for a checkpoint of a few hundred KB.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, save_original_format=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    preprocessor = {
        "image_processor_type": "VideoMAEImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size + 8},
        "resample": 2,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    (out / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
    if not any(out.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file in {out}")
    return str(out)


# --------------------------------------------------------------------------------------
# Clips for reconstruction scores, and a pretraining checkpoint trained on them

# Kinds of `texture_clip`, roughly from most to least predictable from a tenth of the patches.
TEXTURE_CLIP_KINDS = ("blank", "still", "drifting", "glitched", "noise")


def texture_clip(kind: str, rng: np.random.Generator, *, num_frames: int, size: int, period: int) -> np.ndarray:
    """A uint8 clip (num_frames, size, size, 3) of one kind in `TEXTURE_CLIP_KINDS`:

    - ``blank``: one flat colour;
    - ``drifting``: a coloured sinusoidal grating whose period (``period`` pixels, the model's
      patch size) divides the frame, drifting 0-2 pixels per frame along x and y: every patch
      shows the same pattern, so a decoder that learned the texture predicts masked patches
      from any visible one;
    - ``still``: a drifting clip's first frame, repeated;
    - ``glitched``: a drifting clip with two 2x2-patch blocks of random pixels over two
      tubelets (what corrupt macroblocks look like);
    - ``noise``: independent uniform pixels: nothing to predict from anything.
    """
    shape = (num_frames, size, size, 3)
    if kind == "blank":
        return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), shape).copy()
    if kind == "noise":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind not in ("still", "drifting", "glitched"):
        raise ValueError(f"unknown clip kind {kind!r}; expected one of {', '.join(TEXTURE_CLIP_KINDS)}")
    kx, ky = 0, 0
    while kx == 0 and ky == 0:  # Nyquist-rate gratings (|k| = period / 2) can vanish on the pixel grid
        kx, ky = rng.integers(-1, 2, 2)
    phase = rng.uniform(0, 2 * np.pi)
    colour = rng.uniform(0.5, 1.0, 3) * rng.choice([-1.0, 1.0], 3)  # every channel clearly varies
    base = rng.uniform(0.3, 0.7, 3)
    vx, vy = (0, 0) if kind == "still" else rng.integers(-2, 3, 2)
    y, x = np.mgrid[0:size, 0:size]
    frames = []
    for t in range(num_frames):
        wave = np.cos(2 * np.pi * (kx * (x - vx * t) + ky * (y - vy * t)) / period + phase)
        frames.append(np.clip(255 * (base + 0.3 * wave[..., None] * colour), 0, 255))
    clip = np.rint(np.stack(frames)).astype(np.uint8)
    if kind == "glitched":
        for _ in range(2):
            t0 = 2 * int(rng.integers(0, max(1, num_frames // 2 - 1)))
            top, left = (period * rng.integers(0, max(1, size // period - 1), 2)).tolist()
            block = clip[t0:t0 + 4, top:top + 2 * period, left:left + 2 * period]
            block[...] = rng.integers(0, 256, block.shape, dtype=np.uint8)
    return clip


# The checkpoint `train_tiny_pretraining` trains: 4 frames of 16x16, patch 4 (two time slots of
# 16 tokens), small enough to learn the drifting textures in a few hundred steps on one core.
TRAINED_PRETRAINING = dict(num_frames=4, image_size=16, patch_size=4, tubelet_size=2, hidden_size=64,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def train_tiny_pretraining(path, *, steps: int = 800, batch_size: int = 16, mask_ratio: float = 0.75,
                           learning_rate: float = 2e-3, seed: int = 0) -> str:
    """A `make_tiny_checkpoint` pretraining checkpoint (`TRAINED_PRETRAINING`) trained on drifting textures.

    VideoMAE pretraining in miniature: transformers' own `VideoMAEForPreTraining` loss
    (norm_pix_loss) on ``drifting`` and ``still`` `texture_clip`s under tube masks
    (``mask_ratio``; 0.75 learns faster than the paper's 0.9 here and predicts at 0.9 as well),
    AdamW with a 50-step warm-up, one torch thread (deterministic, and faster than two threads
    on a loaded 2-core machine). Saved over the random weights with `save_pretrained`, like a
    hub checkpoint. About 10-20 s on one core for the default 800 steps.
    """
    import torch
    from transformers import VideoMAEForPreTraining

    from vmae_ray.checkpoint import spec_from_dir
    from vmae_ray.reconstruction import tube_mask

    out = make_tiny_checkpoint(path, pretraining_layout=True, seed=seed, **TRAINED_PRETRAINING)
    spec = spec_from_dir(out)
    rng = np.random.default_rng(seed)
    mean = torch.tensor(spec.image_mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(spec.image_std).view(1, 1, 3, 1, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VideoMAEForPreTraining.from_pretrained(out, use_safetensors=True).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
            for _ in range(steps):
                kinds = rng.choice(["drifting", "drifting", "still"], batch_size)
                clips = np.stack([texture_clip(k, rng, num_frames=spec.num_frames, size=spec.crop_height,
                                               period=spec.patch_size) for k in kinds])
                # The image processor's output: rescale, normalise, (B, T, C, H, W).
                pixel_values = (torch.from_numpy(clips).float() * spec.rescale_factor).permute(0, 1, 4, 2, 3)
                pixel_values = (pixel_values - mean) / std
                masks = torch.from_numpy(np.stack([
                    tube_mask(rng, num_time_slots=spec.num_time_slots, tokens_per_frame=spec.tokens_per_frame,
                              mask_ratio=mask_ratio) for _ in range(batch_size)]))
                loss = model(pixel_values, bool_masked_pos=masks).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval().save_pretrained(out, save_original_format=True)
    finally:
        torch.set_num_threads(threads)
    return out
