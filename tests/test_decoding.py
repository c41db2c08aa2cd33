"""Decoding every file of ../shared/media, and the decoder's contract on synthetic video."""

import numpy as np
import pytest

from tests.conftest import SHARED_FILES, require_shared_media
from vmae_ray.decoding import DecodeError, DecodeLimits, FrameGeometry, VideoDecoder, center_crop, model_crop
from vmae_ray.sampling import select_frame_indices

GEOMETRY = FrameGeometry(resize_shortest_edge=40, crop_height=32, crop_width=32)


@pytest.mark.parametrize("media", SHARED_FILES, ids=lambda m: m.name)
@pytest.mark.parametrize("sampling", ["uniform", "stride"])
def test_shared_media(media, sampling):
    require_shared_media()
    if media.expect_error:
        with pytest.raises(DecodeError) as info:
            VideoDecoder(media.path)
        assert info.value.error_type == media.expect_error
        return
    with VideoDecoder(media.path) as decoder:
        probe = decoder.probe
        assert probe.width > 0 and probe.height > 0 and probe.duration_seconds > 0 and probe.fps > 0
        if media.video_stream is not None:
            assert probe.stream_index == media.video_stream
            assert probe.num_video_streams == 2
        plans = decoder.plan(sampling=sampling, num_frames=16, frame_stride=4,
                             clips_per_video=2 if sampling == "stride" else 1)
        clips = list(decoder.clips(plans, GEOMETRY))
    assert [c.clip_index for c in clips] == list(range(len(plans)))
    for clip in clips:
        assert clip.pixels.dtype == np.uint8 and clip.pixels.shape == (16, 32, 32, 3)
        assert clip.frame_indices == sorted(clip.frame_indices)
        assert 0 <= clip.start_seconds <= clip.end_seconds
        assert clip.pixels.std() > 0  # real picture content, not a blank buffer


def test_av1_without_frame_count_uses_timestamps():
    require_shared_media()
    with VideoDecoder(SHARED_FILES[0].path) as decoder:
        assert decoder.probe.duration_seconds == pytest.approx(5.0, abs=0.1)
        plans = decoder.plan(sampling="uniform", num_frames=16, frame_stride=1, clips_per_video=1)
        (clip,) = decoder.clips(plans, GEOMETRY)
    # 125 frames at 25 fps: segment midpoints spread over the whole video.
    assert clip.frame_indices[0] < 8 and clip.frame_indices[-1] > 115


def test_short_video_repeats_last_frame():
    require_shared_media()
    with VideoDecoder(next(m for m in SHARED_FILES if m.name == "h265_video.mp4").path) as decoder:
        plans = decoder.plan(sampling="stride", num_frames=16, frame_stride=1, clips_per_video=1)
        (clip,) = decoder.clips(plans, GEOMETRY)
    assert clip.frame_indices == list(range(10)) + [9] * 6
    assert np.array_equal(clip.pixels[9], clip.pixels[15])


def test_frames_are_the_planned_ones(synthetic_corpus):
    """Decoded clips hold exactly the frames the plan names (read back from the pixels)."""
    from vmae_ray.synthetic import frame_number_from_rgb

    path = synthetic_corpus["a_h264.mp4"]
    geometry = FrameGeometry(resize_shortest_edge=96, crop_height=96, crop_width=96)
    with VideoDecoder(path) as decoder:
        plans = decoder.plan(sampling="stride", num_frames=8, frame_stride=2, clips_per_video=2)
        clips = list(decoder.clips(plans, geometry))
    expected = select_frame_indices([i / 30 for i in range(45)], plans)
    assert [c.frame_indices for c in clips] == expected
    for clip in clips:
        assert [frame_number_from_rgb(f) for f in clip.pixels] == clip.frame_indices


def test_vfr_uses_timestamps(synthetic_corpus):
    path = synthetic_corpus["d_vfr.mkv"]
    import av

    with av.open(path) as c:
        times = [f.time for f in c.decode(video=0)]
    with VideoDecoder(path) as decoder:
        plans = decoder.plan(sampling="uniform", num_frames=8, frame_stride=1, clips_per_video=1)
        (clip,) = decoder.clips(plans, GEOMETRY)
    assert clip.frame_indices == select_frame_indices(times, plans)[0]


def test_limits_refuse_before_decoding(synthetic_corpus):
    path = synthetic_corpus["a_h264.mp4"]
    with pytest.raises(DecodeError) as info:
        VideoDecoder(path, limits=DecodeLimits(max_frame_pixels=100 * 100))
    assert info.value.error_type == "too_large" and "max_frame_pixels" in info.value.message
    with pytest.raises(DecodeError) as info:
        VideoDecoder(path, limits=DecodeLimits(max_duration_seconds=0.5))
    assert info.value.error_type == "too_large"


