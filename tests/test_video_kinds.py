"""Every video as it comes: raw elementary streams, MPEG-TS/PS timestamp restarts, untagged HD
colour, HDR shown as SDR, damaged files marked (issue 17).

Each kind is made here with ffmpeg's command line (`tests/cli_media.py`: the recipe is the
command), in several variants so that a test holds the kind and not one file. Right values
come from ffprobe (frames counted by decoding, the stream's own rate, packet times, tags) or
from ffmpeg's own filters, and frame indices are checked against the frame-number codes read
back from the pixels (`synthetic.frame_number_from_rgb`), never against what the decoder
reports alone.
"""

from __future__ import annotations

import os
import re
import shutil
from fractions import Fraction

import av
import numpy as np
import pytest

from tests.cli_media import (
    decode_errors,
    encode_coded,
    encode_frames,
    ffmpeg,
    frame_times,
    packet_end,
    require_ffmpeg,
    video_stream_facts,
)
from tests.conftest import CASE_FILES, SHARED_FILES, require_shared_media, uniform_indices
from vmae_ray.decoding import (
    BT2020_TO_BT709,
    FrameGeometry,
    VideoDecoder,
    hable,
    hlg_inverse_oetf,
    model_crop,
    pq_eotf,
)
from vmae_ray.listing import list_inputs
from vmae_ray.storage import StorageOptions
from vmae_ray.synthetic import frame_number_from_rgb

CODE_GEOMETRY = FrameGeometry(resize_shortest_edge=96, crop_height=96, crop_width=96)
X264 = ["-c:v", "libx264", "-preset", "veryfast", "-bf", "2", "-g", "12", "-pix_fmt", "yuv420p"]
X265 = ["-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error:keyint=12", "-pix_fmt", "yuv420p"]


def _uniform16(source, geometry=CODE_GEOMETRY):
    """(decoder, the uniform-16 clip) of a path or a file object."""
    decoder = VideoDecoder(source)
    plans = decoder.plan(sampling="uniform", num_frames=16, frame_stride=4, clips_per_video=1)
    (clip,) = list(decoder.clips(plans, geometry))
    decoder.close()
    return decoder, clip


def _codes(clip) -> list[int]:
    return [frame_number_from_rgb(f) for f in clip.pixels]


# ---------------------------------------------------------------------------------------------
# Raw elementary streams: no container, no clock, a demuxer that cannot seek

RAW_STREAMS = {  # name: (encoder arguments, frames per second, frames)
    "drone.h264": (X264 + ["-f", "h264"], 24, 48),
    "camera.264": (X264 + ["-f", "h264"], 30, 60),
    "broadcast.hevc": (X265 + ["-f", "hevc"], 30, 60),
    "dump.265": (X265 + ["-f", "hevc"], 25, 40),
}


@pytest.fixture(scope="module")
def raw_streams(tmp_path_factory) -> dict[str, str]:
    require_ffmpeg()
    root = tmp_path_factory.mktemp("raw")
    return {name: encode_coded(str(root / name), width=128, height=96, fps=fps, num_frames=n, args=args, seed=i)
            for i, (name, (args, fps, n)) in enumerate(RAW_STREAMS.items())}


@pytest.mark.parametrize("name", list(RAW_STREAMS))
def test_raw_stream_span_rate_and_frames(raw_streams, name):
    path = raw_streams[name]
    facts = video_stream_facts(path)
    frames, rate = facts["nb_read_frames"], facts["r_frame_rate"]
    assert (frames, rate) == (RAW_STREAMS[name][2], RAW_STREAMS[name][1])  # ffprobe agrees with the recipe
    assert av.open(path).streams.video[0].average_rate == 25  # the raw demuxer's default, not the stream's
    decoder, clip = _uniform16(path)
    probe = decoder.probe
    assert probe.fps == pytest.approx(float(rate))
    assert probe.start_seconds == 0.0
    assert probe.duration_seconds == pytest.approx(frames / float(rate), abs=1e-6)
    assert _codes(clip) == clip.frame_indices == uniform_indices(frames, 16)
    assert not decoder.damaged


