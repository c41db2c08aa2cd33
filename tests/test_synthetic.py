"""The synthetic media generators: what they promise is what the other tests rely on.

Media here are tiny (<= 160x120, <= 48 frames) so the whole file runs in a few seconds.
"""

import os
import time

import av
import numpy as np
import pytest

from vmae_ray.synthetic import (
    CODE_PERIOD,
    HUGE_HEIGHT,
    HUGE_WIDTH,
    frame_number_from_rgb,
    make_audio_only,
    make_hostile_corpus,
    make_huge_dims_video,
    make_video,
)


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:  # noqa: BLE001 - any lookup failure means "not in this FFmpeg build"
        return False


def _decode(path):
    with av.open(path) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        frames = list(container.decode(stream))
    return codec, frames


def _center_square(rgb: np.ndarray, fraction: float = 1.0) -> np.ndarray:
    height, width = rgb.shape[:2]
    side = int(min(height, width) * fraction)
    top, left = (height - side) // 2, (width - side) // 2
    return rgb[top : top + side, left : left + side]


# name, make_video kwargs, expected decoder name
VARIANTS = [
    ("h264.mp4", dict(codec="h264", width=160, height=120, fps=30, num_frames=36, gop_size=12), "h264"),
    ("vp9.webm", dict(codec="libvpx-vp9", width=128, height=96, fps=12, num_frames=24, gop_size=12), "vp9"),
    ("h264.mkv", dict(codec="h264", width=96, height=64, fps=25, num_frames=20, gop_size=10), "h264"),
    ("mpeg4.avi", dict(codec="mpeg4", width=96, height=128, fps=24, num_frames=24, gop_size=8), "mpeg4"),
    ("hevc10.mp4", dict(codec="hevc", width=128, height=96, fps=30, num_frames=16, gop_size=8,
                        pix_fmt="yuv420p10le"), "hevc"),
]


