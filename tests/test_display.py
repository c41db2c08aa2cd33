"""Geometry as displayed: display matrix (quarter turns, mirrors), sample aspect ratio, frame sizes.

References, each independent of `vmae_ray.decoding`:
- ffmpeg's own rules for showing a frame (fftools/ffmpeg_filter.c: the transpose/hflip/vflip
  filters it inserts from the frame's display matrix), run through libavfilter (`ffmpeg_shown`);
- what the recipe drew (`synthetic.make_displayed_video`: frame codes and red/blue/green markers
  on the picture as displayed) and the right values of ../shared/media/cases/README.md;
- transformers' VideoMAEImageProcessorPil applied to each frame as displayed (ffmpeg's rotation,
  then a PIL resize to the displayed size for the sample aspect ratio), with the tolerance
  tests/test_parity.py states: mean absolute difference under 3 levels, 99th percentile under 20.
  Parity runs on the cases' files and on real footage stored with each display geometry
  (remuxed); the synthetic variants are checked exactly instead (codes and markers): on their
  hard-edged stripes two resize kernels alone can differ by more than that tolerance, with or
  without a display matrix (measured 4.06 vs 4.05 levels on one seed).
"""

from __future__ import annotations

import itertools
import math
import os
from fractions import Fraction

import av
import av.filter
import numpy as np
import pytest
from av.sidedata.sidedata import Type as SideDataType

from tests.conftest import CASE_FILES, case_file, uniform_indices
from vmae_ray.config import ConfigError, EmbedConfig
from vmae_ray.decoding import DecodeError, DisplayTransform, FrameGeometry, VideoDecoder, display_transform_of
from vmae_ray.synthetic import (
    MARKER_FRACTION,
    frame_number_from_rgb,
    make_audio_only,
    make_displayed_video,
    make_resolution_change_video,
    make_video,
    remux_with_display_geometry,
)

needs_display_matrix_writer = pytest.mark.skipif(
    not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
    reason="writing a display matrix needs PyAV >= 18 (VideoStream.set_display_rotation)")

NUM_FRAMES = 40


# ---------------------------------------------------------------------------------------------
# References


def ffmpeg_shown(frame: av.VideoFrame) -> np.ndarray:
    """The RGB picture ffmpeg's command line makes of a decoded frame (its autorotate).

    fftools/ffmpeg_filter.c: theta = -round(av_display_rotation_get(matrix)) in [0, 360); 90:
    transpose "cclock_flip" if matrix[3] > 0 else "clock"; 180: hflip if matrix[0] < 0, vflip if
    matrix[4] < 0; 270: transpose "clock_flip" if matrix[3] < 0 else "cclock"; 0: vflip if
    matrix[4] < 0. ``frame.rotation`` is libavutil's av_display_rotation_get.
    """
    rgb = frame.reformat(format="rgb24")
    side_data = frame.side_data.get(SideDataType.DISPLAYMATRIX)
    if side_data is None:
        return rgb.to_ndarray()
    m = np.frombuffer(bytes(side_data), dtype=np.int32)
    theta = -round(frame.rotation)
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    chain = []
    if abs(theta - 90) < 1:
        chain = [("transpose", "cclock_flip" if m[3] > 0 else "clock")]
    elif abs(theta - 180) < 1:
        chain = ([("hflip", None)] if m[0] < 0 else []) + ([("vflip", None)] if m[4] < 0 else [])
    elif abs(theta - 270) < 1:
        chain = [("transpose", "clock_flip" if m[3] < 0 else "cclock")]
    elif abs(theta) < 1 and m[4] < 0:
        chain = [("vflip", None)]
    if not chain:
        return rgb.to_ndarray()
    graph = av.filter.Graph()
    last = graph.add_buffer(width=rgb.width, height=rgb.height, format="rgb24", time_base=Fraction(1, 30))
    for name, arg in chain:
        node = graph.add(name, arg) if arg else graph.add(name)
        last.link_to(node)
        last = node
    sink = graph.add("buffersink")
    last.link_to(sink)
    graph.configure()
    rgb.pts = 0
    graph.push(rgb)
    return graph.pull().to_ndarray()