@pytest.mark.parametrize("name", ["drone.h264", "broadcast.hevc"])
def test_raw_stream_from_a_file_object_and_dense_clips(raw_streams, name):
    """Read through a file object (as from S3): rewound by reopening; stride clips cover it all."""
    path = raw_streams[name]
    frames = RAW_STREAMS[name][2]
    with open(path, "rb") as f:
        _, clip = _uniform16(f)
    assert _codes(clip) == uniform_indices(frames, 16)
    with open(path, "rb") as f, VideoDecoder(f) as decoder:
        plans = decoder.plan(sampling="stride", num_frames=8, frame_stride=2, clips_per_video=None)
        clips = list(decoder.clips(plans, CODE_GEOMETRY))
    assert len(clips) == -(-frames // 16)  # clips of 16 frames cover the stream (the last may run past it)
    for clip in clips:
        assert _codes(clip) == clip.frame_indices
    assert clips[-1].frame_indices[-1] == min(16 * len(clips) - 2, frames - 1)


def test_raw_stream_extensions_are_listed(raw_streams):
    directory = os.path.dirname(next(iter(raw_streams.values())))
    listed = sorted(os.path.basename(u) for u in list_inputs(directory, StorageOptions()).column("uri").to_pylist())
    assert listed == sorted(RAW_STREAMS)


# ---------------------------------------------------------------------------------------------
# MPEG-TS / MPEG-PS whose timestamps restart: recordings joined with `cat`

RESTARTS = {  # name: (parts' frame counts, extra muxer arguments per part, encoder + muxer)
    "joined.ts": ((38, 37), ([], []), X264 + ["-f", "mpegts"]),
    "three.ts": ((20, 25, 30), ([], [], []), X264 + ["-f", "mpegts"]),
    "jump_forward.ts": ((38, 37), ([], ["-output_ts_offset", "100"]), X264 + ["-f", "mpegts"]),
    "joined.mpg": ((30, 45), ([], []), ["-c:v", "mpeg2video", "-bf", "2", "-g", "12", "-q:v", "4", "-f", "vob"]),
}
RESTART_FPS = 25


@pytest.fixture(scope="module")
def restarts(tmp_path_factory) -> dict[str, str]:
    require_ffmpeg()
    root = tmp_path_factory.mktemp("restarts")
    out = {}
    for i, (name, (counts, extra, args)) in enumerate(RESTARTS.items()):
        first, parts = 0, []
        for j, (count, more) in enumerate(zip(counts, extra)):
            part = str(root / f"{name}.part{j}")
            encode_coded(part, width=128, height=96, fps=RESTART_FPS, num_frames=count, args=args + more,
                         first_code=first, seed=i)
            parts.append(part)
            first += count
        with open(root / name, "wb") as joined:  # `cat part0 part1 > joined`
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, joined)
        out[name] = str(root / name)
    return out


