"""The benchmark suite runs (tiny corpus).

No timed assertions: numbers on a shared CI machine mean nothing. What is checked:
- the corpus generator writes what its spec says and caches by spec;
- `make bench`'s driver runs end to end on the tiny preset and writes a report;
- the pieces it is built from (decode-target comparison, memory probe, GPU smoke mode).
"""

from __future__ import annotations

import json
import os

import pytest

from vmae_ray.decoding import FrameGeometry

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


def test_reconstruction_flops_match_transformers_forward():
    """What --reconstruction adds is one VideoMAEForPreTraining forward (patch embedding, encoder on the
    visible tokens, decoder): the analytic count equals torch's FLOP counter on that forward."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    from bench.ablation import reconstruction_flops
    from bench.gpu_model import BASE, SMOKE
    from vmae_ray.reconstruction import tube_mask

    cfg = dict(SMOKE, decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_intermediate_size=48,
               decoder_num_attention_heads=2)
    # Eager attention: the counter sees its matmuls (it does not count CPU SDPA kernels).
    model = VideoMAEForPreTraining(VideoMAEConfig(**cfg, attn_implementation="eager")).eval()
    mask = tube_mask(np.random.default_rng(0), num_time_slots=8, tokens_per_frame=4, mask_ratio=0.5)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 16, 3, 32, 32), bool_masked_pos=torch.from_numpy(mask)[None])
    assert reconstruction_flops(cfg, mask_ratio=0.5)["extra_gflops"] * 1e9 == pytest.approx(counter.get_total_flops())
    base = reconstruction_flops(BASE)  # VideoMAE-B with transformers' default decoder, 90% masked
    assert base["embed_gflops"] == pytest.approx(360.7, abs=0.1) and base["ratio"] == pytest.approx(0.836, abs=1e-3)


@pytest.mark.slow
def test_bench_runs_end_to_end(ray_session, tmp_path):
    """`make bench`'s driver on the tiny preset (3 clips, 3,000 vectors): corpora, peers, stages, ablations,
    vector search and dedup, report.

    About a minute, nearly all of it Ray Data's fixed cost per job (actor start, model load).
    """
    from bench import run

    workdir, results_md = tmp_path / "bench_out", tmp_path / "BENCHMARKS.md"
    assert run.main(["--workdir", str(workdir), "--results", str(results_md), "--preset", "tiny",
                     "--workloads", "ssv2", "--skip", "memory,gpu,driver", "--decode-repeats", "1"]) == 0
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
    assert 0 < ab["reconstruction"]["ratio"] < 1  # the decoder's loss costs time, never saves it
    vectors = results["vectors"]["sizes"][0]
    assert vectors["rows"] == 3000 and vectors["approx_search"]["recall_at_10"] == 1.0  # a flat index at this size
    assert vectors["dedup"]["all_pairs"]["same_groups"] and vectors["dedup"]["links"] > 0
    text = results_md.read_text()
    for heading in ("## Targets", "## Machine", "## Commands", "## Peers, end to end", "## Decode stage against libavcodec",
                    "## Ablations: each change off and on", "## Vector search, index and dedup at corpus scale"):
        assert heading in text