def displayed_frames(path: str, indices: list[int], size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Frames by presentation index as ffmpeg shows them, resized with PIL to ``size`` (the
    displayed size a sample aspect ratio gives) where that differs; decoded independently."""
    from PIL import Image

    wanted, frames = set(indices), {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                shown = ffmpeg_shown(frame)
                if size is not None and (shown.shape[1], shown.shape[0]) != size:
                    shown = np.asarray(Image.fromarray(shown).resize(size, Image.BILINEAR))
                frames[i] = shown
    return [frames[i] for i in indices]


def processor_levels(processor, frames: list[np.ndarray]) -> np.ndarray:
    """transformers' pixel values for a clip, back in 0..255 levels, as (T, H, W, 3)."""
    pixel_values = processor([frames], return_tensors="np")["pixel_values"][0]  # (T, C, H, W)
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    return (pixel_values.transpose(0, 2, 3, 1) * std + mean) * 255.0


def assert_parity(ours: np.ndarray, reference: np.ndarray, what: str) -> float:
    assert ours.shape == reference.shape, what
    diff = np.abs(ours.astype(np.float64) - reference)
    assert diff.mean() < 3.0, (what, diff.mean())
    assert np.percentile(diff, 99) < 20, (what, np.percentile(diff, 99))
    return float(diff.mean())


def marker_colors(rgb: np.ndarray) -> tuple[str, str, str]:
    """The colour of the top band, the bottom band and the top-left corner of a picture."""
    height = rgb.shape[0]
    band = max(1, int(MARKER_FRACTION * height / 2))
    names = {0: "red", 1: "green", 2: "blue"}

    def colour(region):
        mean = region.reshape(-1, 3).mean(0)
        return names[int(mean.argmax())] if mean.max() > 180 and np.sort(mean)[1] < 80 else "mixed"

    width = rgb.shape[1]
    return (colour(rgb[:band, width // 3: 2 * width // 3]), colour(rgb[-band:, width // 3: 2 * width // 3]),
            colour(rgb[:band, :band]))


# ---------------------------------------------------------------------------------------------
# The display matrix, against ffmpeg


@needs_display_matrix_writer
def test_every_display_matrix_is_shown_as_ffmpeg_shows_it(tmp_path):
    """The 16 matrices of rotate (0/90/180/270) x hflip x vflip (libavutil's
    av_display_rotation_set + av_display_matrix_flip): pixel for pixel ffmpeg's picture."""
    picture = (np.arange(24 * 40 * 3).reshape(24, 40, 3) * 7 % 251).astype(np.uint8)  # no symmetry
    seen = set()
    for degrees, hflip, vflip in itertools.product((0, 90, 180, 270), (False, True), (False, True)):
        path = str(tmp_path / f"m_{degrees}_{hflip}_{vflip}.mp4")
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = 40, 24, "yuv444p"
            stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv444p")
            frame.pts = 0
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                container.mux(packet)
        with av.open(path) as container:
            decoded = next(container.decode(video=0))
        transform = display_transform_of(decoded)
        ours = transform.apply(decoded.to_ndarray(format="rgb24"))
        assert np.array_equal(ours, ffmpeg_shown(decoded)), (degrees, hflip, vflip, transform)
        seen.add(transform)
    assert len(seen) == 8  # the eight orientations, each reached


def test_display_transform_of_raw_matrices():
    one = 1 << 16
    assert DisplayTransform.from_display_matrix([one, 0, 0, 0, one, 0, 0, 0, 1 << 30]) == DisplayTransform(0, False)
    # c01's matrix (a phone held upright): rotate 90 counterclockwise.
    assert DisplayTransform.from_display_matrix([0, -one, 0, one, 0, 0, 0, 0, 1 << 30]) == DisplayTransform(90, False)
    assert DisplayTransform.from_display_matrix([-one, 0, 0, 0, one, 0, 0, 0, 1 << 30]) == DisplayTransform(0, True)
    assert DisplayTransform.from_display_matrix([0] * 9) == DisplayTransform(0, False)  # singular: ignored
    # 30 degrees (no camera writes it) snaps to the nearest quarter turn.
    c, s = int(one * math.cos(math.pi / 6)), int(one * math.sin(math.pi / 6))
    assert DisplayTransform.from_display_matrix([c, -s, 0, s, c, 0, 0, 0, 1 << 30]) == DisplayTransform(0, False)


# ---------------------------------------------------------------------------------------------
# Generated variants of each kind

# name: (recipe, expected (rotation_degrees, hflip), displayed (width, height), sample aspect ratio)
DISPLAY_VARIANTS = {
    "rot90.mp4": (dict(display_width=144, display_height=256, rotation_degrees=90), (90, False), Fraction(1)),
    "rot180.mkv": (dict(display_width=256, display_height=144, rotation_degrees=180), (180, False), Fraction(1)),
    "rot270.mov": (dict(display_width=144, display_height=256, rotation_degrees=270), (270, False), Fraction(1)),
    "hflip.mp4": (dict(display_width=256, display_height=144, hflip=True), (0, True), Fraction(1)),
    "rot90_vflip_vp9.webm": (dict(display_width=144, display_height=256, rotation_degrees=90, vflip=True,
                                  codec="libvpx-vp9"), (90, True), Fraction(1)),
    "sar_8_9.mp4": (dict(display_width=192, display_height=144, sample_aspect_ratio=Fraction(8, 9)), (0, False),
                    Fraction(8, 9)),
    "sar_4_3_rot270.mkv": (dict(display_width=144, display_height=256, rotation_degrees=270,
                                sample_aspect_ratio=Fraction(4, 3)), (270, False), Fraction(4, 3)),
}
RESOLUTION_CHANGE = dict(sizes=((480, 270), (320, 240)), frames_per_size=20, start_seconds=3.0)


@pytest.fixture(scope="module")
def display_variants(tmp_path_factory) -> dict[str, str]:
    """The variants, each checked before use: the stored size and sample aspect ratio a probe
    reports, and the picture ffmpeg shows (markers where the recipe drew them, codes readable)."""
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("writing a display matrix needs PyAV >= 18 (VideoStream.set_display_rotation)")
    root = tmp_path_factory.mktemp("display")
    out = {}
    for seed, (name, (recipe, _, sar)) in enumerate(DISPLAY_VARIANTS.items()):
        path = make_displayed_video(str(root / name), num_frames=NUM_FRAMES, gop_size=20, seed=seed, **recipe)
        size = (recipe["display_width"], recipe["display_height"])
        with av.open(path) as container:
            stream = container.streams.video[0]
            assert (stream.sample_aspect_ratio or Fraction(1)) == sar, name
            frames = list(container.decode(stream))
        assert len(frames) == NUM_FRAMES
        for k in (0, NUM_FRAMES - 1):
            shown = ffmpeg_shown(frames[k])
            # Players widen (sar > 1) or heighten (sar < 1) the stored pixels: area x max(sar, 1/sar).
            assert shown.shape[0] * shown.shape[1] * max(sar, 1 / sar) == size[0] * size[1], name
            if sar != 1:
                shown = displayed_frames(path, [k], size)[0]
            assert marker_colors(shown) == ("red", "blue", "green"), name
            assert frame_number_from_rgb(shown) == k
        out[name] = path
    path = make_resolution_change_video(str(root / "res_down.ts"), **RESOLUTION_CHANGE)
    with av.open(path) as container:
        sizes = [(f.width, f.height) for f in container.decode(video=0)]
    assert sizes == [(480, 270)] * 20 + [(320, 240)] * 20
    out["res_down.ts"] = path
    return out


def _whole_picture_geometry(width: int, height: int, short: int = 72) -> FrameGeometry:
    """A geometry whose crop is the whole resized picture (so the markers stay in)."""
    g = FrameGeometry(short, 1, 1)
    w, h = g.resized_size(width, height)
    return FrameGeometry(short, h, w)


@pytest.mark.parametrize("name", list(DISPLAY_VARIANTS))
def test_variant_is_decoded_as_displayed(display_variants, name):
    recipe, (rotation, hflip), sar = DISPLAY_VARIANTS[name]
    size = (recipe["display_width"], recipe["display_height"])
    with VideoDecoder(display_variants[name]) as decoder:
        width, height, display, shown_sar = decoder.shown()
        assert (width, height) == size
        assert (display.rotation_degrees, display.hflip, shown_sar) == (rotation, hflip, sar)
        plans = decoder.plan(sampling="uniform", num_frames=16, frame_stride=1, clips_per_video=1)
        (clip,) = decoder.clips(plans, _whole_picture_geometry(*size))
    assert clip.frame_indices == uniform_indices(NUM_FRAMES, 16)
    for k, frame in zip(clip.frame_indices, clip.pixels):
        assert marker_colors(frame) == ("red", "blue", "green"), (name, k)
        assert frame_number_from_rgb(frame) == k


def test_stored_geometry_keeps_the_stored_picture(display_variants):
    """--geometry stored: the picture as stored (sideways here), the old behaviour."""
    path = display_variants["rot90.mp4"]
    with VideoDecoder(path) as decoder:
        assert decoder.shown(apply_display=False) == (256, 144, DisplayTransform(), Fraction(1))
        plans = decoder.plan(sampling="uniform", num_frames=4, frame_stride=1, clips_per_video=1)
        # 256x144 stored -> 128x72, the whole picture.
        (clip,) = decoder.clips(plans, FrameGeometry(72, 72, 128, apply_display=False))
    assert clip.pixels.shape == (4, 72, 128, 3)
    for frame in clip.pixels:
        assert marker_colors(frame) != ("red", "blue", "green")
        assert marker_colors(np.rot90(frame)) == ("red", "blue", "green")  # turned as the matrix says


# ---------------------------------------------------------------------------------------------
# Parity with transformers on the picture as displayed

SHARED_GEOMETRY_CASES = ["c01_phone_portrait_rot90.mp4", "c13_anamorphic_sar.mp4", "c05_resolution_change.ts"]
# Real footage (../shared/media/nasa_13013.mp4, its 480x270 stream) stored as a phone or an
# anamorphic capture would store it: the same coded pictures with a display matrix and/or a
# sample aspect ratio (remuxed, not re-encoded). name: (recipe, displayed (width, height)).
REAL_VARIANTS = {
    "nasa_rot90.mp4": (dict(rotation_degrees=90), (270, 480)),
    "nasa_rot180.mov": (dict(rotation_degrees=180), (480, 270)),
    "nasa_rot270_hflip.mp4": (dict(rotation_degrees=270, hflip=True), (270, 480)),
    "nasa_hflip.mkv": (dict(hflip=True), (480, 270)),
    "nasa_sar_4_3.mp4": (dict(sample_aspect_ratio=Fraction(4, 3)), (640, 270)),
    "nasa_sar_8_9_rot270.mp4": (dict(sample_aspect_ratio=Fraction(8, 9), rotation_degrees=270), (304, 480)),
}


@pytest.fixture(scope="module")
def real_variants(shared_media, tmp_path_factory) -> dict[str, str]:
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("writing a display matrix needs PyAV >= 18 (VideoStream.set_display_rotation)")
    root = tmp_path_factory.mktemp("real_display")
    source = os.path.join(shared_media, "nasa_13013.mp4")
    out = {}
    for name, (recipe, size) in REAL_VARIANTS.items():
        path = remux_with_display_geometry(source, str(root / name), max_frames=60, **recipe)
        with av.open(path) as container:  # checked before use: what ffmpeg shows
            frame = next(container.decode(video=0))
            shown = ffmpeg_shown(frame)
            sar = container.streams.video[0].sample_aspect_ratio or Fraction(1)
        assert sar == recipe.get("sample_aspect_ratio", 1), name
        # Players widen (sar > 1) or heighten (sar < 1) the stored pixels (rounded to whole pixels).
        area = shown.shape[0] * shown.shape[1] * max(sar, 1 / sar)
        assert float(area) == pytest.approx(size[0] * size[1], rel=0.01), name
        out[name] = path
    return out


@pytest.fixture(scope="module")
def processor(classifier_dir):
    from transformers import VideoMAEImageProcessorPil

    return VideoMAEImageProcessorPil.from_pretrained(classifier_dir)


@pytest.fixture(scope="module")
def model_geometry(classifier_dir) -> FrameGeometry:
    from vmae_ray.checkpoint import load_model_spec

    spec = load_model_spec(classifier_dir)
    return FrameGeometry(spec.resize_shortest_edge, spec.crop_height, spec.crop_width, "BILINEAR")


def _geometry_case(name: str, request) -> tuple[str, tuple[int, int] | None]:
    """(path, displayed size for the reference's sample-aspect-ratio resize, or None)."""
    if name in CASE_FILES:
        case = case_file(name)
        return case.path, case.displayed_size if name == "c13_anamorphic_sar.mp4" else None
    if name in REAL_VARIANTS:
        recipe, size = REAL_VARIANTS[name]
        return request.getfixturevalue("real_variants")[name], size if "sample_aspect_ratio" in recipe else None
    return request.getfixturevalue("display_variants")[name], None


@pytest.mark.parametrize("name", SHARED_GEOMETRY_CASES + list(REAL_VARIANTS) + ["res_down.ts"])
def test_pixels_match_transformers_on_the_displayed_frame(name, request, processor, model_geometry):
    path, size = _geometry_case(name, request)
    with VideoDecoder(path) as decoder:
        # Dense stride sampling: every other frame across the clip, so a resolution change is inside.
        plans = decoder.plan(sampling="stride", num_frames=16, frame_stride=2, clips_per_video=1)
        (clip,) = decoder.clips(plans, model_geometry)
    frames = displayed_frames(path, clip.frame_indices, size)
    assert_parity(clip.pixels, processor_levels(processor, frames), name)
    if "res" in name:
        sizes = {f.shape[:2] for f in frames}
        assert len(sizes) == 2, f"the clip should span the resolution change: {sizes}"


@pytest.mark.parametrize("name", ["c05_resolution_change.ts", "res_down.ts"])
def test_each_frame_is_resized_from_its_own_size(name, request, processor, model_geometry):
    """The check above can fail: squashing later frames to the first frame's aspect ratio (what
    the decoder did before) is far outside the tolerance."""
    from PIL import Image

    path, _ = _geometry_case(name, request)
    with VideoDecoder(path) as decoder:
        plans = decoder.plan(sampling="stride", num_frames=16, frame_stride=2, clips_per_video=1)
        (clip,) = decoder.clips(plans, model_geometry)
    frames = displayed_frames(path, clip.frame_indices)
    first = frames[0].shape[:2]
    squashed = [f if f.shape[:2] == first else np.asarray(Image.fromarray(f).resize((first[1], first[0]),
                                                                                    Image.BILINEAR))
                for f in frames]
    changed = [i for i, f in enumerate(frames) if f.shape[:2] != first]
    reference = processor_levels(processor, squashed)
    diff = np.abs(clip.pixels[changed].astype(np.float64) - reference[changed]).mean()
    assert diff > 10, diff


def test_stored_geometry_matches_transformers_on_the_stored_frame(processor, model_geometry):
    case = case_file("c01_phone_portrait_rot90.mp4")
    stored = FrameGeometry(model_geometry.resize_shortest_edge, model_geometry.crop_height,
                           model_geometry.crop_width, "BILINEAR", apply_display=False)
    with VideoDecoder(case.path) as decoder:
        plans = decoder.plan(sampling="uniform", num_frames=8, frame_stride=1, clips_per_video=1)
        (clip,) = decoder.clips(plans, stored)
    with VideoDecoder(case.path) as decoder:
        (shown,) = decoder.clips(plans, model_geometry)
    with av.open(case.path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert_parity(clip.pixels, processor_levels(processor, [frames[i] for i in clip.frame_indices]), "stored")
    assert np.abs(clip.pixels.astype(int) - shown.pixels.astype(int)).mean() > 10  # the modes differ


# ---------------------------------------------------------------------------------------------
# Stream choice: cover art is not video


def test_cover_art_is_never_chosen(tmp_path):
    song = make_audio_only(str(tmp_path / "song.mp3"), seconds=1.0, cover_art=True)
    with av.open(song) as container:  # the file as a music player stores it
        (picture,) = container.streams.video
        assert int(picture.disposition) & int(av.stream.Disposition.attached_pic)
    with pytest.raises(DecodeError) as info:
        VideoDecoder(song)
    assert info.value.error_type == "no_video_stream" and "still picture" in info.value.message

    video = make_video(str(tmp_path / "with_thumbnail.mp4"), width=96, height=64, num_frames=20, cover_art=True,
                       audio=True)
    with av.open(video) as container:
        assert len(container.streams.video) == 2
    with VideoDecoder(video) as decoder:
        assert (decoder.probe.stream_index, decoder.probe.num_video_streams) == (0, 1)
        assert decoder.probe.duration_seconds == pytest.approx(20 / 30)


# ---------------------------------------------------------------------------------------------
# The flag


def test_geometry_flag(tiny_classifier):
    from vmae_ray.checkpoint import load_model_spec
    from vmae_ray.cli import config_from_args
    from vmae_ray.planning import decode_params, settings_fingerprint

    spec = load_model_spec(tiny_classifier)
    base = ["--input", "in", "--output", "out", "--model", tiny_classifier]
    displayed, stored = config_from_args(base), config_from_args(base + ["--geometry", "stored"])
    assert displayed.geometry == "displayed" and stored.geometry == "stored"
    assert decode_params(displayed, spec, 8).geometry.apply_display is True
    assert decode_params(stored, spec, 8).geometry.apply_display is False
    # Rows of different geometry are never mixed: the settings differ.
    assert settings_fingerprint(displayed, spec, 8, True) != settings_fingerprint(stored, spec, 8, True)
    with pytest.raises(ConfigError, match="--geometry"):
        EmbedConfig(input="in", output="out", geometry="rotated").validate()
    with pytest.raises(SystemExit) as info:
        config_from_args(base + ["--geometry", "sideways"])
    assert info.value.code == 2