@pytest.mark.parametrize("name", list(RESTARTS))
def test_timestamp_restarts_play_through(restarts, name):
    path = restarts[name]
    total = sum(RESTARTS[name][0])
    assert video_stream_facts(path)["nb_read_frames"] == total  # ffmpeg decodes every frame of all parts
    times = frame_times(path, as_decoded=True)
    assert any(b < a or b - a > 10 for a, b in zip(times, times[1:]))  # the restart is really there
    decoder, clip = _uniform16(path)
    assert decoder.probe.duration_seconds == pytest.approx(total / RESTART_FPS, abs=1e-3)
    assert _codes(clip) == clip.frame_indices == uniform_indices(total, 16)
    assert clip.start_seconds == pytest.approx(uniform_indices(total, 16)[0] / RESTART_FPS, abs=1e-6)
    assert not decoder.damaged
    # Dense clips run across the joins: frame i is the i-th decoded frame.
    with VideoDecoder(path) as dense:
        plans = dense.plan(sampling="stride", num_frames=16, frame_stride=2, clips_per_video=None)
        clips = list(dense.clips(plans, CODE_GEOMETRY))
    assert len(clips) == -(-total // 32)
    for c in clips:
        first = c.frame_indices[0]
        assert _codes(c) == c.frame_indices == [min(i, total - 1) for i in range(first, first + 32, 2)]
    starts = [c.start_seconds for c in clips]
    assert starts == sorted(starts) and starts[-1] == pytest.approx(clips[-1].frame_indices[0] / RESTART_FPS)


# ---------------------------------------------------------------------------------------------
# Colour as players show it: tags win; untagged = BT.709 for HD, BT.601 otherwise; limited range

BARS = np.array([[191, 191, 191], [191, 191, 0], [0, 191, 191], [0, 191, 0], [191, 0, 191], [191, 0, 0],
                 [0, 0, 191], [40, 80, 220]], dtype=np.uint8)  # 75% colour bars and a blue-ish one
KR_KB = {"bt709": (0.2126, 0.0722), "bt601": (0.299, 0.114)}

COLOUR_CASES = {  # name: (width, height, matrix the YUV was made with, h264_metadata tags, expected reading)
    "hd_720p_untagged": (1280, 720, "bt709", None, ("bt709", False)),
    "hd_wide_untagged": (1280, 544, "bt709", None, ("bt709", False)),
    "hd_tall_untagged": (960, 720, "bt709", None, ("bt709", False)),
    "sd_untagged": (640, 480, "bt601", None, ("bt601", False)),
    "almost_hd_untagged": (1278, 718, "bt601", None, ("bt601", False)),
    "hd_tagged_601": (1280, 720, "bt601", "matrix_coefficients=6", ("bt601", False)),
    "sd_tagged_709": (640, 480, "bt709", "matrix_coefficients=1", ("bt709", False)),
    "hd_tagged_full_range": (1280, 720, "bt709", "matrix_coefficients=1:video_full_range_flag=1", ("bt709", True)),
    "mjpeg_jpeg_range": (640, 480, "bt601", "mjpeg", ("bt601", True)),
}


def _bars(width: int, height: int) -> np.ndarray:
    edges = np.linspace(0, width, len(BARS) + 1).astype(int)
    rgb = np.empty((height, width, 3), np.uint8)
    for bar, (a, b) in zip(BARS, zip(edges, edges[1:])):
        rgb[:, a:b] = bar
    return rgb


@pytest.fixture(scope="module")
def colour_videos(tmp_path_factory) -> dict[str, str]:
    require_ffmpeg()
    root = tmp_path_factory.mktemp("colour")
    out = {}
    for name, (width, height, matrix, tags, (_, full)) in COLOUR_CASES.items():
        frames = [_bars(width, height)] * 2
        scale = f"scale=out_color_matrix={matrix}:out_range={'pc' if full else 'tv'}"
        if tags == "mjpeg":
            path = encode_frames(str(root / f"{name}.avi"), frames, fps=25,
                                 args=["-vf", scale, "-c:v", "mjpeg", "-pix_fmt", "yuvj420p", "-q:v", "2"])
        else:
            plain = encode_frames(str(root / f"{name}.plain.mp4"), frames, fps=25,
                                  args=["-vf", scale, "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0",
                                        "-pix_fmt", "yuv420p"])
            path = str(root / f"{name}.mp4")
            if tags:
                ffmpeg("-i", plain, "-c", "copy", "-bsf:v", f"h264_metadata={tags}", path)
            else:
                os.replace(plain, path)
        out[name] = path
    return out


def _yuv_to_rgb(y: float, u: float, v: float, matrix: str, full: bool) -> np.ndarray:
    """The published conversion (BT.709 / BT.601, ITU-R BT.709-6 and BT.601-7; limited range
    16-235/16-240, full range 0-255), independent of libswscale."""
    kr, kb = KR_KB[matrix]
    if full:
        luma, cb, cr = y / 255, (u - 128) / 255, (v - 128) / 255
    else:
        luma, cb, cr = (y - 16) / 219, (u - 128) / 224, (v - 128) / 224
    r = luma + 2 * (1 - kr) * cr
    b = luma + 2 * (1 - kb) * cb
    g = (luma - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.array([r, g, b]) * 255, 0, 255)


def _plane(frame, i: int) -> np.ndarray:
    plane = frame.planes[i]
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]