@pytest.mark.parametrize("payload", [b"", b"\x00" * 10, bytes(range(256)) * 40])
def test_garbage_is_corrupt(tmp_path, payload):
    path = tmp_path / "bad.mp4"
    path.write_bytes(payload)
    with pytest.raises(DecodeError) as info:
        with VideoDecoder(str(path), size_bytes=len(payload)) as decoder:
            list(decoder.clips(decoder.plan(sampling="uniform", num_frames=4, frame_stride=1, clips_per_video=1), GEOMETRY))
    assert info.value.error_type == "corrupt"


def test_resized_size_and_crop_follow_transformers():
    g = FrameGeometry(resize_shortest_edge=224, crop_height=224, crop_width=224)
    assert g.resized_size(1280, 720) == (398, 224)
    assert g.resized_size(720, 1280) == (224, 398)
    rgb = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    assert np.array_equal(center_crop(rgb, 3, 3), rgb[1:4, 2:5])


# --------------------------------------------------------------------------------------
# Keyframe seeking: sparse plans give exactly the frames of decoding straight through

SEEK_GEOMETRY = FrameGeometry(resize_shortest_edge=96, crop_height=96, crop_width=96)


PLANS = [("uniform", 8, 1, 1), ("stride", 8, 2, 3), ("stride", 4, 1, 5)]


def _decode(path, plan, *, straight: bool):
    """(clips, the decoder's stats) for a plan (sampling, num_frames, frame_stride, clips_per_video)."""
    sampling, num_frames, stride, clips = plan
    with VideoDecoder(path, record_frames=True) as decoder:
        plans = decoder.plan(sampling=sampling, num_frames=num_frames, frame_stride=stride, clips_per_video=clips)
        out = list(decoder.clips(plans, SEEK_GEOMETRY, seek=not straight))
    return out, decoder.stats


@pytest.mark.parametrize("name", ["h264_bframes.mp4", "h264.mkv", "vp9.webm", "vfr.mkv", "h264_longgop.mp4"])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p[0]}-{p[1]}x{p[2]}-{p[3]}")
def test_seeking_equals_straight_decoding(long_videos, name, plan):
    from vmae_ray.synthetic import frame_number_from_rgb

    path = long_videos[name]
    straight, straight_stats = _decode(path, plan, straight=True)
    seeking, stats = _decode(path, plan, straight=False)
    assert not straight_stats.seeks
    assert len(stats.seeks) >= 2, "a sparse plan over a long video should seek"
    assert stats.fallbacks == 0 and stats.frames_decoded < straight_stats.frames_decoded
    assert [c.clip_index for c in seeking] == [c.clip_index for c in straight]
    for a, b in zip(straight, seeking):
        assert a.frame_indices == b.frame_indices
        assert (a.start_seconds, a.end_seconds) == (b.start_seconds, b.end_seconds)
        assert np.array_equal(a.pixels, b.pixels)
        # And they are the frames the indices name (frame numbers are drawn in the pixels).
        assert [frame_number_from_rgb(f) for f in b.pixels] == b.frame_indices


def test_preroll_skips_nonreference_frames_exactly(long_videos):
    """After a seek into a long GOP, B-frames before the needed frames are not decoded, the
    decoder never falls back to decoding straight through, and the clips are the right frames."""
    import av

    from vmae_ray.synthetic import frame_number_from_rgb

    path = long_videos["h264_longgop.mp4"]
    with av.open(path) as c:
        assert any(f.pict_type == av.video.frame.PictureType.B for f in c.decode(video=0)), "needs B-frames"
    clips, stats = _decode(path, ("stride", 4, 2, 3), straight=False)
    decoded = stats.decoded_indices
    assert stats.fallbacks == 0 and stats.seeks
    assert len(clips) == 3
    for clip in clips:
        assert [frame_number_from_rgb(f) for f in clip.pixels] == clip.frame_indices
    # Frames pushed after a seek skip some ranks (the non-reference frames of the pre-roll),
    # and from a few frames before each clip on every frame is there.
    gaps = [b - a for a, b in zip(decoded, decoded[1:]) if b > a + 1]
    assert gaps, "no frame was skipped in the pre-roll"
    for clip in clips:
        first = clip.frame_indices[0]
        assert all(i in decoded for i in range(max(0, first - 4), clip.frame_indices[-1] + 1))