@pytest.mark.parametrize("name,kwargs,decoder", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_make_video_round_trip(tmp_path, name, kwargs, decoder):
    encoder = {"h264": "libx264", "hevc": "libx265"}.get(kwargs["codec"], kwargs["codec"])
    if not _has_encoder(encoder):
        pytest.skip(f"encoder {encoder} not in this FFmpeg build")
    path = make_video(str(tmp_path / name), seed=3, **kwargs)
    assert path == str(tmp_path / name) and os.path.getsize(path) > 0
    codec, frames = _decode(path)
    assert codec == decoder
    assert len(frames) == kwargs["num_frames"]
    assert {(f.width, f.height, f.format.name) for f in frames} == {
        (kwargs["width"], kwargs["height"], kwargs.get("pix_fmt", "yuv420p"))
    }
    # Every frame reads back as its own index at full size...
    assert [frame_number_from_rgb(f.to_ndarray(format="rgb24")) for f in frames] == list(range(len(frames)))
    # ...and after a libswscale downscale (1/4 where that leaves >= 24 px on the short side,
    # else 1/2) and a center crop to the short side or to 80% of it.
    div = 4 if min(kwargs["width"], kwargs["height"]) // 4 >= 24 else 2
    for k, frame in enumerate(frames):
        small = frame.reformat(width=frame.width // div, height=frame.height // div, format="rgb24").to_ndarray()
        assert frame_number_from_rgb(small) == k
        assert frame_number_from_rgb(_center_square(small)) == k
        assert frame_number_from_rgb(_center_square(small, 0.8)) == k


def test_quarter_size_with_other_scalers(tmp_path):
    path = make_video(str(tmp_path / "q.mp4"), width=160, height=120, num_frames=12, gop_size=6, seed=5)
    _, frames = _decode(path)
    for k, frame in enumerate(frames):
        for interpolation in ("AREA", "BICUBIC", "POINT"):
            small = frame.reformat(width=40, height=30, format="rgb24", interpolation=interpolation).to_ndarray()
            assert frame_number_from_rgb(_center_square(small)) == k, interpolation
        # The VideoMAE path: shortest edge -> 40, center crop 32x32 (crop smaller than the short side).
        resized = frame.reformat(width=53, height=40, format="rgb24").to_ndarray()
        assert frame_number_from_rgb(_center_square(resized, 0.8)) == k
        # Normalised float input reads the same.
        assert frame_number_from_rgb(resized.astype(np.float32) / 255.0) == k


def test_frames_move_and_seed_changes_the_background(tmp_path):
    a = make_video(str(tmp_path / "a.mp4"), width=96, height=64, num_frames=6, seed=0)
    b = make_video(str(tmp_path / "b.mp4"), width=96, height=64, num_frames=6, seed=1)
    fa = [f.to_ndarray(format="rgb24").astype(int) for f in _decode(a)[1]]
    fb = [f.to_ndarray(format="rgb24").astype(int) for f in _decode(b)[1]]
    # The background outside the code moves from frame to frame (left column band).
    assert np.abs(fa[0][:, :10] - fa[3][:, :10]).mean() > 5
    assert np.abs(fa[0][:, :10] - fb[0][:, :10]).mean() > 5
    assert [frame_number_from_rgb(f) for f in fb] == list(range(6))


def test_cfr_pts_are_uniform(tmp_path):
    path = make_video(str(tmp_path / "cfr.mkv"), width=96, height=64, fps=25, num_frames=20, gop_size=10)
    _, frames = _decode(path)
    times = np.array([f.time for f in frames])
    assert np.allclose(np.diff(times), 1 / 25, atol=1.5e-3)  # mkv stores milliseconds


@pytest.mark.parametrize("ext", [".mkv", ".mp4"])
def test_vfr_has_irregular_pts(tmp_path, ext):
    path = make_video(str(tmp_path / f"vfr{ext}"), width=128, height=72, num_frames=40, gop_size=20, vfr=True, seed=1)
    _, frames = _decode(path)
    assert len(frames) == 40
    deltas_ms = np.round(np.diff([f.time for f in frames]) * 1000).astype(int)
    assert set(deltas_ms.tolist()) == {20, 33, 60}
    assert [frame_number_from_rgb(f.to_ndarray(format="rgb24")) for f in frames] == list(range(40))
    # Same seed -> same timeline (tests may compute expected timestamps by regenerating).
    again = make_video(str(tmp_path / f"vfr_again{ext}"), width=128, height=72, num_frames=40, gop_size=20,
                       vfr=True, seed=1)
    assert [f.time for f in _decode(again)[1]] == [f.time for f in frames]


@pytest.mark.parametrize("ext,audio_codec", [(".mp4", "aac"), (".webm", "opus"), (".avi", "pcm_s16le")])
def test_audio_stream(tmp_path, ext, audio_codec):
    codec = "libvpx-vp9" if ext == ".webm" else "h264"
    path = make_video(str(tmp_path / f"av{ext}"), codec=codec, width=64, height=48, fps=20, num_frames=20,
                      gop_size=10, audio=True)
    with av.open(path) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        assert container.streams.audio[0].codec_context.name == audio_codec
        samples = sum(f.samples for f in container.decode(audio=0))
        rate = container.streams.audio[0].sample_rate
    assert samples / rate == pytest.approx(1.0, abs=0.1)
    _, frames = _decode(path)
    assert [frame_number_from_rgb(f.to_ndarray(format="rgb24")) for f in frames] == list(range(20))


def test_frame_number_rejects_pictures_without_a_code():
    rng = np.random.default_rng(0)
    for image in [np.zeros((48, 64, 3), np.uint8), np.full((48, 64, 3), 255, np.uint8),
                  rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)]:
        with pytest.raises(ValueError):
            frame_number_from_rgb(image)
    with pytest.raises(ValueError):
        frame_number_from_rgb(np.zeros((4, 4, 4, 3), np.uint8))
    assert CODE_PERIOD == 4096


@pytest.mark.parametrize("ext", [".mp3", ".m4a"])
def test_audio_only(tmp_path, ext):
    path = make_audio_only(str(tmp_path / f"tone{ext}"), seconds=1.5)
    with av.open(path) as container:
        assert len(container.streams.video) == 0
        assert len(container.streams.audio) == 1
        assert container.duration / av.time_base == pytest.approx(1.5, abs=0.15)


def test_huge_dims_header(tmp_path):
    path = make_huge_dims_video(str(tmp_path / "huge.mkv"))
    assert os.path.getsize(path) < 200_000
    start = time.perf_counter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (HUGE_WIDTH, HUGE_HEIGHT)
        assert (stream.width, stream.height) == (HUGE_WIDTH, HUGE_HEIGHT)
    assert time.perf_counter() - start < 1.0
    assert HUGE_WIDTH * HUGE_HEIGHT > 8192 * 8192  # above the job's default max_frame_pixels
    # Decoding it fails cleanly (the 64-byte payload is not a frame); nothing huge is allocated.
    with av.open(path) as container:
        with pytest.raises(av.error.FFmpegError):
            list(container.decode(video=0))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    source = make_video(str(root / "source.mp4"), width=96, height=64, num_frames=30, gop_size=10)
    return source, make_hostile_corpus(str(root / "corpus"), source_video=source, seed=0)


def _decodable_frames(path) -> int:
    """Frames PyAV gets out of a file; -1 if it cannot even be opened."""
    try:
        container = av.open(path)
    except av.error.FFmpegError:
        return -1
    count = 0
    with container:
        if not container.streams.video:
            return 0
        try:
            for _ in container.decode(video=0):
                count += 1
        except av.error.FFmpegError:
            pass
    return count


def test_hostile_corpus_kinds(hostile):
    source, items = hostile
    names = {os.path.basename(p): kind for p, kind in items}
    assert names == {
        "zero_bytes.mp4": "corrupt",
        "random_bytes.mp4": "corrupt",
        "truncated_01pct.mp4": "corrupt",
        "truncated_30pct.mp4": "ok_or_corrupt",
        "truncated_70pct.mp4": "ok_or_corrupt",
        "bitflip.mp4": "ok_or_corrupt",
        "audio_only.mp3": "no_video_stream",
        "huge_dims.mkv": "too_large",
    }
    assert all(os.path.dirname(p) == os.path.dirname(items[0][0]) for p, _ in items)
    assert {kind for _, kind in items} <= {"corrupt", "ok_or_corrupt", "no_video_stream", "too_large"}


def test_hostile_corpus_files(hostile):
    source, items = hostile
    paths = {os.path.basename(p): p for p, _ in items}
    data = open(source, "rb").read()

    assert os.path.getsize(paths["zero_bytes.mp4"]) == 0
    assert _decodable_frames(paths["random_bytes.mp4"]) == -1
    # Truncations are prefixes of the source; the 1% one holds no frame data at all.
    for name, fraction in [("truncated_30pct.mp4", 0.3), ("truncated_70pct.mp4", 0.7)]:
        cut = open(paths[name], "rb").read()
        assert data.startswith(cut) and len(cut) == int(len(data) * fraction)
    header = open(paths["truncated_01pct.mp4"], "rb").read()
    assert data.startswith(header) and 0 < len(header) <= len(data) // 100
    assert _decodable_frames(paths["truncated_01pct.mp4"]) <= 0
    # ~50 flipped bits, none in the first 10% (where the container header lives).
    flipped = np.frombuffer(open(paths["bitflip.mp4"], "rb").read(), np.uint8)
    original = np.frombuffer(data, np.uint8)
    assert flipped.shape == original.shape
    diff = np.nonzero(flipped != original)[0]
    assert diff.min() >= len(data) // 10
    assert 30 <= int(np.unpackbits(flipped ^ original).sum()) <= 50
    with av.open(paths["audio_only.mp3"]) as container:
        assert len(container.streams.video) == 0 and len(container.streams.audio) == 1
    with av.open(paths["huge_dims.mkv"]) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.width * stream.codec_context.height > 8192 * 8192


def test_hostile_corpus_is_deterministic(hostile, tmp_path):
    source, items = hostile
    again = make_hostile_corpus(str(tmp_path), source_video=source, seed=0)
    for (p1, k1), (p2, k2) in zip(items, again):
        assert k1 == k2 and os.path.basename(p1) == os.path.basename(p2)
        if not p1.endswith(".mp3"):  # encoders may stamp versions; our byte edits must not vary
            assert open(p1, "rb").read() == open(p2, "rb").read(), p1


def test_bit_exact_media_are_the_same_bytes_every_time(tmp_path):
    """The demo's recipes with bit_exact=True: every file is byte-identical when made again
    (x264 with its assembly, or any encoder with threads, varied from run to run; Matroska
    writes a random segment UID), so the numbers the demo prints are the README's."""
    import hashlib

    from vmae_ray.demo import SCENE_RECIPE, SYNTHETIC
    from vmae_ray.synthetic import make_scene_corpus, make_video, transcode_video

    def corpus(folder) -> dict[str, str]:
        paths = [p for p, _ in make_scene_corpus(folder / "scenes", per_scene=3, seed=100, bit_exact=True,
                                                 **SCENE_RECIPE)]
        for i, (name, kwargs) in enumerate(SYNTHETIC):
            paths.append(make_video(str(folder / name), seed=i, bit_exact=True, **kwargs))
        paths.append(transcode_video(folder / SYNTHETIC[0][0], folder / "copy.mp4", width=64, height=48,
                                     bit_exact=True))
        return {os.path.relpath(p, folder): hashlib.md5(open(p, "rb").read()).hexdigest() for p in paths}

    first, second = corpus(tmp_path / "a"), corpus(tmp_path / "b")
    assert len(first) == 12 + len(SYNTHETIC) + 1 and first == second