@pytest.mark.parametrize("name", list(COLOUR_CASES))
def test_colour_matrix_and_range_as_players_read_them(colour_videos, name):
    width, height, _, _, (matrix, full) = COLOUR_CASES[name]
    path = colour_videos[name]
    tags = video_stream_facts(path)
    assert ("color_space" in tags) == (COLOUR_CASES[name][3] is not None), tags  # untagged means untagged
    with av.open(path) as container:
        frame = next(container.decode(video=0))
        planes = [_plane(frame, i) for i in range(3)]
        ours = model_crop(frame, FrameGeometry(min(width, height), height, width), (width, height)).astype(float)
    other = "bt601" if matrix == "bt709" else "bt709"
    edges = np.linspace(0, width, len(BARS) + 1).astype(int)
    worst_other = 0.0
    for a, b in zip(edges, edges[1:]):
        x0, x1, y0, y1 = a + (b - a) // 4, b - (b - a) // 4, height // 4, 3 * height // 4
        sy, sx = planes[0].shape[0] / height, planes[0].shape[1] / width
        cy, cx = planes[1].shape[0] / height, planes[1].shape[1] / width
        yuv = (planes[0][int(y0 * sy):int(y1 * sy), int(x0 * sx):int(x1 * sx)].mean(),
               planes[1][int(y0 * cy):int(y1 * cy), int(x0 * cx):int(x1 * cx)].mean(),
               planes[2][int(y0 * cy):int(y1 * cy), int(x0 * cx):int(x1 * cx)].mean())
        got = ours[y0:y1, x0:x1].reshape(-1, 3).mean(0)
        # libswscale converts in fixed point: within 3 levels of the formula.
        assert np.abs(got - _yuv_to_rgb(*yuv, matrix, full)).max() <= 3.0, (name, yuv, got)
        worst_other = max(worst_other, np.abs(got - _yuv_to_rgb(*yuv, other, full)).max(),
                          np.abs(got - _yuv_to_rgb(*yuv, matrix, not full)).max())
    assert worst_other > 6, ("the other matrix or range would not have been told apart", worst_other)


# ---------------------------------------------------------------------------------------------
# HDR (PQ, HLG; BT.2020) tone-mapped to SDR BT.709 as ffmpeg's documented recipe does

RECIPE = ("zscale=t=linear:npl=100,format=gbrpf32le,zscale=p=bt709,tonemap=tonemap=hable:desat=0,"
          "zscale=t=bt709:m=bt709:r=tv,format=gbrpf32le")
HDR_CASES = {  # name: (transfer, pixel format, extra x265 parameters, (mean, 99th percentile) tolerance)
    "pq_444.mkv": ("smpte2084", "yuv444p10le", "lossless=1", (0.5, 2.0)),
    "hlg_444.mkv": ("arib-std-b67", "yuv444p10le", "lossless=1", (0.5, 2.0)),
    "pq_maxcll_444.mkv": ("smpte2084", "yuv444p10le", "lossless=1:max-cll=400,100:"
                          "master-display=G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1)",
                          (0.5, 2.0)),
    "pq_420.mp4": ("smpte2084", "yuv420p10le", "crf=12", (1.0, 3.0)),
    "hlg_420.mkv": ("arib-std-b67", "yuv420p10le", "crf=12", (1.0, 3.0)),
}


@pytest.fixture(scope="module")
def hdr_videos(tmp_path_factory) -> dict[str, str]:
    require_ffmpeg()
    root = tmp_path_factory.mktemp("hdr")
    out = {}
    for name, (transfer, pix_fmt, params, _) in HDR_CASES.items():
        # Smooth R'G'B' ramps over the whole signal range, made BT.2020 YUV by ffmpeg's scale filter.
        source = ("nullsrc=s=96x64:r=25,format=gbrp10le,geq=r='1023*X/W':g='1023*Y/H':b='1023*(0.3+0.5*sin(X/9))',"
                  f"scale=out_color_matrix=bt2020:out_range=tv,format={pix_fmt}")
        out[name] = str(root / name)
        ffmpeg("-f", "lavfi", "-i", source, "-frames:v", "2", "-c:v", "libx265", "-pix_fmt", pix_fmt,
               "-x265-params", f"log-level=error:{params}:colorprim=bt2020:transfer={transfer}:colormatrix=bt2020nc",
               "-color_primaries", "bt2020", "-color_trc", transfer, "-colorspace", "bt2020nc", "-color_range", "tv",
               out[name])
    return out


