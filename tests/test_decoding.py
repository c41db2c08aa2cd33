"""Decoding every file of ../shared/media, and the decoder's contract on synthetic video."""

import numpy as np
import pytest

from tests.conftest import SHARED_FILES, require_shared_media
from vmae_ray.decoding import DecodeError, DecodeLimits, FrameGeometry, VideoDecoder, center_crop
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
