"""Decode step: probe a video with PyAV, decode what a clip plan needs, emit uint8 clips.

No Ray here: `VideoDecoder` works on any seekable binary file object (a local file, or the
ranged-read S3 file from `vmae_ray.storage`), so it is tested directly.

Performance choices (see DESIGN.md, performance model): only the frames a plan selects are
converted to RGB, and the conversion resizes in the same libswscale call, so the cost is
close to decoding alone; decoding stops as soon as the last target is filled. Frames are
matched to targets by timestamp (`sampling.FrameMatcher`), never by assuming a constant rate.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, BinaryIO

import av
import av.logging
import numpy as np
from av.sidedata.sidedata import Type as SideDataType
from av.video.reformatter import ColorRange as SwsColorRange
from av.video.reformatter import Colorspace as SwsColorspace

from vmae_ray.sampling import ClipPlan, FrameMatcher, plan_clips
from vmae_ray.schema import check_error_code
from vmae_ray.storage import classify_storage_error

# PIL resample codes (what preprocessor_config.json stores) -> the libswscale filter that
# comes closest; parity with the PIL resize is tested with a stated tolerance.
SWSCALE_FOR_PIL_RESAMPLE = {0: "POINT", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "AREA", 5: "BILINEAR"}


# Keyframe seeking for sparse plans (see `VideoDecoder.clips`). Plans whose targets are never
# more than SEEK_MIN_GAP_FRAMES apart decode straight through without looking at the index;
# otherwise a seek is made when the keyframe before the next target lies more than
# SEEK_MIN_SKIP_FRAMES frames past the current position (a seek costs about one frame's decode).
SEEK_MIN_GAP_FRAMES = 32
SEEK_MIN_SKIP_FRAMES = 16
# After a seek, the frames between the keyframe and the next needed one are decoded only as
# references for what follows: frames no other frame references (most B-frames) are skipped
# there (libavcodec's skip_frame=NONREF), until PREROLL_MARGIN_FRAMES before the needed frame,
# which leaves room for the decoder's reordering delay. From PREROLL_CHECK_FRAMES after that
# switch on, decoded frames must again be consecutive, so a needed frame is never missed.
PREROLL_MARGIN_FRAMES = 24
PREROLL_CHECK_FRAMES = 16

# A frame's place in decode order is at most the decoder's reordering delay (16 frames in
# H.264/HEVC) away from its place in presentation order.
REORDER_MAX_FRAMES = 16
# The end of a video is found as probing tools find it: seek to the last keyframe and demux
# to the end of the file (no decoding). The frame shown last is among the last
# REORDER_MAX_FRAMES + 1 packets, so the tail must start at a keyframe or hold more packets
# than that; otherwise the seek steps back (TAIL_STEP_SECONDS, then 4x as far each time) at
# most TAIL_ATTEMPTS times.
TAIL_MIN_PACKETS = REORDER_MAX_FRAMES + 1
TAIL_STEP_SECONDS = 2.0
TAIL_ATTEMPTS = 4
# The first presented frame is read from the first HEAD_PACKETS packets when they say it
# unambiguously (see `VideoDecoder._head_start`); otherwise the first frame is decoded.
HEAD_PACKETS = REORDER_MAX_FRAMES + 1
# A sample aspect ratio outside [1/MAX, MAX] is a damaged header, not a real anamorphic format
# (those range from 8:9 to 2:1); it is ignored rather than turned into a huge resize.
MAX_SAMPLE_ASPECT_RATIO = 4

# libavformat's AVInputFormat flags (libavformat/avformat.h). NOTIMESTAMPS: the format has no
# clock (raw elementary streams: .h264, .hevc); its demuxer cannot seek, and the rate it
# reports (average_rate) is its own default, 25. TS_DISCONT: timestamps may restart mid-file
# (MPEG-TS and MPEG-PS: recordings joined with `cat`, a restarted recorder, a splice).
AVFMT_NOTIMESTAMPS = 0x0080
AVFMT_TS_DISCONT = 0x0200
# In a format that allows discontinuities, a step back of the timestamps, or a jump forward
# larger than this, is a restart: re-based so the recording plays on, as ffmpeg does (its
# -dts_delta_threshold, 10 s by default).
TIMESTAMP_JUMP_SECONDS = 10.0
# A stream whose packets end this much (or two frames, if more) before the end its header
# states was cut short. Sound files end within a frame of their header.
CUT_TOLERANCE_SECONDS = 0.25


@dataclass(frozen=True)
class DisplayTransform:
    """What a player does to a stored picture before showing it: mirror it left-right when
    ``hflip``, then rotate it counterclockwise by ``rotation_degrees`` (0, 90, 180 or 270).

    Read from the display matrix (libavutil/display.h; the MP4/MOV ``tkhd`` matrix, Matroska's
    projection, H.264/HEVC display-orientation SEI), which libavcodec attaches to every decoded
    frame. ``rotation_degrees`` has the sense of ffprobe's ``rotation`` and PyAV's
    ``VideoFrame.rotation`` (counterclockwise; a phone held upright is usually 90 or 270).
    Each of the eight matrices that cameras and editors write (quarter turns, optionally
    mirrored) is exactly one transform; other angles are snapped to the nearest quarter turn.
    """

    rotation_degrees: int = 0
    hflip: bool = False

    @classmethod
    def from_display_matrix(cls, matrix: Sequence[int] | bytes) -> DisplayTransform:
        """The transform of a 3x3 display matrix: 9 int32 (16.16 fixed point), or its side-data bytes.

        The matrix maps a stored point (p, q) (x right, y down) to (a p + c q, b p + d q) with
        a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]. A negative determinant is a
        mirror image: the left-right mirror is taken out first, what remains is a rotation whose
        counterclockwise angle is atan2(c, a). A singular matrix (a damaged one) is ignored,
        as libavutil's av_display_rotation_get ignores it.
        """
        if isinstance(matrix, (bytes, bytearray, memoryview)):
            matrix = np.frombuffer(bytes(matrix)[:36], dtype=np.int32).tolist()
        a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
        det = a * d - b * c
        if det == 0:
            return IDENTITY
        hflip = det < 0
        if hflip:  # M = R H with H the mirror (p -> -p): R = M H negates the first column
            a, b = -a, -b
        quarter_turns = round(math.degrees(math.atan2(c, a)) / 90.0) % 4
        if not quarter_turns and not hflip:
            return IDENTITY
        return cls(rotation_degrees=90 * quarter_turns, hflip=hflip)

    @property
    def swaps_axes(self) -> bool:
        """True for quarter turns: the displayed width is the stored height."""
        return self.rotation_degrees in (90, 270)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels`` (H, W, ...) as displayed: a numpy view, no copy."""
        if self.hflip:
            pixels = pixels[:, ::-1]
        return np.rot90(pixels, self.rotation_degrees // 90) if self.rotation_degrees else pixels


IDENTITY = DisplayTransform()


def displayed_size(width: int, height: int, sample_aspect_ratio: Fraction,
                   transform: DisplayTransform = IDENTITY) -> tuple[int, int]:
    """(width, height) of a stored width x height picture as a player shows it.

    The sample aspect ratio (pixel width / pixel height) widens the picture when above 1 and
    heightens it when below 1, never shrinks it (Chromium's natural size, mpv's display
    size): 240x160 at 32:27 shows as 284x160, 720x480 at 8:9 as 720x540. A quarter turn of
    the display matrix then swaps width and height.
    """
    sar = sample_aspect_ratio
    if sar > 1:
        width = max(1, round(width * sar))
    elif sar < 1:
        height = max(1, round(height / sar))
    return (height, width) if transform.swaps_axes else (width, height)


class DecodeError(Exception):
    """A video that cannot be turned into clips; becomes one row of `errors/`.

    ``error_type`` and ``stage`` must be in `schema.ERROR_TYPES` / `schema.STAGES` (else ValueError).
    """

    def __init__(self, error_type: str, stage: str, message: str):
        check_error_code(stage=stage, error_type=error_type)
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

    With ``apply_display`` (the default) the frame is first taken as a player shows it: its
    display matrix (`DisplayTransform`) and the stream's sample aspect ratio are applied, so
    the resize starts from the displayed size (`displayed_size`). Without, the stored picture
    is used as it is. Either way each frame is resized from its own decoded size.
    """

    resize_shortest_edge: int
    crop_height: int
    crop_width: int
    interpolation: str = "BILINEAR"
    apply_display: bool = True

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing the short side, as transformers computes it."""
        short, long = (width, height) if width <= height else (height, width)
        new_short = self.resize_shortest_edge
        new_long = int(new_short * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)


@dataclass(frozen=True)
class VideoProbe:
    """Facts about the chosen video stream, written to the `videos/` table.

    ``start_seconds`` is the presentation time of the first frame, ``duration_seconds`` the
    span from it to the end of the last frame, both from the video stream's own packets.
    ``width`` x ``height`` is the stored size the stream's header gives and
    ``sample_aspect_ratio`` the stream's (1 when absent); what a player shows of the first
    frame is `VideoDecoder.shown`. ``num_video_streams`` counts real video streams (not
    cover art).
    """

    stream_index: int
    num_video_streams: int
    width: int
    height: int
    fps: float
    codec: str
    pix_fmt: str
    duration_seconds: float
    start_seconds: float
    sample_aspect_ratio: Fraction = Fraction(1)


@dataclass
class DecodeStats:
    """What a `VideoDecoder` did, for benchmarks, logs and tests.

    ``decoded_indices`` (the index of every frame examined, in order) is recorded only when
    the decoder was made with ``record_frames=True``: long videos have many frames.
    """

    frames_decoded: int = 0  # frames libavcodec returned
    seeks: list[int] = field(default_factory=list)  # frame index of each keyframe sought to
    fallbacks: int = 0  # sparse plans decoded straight through after the packet index disagreed
    decoded_indices: list[int] | None = None


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


# -- colour ---------------------------------------------------------------------------------
# What players do with a frame's colour tags (mpv, Chromium, VLC; DESIGN.md): tags win. An
# untagged matrix is BT.709 for HD (height >= 720 or width >= 1280) and BT.601 otherwise; an
# untagged range is limited, except for the JPEG-range pixel formats (yuvj*). libswscale on
# its own reads every untagged frame as BT.601, which shifts HD colours by 7-12 levels.
_AVCOL_SPC_UNTAGGED = (2, 3)  # AVCOL_SPC_UNSPECIFIED, AVCOL_SPC_RESERVED
_AVCOL_RANGE_UNSPECIFIED = 0
_AVCOL_PRI_BT709 = 1
# HDR transfer functions (AVColorTransferCharacteristic) by the name ffprobe gives them.
HDR_TRANSFERS = {16: "smpte2084", 18: "arib-std-b67"}  # PQ (HDR10), HLG


def is_hd(width: int, height: int) -> bool:
    """HD as players decide an untagged matrix: 720 lines or more, or 1280 columns or more."""
    return height >= 720 or width >= 1280


def colour_reading(frame) -> dict[str, Any]:
    """The libswscale reading of a frame's colour for `VideoFrame.reformat`: its own tags, and
    for what is untagged the players' defaults (see above). Empty when the frame is tagged."""
    options: dict[str, Any] = {}
    if frame.format.is_rgb:
        return options  # no matrix, no range
    if frame.colorspace in _AVCOL_SPC_UNTAGGED:
        hd = is_hd(frame.width, frame.height)
        options["src_colorspace"] = SwsColorspace.ITU709 if hd else SwsColorspace.ITU601
    if frame.color_range == _AVCOL_RANGE_UNSPECIFIED and not frame.format.name.startswith("yuvj"):
        options["src_color_range"] = SwsColorRange.MPEG
    return options


# HDR to SDR: ffmpeg's documented tone-mapping recipe (the `tonemap` filter's documentation),
#   zscale=t=linear:npl=100,format=gbrpf32le,zscale=p=bt709,tonemap=tonemap=hable:desat=0,
#   zscale=t=bt709:m=bt709:r=tv,format=yuv420p
# up to its last step (R'G'B' for the model instead of YUV 4:2:0 for an encoder):
# 1. linear light with 1.0 = 100 cd/m^2 (npl=100): PQ by the SMPTE ST 2084 EOTF (10000 cd/m^2
#    = 100.0); HLG by zimg's display-referred BT.2100 EOTF (inverse OETF, then the OOTF with
#    gamma 1.2 per channel, nominal peak 1000 cd/m^2 = 10.0);
# 2. BT.2020 primaries to BT.709 (3x3 matrix in linear light, D65 white);
# 3. the `tonemap` filter's Hable operator with desat=0: the largest of R, G, B goes through
#    hable(x) / hable(peak) and all three are scaled by the same factor (hue kept); peak is the
#    frame's MaxCLL, else its mastering display's peak luminance, else 1000 cd/m^2 (what the
#    filter assumes once zscale has made the signal linear), over 100;
# 4. BT.709 for a BT.1886 display, as zimg (3.x) writes transfer=bt709: x ** (1 / 2.4), clipped
#    to [0, 1], 8 bits.
# Checked against ffmpeg's command line (tests/test_video_kinds.py). The frame is resized (and
# cropped) by libswscale in the HDR signal first, so only the model's crop is tone-mapped.
TONEMAP_OPERATOR = "hable"
TONEMAP_DESAT = 0.0
HDR_NOMINAL_PEAK_CDM2 = 100.0  # zscale npl: linear 1.0
HDR_DEFAULT_PEAK_CDM2 = 1000.0
_PQ_M1, _PQ_M2 = 2610 / 16384, 2523 / 4096 * 128
_PQ_C1, _PQ_C2, _PQ_C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
_HLG_A, _HLG_B, _HLG_C = 0.17883277, 0.28466892, 0.55991073


def pq_eotf(signal: np.ndarray) -> np.ndarray:
    """SMPTE ST 2084: non-linear signal in [0, 1] -> display light in cd/m^2 / 10000."""
    power = np.power(np.clip(signal, 0.0, 1.0), 1.0 / _PQ_M2)
    return np.power(np.maximum(power - _PQ_C1, 0.0) / (_PQ_C2 - _PQ_C3 * power), 1.0 / _PQ_M1)


def hlg_inverse_oetf(signal: np.ndarray) -> np.ndarray:
    """ARIB STD-B67 / BT.2100 HLG: non-linear signal in [0, 1] -> scene light in [0, 1]."""
    signal = np.clip(signal, 0.0, 1.0)
    with np.errstate(over="ignore"):
        log_part = (np.exp((signal - _HLG_C) / _HLG_A) + _HLG_B) / 12.0
    return np.where(signal <= 0.5, signal * signal / 3.0, log_part)


def hable(x):
    """The Hable (Uncharted 2) filmic curve as ffmpeg's tonemap filter writes it."""
    a, b, c, d, e, f = 0.15, 0.50, 0.10, 0.20, 0.02, 0.30
    return (x * (x * a + b * c) + d * e) / (x * (x * a + b) + d * f) - e / f


def _rgb_to_xyz(primaries, white=(0.3127, 0.3290)) -> np.ndarray:
    xyz = np.array([[x / y, 1.0, (1.0 - x - y) / y] for x, y in primaries]).T
    wx, wy = white
    return xyz * np.linalg.solve(xyz, np.array([wx / wy, 1.0, (1.0 - wx - wy) / wy]))


# BT.2020 linear RGB -> BT.709 linear RGB through CIE XYZ (ITU-R BT.2087 gives the same matrix).
BT2020_TO_BT709 = np.linalg.inv(_rgb_to_xyz([(0.64, 0.33), (0.30, 0.60), (0.15, 0.06)])) @ _rgb_to_xyz(
    [(0.708, 0.292), (0.170, 0.797), (0.131, 0.046)])

_LINEAR_LUTS: dict[str, np.ndarray] = {}


def hdr_linear_lut(transfer: str) -> np.ndarray:
    """float32[65536]: 16-bit signal code -> linear light (1.0 = 100 cd/m^2), step 1 of the recipe."""
    lut = _LINEAR_LUTS.get(transfer)
    if lut is None:
        signal = np.arange(65536, dtype=np.float64) / 65535.0
        if transfer == "smpte2084":
            linear = pq_eotf(signal) * (10000.0 / HDR_NOMINAL_PEAK_CDM2)
        elif transfer == "arib-std-b67":
            linear = np.power(hlg_inverse_oetf(signal), 1.2) * (1000.0 / HDR_NOMINAL_PEAK_CDM2)
        else:
            raise ValueError(f"not an HDR transfer function: {transfer!r}")
        lut = _LINEAR_LUTS[transfer] = linear.astype(np.float32)
    return lut


def hdr_signal_peak(frame) -> float:
    """The tonemap filter's signal peak (in units of 100 cd/m^2) for a frame: its MaxCLL, else its
    mastering display's peak luminance, else 1000 cd/m^2 (libavfilter's ff_determine_signal_peak
    on the linear frame zscale hands it)."""
    cll = mastering = None
    for side_data in side_data_of(frame):
        if side_data.type == SideDataType.CONTENT_LIGHT_LEVEL:
            cll = bytes(side_data)
        elif side_data.type == SideDataType.MASTERING_DISPLAY_METADATA:
            mastering = bytes(side_data)
    if cll is not None and len(cll) >= 4:
        max_cll = int(np.frombuffer(cll[:4], dtype=np.uint32)[0])  # AVContentLightMetadata.MaxCLL
        if max_cll:
            return max_cll / HDR_NOMINAL_PEAK_CDM2
    if mastering is not None and len(mastering) >= 88:
        # AVMasteringDisplayMetadata: 3x2 AVRationals of primaries, 2 of the white point, min and max
        # luminance, then has_primaries and has_luminance (int).
        num, den = np.frombuffer(mastering[72:80], dtype=np.int32)
        has_luminance = int(np.frombuffer(mastering[84:88], dtype=np.int32)[0])
        if has_luminance and den > 0 and num > 0:
            return num / den / HDR_NOMINAL_PEAK_CDM2
    return HDR_DEFAULT_PEAK_CDM2 / HDR_NOMINAL_PEAK_CDM2


# Step 4 as a table: 8-bit code of x ** (1 / 2.4) indexed by sqrt(x) in 16 bits (a square root
# is several times cheaper than a power; near black, where the curve is steep, the table's step
# is still under 0.03 of a level).
_BT1886_CODE_BY_SQRT = np.round(255.0 * np.power(np.arange(65536) / 65535.0, 2 / 2.4)).astype(np.uint8)


def tone_map_to_sdr(signal: np.ndarray, transfer: str, *, peak: float, bt2020: bool = True) -> np.ndarray:
    """HDR R'G'B' (uint16 codes, planar (3, ...) in R, G, B order) -> SDR BT.709 R'G'B' uint8
    (..., 3), interleaved as the model takes it.

    Steps 1-4 of the recipe above; ``peak`` from `hdr_signal_peak`; ``bt2020`` converts the
    primaries (False only for HDR tagged with BT.709 primaries). Plane by plane, in float32.
    """
    lut = hdr_linear_lut(transfer)
    red, green, blue = lut[signal[0]], lut[signal[1]], lut[signal[2]]
    if bt2020:
        m = BT2020_TO_BT709.astype(np.float32)
        red, green, blue = (m[i, 0] * red + m[i, 1] * green + m[i, 2] * blue for i in range(3))
    # desat=0: no desaturation towards luma before the curve (TONEMAP_DESAT).
    brightest = np.maximum(np.maximum(red, green), blue)
    np.maximum(brightest, np.float32(1e-6), out=brightest)
    scale = hable(brightest)
    scale /= brightest * np.float32(hable(peak))
    out = np.empty((*signal.shape[1:], 3), dtype=np.uint8)
    for channel, plane in enumerate((red, green, blue)):
        plane *= scale
        np.clip(plane, 0.0, 1.0, out=plane)
        np.sqrt(plane, out=plane)
        plane *= 65535.0
        plane += 0.5
        out[..., channel] = _BT1886_CODE_BY_SQRT[plane.astype(np.uint16)]
    return out


def hdr_transfer(frame) -> str | None:
    """'smpte2084' (PQ) or 'arib-std-b67' (HLG) for an HDR frame, else None."""
    return HDR_TRANSFERS.get(frame.color_trc)


def model_crop(frame, geometry: FrameGeometry, resized: tuple[int, int], *, transform: DisplayTransform = IDENTITY,
               threads: int = 1) -> np.ndarray:
    """The model's crop of one decoded frame: (crop_height, crop_width, 3) uint8 RGB, contiguous.

    ``resized`` is the (width, height) the frame *as displayed* is resized to before the center
    crop (`FrameGeometry.resized_size` of `displayed_size`); ``transform`` is the frame's
    display transform (identity for the stored picture). Resize + convert in one libswscale
    call to planar RGB (gbrp): libswscale's planar writer is 1.5-2.5x faster than its packed
    rgb24 writer when scaling (measured with libswscale 9: 0.30 vs 0.79 ms for 428x240 ->
    413x232, 1.2 vs 1.7 ms from 1080p) and interpolates chroma fully, so on HD input it is
    closer to the reference (full resolution RGB then PIL bilinear): mean error 2.2 vs 4.4
    levels on 720p test video; identical output where both are exact. The crop is then copied
    plane by plane straight into the output, which saves interleaving the whole resized frame
    first (as `to_ndarray` would) and then copying the crop again.

    The display transform costs no extra pass: a quarter turn commutes with the (separable)
    resize, so libswscale resizes the stored frame to the transposed size, and the rotation
    and mirror are numpy views that the crop copy reads through. The sample aspect ratio is
    part of ``resized`` (one resize from the stored size straight to the target).
    """
    g = geometry
    out_w, out_h = resized
    top, left = (out_h - g.crop_height) // 2, (out_w - g.crop_width) // 2
    stored_w, stored_h = (out_h, out_w) if transform.swaps_axes else (out_w, out_h)
    # Colour as players read it (`colour_reading`); HDR keeps 16 bits for the tone mapping.
    transfer = hdr_transfer(frame)
    dtype = np.uint16 if transfer else np.uint8
    planar = frame.reformat(format="gbrp16le" if transfer else "gbrp", width=stored_w, height=stored_h,
                            interpolation=g.interpolation, threads=threads, **colour_reading(frame))
    if top < 0 or left < 0:
        # Resized smaller than the crop (an odd preprocessor config): transformers zero-pads.
        out = np.ascontiguousarray(center_crop(transform.apply(planar.to_ndarray()), g.crop_height, g.crop_width))
        if transfer:
            out = np.moveaxis(out, -1, 0)
    else:
        # HDR: R, G, B planes for the tone mapping; else the interleaved crop the model takes.
        shape = (3, g.crop_height, g.crop_width) if transfer else (g.crop_height, g.crop_width, 3)
        out = np.empty(shape, dtype=dtype)
        # gbrp plane order is G, B, R.
        for channel, plane in ((0, planar.planes[2]), (1, planar.planes[0]), (2, planar.planes[1])):
            data = np.frombuffer(plane, dtype=dtype).reshape(plane.height, plane.line_size // dtype().itemsize)
            if transform is not IDENTITY:
                data = transform.apply(data[:, :stored_w])  # without the row padding, which would move
            crop = data[top:top + g.crop_height, left:left + g.crop_width]
            if transfer:
                out[channel] = crop
            else:
                out[:, :, channel] = crop
    if transfer:
        return tone_map_to_sdr(out, transfer, peak=hdr_signal_peak(frame),
                               bt2020=frame.color_primaries != _AVCOL_PRI_BT709)
    return out


def _raise_as_decode_error(exc: BaseException, stage: str):
    """Raise ``exc`` as the DecodeError it means, from an ``except`` block, keeping its cause.

    A transient storage error (a reset connection, a timeout, throttling) is re-raised as it
    is: the video is not broken, and the decode step retries it (`stages.decode_video`).
    """
    if not isinstance(exc, av.error.FFmpegError) and classify_storage_error(exc) == "transient":
        raise exc
    raise _error_from_av(exc, stage) from exc


def _error_from_av(exc: BaseException, stage: str) -> DecodeError:
    if isinstance(exc, DecodeError):
        return exc
    if isinstance(exc, av.error.FFmpegError) and exc.errno == errno.EPERM:
        # Many libavformat/libavcodec calls fail with a bare -1, which is AVERROR(EPERM):
        # PyAV raises it as PermissionError "Operation not permitted". From the demuxer or
        # decoder that means damaged data, not a permission problem (the bytes are read by
        # Python, whose own PermissionError is not an FFmpegError).
        return DecodeError("corrupt", stage, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (FileNotFoundError, av.error.FileNotFoundError)):
        return DecodeError("not_found", "read", str(exc))
    if isinstance(exc, (PermissionError, av.error.PermissionError)):
        return DecodeError("access_denied", "read", str(exc))
    if isinstance(exc, MemoryError):
        return DecodeError("too_large", stage, f"out of memory while decoding: {exc}")
    if isinstance(exc, (av.error.FFmpegError, EOFError, ValueError, IndexError, OSError)):
        return DecodeError("corrupt", stage, f"{type(exc).__name__}: {exc}")
    return DecodeError("unknown", stage, f"{type(exc).__name__}: {exc}")


_DISPOSITION_ATTACHED_PIC = int(av.stream.Disposition.attached_pic)
_DISPOSITION_DEFAULT = int(av.stream.Disposition.default)


def _is_still_picture(stream) -> bool:
    """Cover art and thumbnails: a picture stored as a one-frame video stream (attached_pic)."""
    return bool(int(stream.disposition) & _DISPOSITION_ATTACHED_PIC)


def _codec_name(stream) -> str:
    return stream.codec_context.name if stream.codec_context is not None else "unknown codec"


def _sample_aspect_ratio(stream) -> Fraction:
    """The stream's sample aspect ratio as libavformat guesses it (the container's, else the
    codec's); 1 when absent or implausible (see MAX_SAMPLE_ASPECT_RATIO)."""
    try:
        sar = stream.sample_aspect_ratio
    except Exception:  # noqa: BLE001 - no usable value is the same as none
        return Fraction(1)
    if not sar or sar <= 0:
        return Fraction(1)
    sar = Fraction(sar.numerator, sar.denominator)
    if not Fraction(1, MAX_SAMPLE_ASPECT_RATIO) <= sar <= MAX_SAMPLE_ASPECT_RATIO:
        return Fraction(1)
    return sar


def side_data_of(frame) -> Iterator:
    """The side data (``av.sidedata.SideData``) libavcodec attached to a decoded frame.

    PyAV up to 18.1.0 iterates a frame's side-data container as SideData objects; 18.1.1 made it
    a true Mapping whose iteration yields the `SideDataType` keys. Both are read here.
    """
    container = frame.side_data
    for item in container:
        yield container[item] if isinstance(item, SideDataType) else item


def display_matrix_of(frame) -> bytes | None:
    """The raw display matrix (36 bytes) libavcodec attached to a decoded frame, or None."""
    # Iterating is 5x cheaper than the container's Mapping.get (1.7 vs 8.6 us a frame, PyAV 18.1.0).
    for side_data in side_data_of(frame):
        if side_data.type == SideDataType.DISPLAYMATRIX:
            return bytes(side_data)
    return None


def display_transform_of(frame) -> DisplayTransform:
    """The `DisplayTransform` of a decoded frame (identity when it has no display matrix)."""
    matrix = display_matrix_of(frame)
    return DisplayTransform.from_display_matrix(matrix) if matrix else IDENTITY


# -- damage -----------------------------------------------------------------------------------

class DamageLog:
    """What was wrong with a video, as the decoder met it: from the packets and the decoding.

    Evidence, the same in every container: a stream whose packets end well before the end its
    header states (a file cut short); packets the decoder refuses (they give no frame); frames
    the decoder marks as decoded with errors; frames missing where the format's timestamps
    count every frame (MPEG-TS/PS); and the errors libavformat/libavcodec report, which is what
    `ffmpeg -v error -i FILE -f null -` prints (nothing, for a sound file). The demuxer's
    "corrupt" packet flag is not evidence: MPEG-TS sets it at every join of two recordings
    (their continuity counters restart) on packets that decode whole. Only what was read is
    known: the packets the probe and the plan read, the frames the plan decoded. Times are
    absolute (the stream's clock, re-based after a timestamp restart); `summary` states them
    from the video's first frame.
    """

    def __init__(self):
        self.cut: tuple[float, float] | None = None  # (end of the packets, end the header states)
        self._events: dict[str, dict[float, int]] = {}  # kind -> {seconds: count}
        self._first_message: str | None = None
        self._messages: set[str] = set()

    def __bool__(self) -> bool:
        return self.cut is not None or bool(self._events)

    def add(self, kind: str, seconds: float | None, count: int = 1) -> None:
        """One piece of evidence of ``kind`` (see `KINDS`) at ``seconds`` (absolute).

        The same evidence met twice (a packet read by the probe and decoded later) counts once.
        """
        events = self._events.setdefault(kind, {})
        key = -1.0 if seconds is None else round(float(seconds), 6)
        events[key] = max(events.get(key, 0), count)

    def libav_error(self, seconds: float | None, message: str) -> None:
        """An error libav logged while the packet at ``seconds`` was read or decoded. The same
        message twice (the probe and the decoding both reaching a cut end) counts once."""
        message = " ".join(message.split())
        self._first_message = self._first_message or message
        events = self._events.setdefault("libav", {})
        if message in self._messages:
            if seconds is not None:
                events.setdefault(round(float(seconds), 6), 0)  # its time, not another error
            return
        self._messages.add(message)
        key = -1.0 if seconds is None else round(float(seconds), 6)
        events[key] = events.get(key, 0) + 1

    KINDS = {  # kind: (one, several)
        "undecodable": ("undecodable packet", "undecodable packets"),
        "corrupt_frame": ("frame decoded with errors", "frames decoded with errors"),
        "missing": ("frame missing from the timestamps", "frames missing from the timestamps"),
        "libav": ("error reported by libavformat/libavcodec", "errors reported by libavformat/libavcodec"),
    }

    def summary(self, start_seconds: float = 0.0) -> str | None:
        """One line, e.g. "ends at 1.28 s of a 3.00 s header duration; 2 undecodable packets at
        1.10 s"; None when nothing was wrong."""
        parts = []
        if self.cut is not None:
            end, header_end = self.cut
            parts.append(f"ends at {end - start_seconds:.2f} s of a {header_end - start_seconds:.2f} s header duration")
        for kind, (one, several) in self.KINDS.items():
            events = self._events.get(kind)
            if not events:
                continue
            count = sum(events.values())
            times = sorted(t - start_seconds for t in events if t >= 0)
            noun = one if count == 1 else several
            where = ""
            if times:
                where = f" at {times[0]:.2f} s" if times[-1] - times[0] < 0.005 else f" at {times[0]:.2f}-{times[-1]:.2f} s"
            text = f"{count} {noun}{where}"
            if kind == "libav" and self._first_message:
                text += f" (first: {self._first_message[:160]})"
            parts.append(text)
        return "; ".join(parts) if parts else None


_LIBAV_LOG_LOCK = threading.Lock()
_LIBAV_LOG_USERS = 0
_LIBAV_LEVEL_OURS = False
_LIBAV_SKIP_REPEATED = True


class _LibavErrors:
    """The errors libav logs while one decoder works go to its `DamageLog`.

    PyAV drops libav's log by default: while any decoder is open (`open` .. `close`) the log
    level is ERROR (unless the process chose one) and PyAV's folding of repeated messages is
    off (it holds a message back until a different one comes, which would carry one video's
    message into the next one's). Each step that reads or decodes is a ``with`` block: what is
    logged on this thread meanwhile is this decoder's (cheap: one capture list pushed and
    popped, about a microsecond).
    """

    __slots__ = ("_sink", "_capture", "_logs", "_thread", "_open")

    def __init__(self, sink):
        self._sink = sink  # (message) -> None
        self._capture = self._logs = self._thread = None
        self._open = False

    def open(self) -> None:
        global _LIBAV_LOG_USERS, _LIBAV_LEVEL_OURS, _LIBAV_SKIP_REPEATED
        with _LIBAV_LOG_LOCK:
            if not self._open:
                if _LIBAV_LOG_USERS == 0:
                    if av.logging.get_level() is None:
                        av.logging.set_level(av.logging.ERROR)
                        _LIBAV_LEVEL_OURS = True
                    _LIBAV_SKIP_REPEATED = av.logging.get_skip_repeated()
                    av.logging.set_skip_repeated(False)
                _LIBAV_LOG_USERS += 1
                self._open = True

    def close(self) -> None:
        global _LIBAV_LOG_USERS, _LIBAV_LEVEL_OURS
        with _LIBAV_LOG_LOCK:
            if self._open:
                self._open = False
                _LIBAV_LOG_USERS -= 1
                if _LIBAV_LOG_USERS == 0:
                    av.logging.set_skip_repeated(_LIBAV_SKIP_REPEATED)
                    if _LIBAV_LEVEL_OURS:
                        av.logging.set_level(None)
                        _LIBAV_LEVEL_OURS = False

    def __del__(self):
        self.close()

    def __enter__(self):
        thread = threading.get_ident()
        if self._thread != thread:  # a capture is bound to the thread it was made on
            self._capture, self._thread = av.logging.Capture(local=True), thread
        self._logs = self._capture.__enter__()
        return self

    def __exit__(self, *exc_info):
        self._capture.__exit__(*exc_info)
        logs = self._logs
        if logs:
            for level, name, message in logs:
                if level <= av.logging.ERROR:
                    self._sink(f"{name}: {message}" if name else message)
            logs.clear()
        return False


class VideoDecoder:
    """Probe and decode one video. Use as a context manager; errors raise `DecodeError`.

    ``threads`` is libavcodec's thread count per decode (1 keeps one Ray task on one core).
    ``stats`` says what it did (`DecodeStats`; frame indices too with ``record_frames``).
    """

    def __init__(self, file: BinaryIO | str, *, limits: DecodeLimits = DecodeLimits(),
                 size_bytes: int | None = None, threads: int = 1, record_frames: bool = False):
        self._limits = limits
        self._skipping = False
        self._primed = None  # (first frame, the decode iterator after it) until something else reads
        self._first_frame: tuple[int, int, DisplayTransform, str | None] | None = None  # of the first decoded
        self.stats = DecodeStats(decoded_indices=[] if record_frames else None)
        self.damage = DamageLog()
        self._position: float | None = None  # seconds of the packet read last (for damage)
        self._errors = _LibavErrors(lambda message: self.damage.libav_error(self._position, message))
        self._errors.open()
        self._file = file
        try:
            self._seekable = isinstance(file, str) or bool(file.seekable())
        except Exception:  # noqa: BLE001 - a file object without seekable(): do not seek
            self._seekable = False
        if size_bytes is not None and size_bytes > limits.max_bytes:
            self._errors.close()
            raise DecodeError("too_large", "probe", f"{size_bytes} bytes exceeds max_bytes={limits.max_bytes}")
        if size_bytes == 0:
            self._errors.close()
            raise DecodeError("corrupt", "probe", "empty file (0 bytes)")
        try:
            with self._errors:
                self._container = av.open(file, mode="r", metadata_errors="ignore")
        except Exception as exc:  # noqa: BLE001 - every open failure is a per-video error
            self._errors.close()
            _raise_as_decode_error(exc, "probe")
        flags = self._container.format.flags
        # Raw elementary streams have no clock and their demuxer cannot seek: they are read
        # from the start (reopened to rewind). Formats with discontinuous timestamps are
        # scanned whole by the probe, so a restart is found wherever it is.
        self._no_clock = bool(flags & AVFMT_NOTIMESTAMPS)
        self._discontinuous = bool(flags & AVFMT_TS_DISCONT)
        self._demuxer_seeks = self._seekable and not self._no_clock
        self._restarts = 0  # timestamp restarts the probe found (re-based while decoding)
        self._other_end: float | None = None  # latest end among the other streams' packets read
        self._threads = threads
        try:
            self._stream = self._choose_stream()
            if self._stream.codec_context is None:
                raise DecodeError("corrupt", "probe", "the video stream has no decoder (unknown codec id: a damaged "
                                                      "header, or a codec this FFmpeg build lacks)")
            self._set_threads()
            self.probe = self._probe()
        except DecodeError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a failed seek in the timing scan
            self.close()
            _raise_as_decode_error(exc, "probe")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> VideoDecoder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()
        self._errors.close()

    def _set_threads(self) -> None:
        self._stream.thread_type = "AUTO" if self._threads != 1 else "SLICE"
        self._stream.codec_context.thread_count = self._threads

    @property
    def damaged(self) -> bool:
        """True when the decoder met damage (see `DamageLog`); `damage` says what it was."""
        return bool(self.damage)

    @property
    def damage_summary(self) -> str | None:
        """What was wrong, from the video's first frame on (`DamageLog.summary`), or None."""
        return self.damage.summary(self.probe.start_seconds if hasattr(self, "probe") else 0.0)

    def _choose_stream(self):
        streams = list(self._container.streams.video)
        videos = [s for s in streams if not _is_still_picture(s)]
        if not videos:
            if streams:
                pictures = ", ".join(f"stream {s.index} ({_codec_name(s)} {s.codec_context.width}x{s.codec_context.height})"
                                     if s.codec_context else f"stream {s.index}" for s in streams)
                raise DecodeError("no_video_stream", "probe",
                                  f"the file has no video stream, only a still picture (cover art or thumbnail, "
                                  f"attached_pic disposition): {pictures}")
            raise DecodeError("no_video_stream", "probe", "the file has no video stream")
        self._num_video_streams = len(videos)
        # libavformat's av_find_best_stream: the default/most suitable stream, so a file with
        # several video streams gets the one a player would show; we record which. It ranks
        # still pictures too, so when it picks one, take the best real video stream by its
        # first criteria: the default disposition, then the bit rate.
        best = self._container.streams.best("video")
        if best is not None and any(best.index == s.index for s in videos):
            return best
        return max(videos, key=lambda s: (bool(int(s.disposition) & _DISPOSITION_DEFAULT),
                                          (s.codec_context.bit_rate or 0) if s.codec_context else 0, -s.index))

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
        header_start = float(stream.start_time * time_base) if stream.start_time is not None and time_base else 0.0
        if self._no_clock:
            # The raw demuxer's average_rate is its own default (25); the stream's own rate
            # (from the codec: the SPS timing of H.264/HEVC) is what players use.
            rate = stream.guessed_rate or stream.average_rate
        else:
            rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if self._no_clock:
            # No timestamps: the first frame is at 0 and the span is counted from the packets.
            start = 0.0
            end, tail_fps = self._count_span(fps)
        else:
            # A file that cannot seek is read once, from the start: no look ahead at its packets.
            start = self._head_start() if self._seekable else None
            if self._discontinuous and self._seekable:
                end, tail_fps = self._scan_restarts(fps)
            else:
                end, tail_fps = self._find_end(fps)
                if end is not None:
                    self._check_cut(end, fps or tail_fps)
        if end is None:
            end = self._header_end()
        if fps <= 0:
            fps = tail_fps or 30.0
        # Refused before a single frame is decoded (from the header's start when the first
        # packets leave the first frame open: at or a few frames before it).
        if end is not None and end - (header_start if start is None else start) > limits.max_duration_seconds:
            raise DecodeError(
                "too_large", "probe",
                f"duration {end - (header_start if start is None else start):.1f}s exceeds "
                f"max_duration_seconds={limits.max_duration_seconds}",
            )
        if start is None:
            # The first packets leave open which frame the decoder shows first (an open GOP, a
            # stream cut mid-GOP): decode it (`_prime` rewinds first). Decoding straight through
            # goes on from it.
            first = self._prime()
            start = float(first.time) if first.time is not None else header_start
        elif self._seekable:
            self._rewind()
        if self._no_clock or self._discontinuous:
            self._position = None  # damage met from here on is timed by the decoded frames
        duration = max(end - start, 0.0) if end is not None else 0.0
        if duration > limits.max_duration_seconds:
            raise DecodeError(
                "too_large", "probe",
                f"duration {duration:.1f}s exceeds max_duration_seconds={limits.max_duration_seconds}",
            )
        stream = self._stream  # a rewind may have reopened the input: the old stream is gone
        return VideoProbe(
            stream_index=stream.index,
            num_video_streams=self._num_video_streams,
            width=width,
            height=height,
            fps=fps,
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt or "",
            duration_seconds=duration,
            start_seconds=start,
            sample_aspect_ratio=_sample_aspect_ratio(stream),
        )

    def shown(self, apply_display: bool = True) -> tuple[int, int, DisplayTransform, Fraction]:
        """(width, height, display transform, sample aspect ratio) of the picture a player shows
        of the first decoded frame: the picture the model's resize starts from. Without
        ``apply_display``: the stored size, identity and 1.

        Known once a frame is decoded (the first frame, or with a sparse plan the keyframe its
        first seek lands on); before any decoding this decodes the first frame.
        """
        if self._first_frame is None:
            self._prime()
        width, height, display, _ = self._first_frame
        if not apply_display:
            return width, height, IDENTITY, Fraction(1)
        sar = self.probe.sample_aspect_ratio
        return (*displayed_size(width, height, sar, display), display, sar)

    def _note_first(self, frame) -> None:
        if self._first_frame is None:
            self._first_frame = (int(frame.width), int(frame.height), display_transform_of(frame), hdr_transfer(frame))

    @property
    def hdr(self) -> str | None:
        """The HDR transfer function of the first decoded frame ('smpte2084' for PQ,
        'arib-std-b67' for HLG; see `HDR_TRANSFERS`), None for SDR. Such frames are tone-mapped
        to SDR BT.709 (`tone_map_to_sdr`)."""
        if self._first_frame is None:
            self._prime()
        return self._first_frame[3]

    # -- time span ----------------------------------------------------------------------------

    def _find_end(self, fps: float) -> tuple[float | None, float]:
        """(end of the last frame in seconds, frame rate seen in the tail) from the video packets.

        As probing tools do: seek to the last keyframe and demux to the end of the file (no
        decoding), so a long file costs its last GOP's bytes, not all of them. The end is the
        largest pts + duration among those packets (a packet without a duration lasts the
        typical gap between the tail's timestamps). Container durations are not used: they
        cover every stream (audio often runs longer), and Matroska's Duration can be an end
        time. Returns (None, 0.0) when the input cannot seek; a failed seek falls back to
        demuxing the whole stream. Leaves the demuxer anywhere: the caller rewinds.
        """
        stream = self._stream
        time_base = stream.time_base
        if not self._seekable or not time_base:
            return None, 0.0
        origin = stream.start_time or 0
        target = origin + int(30 * 86400 / time_base)  # a month in: past the end of any video here
        step = max(1, int(TAIL_STEP_SECONDS / time_base))
        packets: list[tuple[int, int, bool]] = []
        try:
            for _ in range(TAIL_ATTEMPTS):
                self._container.seek(target, stream=stream, backward=True)
                packets = self._video_packets()
                if packets and (packets[0][2] or len(packets) >= TAIL_MIN_PACKETS):
                    break
                # Landed inside the last frames' reordering window (or past them): step back.
                target = (min(p[0] for p in packets) if packets else target) - step
                step *= 4
        except av.error.FFmpegError:
            packets = []
        if not packets:
            self._rewind()
            packets = self._video_packets()
        if not packets:
            return None, 0.0
        pts = sorted({p[0] for p in packets})
        gaps = sorted(b - a for a, b in zip(pts, pts[1:]))
        if gaps:
            typical = gaps[len(gaps) // 2]
        else:
            typical = int(round(1 / (fps * time_base))) if fps > 0 else 0
        end = max(p + (d if d > 0 else typical) for p, d, _ in packets)
        tail_fps = len(gaps) / float((pts[-1] - pts[0]) * time_base) if gaps else 0.0
        return float(end * time_base), tail_fps

    def _head_start(self) -> float | None:
        """The first presented frame's time from the first packets (demux only), or None.

        Unambiguous when the stream opens with a keyframe that is shown first: no packet among
        the first HEAD_PACKETS (more than any decoder's reordering delay) is presented before
        it. B-frame delay is read right here: an AVI whose header starts at 0 s and whose first
        frame is presented at 0.04 s gives 0.04. An open GOP's leading frames, or a stream cut
        mid-GOP, leave it to the decoder (None).
        """
        packets = self._video_packets(limit=HEAD_PACKETS)
        if not packets or not packets[0][2] or min(p[0] for p in packets) != packets[0][0]:
            return None
        return float(packets[0][0] * self._stream.time_base)

    def _video_packets(self, limit: int | None = None) -> list[tuple[int, int, bool]]:
        """(pts, duration, keyframe) of the chosen stream's packets from here to the end.

        Packets the demuxer marks discard (outside an MP4 edit list) produce no frame and are
        left out; a packet without pts counts by its dts. Damaged data ends the list (a
        truncated tail still gives the packets before it); an I/O error of the file itself
        (storage) is raised, so it is not mistaken for the end of the video. The other streams'
        packets are read too (the end of the latest is kept for `_check_cut`), and damage met
        is recorded.
        """
        out = []
        index = self._stream.index
        time_base = float(self._stream.time_base or 0)
        with self._errors:
            try:
                for packet in self._container.demux():
                    if packet.stream_index != index:
                        self._note_other_end(packet)
                        continue
                    if packet.size == 0 or packet.is_discard:
                        continue
                    ts = packet.pts if packet.pts is not None else packet.dts
                    if ts is not None:
                        self._position = ts * time_base
                        out.append((int(ts), int(packet.duration or 0), bool(packet.is_keyframe)))
                        if limit is not None and len(out) >= limit:
                            break
            except (av.error.FFmpegError, EOFError):
                pass
        return out

    def _note_other_end(self, packet) -> None:
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None or packet.size == 0 or packet.time_base is None:
            return
        end = float((ts + (packet.duration or 0)) * packet.time_base)
        if self._other_end is None or end > self._other_end:
            self._other_end = end

    def _check_cut(self, end: float, fps: float) -> None:
        """Mark the video cut short when its packets end well before its headers say.

        The video stream's own header duration (MP4/MOV tracks, AVI) is compared with the end of
        its packets; the container's (every stream: audio may run longer than the video) with
        the end of the latest stream read in the tail. Matroska's Duration may be an end time
        rather than a length, so the earlier of the two readings is taken. Formats without a
        stored duration (raw streams, MPEG-TS/PS: libavformat estimates theirs) are not checked.
        """
        stream, container = self._stream, self._container
        tolerance = max(CUT_TOLERANCE_SECONDS, 2.0 / fps if fps > 0 else 0.0)
        claims = []
        if stream.duration and stream.time_base:
            header_end = float(((stream.start_time or 0) + stream.duration) * stream.time_base)
            if header_end - end > tolerance:
                claims.append(header_end)
        if container.duration and container.duration > 0:
            duration = container.duration / av.time_base
            start = (container.start_time or 0) / av.time_base
            header_end = min(duration, start + duration)
            if header_end - max(end, self._other_end or end) > tolerance:
                claims.append(header_end)
        if claims:
            self.damage.cut = (end, max(claims))

    def _count_span(self, fps: float) -> tuple[float | None, float]:
        """(end, frame rate) of a stream without timestamps, from its packets (demux only).

        Each packet is one frame lasting its duration (the codec parser's, from the stream's own
        rate, repeated fields included), else 1 / ``fps``. A file object that cannot rewind is
        read once: nothing is counted ahead (None).
        """
        if not self._seekable:
            return None, 0.0
        time_base = float(self._stream.time_base or 0)
        total, count = 0.0, 0
        with self._errors:
            try:
                for packet in self._container.demux(self._stream):
                    if packet.size == 0:
                        continue
                    self._position = total
                    count += 1
                    total += packet.duration * time_base if packet.duration and time_base else (
                        1.0 / fps if fps > 0 else 0.0)
            except (av.error.FFmpegError, EOFError):
                pass
        if not count:
            return None, 0.0
        return total, (count / total if total > 0 else 0.0)

    def _scan_restarts(self, fps: float) -> tuple[float | None, float]:
        """(end, frame rate) of a stream whose timestamps may restart (MPEG-TS/PS), from all its
        packets (demux only, from the first).

        Decode timestamps only go forward within a recording: a step back, or a jump forward
        beyond TIMESTAMP_JUMP_SECONDS, starts the next one. Recordings play one after the other,
        so the end is the first one's plus the lengths of the others, on the first one's clock.
        Frames the timestamps skip (a packet's dts past the previous packet's end by a frame or
        more, where packets state their durations) are recorded as damage.
        """
        self._rewind()
        stream = self._stream
        time_base = float(stream.time_base or 0)
        if not time_base:
            return None, 0.0
        segments: list[list[int]] = []  # per recording: [first pts, end pts]
        elapsed = 0.0  # length of the recordings before the current one
        prev_dts = prev_duration = None
        count = 0
        with self._errors:
            try:
                for packet in self._container.demux(stream):
                    if packet.size == 0 or packet.is_discard:
                        continue
                    pts = packet.pts if packet.pts is not None else packet.dts
                    if pts is None:
                        continue
                    dts = packet.dts if packet.dts is not None else pts
                    duration = int(packet.duration or 0)
                    count += 1
                    if prev_dts is None or dts < prev_dts or (dts - prev_dts) * time_base > TIMESTAMP_JUMP_SECONDS:
                        if segments:
                            elapsed += (segments[-1][1] - segments[-1][0]) * time_base
                        segments.append([pts, pts + duration])
                    else:
                        segment = segments[-1]
                        segment[0], segment[1] = min(segment[0], pts), max(segment[1], pts + duration)
                        if prev_duration and dts - prev_dts >= 1.9 * prev_duration:
                            missing = round((dts - prev_dts) / prev_duration) - 1
                            self.damage.add("missing", self._rebased(segments, elapsed, prev_dts), missing)
                    self._position = self._rebased(segments, elapsed, pts)
                    prev_dts, prev_duration = dts, duration
            except (av.error.FFmpegError, EOFError):
                pass
        if not segments:
            return None, 0.0
        self._restarts = len(segments) - 1
        first = segments[0]
        end = first[1] * time_base + sum((b - a) * time_base for a, b in segments[1:])
        length = end - first[0] * time_base
        return end, (count / length if length > 0 else 0.0)

    def _rebased(self, segments: list[list[int]], elapsed: float, ts: int) -> float:
        """Seconds on the first recording's clock of timestamp ``ts`` of the latest recording."""
        time_base = float(self._stream.time_base)
        first = segments[0][0] * time_base
        return first + elapsed + (ts - segments[-1][0]) * time_base if len(segments) > 1 else ts * time_base

    def _header_end(self) -> float | None:
        """The end time the headers claim: only for inputs that cannot seek to their end."""
        stream, container = self._stream, self._container
        if stream.duration is not None and stream.time_base:
            return float(((stream.start_time or 0) + stream.duration) * stream.time_base)
        if container.duration is not None:
            return ((container.start_time or 0) + container.duration) / av.time_base
        return None

    def _prime(self):
        """Decode the first frame (the first presented one), from the start of the stream.

        Decoding straight through goes on from it, so it costs nothing there.
        """
        if self._seekable:
            self._rewind()
        frames = self._frames()
        try:
            first = next(frames, None)
        except Exception as exc:  # noqa: BLE001 - a broken first frame is a per-video error
            _raise_as_decode_error(exc, "decode")
        if first is None:
            raise self._nothing_decoded()
        self.stats.frames_decoded += 1
        self._note_first(first)
        self._primed = (first, frames)
        return first

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

    def clips(self, plans: list[ClipPlan], geometry: FrameGeometry, *, seek: bool = True) -> Iterator[DecodedClip]:
        """Decode what the plans need and yield each clip as soon as its frames are in.

        Only frames some target selects are converted (RGB + resize in one swscale call);
        clips leave as soon as complete, so a long video with many clips holds only the
        frames of the clips still open, never the whole video.

        Dense plans decode straight through from the first frame and stop after the last
        target. Sparse plans (targets further apart than `SEEK_MIN_GAP_FRAMES`, as with
        uniform sampling or a few stride clips over a long video) scan the stream's packet
        index (demux only, no decoding) and seek to the keyframe before a target whenever
        that skips at least `SEEK_MIN_SKIP_FRAMES` frames; see `_clips_seeking`. Both ways
        give the same frames and the same `frame_indices` (a frame's index is its rank in
        presentation order, which is its position when decoding straight through).
        ``seek=False`` always decodes straight through.
        """
        if seek and self._should_scan(plans):
            self._rewind()  # the index is demuxed from the first packet on
            index = self.packet_index()
            if index is not None and self._worth_seeking(plans, index):
                yield from self._clips_seeking(plans, geometry, index)
                return
            self._rewind()
        yield from self._clips_straight(plans, geometry)

    # -- straight through --------------------------------------------------------------------

    def _clips_straight(self, plans: list[ClipPlan], geometry: FrameGeometry,
                        skip_clips: int = 0) -> Iterator[DecodedClip]:
        asm = _ClipAssembler(plans, geometry, self.probe, self._threads)
        index = -1
        last_time = None
        period = asm.period
        primed, self._primed = self._primed, None
        frames = itertools.chain((primed[0],), primed[1]) if primed else self._frames()
        # Where the probe found the timestamps restarting, a step back (or a jump beyond
        # TIMESTAMP_JUMP_SECONDS) continues the clock from the frame before, as players play on;
        # as many times as the probe found (a damaged stream may put a frame out of order).
        restarts_left = self._restarts
        offset = 0.0
        last_raw = None
        try:
            for frame in frames:
                index += 1
                if index or not primed:  # the primed frame was counted when decoded
                    self.stats.frames_decoded += 1
                    self._note_first(frame)
                self._record(index)
                raw = frame.time
                if raw is None:  # no timestamp: continue the previous one at the nominal rate
                    t = (last_time + period) if last_time is not None else self.probe.start_seconds
                else:
                    if restarts_left and last_raw is not None and last_time is not None and (
                            raw < last_raw or raw - last_raw > TIMESTAMP_JUMP_SECONDS):
                        offset = last_time + period - raw
                        restarts_left -= 1
                    last_raw = raw
                    t = raw + offset
                last_time = t
                self._position = t
                for clip in asm.push(index, frame, t):
                    if clip.clip_index >= skip_clips:
                        yield clip
                if asm.done:
                    break
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken stream is a per-video error
            _raise_as_decode_error(exc, "decode")
        if index < 0:
            raise self._nothing_decoded()
        for clip in asm.finish():
            if clip.clip_index >= skip_clips:
                yield clip

    # -- keyframe seeking --------------------------------------------------------------------

    def _should_scan(self, plans: list[ClipPlan]) -> bool:
        """Cheap test on the plan alone: could any gap between targets hold a GOP to skip?"""
        fps = self.probe.fps
        if fps <= 0 or not self._demuxer_seeks or self._restarts:
            return False
        times = sorted({t for p in plans for t in p.target_seconds})
        if not times:
            return False
        gaps = [times[0] - self.probe.start_seconds] + [b - a for a, b in zip(times, times[1:])]
        return max(gaps) * fps >= SEEK_MIN_GAP_FRAMES

    def packet_index(self) -> PacketIndex | None:
        """Timestamps and keyframe flags of every packet of the stream (demux, no decoding).

        Returns None (decode straight through) when the index cannot map timestamps to frame
        numbers one to one: a packet without pts, two packets with the same pts, or no keyframe.
        Packets marked discard (e.g. before an MP4 edit list's start) produce no frame and are
        left out, as the decoder leaves them out.
        """
        stream = self._stream
        entries: list[tuple[int, int | None, bool]] = []
        try:
            with self._errors:
                for packet in self._container.demux(stream):
                    if packet.size == 0:
                        continue  # the flush packet at the end
                    if packet.is_discard:
                        continue
                    if packet.pts is None:
                        return None
                    entries.append((int(packet.pts), packet.dts, bool(packet.is_keyframe)))
        except Exception:  # noqa: BLE001 - an unreadable index: decode straight through
            return None
        if not entries:
            return None
        entries.sort()
        pts = [e[0] for e in entries]
        if any(a == b for a, b in zip(pts, pts[1:])):
            return None
        keyframes = [i for i, e in enumerate(entries) if e[2]]
        if not keyframes:
            return None
        # Seek by the keyframe's pts: libavformat's seek (MP4 included) lands on the last
        # keyframe at or before it. `_start_at_keyframe` checks where it really landed.
        seek_ts = [entries[i][0] for i in keyframes]
        tb = float(stream.time_base)
        return PacketIndex(pts=pts, seconds=[p * tb for p in pts], keyframes=keyframes, seek_ts=seek_ts,
                            rank={p: i for i, p in enumerate(pts)})

    def _worth_seeking(self, plans: list[ClipPlan], index: PacketIndex) -> bool:
        """Would following the plan with seeks skip at least one GOP's worth of frames?"""
        pos = -1
        for t in sorted({t for p in plans for t in p.target_seconds}):
            owner = index.owner_floor(t)
            key = index.keyframe_at_or_before(owner)
            if key > pos + SEEK_MIN_SKIP_FRAMES:
                return True
            pos = max(pos, owner + 1)
        return False

    def _record(self, index: int) -> None:
        if self.stats.decoded_indices is not None:
            self.stats.decoded_indices.append(index)

    def _rewind(self) -> None:
        """Back to the first packet: a seek, or where the demuxer cannot seek, the input reopened."""
        self._primed = None
        if self._demuxer_seeks:
            try:
                self._container.seek(0)
                return
            except av.error.FFmpegError:
                self._demuxer_seeks = False  # e.g. a raw stream in a container-less format: reopen
            except Exception as exc:  # noqa: BLE001
                _raise_as_decode_error(exc, "decode")
        self._reopen()

    def _reopen(self) -> None:
        """Open the input again from its first byte (how an input whose demuxer cannot seek rewinds)."""
        if not self._seekable:
            raise DecodeError("corrupt", "decode", "the input cannot be read again from its start (its demuxer "
                                                   "cannot seek and the file object cannot rewind)")
        index = self._stream.index
        self._container.close()
        try:
            if not isinstance(self._file, str):
                self._file.seek(0)
            with self._errors:
                self._container = av.open(self._file, mode="r", metadata_errors="ignore")
            self._stream = self._container.streams[index]
        except Exception as exc:  # noqa: BLE001
            _raise_as_decode_error(exc, "decode")
        self._skipping = False
        self._set_threads()

    def _nothing_decoded(self) -> DecodeError:
        damage = self.damage_summary
        return DecodeError("corrupt", "decode", "no frame could be decoded" + (f" ({damage})" if damage else ""))

    def _frames(self) -> Iterator:
        """The stream's decoded frames from the demuxer's position on, as `container.decode` gives
        them, except that damage is recorded (`DamageLog`) instead of ending the video: a packet
        the decoder refuses gives no frame and the next ones decode on; data the demuxer cannot
        read ends the stream there (the frames before it stand)."""
        stream = self._stream
        time_base = float(stream.time_base) if stream.time_base else 0.0
        packets = self._container.demux(stream)
        damage, errors = self.damage, self._errors
        while True:
            with errors:
                try:
                    packet = next(packets)
                except StopIteration:
                    return
                except (av.error.FFmpegError, EOFError):
                    # libav has logged why (recorded by `errors`); a storage error is not an FFmpegError.
                    damage.libav_error(self._position, "the rest of the file cannot be read")
                    return
                if packet.size:
                    if time_base and not self._no_clock and not self._restarts:
                        ts = packet.pts if packet.pts is not None else packet.dts
                        if ts is not None:
                            self._position = ts * time_base
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    damage.add("undecodable", self._position)
                    continue
            for frame in frames:
                if frame.is_corrupt:
                    seconds = frame.time if frame.time is not None and not self._restarts else self._position
                    damage.add("corrupt_frame", seconds)
                yield frame

    def _seek_to_keyframe(self, index: PacketIndex, key_pos: int) -> None:
        self.stats.seeks.append(index.keyframes[key_pos])
        self._container.seek(index.seek_ts[key_pos], stream=self._stream, backward=True, any_frame=False)

    def _start_at_keyframe(self, index: PacketIndex, key_pos: int) -> Iterator:
        """Decoded frames from the keyframe ``key_pos`` on (or from an earlier one).

        A demuxer may land past the keyframe asked for (it searches its own index, by dts or
        by cue points); frames would then be skipped, so step back one keyframe and retry. A
        landing before it only costs decoding a few frames that are then dropped.
        """
        floor = index.keyframes[key_pos]
        for attempt_pos in range(key_pos, max(-1, key_pos - 4), -1):
            self._seek_to_keyframe(index, attempt_pos)
            frames = self._frames()
            first = next(frames, None)
            if first is None:
                raise _IndexMismatch(f"no frame after seeking to frame {index.keyframes[attempt_pos]}")
            rank = index.rank.get(first.pts) if first.pts is not None else None
            if rank is not None and rank <= floor:
                return itertools.chain((first,), frames)
        raise _IndexMismatch(f"seeking to frame {floor} lands after it")

    def _clips_seeking(self, plans: list[ClipPlan], geometry: FrameGeometry,
                       index: PacketIndex) -> Iterator[DecodedClip]:
        """Decode forward from the keyframe before each target that is far ahead.

        A frame's index is the rank of its pts among the stream's packets, which is its
        position when decoding straight through as long as every packet gives one frame. That
        is checked as frames arrive: two frames decoded one after the other must have
        consecutive ranks. If not (a decoder that drops or adds frames), the video is decoded
        again straight through, and the clips already yielded are not repeated.
        """
        asm = _ClipAssembler(plans, geometry, self.probe, self._threads)
        yielded = 0
        frames = None  # the decode iterator, None until the first seek
        pos = -1  # index of the last frame pushed
        expect = None  # rank the next decoded frame must have (None right after a seek)
        floor = 0  # after a seek to keyframe k: frames before k are not pushed
        skip_until = -1  # while skipping non-reference frames: the rank at which to stop
        check_from = -1  # ranks up to this one may have gaps (skipped frames)
        try:
            while not asm.done:
                target = asm.next_target_seconds
                owner = index.owner_floor(target)
                key_pos = index.keyframe_pos_at_or_before(owner)
                key = index.keyframes[key_pos]
                if frames is None or key > pos + SEEK_MIN_SKIP_FRAMES:
                    self._skip_nonref(False)
                    frames = self._start_at_keyframe(index, key_pos)
                    expect, floor = None, key
                    asm.forget_previous()
                    skip_until = owner - PREROLL_MARGIN_FRAMES
                    if skip_until > key:
                        self._skip_nonref(True)
                        check_from = skip_until + PREROLL_CHECK_FRAMES
                    else:
                        skip_until = -1
                # Decode until the next target is filled or the stream ends.
                goal = asm.filled_count + 1
                ended = True
                for frame in frames:
                    self.stats.frames_decoded += 1
                    self._note_first(frame)
                    if frame.pts is None:
                        raise _IndexMismatch("a decoded frame has no pts")
                    rank = index.rank.get(frame.pts)
                    if rank is None:
                        raise _IndexMismatch(f"decoded pts {frame.pts} is not in the packet index")
                    if skip_until >= 0 and rank >= skip_until:
                        self._skip_nonref(False)
                        skip_until = -1
                    if rank < floor or rank <= pos:
                        continue  # before the keyframe we wanted (or already pushed)
                    if expect is not None and rank != expect and rank > check_from:
                        raise _IndexMismatch(f"frame {rank} decoded after frame {expect - 1}")
                    expect = rank + 1
                    pos = rank
                    self._record(rank)
                    for clip in asm.push(rank, frame, frame.time):
                        yielded += 1
                        yield clip
                    if asm.done or asm.filled_count >= goal:
                        ended = False
                        break
                if ended and not asm.done:
                    # End of stream: the remaining targets take the last frame.
                    for clip in asm.finish():
                        yielded += 1
                        yield clip
                    break
        except _IndexMismatch:
            self._skip_nonref(False)
            self.stats.fallbacks += 1
            self._rewind()
            yield from self._clips_straight(plans, geometry, skip_clips=yielded)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken stream is a per-video error
            _raise_as_decode_error(exc, "decode")
        finally:
            self._skip_nonref(False)

    def _skip_nonref(self, on: bool) -> None:
        """Have libavcodec skip (or stop skipping) frames no other frame references."""
        if on or self._skipping:
            self._stream.codec_context.skip_frame = "NONREF" if on else "DEFAULT"
        self._skipping = on


class _IndexMismatch(Exception):
    """The packet index does not describe the decoded frames; decode straight through."""


@dataclass
class PacketIndex:
    pts: list[int]  # every frame's pts, sorted: position = frame index
    seconds: list[float]
    keyframes: list[int]  # frame indices of keyframes, increasing
    seek_ts: list[int]  # per keyframe, the timestamp to seek to
    rank: dict[int, int]  # pts -> frame index

    def owner_floor(self, target: float) -> int:
        """A frame index at or before the frame shown at ``target`` (never after it)."""
        return max(0, bisect.bisect_right(self.seconds, target - 1e-6) - 1)

    def keyframe_pos_at_or_before(self, frame_index: int) -> int:
        return max(0, bisect.bisect_right(self.keyframes, frame_index) - 1)

    def keyframe_at_or_before(self, frame_index: int) -> int:
        return self.keyframes[self.keyframe_pos_at_or_before(frame_index)]


class _ClipAssembler:
    """Matches frames to the plans' targets, converts the chosen ones, assembles clips.

    Frames are pushed in increasing index order (possibly with gaps, where the decoder seeked
    over frames no target needs). Only selected frames are converted; clips are yielded in
    order as soon as complete and their frames released.
    """

    def __init__(self, plans: list[ClipPlan], geometry: FrameGeometry, probe: VideoProbe, threads: int = 1):
        self.plans, self.geometry, self.probe = plans, geometry, probe
        # libswscale threads: like libavcodec's, one per decode task by default (PyAV's own
        # default, 0, starts a thread per CPU in every task).
        self.threads = threads
        # Per distinct (decoded size, display matrix): the resized size and display transform.
        # Each frame is sized from itself, so a stream that changes resolution keeps every
        # frame's own aspect ratio, as the Hugging Face processor does frame by frame.
        self._targets: dict[tuple, tuple[tuple[int, int], DisplayTransform]] = {}
        self._sar = probe.sample_aspect_ratio if geometry.apply_display else Fraction(1)
        self.matcher = FrameMatcher(plans)
        num_frames = [len(p.target_seconds) for p in plans]
        self.chosen: list[list[int | None]] = [[None] * n for n in num_frames]
        self.remaining = list(num_frames)
        self.total = sum(num_frames)
        self.filled_count = 0
        self.converted: dict[int, tuple[np.ndarray, float]] = {}  # index -> (rgb crop, seconds)
        self.next_clip = 0
        self.prev = None  # (index, frame, seconds) not yet known to be needed
        self.period = 1.0 / probe.fps if probe.fps > 0 else 0.0

    @property
    def done(self) -> bool:
        return self.matcher.done

    @property
    def next_target_seconds(self) -> float | None:
        return self.matcher.next_target_seconds

    def forget_previous(self) -> None:
        # After a seek the previous frame can no longer own a target (every open target is
        # at or after the keyframe sought to), so it need not be kept.
        self.prev = None

    def _convert(self, index: int, frame, seconds: float) -> None:
        if index not in self.converted:
            self.converted[index] = (self._rgb_crop(frame), seconds)

    def _rgb_crop(self, frame) -> np.ndarray:
        matrix = display_matrix_of(frame) if self.geometry.apply_display else None
        key = (frame.width, frame.height, matrix)
        target = self._targets.get(key)
        if target is None:
            transform = DisplayTransform.from_display_matrix(matrix) if matrix else IDENTITY
            shown = displayed_size(frame.width, frame.height, self._sar, transform)
            target = self._targets[key] = (self.geometry.resized_size(*shown), transform)
        resized, transform = target
        return model_crop(frame, self.geometry, resized, transform=transform, threads=self.threads)

    def _fill(self, slots, frames_by_index) -> None:
        for clip_pos, frame_pos, owner in slots:
            self._convert(owner, *frames_by_index[owner])
            self.chosen[clip_pos][frame_pos] = owner
            self.remaining[clip_pos] -= 1
            self.filled_count += 1

    def _ready(self) -> Iterator[DecodedClip]:
        probe, converted = self.probe, self.converted
        # Clips complete in order (their last targets are increasing).
        while self.next_clip < len(self.plans) and self.remaining[self.next_clip] == 0:
            indices = [int(i) for i in self.chosen[self.next_clip]]
            pixels = np.stack([converted[i][0] for i in indices])
            start = converted[indices[0]][1] - probe.start_seconds
            end = converted[indices[-1]][1] - probe.start_seconds + self.period
            yield DecodedClip(self.next_clip, start, end, indices, pixels)
            self.next_clip += 1
            still_needed = {i for c in self.chosen[self.next_clip:] for i in c if i is not None}
            for i in list(converted):
                if i not in still_needed:
                    del converted[i]

    def push(self, index: int, frame, t: float) -> Iterator[DecodedClip]:
        frames_by_index = {index: (frame, t)}
        if self.prev is not None:
            frames_by_index[self.prev[0]] = self.prev[1:]
        self._fill(self.matcher.push(index, t), frames_by_index)
        yield from self._ready()
        self.prev = (index, frame, t)

    def finish(self) -> Iterator[DecodedClip]:
        if not self.matcher.done and self.prev is not None:
            self._fill(self.matcher.finish(), {self.prev[0]: self.prev[1:]})
        yield from self._ready()
