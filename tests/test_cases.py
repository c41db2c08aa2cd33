"""The real-world cases of ../shared/media/cases: every right value of its README, read back.

Frame indices are checked against the frame-number codes drawn in the pixels
(`synthetic.frame_number_from_rgb`), never against what the decoder reports alone. These
tests run the decoder directly; the tables of a job over the same files are checked in
test_pipeline (its module-scoped run includes every case), the geometry against
transformers in test_display.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import CASE_FILES, UNIFORM16_60_FRAMES, case_file
from vmae_ray.decoding import DecodeError, DisplayTransform, FrameGeometry, VideoDecoder
from vmae_ray.listing import list_inputs
from vmae_ray.storage import StorageOptions
from vmae_ray.synthetic import MARKER_FRACTION, frame_number_from_rgb

# Short side 96 with a square crop: the frame code (60% of the short side, centred) stays readable.
CODE_GEOMETRY = FrameGeometry(resize_shortest_edge=96, crop_height=96, crop_width=96)
DECODED = [c.name for c in CASE_FILES.values() if c.expect_error is None]


def _clips(path: str, sampling: str, num_frames: int = 16, frame_stride: int = 4, clips_per_video=1,
           geometry=CODE_GEOMETRY):
    with VideoDecoder(path) as decoder:
        plans = decoder.plan(sampling=sampling, num_frames=num_frames, frame_stride=frame_stride,
                             clips_per_video=clips_per_video)
        clips = list(decoder.clips(plans, geometry))
        return decoder, clips


def _codes(clip, first_code: int = 0) -> list[int]:
    return [frame_number_from_rgb(f) - first_code for f in clip.pixels]


@pytest.mark.parametrize("name", DECODED)
def test_time_span_and_size(name):
    case = case_file(name)
    with VideoDecoder(case.path) as decoder:
        probe = decoder.probe
        shown = decoder.shown()
    assert probe.duration_seconds == pytest.approx(case.duration_seconds, abs=1e-3)
    assert probe.start_seconds == pytest.approx(case.start_seconds, abs=1e-3)
    assert probe.fps == pytest.approx(case.fps)
    assert shown[:2] == case.displayed_size


@pytest.mark.parametrize("name", [n for n in DECODED if CASE_FILES[n].uniform16])
def test_uniform16_frames_from_pixels(name):
    case = case_file(name)
    _, (clip,) = _clips(case.path, "uniform")
    assert _codes(clip) == list(case.uniform16)
    assert clip.frame_indices == list(case.uniform16)


def test_avi_bframes_stride_clip_starts_at_first_presented_frame():
    case = case_file("c08_mpeg4_bframes.avi")
    _, clips = _clips(case.path, "stride", clips_per_video=2)
    assert _codes(clips[0]) == list(case.stride4_clip0)
    assert clips[0].start_seconds == pytest.approx(0.0)


def test_mkv_starting_at_10s_is_two_seconds_long():
    case = case_file("c12_mkv_starts_at_10s.mkv")
    import av

    with av.open(case.path) as container:
        # The file as the issue describes it: the container says 12 s, the stream nothing.
        assert container.duration / av.time_base == pytest.approx(12.0)
        assert container.streams.video[0].duration is None
    _, clips = _clips(case.path, "stride", clips_per_video=None)
    assert len(clips) == case.stride4_all_clips
    assert _codes(clips[0]) == list(range(0, 60, 4)) + [59]  # the last target is past the end
    _, (clip,) = _clips(case.path, "uniform")
    assert len(set(_codes(clip))) == 16, "no frame repeated: no target past the last frame"


def test_rotated_phone_video_is_portrait_with_red_bar_on_top():
    case = case_file("c01_phone_portrait_rot90.mp4")
    # Keep the whole displayed picture: 180x320 -> 90x160, crop 90 wide and 160 high.
    whole = FrameGeometry(resize_shortest_edge=90, crop_height=160, crop_width=90)
    decoder, (clip,) = _clips(case.path, "uniform", geometry=whole)
    assert decoder.shown()[2] == DisplayTransform(rotation_degrees=90, hflip=False)
    assert clip.pixels.shape == (16, 160, 90, 3)
    band = int(MARKER_FRACTION * 160 / 2)
    for frame in clip.pixels.astype(int):
        top, bottom = frame[:band].mean((0, 1)), frame[-band:].mean((0, 1))
        assert top[0] > 200 and top[1:].max() < 60, top  # red
        assert bottom[2] > 200 and bottom[:2].max() < 60, bottom  # blue
    assert [frame_number_from_rgb(f) for f in clip.pixels] == list(UNIFORM16_60_FRAMES)


def test_resolution_change_frames_read_back():
    case = case_file("c05_resolution_change.ts")
    # Frames of both sizes (0-29 are 320x240, 30-59 480x270), each read back from its own
    # pixels; that each keeps its own aspect ratio is checked against transformers in test_display.
    _, (clip,) = _clips(case.path, "stride", num_frames=15, frame_stride=4)
    assert _codes(clip) == clip.frame_indices == list(range(0, 60, 4))


def test_cover_art_is_no_video_stream():
    case = case_file("c02_audio_with_cover.mp4")
    with pytest.raises(DecodeError) as info:
        VideoDecoder(case.path)
    assert info.value.error_type == case.expect_error == "no_video_stream"
    assert "still picture" in info.value.message and info.value.stage == "probe"


def test_bracketed_input_is_that_file():
    talk = case_file("brackets/talk [1].mp4")
    neighbour = CASE_FILES["brackets/talk 1.mp4"]
    listing = list_inputs(talk.path, StorageOptions())
    assert listing.column("uri").to_pylist() == [talk.path]
    for case in (talk, neighbour):
        _, (clip,) = _clips(case.path, "stride", num_frames=30, frame_stride=1)
        assert [frame_number_from_rgb(f) for f in clip.pixels] == list(range(case.first_code, case.first_code + 30))


def test_cases_readme_values_are_the_ones_declared():
    """The declarations above are the README's: a changed README must fail here, not pass silently."""
    case = case_file("c08_mpeg4_bframes.avi")
    readme = open(os.path.join(os.path.dirname(case.path), "README.md"), encoding="utf-8").read()
    for c in CASE_FILES.values():
        assert f"`{c.name}`" in readme
        if c.uniform16:
            assert str(list(c.uniform16)).replace(" ", "") in readme.replace(" ", "")
    assert "**180x320**" in readme and "**284x160**" in readme and "**2.0 s**" in readme