def test_dense_plans_do_not_scan(long_videos, monkeypatch):
    calls = []
    monkeypatch.setattr(VideoDecoder, "packet_index", lambda self: calls.append(1))
    with VideoDecoder(long_videos["h264_bframes.mp4"]) as decoder:
        plans = decoder.plan(sampling="stride", num_frames=8, frame_stride=2, clips_per_video=None)
        assert len(list(decoder.clips(plans, SEEK_GEOMETRY))) == len(plans)
    assert not calls


def test_index_mismatch_falls_back_to_straight(long_videos, monkeypatch):
    """A packet index that does not describe the decoded frames: same clips, each once."""
    path = long_videos["h264_bframes.mp4"]
    plan = ("stride", 8, 2, 3)
    expected, _ = _decode(path, plan, straight=True)
    original = VideoDecoder.packet_index

    def broken(self):
        index = original(self)
        # From frame 5 on, every rank one too high, as if a packet before it had made no
        # frame: the first clip (frames 0..14) is decoded across the gap, which is detected.
        index.rank = {p: (r if r < 5 else r + 1) for p, r in index.rank.items()}
        return index

    monkeypatch.setattr(VideoDecoder, "packet_index", broken)
    with VideoDecoder(path) as decoder:
        plans = decoder.plan(sampling=plan[0], num_frames=plan[1], frame_stride=plan[2], clips_per_video=plan[3])
        got = list(decoder.clips(plans, SEEK_GEOMETRY))
    assert decoder.stats.fallbacks == 1, "the broken index should have been detected"
    assert [c.clip_index for c in got] == list(range(len(plans)))
    for a, b in zip(expected, got):
        assert a.frame_indices == b.frame_indices and np.array_equal(a.pixels, b.pixels)


@pytest.mark.parametrize("name", ["h264_bframes.mp4", "vp9.webm"])
def test_planar_conversion_is_as_close_to_the_reference(long_videos, name):
    """The gbrp fast path is at least as close as packed rgb24 to the preprocessing reference
    (full-resolution RGB, then PIL bilinear resize and center crop, as transformers does)."""
    import av
    from PIL import Image

    path = long_videos[name]
    with VideoDecoder(path) as decoder:
        probe = decoder.probe
    w, h = SEEK_GEOMETRY.resized_size(probe.width, probe.height)
    crop = lambda a: center_crop(a, SEEK_GEOMETRY.crop_height, SEEK_GEOMETRY.crop_width).astype(int)  # noqa: E731
    errors = {"planar": [], "packed": []}
    with av.open(path) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i % 50:
                continue
            fast = model_crop(frame, SEEK_GEOMETRY, (w, h))
            assert fast.shape == (96, 96, 3) and fast.dtype == np.uint8 and fast.flags.c_contiguous
            packed = frame.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR").to_ndarray()
            ref = np.asarray(Image.fromarray(frame.to_ndarray(format="rgb24")).resize((w, h), Image.BILINEAR))
            errors["planar"].append(np.abs(fast.astype(int) - crop(ref)).mean())
            errors["packed"].append(np.abs(crop(packed) - crop(ref)).mean())
    planar, packed = np.mean(errors["planar"]), np.mean(errors["packed"])
    assert planar <= packed + 0.1, (planar, packed)


class _FlakyFile:
    """A seekable file whose reads past ``fail_at`` bytes raise a connection reset (as a
    ranged S3 read can), as many times as ``failures``."""

    def __init__(self, path: str, fail_at: int, failures: int = 1):
        self._f = open(path, "rb")
        self.fail_at, self.failures = fail_at, failures

    def read(self, n=-1):
        if self.failures and self._f.tell() + max(n, 1) > self.fail_at:
            self.failures -= 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return self._f.read(n)

    def seek(self, offset, whence=0):
        return self._f.seek(offset, whence)

    def tell(self):
        return self._f.tell()

    def seekable(self):
        return True

    def close(self):
        self._f.close()


def test_a_transient_read_error_is_not_a_broken_video(long_videos):
    """A connection reset while probing the end of a file is raised as itself (the decode step
    retries it), never turned into a `corrupt` DecodeError."""
    import os

    from vmae_ray.storage import classify_storage_error

    path = long_videos["h264.mkv"]
    flaky = _FlakyFile(path, fail_at=int(os.path.getsize(path) * 0.8))
    try:
        with pytest.raises(ConnectionResetError) as info:
            with VideoDecoder(flaky) as decoder:
                list(decoder.clips(decoder.plan(sampling="uniform", num_frames=4, frame_stride=1,
                                                clips_per_video=1), GEOMETRY))
        assert classify_storage_error(info.value) == "transient"
    finally:
        flaky.close()
