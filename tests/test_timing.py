"""A video's time span comes from its video stream's packets, not from container headers.

Variants of each kind of file the shared cases reproduce (audio outlasting the video in WebM,
Matroska chunks that start late, B-frame delay in AVI and in MP4 without an edit list, MPEG-TS
start offsets), made by `synthetic.make_video` and checked before use against what their headers
claim (so each file really disagrees with its packets). Right values: the recipe's frame count
and rate, the first frame's time from an independent PyAV decode, and frame codes read from
the decoded pixels against brute-force segment midpoints.
"""

from __future__ import annotations

import av
import pytest

from tests.conftest import uniform_indices
from vmae_ray.decoding import FrameGeometry, VideoDecoder
from vmae_ray.storage import StorageOptions, open_input
from vmae_ray.synthetic import frame_number_from_rgb, make_video

CODE_GEOMETRY = FrameGeometry(resize_shortest_edge=96, crop_height=96, crop_width=96)

# name: (recipe, what the headers get wrong; checked in the fixture)
TIMING_VARIANTS = {
    "vp9_audio_runs_on.webm": (dict(codec="libvpx-vp9", fps=24, num_frames=48, gop_size=24, audio=True,
                                    audio_seconds=5.0), "container duration covers the audio (5 s)"),
    "h264_starts_at_7_6s.mkv": (dict(fps=25, num_frames=50, start_seconds=7.6),
                                "no stream duration; the container's Duration is the end time (9.6 s)"),
    "mpeg4_bframes.avi": (dict(codec="mpeg4", fps=30, num_frames=60, max_b_frames=2),
                          "header start 0 s, first frame presented one tick later"),
    # Two where libavformat's headers already agree with the packets (regression checks): an
    # MP4 whose first frame is presented after the B-frame delay, and an MPEG-TS offset.
    "h264_bframes_no_editlist.mp4": (dict(fps=30, num_frames=60, container_options={"use_editlist": "0"}),
                                     "none: start_time is the first frame's"),
    "h264_starts_at_5s.ts": (dict(fps=30, num_frames=60, start_seconds=5.0), "none: timings estimated from pts"),
}


def _first_frame_seconds(path: str) -> float:
    with av.open(path) as container:
        return float(next(container.decode(video=0)).time)


@pytest.fixture(scope="module")
def timing_variants(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("timing")
    out = {}
    for seed, (name, (recipe, _)) in enumerate(TIMING_VARIANTS.items()):
        path = make_video(str(root / name), width=128, height=96, seed=seed, **recipe)
        span = recipe["num_frames"] / recipe["fps"]
        first = _first_frame_seconds(path)
        with av.open(path) as container:  # the headers disagree with the packets, as intended
            stream = container.streams.video[0]
            header_start = float(stream.start_time * stream.time_base)
            container_duration = container.duration / av.time_base
            if name.endswith(".webm"):
                assert container_duration == pytest.approx(5.0, abs=0.05)
            elif name.endswith(".mkv"):
                # Matroska's Duration element holds the end time, which libavformat reports as the duration.
                assert stream.duration is None and container_duration == pytest.approx(7.6 + span, abs=0.05)
                assert first == pytest.approx(7.6)
            elif name.endswith(".avi"):
                assert header_start == 0 and first == pytest.approx(1 / 30)
            elif name.endswith(".mp4"):
                assert first > 0
            else:
                assert first == pytest.approx(5.0)
        out[name] = path
    return out


@pytest.mark.parametrize("name", list(TIMING_VARIANTS))
def test_span_and_frames_from_the_packets(timing_variants, name):
    recipe, _ = TIMING_VARIANTS[name]
    path, frames, fps = timing_variants[name], recipe["num_frames"], recipe["fps"]
    with VideoDecoder(path) as decoder:
        probe = decoder.probe
        assert probe.start_seconds == pytest.approx(_first_frame_seconds(path), abs=1e-6)
        assert probe.duration_seconds == pytest.approx(frames / fps, abs=1e-3)
        plans = decoder.plan(sampling="uniform", num_frames=16, frame_stride=1, clips_per_video=1)
        (clip,) = decoder.clips(plans, CODE_GEOMETRY)
    assert [frame_number_from_rgb(f) for f in clip.pixels] == uniform_indices(frames, 16)
    with VideoDecoder(path) as decoder:
        plans = decoder.plan(sampling="stride", num_frames=16, frame_stride=3, clips_per_video=None)
        clips = list(decoder.clips(plans, CODE_GEOMETRY))
    # Back to back from the first presented frame; the last clip repeats the last frame.
    assert len(clips) == -(-frames // 48)
    for i, clip in enumerate(clips):
        expected = [min(48 * i + 3 * k, frames - 1) for k in range(16)]
        assert [frame_number_from_rgb(f) for f in clip.pixels] == expected, (name, i)
        assert clip.start_seconds == pytest.approx(48 * i / fps, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Cheap on object storage


@pytest.fixture(scope="module")
def long_mkv(tmp_path_factory) -> tuple[str, int, int]:
    """30 s of 160x120 H.264 in Matroska at 2 Mbit/s (about 3.9 MB), one keyframe a second, cut
    from a longer recording: timestamps start at 10 s."""
    path = make_video(str(tmp_path_factory.mktemp("long") / "long.mkv"), width=160, height=120, fps=30,
                      num_frames=900, gop_size=30, bit_rate=2_000_000, start_seconds=10.0)
    with av.open(path) as container:  # no stream duration; the container's is the end time (40 s)
        assert container.streams.video[0].duration is None
        assert container.duration / av.time_base == pytest.approx(40.0, abs=0.05)
    return path, 900, 30


def test_finding_the_end_reads_the_tail_not_the_whole_file(s3_server, s3_bucket, long_mkv):
    """Ranged reads of a long MKV on the S3 server: the probe (span included) reads the header,
    the last GOP and the first frame, not the file. Byte counts are what the ranged-read cache
    asked the server for (fsspec's total_requested_bytes)."""
    path, frames, fps = long_mkv
    with open(path, "rb") as f:
        data = f.read()
    s3_server.client.put_object(Bucket=s3_bucket, Key="long.mkv", Body=data)
    uri, storage = f"s3://{s3_bucket}/long.mkv", StorageOptions(s3_server.storage_options)
    since = len(s3_server.requests)
    # Small thresholds so a test-sized file takes the ranged-read path of large objects.
    with open_input(uri, storage, whole_object_max_bytes=256 * 1024, block_size=64 * 1024, size=len(data)) as f:
        with VideoDecoder(f, size_bytes=len(data)) as decoder:
            probe_bytes = f.cache.total_requested_bytes
            assert decoder.probe.duration_seconds == pytest.approx(frames / fps, abs=1e-3)
            plans = decoder.plan(sampling="uniform", num_frames=16, frame_stride=1, clips_per_video=1)
            (clip,) = decoder.clips(plans, CODE_GEOMETRY)
        total_bytes = f.cache.total_requested_bytes
    gets = [r for r in s3_server.requests_for(s3_bucket, "long.mkv", since=since) if r.method == "GET"]
    print(f"\nlong MKV {len(data)} bytes: probe read {probe_bytes} ({probe_bytes / len(data):.1%}), "
          f"uniform-16 decode in all {total_bytes} ({total_bytes / len(data):.1%}), {len(gets)} GETs")
    assert [frame_number_from_rgb(f) for f in clip.pixels] == uniform_indices(frames, 16)
    assert probe_bytes < 0.15 * len(data)