def _recipe_reference(path: str, width: int, height: int) -> np.ndarray:
    """ffmpeg's command line running the recipe (up to R'G'B'): (H, W, 3) levels, 0-255 floats."""
    import subprocess

    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-vf", RECIPE, "-frames:v", "1", "-f", "rawvideo", "-"],
                         capture_output=True, check=True).stdout
    planes = np.frombuffer(raw, np.float32).reshape(3, height, width)  # G, B, R
    return np.clip(np.stack([planes[2], planes[0], planes[1]], -1), 0, 1) * 255


@pytest.mark.parametrize("name", list(HDR_CASES))
def test_hdr_tone_mapped_as_ffmpeg_recipe(hdr_videos, name):
    """Tolerance: mean absolute difference and its 99th percentile, in 8-bit levels (a few
    pixels differ more: where the signal is near black, x ** (1 / 2.4) magnifies float rounding,
    and in 4:2:0 at sharp chroma edges libswscale and zimg upsample chroma differently)."""
    transfer, _, _, (mean_tol, p99_tol) = HDR_CASES[name]
    path = hdr_videos[name]
    assert video_stream_facts(path)["color_transfer"] == transfer
    with av.open(path) as container:
        frame = next(container.decode(video=0))
        ours = model_crop(frame, FrameGeometry(64, 64, 96), (96, 64)).astype(float)
    diff = np.abs(ours - _recipe_reference(path, 96, 64))
    assert diff.mean() < mean_tol and np.percentile(diff, 99) < p99_tol, (diff.mean(), np.percentile(diff, 99))
    # Not the SDR reading of the same codes: tone mapping changed the picture.
    plain = frame.reformat(format="rgb24").to_ndarray().astype(float)
    assert np.abs(plain - ours).mean() > 10
    decoder, _ = _uniform16(path, FrameGeometry(64, 64, 64))
    assert decoder.hdr == transfer


def test_hdr_formulas_against_published_values():
    """The recipe's steps against numbers the standards publish (independent of ffmpeg)."""
    # SMPTE ST 2084: 100, 1000 and 10000 cd/m^2 at these signal values (BT.2100 table / BT.2390).
    np.testing.assert_allclose(pq_eotf(np.array([0.0, 0.50807, 0.75183, 1.0])) * 10000,
                               [0, 100, 1000, 10000], rtol=2e-4, atol=1e-6)
    # BT.2100 HLG: E' = 0.5 is the reference white (1/12 of scene peak), E' = 1 the peak.
    np.testing.assert_allclose(hlg_inverse_oetf(np.array([0.0, 0.5, 1.0])), [0, 1 / 12, 1.0], rtol=1e-6)
    # ITU-R BT.2087 gives BT.2020 -> BT.709 (linear) to four decimals.
    np.testing.assert_allclose(BT2020_TO_BT709, [[1.6605, -0.5876, -0.0728], [-0.1246, 1.1329, -0.0083],
                                                 [-0.0182, -0.1006, 1.1187]], atol=1e-4)
    # Hable's curve (Uncharted 2): f(0) = 0, increasing, and the recipe maps the peak to 1.
    xs = np.linspace(0, 10, 101)
    assert hable(0.0) == pytest.approx(0, abs=1e-9) and np.all(np.diff(hable(xs)) > 0)


# ---------------------------------------------------------------------------------------------
# Damaged files: embedded from what decodes, and marked

DAMAGE_SOURCES = {  # name: encoder + muxer arguments (3 s at 25 fps, with audio)
    "cut.mkv": X264 + ["-c:a", "aac", "-f", "matroska"],
    "cut.webm": ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "12", "-c:a", "libopus",
                 "-f", "webm"],
    "cut_faststart.mp4": X264 + ["-c:a", "aac", "-movflags", "+faststart", "-f", "mp4"],
    "cut.mov": X264 + ["-c:a", "aac", "-movflags", "+faststart", "-f", "mov"],
    "garbage.ts": X264 + ["-c:a", "aac", "-f", "mpegts"],
    "garbage_long.ts": X264 + ["-c:a", "aac", "-f", "mpegts"],
    "garbage.mp4": X264 + ["-c:a", "aac", "-movflags", "+faststart", "-f", "mp4"],
    "garbage.mkv": X264 + ["-c:a", "aac", "-f", "matroska"],
    # Whole files that must not be marked: audio running 1 s past the video (the container's
    # duration is the audio's), in MP4 and Matroska.
    "long_audio.mp4": X264 + ["-c:a", "aac", "-f", "mp4"],
    "long_audio.mkv": X264 + ["-c:a", "aac", "-f", "matroska"],
}
DAMAGE_FPS, DAMAGE_FRAMES = 25, 75


