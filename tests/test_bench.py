"""The benchmark suite runs (tiny corpus), and the decoder's keyframe-seek path is exact.

No timed assertions: numbers on a shared CI machine mean nothing. What is checked:
- the corpus generator writes what its spec says and caches by spec;
- `make bench`'s driver runs end to end on the tiny preset and writes a report;
- the pieces it is built from (decode-target comparison, memory probe, GPU smoke mode);
- `VideoDecoder` with keyframe seeking (sparse plans) returns exactly the frames, indices and
  pixels of decoding straight through, on several containers and codecs, and falls back to
  straight decoding when the packet index does not describe the frames.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import vmae_ray.decoding as decoding
from vmae_ray.decoding import FrameGeometry, VideoDecoder

GEOMETRY = FrameGeometry(resize_shortest_edge=96, crop_height=96, crop_width=96)


# ------------------------------------------------------------------------------------ corpus


def test_corpus_spec_shape_and_cache(tmp_path):
    from bench.corpus import CorpusSpec, VideoSpec, ensure_corpus

    spec = CorpusSpec("t", (
        # 4 s at 30 fps with a 2 s segment: built by repeating packets of closed GOPs.
        VideoSpec("long.mp4", "h264", 160, 90, 30, 4.0, 15, seed=1, segment_seconds=2.0),
        VideoSpec("clip.webm", "libvpx-vp9", 128, 72, 12, 2.0, 12, seed=2, crf=None, bit_rate=200_000),
    ))
    corpus = ensure_corpus(spec, str(tmp_path), log=lambda _msg: None)
    facts = {f["name"]: f for f in corpus.files}
    assert facts["long.mp4"]["frames"] == 120 and facts["long.mp4"]["keyframes"] == 8  # GOP 15
    assert facts["long.mp4"]["duration_seconds"] == pytest.approx(4.0, abs=0.05)
    assert facts["clip.webm"]["frames"] == 24 and facts["clip.webm"]["codec"] == "vp9"
    # Every frame of the repeated stream decodes, with increasing timestamps.
    import av

    with av.open(corpus.paths[0]) as c:
        times = [f.time for f in c.decode(video=0)]
    assert len(times) == 120 and times == sorted(times) and len(set(times)) == 120

    mtime = os.path.getmtime(corpus.paths[0])
    again = ensure_corpus(spec, str(tmp_path), log=lambda _msg: None)
    assert again.directory == corpus.directory and os.path.getmtime(again.paths[0]) == mtime
    changed = CorpusSpec("t", spec.videos[:1])
    assert ensure_corpus(changed, str(tmp_path), log=lambda _msg: None).directory != corpus.directory


# ------------------------------------------------------------------------------------ seeking


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    """Frame-coded videos long enough for sparse plans to seek (GOP << gaps between targets)."""
    from vmae_ray.synthetic import make_video

    root = tmp_path_factory.mktemp("seek")
    recipes = {
        "h264_bframes.mp4": dict(codec="h264", width=160, height=120, fps=30, num_frames=480, gop_size=30),
        "h264.mkv": dict(codec="h264", width=160, height=120, fps=25, num_frames=400, gop_size=40),
        "vp9.webm": dict(codec="libvpx-vp9", width=160, height=120, fps=12, num_frames=300, gop_size=24),
        "vfr.mkv": dict(codec="h264", width=160, height=120, fps=30, num_frames=400, gop_size=40, vfr=True),
        # Long GOPs with B-frames: the pre-roll after a seek skips non-reference frames.
        "h264_longgop.mp4": dict(codec="h264", width=160, height=120, fps=30, num_frames=480, gop_size=200),
    }
    return {name: make_video(str(root / name), seed=i, **kw) for i, (name, kw) in enumerate(recipes.items())}


PLANS = [("uniform", 8, 1, 1), ("stride", 8, 2, 3), ("stride", 4, 1, 5)]


def _decode(path, plan, *, straight: bool, monkeypatch):
    sampling, num_frames, stride, clips = plan
    seeks = []
    with monkeypatch.context() as m:
        if straight:
            m.setattr(decoding, "SEEK_MIN_GAP_FRAMES", 10**9)
        original = VideoDecoder._seek_to_keyframe

        def spy(self, index, key_pos):
            seeks.append(index.keyframes[key_pos])
            return original(self, index, key_pos)

        m.setattr(VideoDecoder, "_seek_to_keyframe", spy)
        with VideoDecoder(path) as decoder:
            plans = decoder.plan(sampling=sampling, num_frames=num_frames, frame_stride=stride,
                                 clips_per_video=clips)
            out = list(decoder.clips(plans, GEOMETRY))
    return out, seeks


@pytest.mark.parametrize("name", ["h264_bframes.mp4", "h264.mkv", "vp9.webm", "vfr.mkv", "h264_longgop.mp4"])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p[0]}-{p[1]}x{p[2]}-{p[3]}")
def test_seeking_equals_straight_decoding(long_videos, name, plan, monkeypatch):
    from vmae_ray.synthetic import frame_number_from_rgb

    path = long_videos[name]
    straight, no_seeks = _decode(path, plan, straight=True, monkeypatch=monkeypatch)
    seeking, seeks = _decode(path, plan, straight=False, monkeypatch=monkeypatch)
    assert not no_seeks
    assert len(seeks) >= 2, "a sparse plan over a long video should seek"
    assert [c.clip_index for c in seeking] == [c.clip_index for c in straight]
    for a, b in zip(straight, seeking):
        assert a.frame_indices == b.frame_indices
        assert (a.start_seconds, a.end_seconds) == (b.start_seconds, b.end_seconds)
        assert np.array_equal(a.pixels, b.pixels)
        # And they are the frames the indices name (frame numbers are drawn in the pixels).
        assert [frame_number_from_rgb(f) for f in b.pixels] == b.frame_indices


def test_preroll_skips_nonreference_frames_exactly(long_videos, monkeypatch):
    """After a seek into a long GOP, B-frames before the needed frames are not decoded, the
    decoder never falls back to decoding straight through, and the clips are the right frames."""
    import av

    from vmae_ray.synthetic import frame_number_from_rgb

    path = long_videos["h264_longgop.mp4"]
    with av.open(path) as c:
        assert any(f.pict_type == av.video.frame.PictureType.B for f in c.decode(video=0)), "needs B-frames"
    decoded, fallbacks = [], []
    original_push = decoding._ClipAssembler.push
    monkeypatch.setattr(decoding._ClipAssembler, "push",
                        lambda self, index, frame, t: (decoded.append(index), original_push(self, index, frame, t))[1])
    monkeypatch.setattr(VideoDecoder, "_rewind", lambda self: fallbacks.append(1))
    with VideoDecoder(path) as decoder:
        plans = decoder.plan(sampling="stride", num_frames=4, frame_stride=2, clips_per_video=3)
        clips = list(decoder.clips(plans, GEOMETRY))
    assert not fallbacks
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
    monkeypatch.setattr(VideoDecoder, "_packet_index", lambda self: calls.append(1))
    with VideoDecoder(long_videos["h264_bframes.mp4"]) as decoder:
        plans = decoder.plan(sampling="stride", num_frames=8, frame_stride=2, clips_per_video=None)
        assert len(list(decoder.clips(plans, GEOMETRY))) == len(plans)
    assert not calls


def test_index_mismatch_falls_back_to_straight(long_videos, monkeypatch):
    """A packet index that does not describe the decoded frames: same clips, each once."""
    path = long_videos["h264_bframes.mp4"]
    plan = ("stride", 8, 2, 3)
    expected, _ = _decode(path, plan, straight=True, monkeypatch=monkeypatch)
    original = VideoDecoder._packet_index

    def broken(self):
        index = original(self)
        # From frame 5 on, every rank one too high, as if a packet before it had made no
        # frame: the first clip (frames 0..14) is decoded across the gap, which is detected.
        index.rank = {p: (r if r < 5 else r + 1) for p, r in index.rank.items()}
        return index

    monkeypatch.setattr(VideoDecoder, "_packet_index", broken)
    mismatches = []
    original_init = decoding._IndexMismatch.__init__
    monkeypatch.setattr(decoding._IndexMismatch, "__init__",
                        lambda self, *a: (mismatches.append(a), original_init(self, *a))[1])
    with VideoDecoder(path) as decoder:
        plans = decoder.plan(sampling=plan[0], num_frames=plan[1], frame_stride=plan[2], clips_per_video=plan[3])
        got = list(decoder.clips(plans, GEOMETRY))
    assert mismatches, "the broken index should have been detected"
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
    assembler = decoding._ClipAssembler([], GEOMETRY, probe)
    w, h = GEOMETRY.resized_size(probe.width, probe.height)
    crop = lambda a: decoding.center_crop(a, GEOMETRY.crop_height, GEOMETRY.crop_width).astype(int)  # noqa: E731
    errors = {"planar": [], "packed": []}
    with av.open(path) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i % 50:
                continue
            fast = assembler._rgb_crop(frame)
            assert fast.shape == (96, 96, 3) and fast.dtype == np.uint8 and fast.flags.c_contiguous
            packed = frame.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR").to_ndarray()
            ref = np.asarray(Image.fromarray(frame.to_ndarray(format="rgb24")).resize((w, h), Image.BILINEAR))
            errors["planar"].append(np.abs(fast.astype(int) - crop(ref)).mean())
            errors["packed"].append(np.abs(crop(packed) - crop(ref)).mean())
    planar, packed = np.mean(errors["planar"]), np.mean(errors["packed"])
    assert planar <= packed + 0.1, (planar, packed)


# ------------------------------------------------------------------------------------ pieces


def test_decode_target_comparison(long_videos):
    from bench.decode_bench import compare

    result = compare([long_videos["h264_bframes.mp4"]], sampling="stride", num_frames=8, frame_stride=2,
                     clips_per_video=3, geometry=GEOMETRY, repeats=1)
    row = result["rows"][0]
    assert result["clips"] == 3 and row["frames_in_file"] == 480
    assert row["frames_seek"] < row["frames_straight"] <= 480
    assert result["ratio_vs_straight_cpu"] > 0 and result["ratio_vs_seek_cpu"] > 0


def test_memory_probe(long_videos, tiny_classifier):
    from bench.memory import run_case

    out = run_case(long_videos["h264_bframes.mp4"], tiny_classifier, "stride", 2, None, timeout=300)
    assert out["clips"] > 0 and out["error"] is None
    assert 0 < out["rss_before_mib"] <= out["peak_rss_mib"]


def test_gpu_model_smoke_and_flops():
    from bench.gpu_model import BASE, analytic_flops, run

    # VideoMAE-B, 16x224x224: the paper's 180 GFLOPs are multiply-accumulates.
    assert analytic_flops(BASE) / 1e9 == pytest.approx(360.7, abs=0.1)
    out = run(smoke=True, batch_size=1, steps=1, warmup=0, dtype="bf16", peak=None)
    assert out["mode"] == "smoke" and out["forward_clips_per_second"] > 0 and out["embedder_clips_per_second"] > 0


@pytest.mark.slow
def test_bench_runs_end_to_end(ray_session, tmp_path):
    """`make bench`'s driver on the tiny preset (3 clips): corpora, peers, stages, ablations, report.

    About a minute, nearly all of it Ray Data's fixed cost per job (actor start, model load).
    """
    from bench import run

    workdir, results_md = tmp_path / "bench_out", tmp_path / "BENCHMARKS.md"
    assert run.main(["--workdir", str(workdir), "--results", str(results_md), "--preset", "tiny",
                     "--workloads", "ssv2", "--skip", "memory,gpu", "--decode-repeats", "1"]) == 0
    results = json.loads((workdir / "results.json").read_text())
    ssv2 = results["measurements"]["ssv2"]
    assert ssv2["vmae_ray"]["summary"]["clips"] == 3
    assert ssv2["model_card"]["out"]["clips"] == 3
    assert ssv2["stages_alone"]["decode"]["clips"] == 3
    assert "ratio_vs_straight_cpu" in ssv2["decode_target"]
    # read_videos either ran or says why it could not (decord missing).
    rv = ssv2["read_videos"]
    assert rv.get("out", {}).get("clips") == 3 or "decord" in rv.get("error", "")
    ab = results["ablations"]
    assert ab["model_folding"]["max_abs_embedding_diff"] < 1e-4 and ab["model_folding"]["speedup"] > 0
    assert ab["isolation"]["clips"] == 3 and ab["isolation"]["isolated_ms_per_clip"] > 0
    assert [ab["cluster_autoscaler"][v]["clips"] for v in ("RATE_BASED", "V2")] == [3, 3]
    text = results_md.read_text()
    for heading in ("## Targets", "## Machine", "## Commands", "## Peers, end to end", "## Decode stage against libavcodec",
                    "## Ablations: each change off and on"):
        assert heading in text
