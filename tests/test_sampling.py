"""Clip plans and timestamp matching: pure logic, property-tested, no Ray, no decoding."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmae_ray.sampling import plan_clips, plan_stride, plan_uniform, select_frame_indices

frame_counts = st.integers(min_value=1, max_value=400)
fps_values = st.floats(min_value=5.0, max_value=60.0)
num_frames_values = st.sampled_from([1, 2, 8, 16])


def cfr_times(count: int, fps: float) -> list[float]:
    return [i / fps for i in range(count)]


def check_selection(chosen: list[list[int]], plans, count: int) -> None:
    assert len(chosen) == len(plans)
    for clip, plan in zip(chosen, plans):
        assert len(clip) == len(plan.target_seconds)
        assert all(0 <= i < count for i in clip), "index out of range"
        assert clip == sorted(clip), "frame indices must be monotonic"


@settings(max_examples=200, deadline=None)
@given(count=frame_counts, fps=fps_values, num_frames=num_frames_values)
def test_uniform_one_clip_in_range_monotonic(count, fps, num_frames):
    plans = plan_uniform(duration_seconds=count / fps, num_frames=num_frames)
    assert len(plans) == 1
    chosen = select_frame_indices(cfr_times(count, fps), plans)
    check_selection(chosen, plans, count)
    if count >= num_frames:
        # One frame per segment: all distinct when there are enough frames.
        assert len(set(chosen[0])) == num_frames
        # Segment i's frame lies inside segment i.
        for i, index in enumerate(chosen[0]):
            assert i * count / num_frames - 1 <= index <= (i + 1) * count / num_frames


def test_uniform_matches_segment_midpoints():
    # 160 frames, 16 segments of 10 frames: the middle frame of each (index 10*i + 5).
    chosen = select_frame_indices(cfr_times(160, 30.0), plan_uniform(duration_seconds=160 / 30, num_frames=16))
    assert chosen == [[10 * i + 5 for i in range(16)]]


@settings(max_examples=200, deadline=None)
@given(count=frame_counts, fps=fps_values, num_frames=num_frames_values,
       stride=st.integers(1, 8), clips=st.one_of(st.none(), st.integers(1, 6)))
def test_stride_plans(count, fps, num_frames, stride, clips):
    plans = plan_stride(duration_seconds=count / fps, fps=fps, num_frames=num_frames, frame_stride=stride,
                        clips_per_video=clips)
    chosen = select_frame_indices(cfr_times(count, fps), plans)
    check_selection(chosen, plans, count)
    span = num_frames * stride
    if clips is not None:
        assert 1 <= len(plans) <= clips
        if count > span:
            assert len(plans) == clips
    else:
        assert len(plans) == max(1, math.ceil(count / span))
    for clip in chosen:
        # Dense clips: consecutive frames exactly `stride` apart until the video ends,
        # then the last frame repeats.
        for a, b in zip(clip, clip[1:]):
            assert b - a == stride or b == a == count - 1 or (b == count - 1 and b - a < stride)
    starts = [c[0] for c in chosen]
    assert starts == sorted(starts)


def test_stride_exact_indices_cfr():
    plans = plan_stride(duration_seconds=64 / 25, fps=25, num_frames=4, frame_stride=4, clips_per_video=None)
    assert select_frame_indices(cfr_times(64, 25), plans) == [
        [0, 4, 8, 12], [16, 20, 24, 28], [32, 36, 40, 44], [48, 52, 56, 60]
    ]


def test_short_video_repeats_last_frame():
    plans = plan_stride(duration_seconds=5 / 30, fps=30, num_frames=8, frame_stride=1, clips_per_video=3)
    assert len(plans) == 1  # N identical clips would add nothing
    assert select_frame_indices(cfr_times(5, 30), plans) == [[0, 1, 2, 3, 4, 4, 4, 4]]
    uniform = select_frame_indices(cfr_times(3, 30), plan_uniform(duration_seconds=3 / 30, num_frames=6))
    assert uniform == [[0, 0, 1, 1, 2, 2]]


def test_single_frame_and_unknown_duration():
    assert select_frame_indices([0.0], plan_uniform(duration_seconds=0, num_frames=4)) == [[0, 0, 0, 0]]
    assert select_frame_indices([0.0], plan_uniform(duration_seconds=-1, num_frames=2)) == [[0, 0]]


@settings(max_examples=100, deadline=None)
@given(deltas=st.lists(st.sampled_from([0.02, 0.033, 0.06, 0.1]), min_size=2, max_size=300),
       num_frames=num_frames_values)
def test_variable_frame_rate_by_timestamp(deltas, num_frames):
    """On VFR video each target gets the frame on screen at that time, not frame k/fps."""
    times = [0.0]
    for d in deltas[:-1]:
        times.append(times[-1] + d)
    duration = times[-1] + deltas[-1]
    plans = plan_uniform(duration_seconds=duration, num_frames=num_frames)
    chosen = select_frame_indices(times, plans)
    check_selection(chosen, plans, len(times))
    for target, index in zip(plans[0].target_seconds, chosen[0]):
        assert times[index] <= target + 1e-9
        if index + 1 < len(times):
            assert times[index + 1] > target - 1e-9


def test_stream_start_offset():
    # Streams often start at a nonzero pts; plans shift with start_seconds.
    times = [10.0 + i / 10 for i in range(20)]
    plans = plan_uniform(duration_seconds=2.0, num_frames=4, start_seconds=10.0)
    assert select_frame_indices(times, plans) == [[2, 7, 12, 17]]


@pytest.mark.parametrize("bad", [dict(num_frames=0), dict(frame_stride=0), dict(fps=0.0), dict(clips_per_video=0)])
def test_invalid_arguments(bad):
    args = dict(sampling="stride", duration_seconds=1.0, fps=30.0, num_frames=4, frame_stride=2, clips_per_video=1)
    args.update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        plan_clips(**args)


def test_unknown_policy():
    with pytest.raises(ValueError, match="uniform, stride"):
        plan_clips(sampling="random", duration_seconds=1, fps=1, num_frames=1, frame_stride=1, clips_per_video=1)