def _damage(path: str, name: str) -> None:
    data = bytearray(open(path, "rb").read())
    if name.startswith("cut"):
        del data[len(data) // 2:]  # cut at half its length
    elif name.startswith("garbage"):
        rng = np.random.default_rng(1)
        start, size = int(len(data) * 0.45), (20000 if "long" in name else 3000)
        data[start:start + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def damaged_videos(tmp_path_factory) -> dict[str, dict]:
    require_ffmpeg()
    root = tmp_path_factory.mktemp("damage")
    out = {}
    for i, (name, args) in enumerate(DAMAGE_SOURCES.items()):
        whole = str(root / f"whole_{name}")
        audio_seconds = 4 if name.startswith("long_audio") else 3
        encode_coded(whole, width=128, height=96, fps=DAMAGE_FPS, num_frames=DAMAGE_FRAMES, args=args, seed=i,
                     input_args=["-f", "lavfi", "-i", f"sine=f=440:sample_rate=16000:d={audio_seconds}"])
        path = str(root / name)
        shutil.copy(whole, path)
        _damage(path, name)
        out[name] = {"path": path, "whole": whole}
    return out


@pytest.mark.parametrize("name", [n for n in DAMAGE_SOURCES if n.startswith("cut")])
def test_cut_file_embedded_from_what_decodes_and_marked(damaged_videos, name):
    path, whole = damaged_videos[name]["path"], damaged_videos[name]["whole"]
    assert not VideoDecoder(whole).damaged
    times = frame_times(path)  # what ffmpeg decodes of the cut file
    start, end = times[0], packet_end(path)
    header = float(video_stream_facts(path)["format"]["duration"])
    assert header > end - start + 1.0  # the header still promises the whole 3 s
    decoder, clip = _uniform16(path)
    assert decoder.damaged
    match = re.match(r"ends at ([\d.]+) s of a ([\d.]+) s header duration", decoder.damage_summary)
    assert match, decoder.damage_summary
    assert float(match.group(1)) == pytest.approx(end - start, abs=0.02)
    assert float(match.group(2)) == pytest.approx(DAMAGE_FRAMES / DAMAGE_FPS, abs=0.07)
    # The span and the plan are what decodes: the frame on screen at each target, by ffprobe's times.
    assert decoder.probe.duration_seconds == pytest.approx(end - start, abs=0.02)
    targets = [start + (i + 0.5) * (end - start) / 16 for i in range(16)]
    expected = [max(k for k, t in enumerate(times) if t <= target + 1e-6) for target in targets]
    assert clip.frame_indices == expected
    assert _codes(clip) == expected  # frame k of the cut file is frame k of the recording


@pytest.mark.parametrize("name", ["garbage.ts", "garbage_long.ts"])
def test_garbage_in_an_mpeg_ts_is_marked(damaged_videos, name):
    path = damaged_videos[name]["path"]
    assert decode_errors(path)  # ffmpeg itself reports the damage
    facts = video_stream_facts(path)
    with VideoDecoder(path) as decoder:  # every frame decoded: all the damage is met
        plans = decoder.plan(sampling="stride", num_frames=75, frame_stride=1, clips_per_video=1)
        (clip,) = list(decoder.clips(plans, CODE_GEOMETRY))
        summary = decoder.damage_summary
    assert decoder.damaged and summary
    lost = DAMAGE_FRAMES - facts["nb_read_packets"]  # frames whose packets the garbage took, by ffprobe
    if lost:  # the timestamps say how many are gone
        assert f"{lost} frame{'s' if lost > 1 else ''} missing from the timestamps" in summary, summary
    else:
        assert "decoded with errors" in summary or "reported by libavformat/libavcodec" in summary, summary
    assert decoder.stats.frames_decoded == facts["nb_read_frames"]
    # What is embedded is frames of the recording (a concealed frame may show another's code,
    # or none): each target got the frame on screen at its time, read back from the pixels.
    codes = []
    for frame in clip.pixels:
        try:
            codes.append(frame_number_from_rgb(frame))
        except ValueError:
            pass
    assert len(codes) > 40 and set(codes) <= set(range(DAMAGE_FRAMES))
    assert sum(a <= b for a, b in zip(codes, codes[1:])) >= len(codes) - 3
    if name == "garbage_long.ts":
        assert lost > 0  # this one loses whole frames


def test_undecodable_packets_are_counted(damaged_videos):
    path = damaged_videos["garbage.mp4"]["path"]
    facts = video_stream_facts(path)
    refused = facts["nb_read_packets"] - facts["nb_read_frames"]  # packets that gave ffmpeg no frame
    assert refused > 0
    with VideoDecoder(path) as decoder:
        plans = decoder.plan(sampling="stride", num_frames=75, frame_stride=1, clips_per_video=1)
        (clip,) = list(decoder.clips(plans, CODE_GEOMETRY))
        summary = decoder.damage_summary
    assert f"{refused} undecodable packets" in summary, summary
    assert decoder.stats.frames_decoded == facts["nb_read_frames"]  # every frame that decodes, and only those


def test_garbage_in_matroska_is_marked(damaged_videos):
    path = damaged_videos["garbage.mkv"]["path"]
    assert decode_errors(path)
    decoder, clip = _uniform16(path)
    assert decoder.damaged and "reported by libavformat/libavcodec" in decoder.damage_summary
    assert _codes(clip) == sorted(_codes(clip))


def test_whole_files_are_not_marked(damaged_videos, raw_streams, restarts, colour_videos, hdr_videos):
    """No false alarm: every whole file made here, the shared media and the cases."""
    paths = [v["whole"] for v in damaged_videos.values()] + [damaged_videos[n]["path"] for n in damaged_videos
                                                             if n.startswith("long_audio")]
    paths += list(raw_streams.values()) + list(restarts.values()) + list(colour_videos.values())
    paths += list(hdr_videos.values())
    if os.path.isdir(require_shared_media()):
        paths += [m.path for m in SHARED_FILES if m.expect_error is None]
        paths += [c.path for c in CASE_FILES.values() if c.expect_error is None and os.path.exists(c.path)]
    for path in paths:
        decoder, _ = _uniform16(path, FrameGeometry(64, 64, 64))
        assert not decoder.damaged, (path, decoder.damage_summary)
        assert not decode_errors(path), path  # and ffmpeg agrees they are whole


def test_damage_is_the_same_through_a_file_object(damaged_videos):
    path = damaged_videos["cut.mkv"]["path"]
    by_path, _ = _uniform16(path)
    with open(path, "rb") as f:
        by_file, _ = _uniform16(f)
    assert by_file.damage_summary == by_path.damage_summary


def test_frame_rate_fraction_of_raw_stream_is_the_streams_own(raw_streams):
    # 24 fps stream: every clip time is a multiple of 1/24 s (no 1/25 s clock anywhere).
    decoder, clip = _uniform16(raw_streams["drone.h264"])
    assert Fraction(clip.start_seconds).limit_denominator(1000) * 24 == clip.frame_indices[0]


# ---------------------------------------------------------------------------------------------
# The facts on rows, --on-damage, and a job over every kind

def _decode_rows(path: str, on_damage: str) -> list[dict]:
    import pyarrow as pa

    from vmae_ray.decoding import DecodeLimits
    from vmae_ray.stages import DecodeParams, decode_video

    params = DecodeParams(sampling="uniform", num_frames=16, frame_stride=4, clips_per_video=1,
                          geometry=FrameGeometry(64, 64, 64), limits=DecodeLimits(), isolate=False,
                          on_damage=on_damage)
    item = {"video_id": os.path.basename(path), "uri": path, "size_bytes": os.path.getsize(path)}
    return pa.concat_tables(list(decode_video(item, params, StorageOptions()))).to_pylist()


def test_rows_carry_damage_and_hdr_and_on_damage_error_makes_an_error_row(damaged_videos, hdr_videos):
    cut = damaged_videos["cut.mkv"]["path"]
    rows = _decode_rows(cut, "embed")
    assert [r["kind"] for r in rows] == ["clip"] and rows[0]["damaged"] is True
    with VideoDecoder(cut) as decoder:  # what the decoder met after decoding the clip
        list(decoder.clips(decoder.plan(sampling="uniform", num_frames=16, frame_stride=4, clips_per_video=1),
                           FrameGeometry(64, 64, 64)))
        assert rows[0]["damage"] == decoder.damage_summary and rows[0]["damage"].startswith("ends at 1.")
    (row,) = _decode_rows(cut, "error")
    assert (row["kind"], row["stage"], row["error_type"]) == ("error", "decode", "damaged")
    assert row["message"].startswith("damaged (--on-damage error): ends at")
    whole = _decode_rows(damaged_videos["cut.mkv"]["whole"], "error")
    assert [(r["kind"], r["damaged"], r["damage"], r["hdr"]) for r in whole] == [("clip", False, None, None)]
    for name, (transfer, *_) in HDR_CASES.items():
        assert _decode_rows(hdr_videos[name], "embed")[0]["hdr"] == transfer


def test_on_damage_flag_is_validated():
    from vmae_ray.cli import config_from_args

    base = ["--input", "in", "--output", "out"]
    assert config_from_args(base).on_damage == "embed"
    assert config_from_args(base + ["--on-damage", "error"]).on_damage == "error"
    with pytest.raises(SystemExit) as info:
        config_from_args(base + ["--on-damage", "skip"])
    assert info.value.code == 2


def test_job_over_every_kind(ray_session, tiny_classifier, raw_streams, restarts, damaged_videos, hdr_videos,
                             colour_videos, tmp_path):
    """One embed run: every kind is listed, decoded and embedded; videos/ says which were damaged
    and which HDR; the report counts the damaged videos."""
    import pyarrow.parquet as pq

    from vmae_ray.cli import config_from_args
    from vmae_ray.cli import main as cli_main
    from vmae_ray.pipeline import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    chosen = {"drone.h264": raw_streams["drone.h264"], "broadcast.hevc": raw_streams["broadcast.hevc"],
              "joined.ts": restarts["joined.ts"], "cut.mkv": damaged_videos["cut.mkv"]["path"],
              "cut_faststart.mp4": damaged_videos["cut_faststart.mp4"]["path"],
              "whole.mkv": damaged_videos["cut.mkv"]["whole"], "pq.mkv": hdr_videos["pq_444.mkv"],
              "hd_untagged.mp4": colour_videos["hd_720p_untagged"]}
    for name, path in chosen.items():
        shutil.copy(path, corpus / name)
    out = tmp_path / "out"
    run(config_from_args(["--input", str(corpus), "--output", str(out), "--model", tiny_classifier]))
    videos = pq.read_table(out / "videos").to_pylist()
    by_name = {os.path.basename(v["uri"]): v for v in videos}
    assert sorted(by_name) == sorted(chosen)
    assert not os.path.exists(out / "errors") or pq.read_table(out / "errors").num_rows == 0
    assert {n for n, v in by_name.items() if v["damaged"]} == {"cut.mkv", "cut_faststart.mp4"}
    assert by_name["cut.mkv"]["damage"].startswith("ends at") and by_name["whole.mkv"]["damage"] is None
    assert {n: v["hdr"] for n, v in by_name.items() if v["hdr"]} == {"pq.mkv": "smpte2084"}
    assert by_name["drone.h264"]["fps"] == 24 and by_name["drone.h264"]["duration_seconds"] == pytest.approx(2.0)
    assert by_name["joined.ts"]["duration_seconds"] == pytest.approx(3.0)
    page = tmp_path / "report.html"
    assert cli_main(["report", "--tables", str(out), "--output", str(page)]) == 0
    assert 'data-damaged-count="2"' in page.read_text(encoding="utf-8")
