"""Render bench results (WORKDIR/results.json) as BENCHMARKS.md.

    python -m bench.report bench_out/results.json > BENCHMARKS.md   # re-render without re-running
"""

from __future__ import annotations

import json
import sys
from typing import Any

TARGETS = {
    "vs_read_videos": 3.0,
    "vs_model_card": 5.0,
    "decode_ratio": 1.15,
    "efficiency": 0.85,
    "decode_rss_mib": 1536.0,
    "bench_seconds": 900.0,
    "vector_recall": 0.95,
    "vector_speedup": 10.0,
    "model_call_fill": 0.9,  # issue 16: mean clips per model call >= 90% of --batch-size
    "driver_us_per_clip": 50.0,  # issue 16: driver CPU per clip at VideoMAE-B geometry
    "driver_bytes_per_input": 32.0,  # issue 16: driver memory per input (listing and diff)
}

# Measured once while changing vmae_ray/decoding.py (not re-measured by `make bench`, which
# only has the current decoder): the same decode-target comparison (bench.decode_bench,
# CPU seconds, best of 2) with the decoder before and after, on the small corpora.
DECODER_CHANGES = """\
Changes to `vmae_ray/decoding.py` (public API unchanged; `tests/test_decoding.py`,
`tests/test_sampling.py` and `tests/test_parity.py` pass):

1. **Keyframe seeking for sparse plans.** When targets are more than
   `SEEK_MIN_GAP_FRAMES` (32) frames apart, the decoder scans the stream's packets (demux
   only: pts, keyframe flag; about 4 us per packet, 0.4 s for one hour of 1080p) and, for
   each next target, seeks to the keyframe at or before it when that skips more than
   `SEEK_MIN_SKIP_FRAMES` (16) frames; otherwise it decodes on. Dense plans decode straight
   through exactly as before, with no scan. `frame_indices` keep their meaning: a frame's
   index is the rank of its pts among the stream's packets (discarded packets excluded),
   which is its position when decoding straight through. This is checked while decoding
   (consecutive frames must have consecutive ranks; a seek must not land after the keyframe
   asked for, else it steps back a keyframe); on any mismatch the video is decoded again
   straight through without repeating clips already yielded. Seeking by pts matters: MP4
   seeks by dts land one GOP early.
2. **Faster conversion of the sampled frames.** libswscale writes planar RGB (`gbrp`)
   instead of packed `rgb24` (1.5-2.6x faster when scaling, and identical output where both
   are exact; on HD input closer to the full-resolution-RGB + PIL reference: mean error 2.2
   vs 4.4 levels on the 720p bench video), the crop is copied plane by plane straight into
   the clip (no full-frame interleave), and libswscale runs single-threaded (`threads=1`,
   like libavcodec: PyAV's default starts a thread per CPU in every decode task).
3. **Non-reference frames skipped in the pre-roll.** After a keyframe seek, the frames up to
   `PREROLL_MARGIN_FRAMES` (24) before the needed one are decoded only as references, so
   libavcodec is told to skip frames nothing references (`skip_frame=NONREF`: most B-frames);
   from 16 frames after switching back, decoded frames must again be consecutive, else the
   video is decoded straight through. Measured in the ablation table below (the corpus now
   has B-frames as streaming encodes do; the table just below predates both).

Before/after: vmae-ray decoder CPU ms per clip, same corpora and plans (`bench.decode_bench.compare`,
best of 2; "straight" is the libavcodec baseline measured in the same run; 224x224 crop):

| workload | straight | before | after | before / straight | after / straight | after / seek floor |
|---|---:|---:|---:|---:|---:|---:|
| kinetics, stride 4x16, 4 clips/video (24 clips) | 596 | 642 | 313 | 1.08 | **0.52** | 1.08 |
| kinetics, uniform 16, 1 clip/video (6 clips) | 2369 | 2412 | 1929 | 1.03 | **0.81** | 1.07 |
| kinetics, stride 4x16, all clips (dense; 4 videos, 45 clips) | 203 | 253 | 224 | 1.24 | **1.11** | 1.13 |
| ssv2, uniform 16 (60 videos) | 24.9 | 57.5 | 31.7 | 2.20 | **1.33** | 1.34 |
"""

# Measured once while changing vmae_ray/decoding.py for issue 10 (`python -m bench.geometry_bench`,
# which loads the previous decoder from git); `make bench` does not re-measure it.
GEOMETRY_CHANGES = """\
## Display geometry and time span (issue 10)

What frames-as-displayed costs the decode stage: the span read from the video packets (the
first packets, and the last GOP found by a seek), the display matrix and sample aspect ratio
applied per frame. Measured with `python -m bench.geometry_bench --workdir bench_out --repeats 5`
on 2026-11-29 (330 s; this 2-core machine, load average 0.8 at the start, 3.5 at the end).
CPU time, best of 5; before = the decoder of commit 0e16f13 (the bench loads it from git),
after = this one, each video decoded by both in turn; straight and seek floor are `make
bench`'s decode-target baselines, measured in the same run. 224x224 crop (resize 232).

| workload | straight ms/clip | seek floor | before | after | before / straight | after / straight | after / before |
|---|---:|---:|---:|---:|---:|---:|---:|
| kinetics, stride 4x16, 4 clips/video (6 videos, 24 clips) | 416.3 | 194.6 | 185.8 | 187.4 | 0.45 | **0.45** | 1.01 |
| ssv2, uniform 16 (60 videos) | 18.3 | 18.3 | 24.2 | 25.0 | 1.32 | **1.37** | 1.03 |

Other runs of the same comparison while the code settled put after/before at 1.00-1.02 on
kinetics (run-to-run noise on HD video is a few percent) and 1.03-1.04 on ssv2: 0.6-0.8 ms
per 240p clip. Measured apart on the same 60 WebM files: reading the first 17 packets 0.05
ms, the seek to the last keyframe and the demux to the end 0.12 ms, the rewind 0.02 ms per
video (before, the decoder trusted the header, which for these files happens to be right);
looking up each converted frame's display matrix 2-5 us a frame; the rest is not
attributable above the noise. The
first frame is decoded while probing only when the first packets leave it open (an open GOP,
a stream cut mid-GOP); an intermediate version that always did so cost kinetics 3% (a
keyframe decoded twice when the plan seeks).

Display transforms per clip: the same videos remuxed with a display matrix or a sample
aspect ratio (`synthetic.remux_with_display_geometry`, no re-encoding: identical decoding
work), `VideoDecoder` CPU ms per clip, best of 5:

| workload | original | rotate 90 | mirror | sample aspect ratio 4:3 |
|---|---:|---:|---:|---:|
| kinetics (720p/1080p H.264, stride 4x16, 4 clips/video) | 194.4 | 193.3 | 200.1 | 193.9 |
| ssv2 (428x240 VP9, uniform 16) | 24.8 | 25.2 | 24.7 | 24.5 |

All within the noise: the quarter turn commutes with the resize (libswscale resizes the
stored frame to the transposed size) and the rotation or mirror is a numpy view the crop copy
reads through. `model_crop` alone, 16 decoded frames (one clip), ms:

| frames | identity | rotate 90 | mirror | rotate 270 + mirror | sample aspect ratio 4:3 |
|---|---:|---:|---:|---:|---:|
| 1280x720 | 10.6 | 10.2 | 9.5 | 9.4 | 11.3 |
| 428x240 | 3.3 | 3.3 | 3.2 | 3.3 | 4.0 |

A sample aspect ratio costs what its larger picture costs: 4:3 widens the resized frame by a
third before the crop (+0.7 ms per 240p clip, +0.7-1.7 ms per 720p clip across runs).

Bytes on object storage: tests/test_timing.py's long Matroska file (30 s of 160x120 H.264 at
2 Mbit/s, 3.87 MB, timestamps from 10 s; no stream duration, the container's Duration element
says 40 s, the end time) on a moto S3 server over HTTP, read through `storage.open_input`'s
ranged reads (64 KiB blocks):

| decoder | probe reads | span found | uniform-16 decode reads in all |
|---|---:|---:|---:|
| before | 98 KB (2.5%) | 40.0 s (wrong: the container's end time) | 5.67 MB (1.47x the file) |
| after | 196 KB (5.1%) | 30.0 s | 6.52 MB (1.69x) |

The probe now reads the header, the first packets and the last GOP, not the file
(`pytest -s tests/test_timing.py -k finding` measures its own copy of the file the same way,
prints the bytes and asserts the probe reads under 15% of them). A sparse plan's decode
reads more than the file with either decoder: the keyframe-seek path demuxes every packet for
its frame index (exact frame numbers need every timestamp), then reads each seek's GOP again
through the read-ahead cache; that is older than this change (building the index from the
MP4 sample table, or keeping the blocks the index scan read, would cut it).
"""

# Measured once while changing vmae_ray/decoding.py for issue 17 (`python -m bench.colour_bench`,
# which loads the previous decoder from git); `make bench` does not re-measure it.
COLOUR_CHANGES = """\
## Every video as it comes: colour, HDR, damage (issue 17)

What reading untagged HD as BT.709, recording damage (libav's errors captured while reading,
packets decoded one by one so a refused one is skipped) and the rest cost the decode stage.
Measured with `python -m bench.colour_bench --workdir bench_out --repeats 5` on 2026-12-07
(447 s; this 2-core machine shared with other work, load average 3.5 at the start). CPU
time, best of 5; before = the decoder of commit 91b2140 (the bench loads it from git), after =
this one, each video decoded by both in turn; straight and seek floor are `make bench`'s
decode-target baselines, measured in the same run. 224x224 crop (resize 232).

| workload | straight ms/clip | seek floor | before | after | before / straight | after / straight | after / before |
|---|---:|---:|---:|---:|---:|---:|---:|
| kinetics, stride 4x16, 4 clips/video (6 videos, 24 clips) | 713.1 | 325.1 | 313.8 | 314.1 | 0.44 | **0.44** | 1.00 |
| ssv2, uniform 16 (60 videos) | 32.5 | 32.8 | 43.0 | 43.5 | 1.32 | **1.34** | 1.01 |

(The machine was about 1.7x slower than for the issue 10 table above; the ratios are what
compare.) The bench corpora are untagged: their 720p and 1080p videos are now read as BT.709
at the same cost. `model_crop` alone, 16 decoded frames (one clip), CPU ms, best of 5
(`--skip decode_stage`, a second run after the tone mapping was made planar, load average
1.8); the HDR files are 16 frames of 10-bit HEVC made by ffmpeg's command line, which before
were converted as if SDR:

| frames | before | after |
|---|---:|---:|
| SDR 1280x720, untagged (BT.601 before, BT.709 now) | 14.1 | 14.4 |
| SDR 1920x1080, untagged | 27.2 | 28.1 |
| HDR PQ 1920x1080 | 33.7 | 64.6 |
| HDR HLG 1920x1080 | 37.6 | 62.6 |
| HDR PQ 1280x720 | 19.8 | 44.0 |

Colour costs nothing: the matrix is one argument of the same libswscale call. Tone mapping
costs about 25-30 ms per clip (1.1 ms a frame for the 224x224 crop in numpy: a table for the
PQ/HLG EOTF, the 3x3 primaries matrix, the Hable curve, a table for the BT.1886 output,
plane by plane; libswscale's 16-bit output itself costs what its 8-bit output did), paid by
HDR videos only; it works on the model's crop, so it does not grow with the input size. A
first version that worked on interleaved pixels with a power function cost 62 ms per clip.
"""



def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _rate(n: float, s: float | None) -> float | None:
    return n / s if s else None


def _peer_rows(m: dict) -> dict[str, dict]:
    """Per peer: videos, clips, wall seconds, memory, or an error."""
    rows: dict[str, dict] = {}
    card = m.get("model_card")
    if card:
        rows["model-card loop (1 process)"] = ({"error": card["error"]} if "error" in card else {
            "videos": card["out"]["videos"], "clips": card["out"]["clips"], "seconds": card["seconds"],
            "memory": card["memory"]})
    rv = m.get("read_videos")
    if rv:
        rows["ray.data.read_videos + groupby + actor"] = ({"error": rv["error"]} if "error" in rv else {
            "videos": rv["out"]["videos"], "clips": rv["out"]["clips"], "seconds": rv["seconds"], "memory": rv["memory"]})
    vr = m.get("vmae_ray")
    if vr:
        rows["vmae-ray (pipeline.run)"] = ({"error": vr["error"]} if "error" in vr else {
            "videos": vr["summary"]["videos_ok"], "clips": vr["summary"]["clips"], "seconds": vr["seconds"],
            "memory": vr["memory"]})
    return rows


def _ratios(m: dict) -> dict[str, float | None]:
    def cps(key: str, clips_path, secs_key="seconds"):
        r = m.get(key)
        if not r or "error" in r:
            return None
        return _rate(clips_path(r), r[secs_key])

    vm = cps("vmae_ray", lambda r: r["summary"]["clips"])
    rv = cps("read_videos", lambda r: r["out"]["clips"])
    mc = cps("model_card", lambda r: r["out"]["clips"])
    return {"vmae": vm, "read_videos": rv, "model_card": mc,
            "vs_read_videos": vm / rv if vm and rv else None, "vs_model_card": vm / mc if vm and mc else None}


def _efficiency(m: dict, res: dict) -> dict[str, Any] | None:
    vr, st = m.get("vmae_ray"), m.get("stages_alone")
    if not vr or "error" in vr or not st or "error" in st:
        return None
    report = vr["summary"].get("stage_report") or {}
    slots = report.get("decode_slots", 1)
    actors = report.get("embed_actors", res.get("num_actors", 1))
    decode = st["decode"]["clips_per_second"] * slots
    model = st["model"]["clips_per_second"] * actors
    e2e = vr["summary"]["clips"] / vr["seconds"]
    # The target is "after start-up": the job's own measurement from its first embedded clip
    # (model actor started, decoding under way) to its last.
    steady = report.get("after_startup_clips_per_second") or e2e
    slowest = min(decode, model)
    # When both stages run on the same cores (CPU model), the most the machine can do is its
    # CPUs over the CPU seconds one clip costs in both stages.
    cpus = res.get("num_cpus") or 1
    shared = cpus / (1.0 / st["decode"]["clips_per_second"] + 1.0 / st["model"]["clips_per_second"])
    return {"decode_alone_per_task": st["decode"]["clips_per_second"], "decode_slots": slots,
            "decode_alone": decode, "model_alone_per_actor": st["model"]["clips_per_second"], "actors": actors,
            "model_alone": model, "slowest": slowest, "slowest_stage": "decode" if decode <= model else "model",
            "e2e": e2e, "pipeline_only": vr["summary"]["clips"] / vr["summary"]["pipeline_seconds"]
            if vr["summary"].get("pipeline_seconds") else None,
            "steady": steady, "first_clip_seconds": report.get("first_clip_seconds"),
            "efficiency": steady / slowest if slowest else None, "clips": vr["summary"]["clips"], "report": report,
            "shared_bound": shared, "vs_shared": steady / shared if shared else None,
            "e2e_efficiency": e2e / slowest if slowest else None,
            "decode_in_process": (st.get("decode_in_process") or {}).get("clips_per_second")}


def render(results: dict) -> str:
    out: list[str] = []
    w = out.append
    mach = results["machine"]
    meas = results.get("measurements", {})
    res = results.get("resources", {})
    w("# Benchmarks\n")
    w(f"Written by `make bench` (`python -m bench.run --workdir bench_out --results BENCHMARKS.md`) on "
      f"{results.get('started_at')}, preset `{results.get('preset')}` (scale {results.get('scale')}); the whole run "
      f"took **{_f(results.get('total_seconds'), 0)} s** including corpus generation "
      f"({'cached' if all(c.get('cached') for c in results.get('corpora', {}).values()) else 'generated in this run'})"
      f". Raw numbers: `bench_out/results.json`.\n")
    w("All numbers are from one run on a small shared machine (2 cores, CPU only); other jobs were running "
      f"on it (load average {mach.get('loadavg_start')} at the start, {mach.get('loadavg_end')} at the end), "
      "so expect noise of tens of percent on wall-clock figures. Decode-stage ratios use CPU time, "
      "best of 2 interleaved runs, which other load barely moves.\n")

    # ---------------------------------------------------------------- summary
    w("## Targets\n")
    w("| target | workload | measured | status |")
    w("|---|---|---|---|")
    eff_rows = []
    for name, m in meas.items():
        r = _ratios(m)
        w(f"| vmae-ray >= {TARGETS['vs_read_videos']:g}x `ray.data.read_videos` (clips/s) | {name} | "
          + (f"{r['vs_read_videos']:.1f}x" if r["vs_read_videos"] else _err(m.get("read_videos")))
          + f" | {_status(r['vs_read_videos'] >= TARGETS['vs_read_videos'] if r['vs_read_videos'] else None)} |")
        w(f"| vmae-ray >= {TARGETS['vs_model_card']:g}x model-card loop (clips/s) | {name} | "
          + (f"{r['vs_model_card']:.1f}x" if r["vs_model_card"] else _err(m.get("model_card")))
          + f" | {_status(r['vs_model_card'] >= TARGETS['vs_model_card'] if r['vs_model_card'] else None)} |")
    for name, m in meas.items():
        d = m.get("decode_target")
        if d and "error" not in d:
            ratio = d["ratio_vs_straight_cpu"]
            w(f"| decode <= {TARGETS['decode_ratio']}x libavcodec decoding the frames the plan needs (CPU time per clip) "
              f"| {name} | {ratio:.2f}x | {_status(ratio <= TARGETS['decode_ratio'])} |")
    for name, m in meas.items():
        e = _efficiency(m, res)
        if e:
            eff_rows.append((name, e))
            big = e["clips"] >= 200
            w(f"| end-to-end >= {TARGETS['efficiency']} x slowest stage alone (>= 200 clips) | {name} ({e['clips']} clips) | "
              f"{e['efficiency']:.2f} | {_status(e['efficiency'] >= TARGETS['efficiency']) if big else 'n/a (< 200 clips)'} |")
    for name, e in eff_rows:
        mean, batch = e["report"].get("mean_clips_per_model_call"), e["report"].get("batch_size")
        if mean and batch:
            w(f"| mean clips per model call >= {TARGETS['model_call_fill']:.0%} of --batch-size | {name} | "
              f"{mean:.2f} of {batch} ({mean / batch:.0%}) | {_status(mean / batch >= TARGETS['model_call_fill'])} |")
    driver_after = ((results.get("driver") or {}).get("sides") or {}).get("after") or {}
    for inputs, p in sorted((driver_after.get("projection") or {}).items(), key=lambda kv: int(kv[0])):
        w(f"| driver CPU per clip <= {TARGETS['driver_us_per_clip']:g} µs at VideoMAE-B geometry (projected from "
          f"Ray Data's measured cost per task and block) | {int(inputs):,} videos, uniform sampling | "
          f"{p['driver_cpu_us_per_clip']:.1f} µs | {_status(p['driver_cpu_us_per_clip'] <= TARGETS['driver_us_per_clip'])} |")
    per_input = (driver_after.get("listing") or {}).get("bytes_per_input")
    if per_input is not None:
        w(f"| driver memory per input <= {TARGETS['driver_bytes_per_input']:g} bytes (--dry-run, manifests of 1M and "
          f"10M) | - | {per_input:.1f} bytes | {_status(per_input <= TARGETS['driver_bytes_per_input'])} |")
    mem = results.get("memory")
    if isinstance(mem, list) and mem:
        peak = max(x["peak_rss_mib"] for x in mem)
        w(f"| decode task RSS < 1.5 GB on hour-long 1080p (stride clips) | long1080 | peak {peak:.0f} MiB "
          f"| {_status(peak < TARGETS['decode_rss_mib'])} |")
    big = _largest_vector_size(results.get("vectors") or {})
    if big:
        a = big["approx_search"]
        ok = a["recall_at_10"] >= TARGETS["vector_recall"] and big["speedup_vs_exact"] >= TARGETS["vector_speedup"]
        w(f"| approximate search: recall@10 >= {TARGETS['vector_recall']} at <= 1/{TARGETS['vector_speedup']:g} of exact "
          f"latency | {big['rows']:,} x {big['dim']} vectors | recall@10 {a['recall_at_10']:.3f}, "
          f"{big['speedup_vs_exact']:g}x faster ({a['median_ms']:.2f} vs {big['exact_search']['median_ms']:.1f} ms) "
          f"| {_status(ok)} |")
    tot = results.get("total_seconds")
    if tot:
        w(f"| `make bench` < 15 min on this machine | all | {tot / 60:.1f} min | {_status(tot < TARGETS['bench_seconds'])} |")
    gpu = results.get("gpu") or {}
    w("| GPU model stage: clips/s and MFU (VideoMAE-B) | - | "
      + ("not measured: no GPU was lent to this run (CPU smoke mode only)" if not gpu.get("cuda_available")
         else f"{gpu.get('forward_clips_per_second')} clips/s, MFU {gpu.get('forward_mfu')}") + " | "
      + ("n/a" if not gpu.get("cuda_available") else "measured") + " |")
    w("")

    # ---------------------------------------------------------------- machine and commands
    w("## Machine\n")
    w(f"- CPU: {mach.get('nproc')} x {mach.get('cpu_model')} (`nproc` = {mach.get('nproc')}); RAM {mach.get('ram_gib')} GiB; "
      f"GPU: {mach.get('gpu')}")
    w(f"- {mach.get('os')}; Python {mach.get('python')}")
    w(f"- ray {mach.get('ray')}, torch {mach.get('torch')}, transformers {mach.get('transformers')}, "
      f"av (PyAV) {mach.get('av')} with libavcodec {mach.get('libavcodec')} / libswscale {mach.get('libswscale')}, "
      f"pyarrow {mach.get('pyarrow')}, decord {mach.get('decord')}")
    w(f"- load average at start / end: {mach.get('loadavg_start')} / {mach.get('loadavg_end')}\n")
    w("## Commands\n")
    w("```")
    w("make bench                      # = .venv/bin/python -m bench.run --workdir bench_out --results BENCHMARKS.md")
    w("python -m bench.corpus --preset small          # corpora only (cached by spec under bench_out/corpus)")
    w("python -m bench.gpu_model [--smoke]            # model stage at VideoMAE-B size (needs CUDA without --smoke)")
    w("python -m bench.ablation --clips 2 --batch-size 2  # --reconstruction off/on at VideoMAE-B size on CPU (slow)")
    w("python -m bench.report bench_out/results.json  # re-render this file")
    for name, m in meas.items():
        vr = m.get("vmae_ray")
        if vr and "command" in vr:
            w(f"# vmae-ray peer, {name}:")
            w(vr["command"].replace(results.get("_root", "") + "/", ""))
    for x in (mem if isinstance(mem, list) else []):
        w(x.get("command", "").replace(results.get("_root", "") + "/", ""))
    vec = results.get("vectors") or {}
    for x in [*vec.get("sizes", []), *([vec["ablation"]] if vec.get("ablation") else [])]:
        w(x.get("command", ""))
    w("```")
    w(f"Resources given to both Ray peers: decode/read tasks {res.get('decode_cpus')} CPU each, "
      f"{res.get('num_actors')} model actor with {res.get('cpus_per_actor')} CPU, batch {res.get('batch_size')}; "
      f"Ray started with num_cpus={res.get('num_cpus')}. The model-card loop is one Python process "
      "(torch uses its default threads).\n")

    # ---------------------------------------------------------------- corpora, model
    w("## Corpora\n")
    w("| corpus | videos | shape | duration | frames | size | mean bitrate | generation |")
    w("|---|---:|---|---:|---:|---:|---:|---|")
    for name, c in results.get("corpora", {}).items():
        gen = "cached" if c.get("cached") else f"{_f(c.get('generation_seconds'), 0)} s"
        w(f"| {name} | {c['videos']} | {c['describe']} | {c['seconds']:.0f} s | {c['frames']} | "
          f"{c['bytes'] / 2**20:.0f} MiB | {c['mean_bit_rate'] / 1e6:.2f} Mbit/s | {gen} |")
    w("")
    w("Made by `bench/corpus.py` with PyAV: synthetic pictures with real encoder work (two textured layers "
      "moving in different directions, noise, a moving block), x264 `superfast` CRF 23 with a fixed GOP and "
      "B-frames, libvpx-vp9 realtime at 300 kbit/s for the SSv2-shaped clips. H.264 videos longer than 10 s "
      "repeat a unique 10 s segment (whole closed GOPs) at the packet level, so the file is a valid stream of the "
      "stated length whose decode cost per frame is that of the segment. `long1080` is mostly static (CRF 30): "
      "a one-hour 1080p file generated in seconds.\n")
    model = results.get("model", {})
    w("## Model\n")
    w(f"Randomly initialised VideoMAE (`make_tiny_checkpoint`, `{model.get('checkpoint')}`): {model.get('num_frames')} "
      f"frames of {model.get('image_size')}x{model.get('image_size')} (resize short side to "
      f"{model.get('resize_shortest_edge')}, center crop {model.get('crop')}), patch {model.get('patch_size')}, "
      f"tubelet {model.get('tubelet_size')} (1568 tokens, as VideoMAE-B), hidden {model.get('hidden_size')}, "
      f"{model.get('num_hidden_layers')} layer: the real clip geometry with a tiny encoder, so that on CPU the "
      "model stage is cheap next to decoding and the runs measure the decode path (on CPU most of its time is "
      "attention over the 1568 tokens).\n")

    # ---------------------------------------------------------------- ray start
    ray_info = results.get("ray")
    if ray_info:
        w("## Ray start-up (reported apart)\n")
        w(f"`ray.init` took {ray_info['ray_init_seconds']} s; with a first trivial Ray Data job (worker processes "
          f"started) {ray_info['ray_start_seconds']} s. Ray was started once; every Ray peer below ran on it, and "
          "its time excludes this start-up (it includes everything else: planning, actor start and model load, "
          "and for vmae-ray listing, writing and committing the Parquet tables).\n")

    # ---------------------------------------------------------------- peers
    w("## Peers, end to end\n")
    for name, m in meas.items():
        wl = results.get("workloads", {}).get(name, {})
        w(f"### {name}: {wl.get('description', '')}\n")
        w(f"Sampling: {wl.get('sampling')}.\n")
        w("| peer | videos | clips | wall s | videos/s | clips/s | peak RSS driver | peak RSS largest worker "
          "| sum of worker RSS | peak object store |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for peer, row in _peer_rows(m).items():
            if "error" in row:
                w(f"| {peer} | - | - | - | - | - | - | - | - | did not run: {row['error'][:300]} |")
                continue
            mm = row["memory"]
            ray_cols = (f"{mm['worker_rss_max_mib']:.0f} MiB | {mm['worker_rss_sum_mib']:.0f} MiB | "
                        f"{mm['object_store_peak_mib']:.0f} MiB"
                        + (f" (+{mm['object_store_spilled_mib']:.0f} spilled)" if mm.get("object_store_spilled_mib") else "")
                        ) if "model-card" not in peer else "- | - | -"
            w(f"| {peer} | {row['videos']} | {row['clips']} | {row['seconds']:.1f} | "
              f"{row['videos'] / row['seconds']:.2f} | {row['clips'] / row['seconds']:.2f} | "
              f"{mm['driver_rss_mib']:.0f} MiB | {ray_cols} |")
        r = _ratios(m)
        w("")
        w("Worker RSS counts the object-store pages a worker has mapped (shared memory), so for read_videos, "
          "whose shuffle maps gigabytes of frames, it overstates private memory; the object-store column is the "
          "store's own count. The model-card loop's RSS is its whole process.")
        w(f"vmae-ray / read_videos: **{_f(r['vs_read_videos'], 1)}x**; vmae-ray / model-card: "
          f"**{_f(r['vs_model_card'], 1)}x** (clips/s).")
        card = m.get("model_card")
        if card and "error" not in card:
            o = card["out"]
            w(f"Model-card loop breakdown: decoding + RGB of all {o['frames_decoded']} frames {o['decode_seconds']:.1f} s, "
              f"VideoMAEImageProcessorPil {o['preprocess_seconds']:.1f} s, model {o['model_seconds']:.1f} s "
              f"(torch threads {o['torch_threads']}).")
        for key, label in (("vmae_ray", "vmae-ray"), ("read_videos", "read_videos")):
            x = m.get(key)
            if x and "error" not in x and x["memory"].get("cpu_seconds"):
                cpu = x["memory"]["cpu_seconds"]
                total = sum(cpu.values())
                top = ", ".join(f"{k} {v:.1f}" for k, v in list(cpu.items())[:6])
                w(f"CPU seconds during the {label} run ({x['seconds']:.1f} s wall, {total:.1f} CPU s = "
                  f"{total / x['seconds']:.2f} cores busy on average): {top}.")
        rv = m.get("read_videos")
        if rv and "error" not in rv:
            w(f"read_videos ran with `resize={tuple(rv['out']['resize'])}` (its own option; frames at full "
              "resolution would not fit this machine's object store for this corpus).")
        w("")

    # ---------------------------------------------------------------- stages alone, efficiency
    w("## Each stage alone, and pipeline efficiency\n")
    w("Decode alone: `vmae_ray.stages.decode_batch` (the decode task's UDF: open, probe, plan, decode, "
      "convert, Arrow rows; with the job's default crash isolation, in a child process) over the corpus, one "
      "video per call, from one process. Model alone: `VideoMAEEmbedder.embed` on clips "
      "decoded beforehand, batch and torch threads as in the actor. A stage's capacity alone is its rate times "
      "the workers the pipeline gives it (decode slots, actors). Efficiency (the target's \"after start-up\") is "
      "vmae-ray's clips/s from its first embedded clip to its last, as the job reports it, over the slower "
      "capacity; the first clip arrives once the model actor has started (importing torch and transformers, "
      "loading the checkpoint) and decoding is under way. End to end (wall time after Ray start-up, everything "
      "included) is shown beside it. The last columns are the job's own stage report (busy time measured inside "
      "the UDFs during the run).\n")
    w("| workload | clips | decode alone (per task x slots) | model alone (per actor x actors) | slowest | "
      "end to end | first clip after | after start-up | efficiency | shared-CPU bound | after start-up / shared bound | "
      "job's report: decode / embed capacity, bottleneck |")
    w("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, e in eff_rows:
        rep = e["report"]
        w(f"| {name} | {e['clips']} | {e['decode_alone_per_task']:.2f} x {e['decode_slots']} = {e['decode_alone']:.2f} clips/s | "
          f"{e['model_alone_per_actor']:.2f} x {e['actors']} = {e['model_alone']:.2f} clips/s | {e['slowest_stage']} | "
          f"{e['e2e']:.2f} clips/s ({e['e2e_efficiency']:.2f}) | {_f(e['first_clip_seconds'])} s | {e['steady']:.2f} clips/s | "
          f"**{e['efficiency']:.2f}** | {e['shared_bound']:.2f} clips/s | {e['vs_shared']:.2f} | "
          f"{_f(rep.get('decode_capacity_clips_per_second'))} / {_f(rep.get('embed_capacity_clips_per_second'))} clips/s, "
          f"{rep.get('bottleneck', '-')} |")
    w("")
    w("Decode alone runs `stages.decode_batch` with the job's defaults, i.e. in its crash-isolation child "
      "process with rows sent back over a pipe; without isolation (the decoding itself, in-process): "
      + ", ".join(f"{n} {_f(e['decode_in_process'])} clips/s" for n, e in eff_rows) + ". The shared-CPU bound "
      "is the machine's CPUs over the CPU time one clip costs in both stages (decode and model run on the same "
      "cores here; with a GPU they would not). In parentheses after end to end: the same ratio for the whole run.\n")

    # ---------------------------------------------------------------- decode target
    w("## Decode stage against libavcodec\n")
    w("`bench/decode_bench.py`: per video, the job's clip plan names the frames each clip needs. Baselines "
      "decode with the same PyAV/libavcodec and the same thread settings as the decoder (1 thread, slice "
      "threading) and convert nothing: **straight** decodes packets from the start up to the last needed "
      "frame (the target's definition); **seek floor** seeks to the keyframe before every needed frame that "
      "is not reachable within the current GOP and decodes forward (the least decoding possible). vmae-ray "
      "is `VideoDecoder(...).clips(...)` consumed to the end: open, probe, plan, packet scan, seeks, "
      "conversion of the sampled frames. Best of 2 interleaved runs; CPU seconds (wall in parentheses).\n")
    w("| workload | videos | clips | straight ms/clip | seek floor ms/clip | vmae-ray ms/clip | vmae-ray / straight "
      "| vmae-ray / seek floor |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in meas.items():
        d = m.get("decode_target")
        if not d:
            continue
        if "error" in d:
            w(f"| {name} | - | - | - | - | - | failed: {d['error'][:200]} | - |")
            continue
        w(f"| {name} | {d['videos']} | {d['clips']} | "
          f"{d['straight_ms_per_clip_cpu']:.1f} ({d['straight_ms_per_clip_wall']:.1f}) | "
          f"{d['seek_ms_per_clip_cpu']:.1f} ({d['seek_ms_per_clip_wall']:.1f}) | "
          f"{d['vmae_ms_per_clip_cpu']:.1f} ({d['vmae_ms_per_clip_wall']:.1f}) | **{d['ratio_vs_straight_cpu']:.2f}** "
          f"({d['ratio_vs_straight_wall']:.2f}) | {d['ratio_vs_seek_cpu']:.2f} ({d['ratio_vs_seek_wall']:.2f}) |")
    w("")
    for name, m in meas.items():
        d = m.get("decode_target")
        if d and "error" not in d and len(d["rows"]) <= 12:
            w(f"<details><summary>{name}: per video</summary>\n")
            w("| video | frames | clips | frames decoded straight / seek floor | straight ms | seek floor ms | vmae-ray ms |")
            w("|---|---:|---:|---|---:|---:|---:|")
            for row in d["rows"]:
                w(f"| {row['path'].rsplit('/', 1)[-1]} | {row['frames_in_file']} | {row['clips']} | "
                  f"{row['frames_straight']} / {row['frames_seek']} | {1000 * row['straight_cpu']:.0f} | "
                  f"{1000 * row['seek_cpu']:.0f} | {1000 * row['vmae_cpu']:.0f} |")
            w("\n</details>\n")
    w(DECODER_CHANGES)
    w(GEOMETRY_CHANGES)
    w(COLOUR_CHANGES)

    # ---------------------------------------------------------------- memory
    w("## Decode-task memory on long 1080p video\n")
    if isinstance(mem, list) and mem:
        w("`bench/memory.py`, a fresh process per case running `vmae_ray.stages.decode_video` (the decode "
          "task's function; rows dropped as they are produced, as Ray Data hands blocks on). Peak RSS is the "
          "process's `VmHWM`, interpreter and libraries included; `before` is RSS after imports.\n")
        w("| file | length | frames | bitrate | sampling | clips | decode s | RSS before | peak RSS | RSS over time (s: MiB) |")
        w("|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
        for x in mem:
            samples = ", ".join(f"{t:g}: {r:.0f}" for t, r in x["rss_samples_mib"][:8])
            w(f"| {x['name']} | {x['duration_seconds'] / 60:.0f} min | {x['frames']} | {x['bit_rate'] / 1e6:.2f} Mbit/s | "
              f"{x['sampling']} | {x['clips']} | {x['seconds']:.1f} | {x['rss_before_mib']:.0f} MiB | "
              f"**{x['peak_rss_mib']:.0f} MiB** | {samples} |")
        w("")
        w("What was measured: the one-hour file is a real 108,000-frame 1080p H.264 stream (a 250-frame segment "
          "repeated at the packet level, mostly static content, so it is small and quick to make); decoding all "
          "of it would take minutes here, so the hour is decoded with 32 stride clips spread over it (keyframe "
          "seeks, the packet index of all 108,000 frames held in memory). Decoding every frame (back-to-back "
          "clips) is measured on the shorter files of the same stream: peak RSS does not grow with length "
          "(clips leave as they complete; the decoder holds only the frames of open clips), so an hour "
          "decoded in full stays at the same level.\n")
    elif isinstance(mem, dict) and "error" in mem:
        w(f"Failed: {mem['error']}\n")

    # ---------------------------------------------------------------- gpu
    w("## GPU model stage\n")
    if gpu and not gpu.get("cuda_available"):
        w("**No GPU was lent to this run: the GPU numbers were not measured.** `bench/gpu_model.py` ran in its "
          "CPU smoke mode only (a tiny configuration, to check the code path): "
          f"`{gpu.get('command', 'python -m bench.gpu_model --smoke')}` "
          + (f"({gpu.get('forward_clips_per_second')} clips/s forward, {gpu.get('embedder_clips_per_second')} "
             "clips/s through the embedder, on CPU, meaningless for GPU sizing)." if "error" not in gpu else
             f"failed: {gpu['error'][:300]}"))
        w("")
        w("On a CUDA machine, `python -m bench.gpu_model` measures VideoMAE-Base (random weights; 16x224x224, "
          "hidden 768, 12 layers; 360.7 GFLOPs per clip counting 2 per multiply-accumulate, i.e. the paper's "
          "180 GFLOPs) in bf16: clips/s for the model alone and through `VideoMAEEmbedder.embed` from uint8 host "
          "clips, and MFU against the dense bf16 peak (989 TFLOP/s on H100/H200).\n")
    elif gpu and "error" not in gpu:
        w("| device | dtype | batch | GFLOPs/clip | forward clips/s | forward MFU | embedder clips/s | embedder MFU |")
        w("|---|---|---:|---:|---:|---:|---:|---:|")
        w(f"| {gpu['device']} | {gpu['dtype']} | {gpu['batch_size']} | {gpu['gflops_per_clip']} | "
          f"{gpu['forward_clips_per_second']} | {_f(gpu.get('forward_mfu'), 3)} | {gpu['embedder_clips_per_second']} | "
          f"{_f(gpu.get('embedder_mfu'), 3)} |\n")
    elif gpu:
        w(f"Failed: {gpu.get('error', '')[:500]}\n")

    w(_ablations(results.get("ablations") or {}))
    w(_vectors(results.get("vectors") or {}))
    w(_driver(results.get("driver") or {}))
    w(_misses(results, meas, res, eff_rows))
    return "\n".join(out) + "\n"


def _cpu_per_clip(x: dict | None, clips: int) -> float | None:
    if not x or "error" in x or not clips:
        return None
    # All processes on the machine during the run (other load included: best effort).
    cpu = x["memory"].get("cpu_seconds") or {}
    return sum(cpu.values()) / clips


def _ablations(ab: dict) -> str:
    """Each throughput change of the codebase, off and on, from `bench/ablation.py`."""
    if not ab:
        return ""
    lines = ["## Ablations: each change off and on\n",
             "`bench/ablation.py`, same run, same corpora and model; best of interleaved repeats. Each row switches "
             "one change off (the code path it replaced) and on.\n",
             "| change | workload | off | on | gain |", "|---|---|---:|---:|---:|"]
    rows = {
        "model_folding": lambda m: (
            f"| normalisation folded into the patch embedding (uint8 clips in; `embedder.FoldedPatchEmbedding`) | "
            f"model stage, CPU, batch {m['batch_size']}, {m['torch_threads']} thread(s) | "
            f"{m['unfolded_ms_per_clip']:.1f} CPU ms/clip | {m['folded_ms_per_clip']:.1f} CPU ms/clip | "
            f"**{m['speedup']:.2f}x** (max embedding difference {m['max_abs_embedding_diff']:.1e}) |"),
        "isolation": lambda i: (
            f"| crash isolation: decoding in a child process, rows back as Arrow IPC read into place | "
            f"ssv2, {i['videos']} videos, decode UDF, CPU of both processes | "
            f"{i['in_process_ms_per_clip']:.1f} CPU ms/clip (in process) | "
            f"{i['isolated_ms_per_clip']:.1f} CPU ms/clip (isolated) | "
            f"cost {i['overhead_ms_per_clip']:+.1f} ms/clip ({100 * i['overhead_fraction']:+.0f}%) |"),
        "preroll_skip": lambda k: (
            f"| non-reference frames skipped in the pre-roll after a keyframe seek | kinetics, {k['clips']} "
            f"stride clips, decoder | {k['no_skip_ms_per_clip']:.1f} CPU ms/clip | "
            f"{k['skip_ms_per_clip']:.1f} CPU ms/clip | **{k['speedup']:.2f}x** |"),
        "reconstruction": lambda r: (
            f"| `--reconstruction` off and on (the pretraining decoder's loss per clip; costs, does not gain) | "
            f"model stage, CPU, bench geometry ({r['tokens']} tokens) as a pretraining checkpoint, batch "
            f"{r['batch_size']}, {r['torch_threads']} thread(s) | {r['off_clips_per_cpu_second']:.1f} clips/CPU s | "
            f"{r['on_clips_per_cpu_second']:.1f} clips/CPU s | **{r['ratio']:.2f}x** (VideoMAE-B by FLOPs: "
            f"{r['videomae_b']['embed_gflops']:.0f} + {r['videomae_b']['extra_gflops']:.0f} GFLOPs per clip, "
            f"{r['videomae_b']['ratio']:.2f}x) |"),
        "cluster_autoscaler": lambda c: (
            f"| Ray Data cluster autoscaler V2 instead of Ray 2.60's default RATE_BASED | ssv2, "
            f"{c['V2']['clips']} clips, whole job on a running Ray | "
            f"{c['RATE_BASED']['clips_per_second']:.2f} clips/s | {c['V2']['clips_per_second']:.2f} clips/s | "
            f"**{c['speedup']:.2f}x** |"),
    }
    for key, render_row in rows.items():
        entry = ab.get(key)
        if entry and "error" not in entry:
            lines.append(render_row(entry))
    for key, value in ab.items():
        if isinstance(value, dict) and "error" in value:
            lines.append(f"| {key} | - | failed: {value['error'][:200]} | | |")
    lines.append("")
    lines.append(
        "Why each is worth having: the normalised float32 clip is four times the uint8 one and three passes over it "
        "on CPU cost more than the tiny model itself (on a GPU the fold saves a kernel chain per batch and keeps the "
        "input exact in bf16); isolation's cost is what a crash-proof decoder costs now (with pickled tables, before "
        "the IPC transport, it was +9.5 ms per clip, +27%: `bench.ablation.isolation` on the first 60 ssv2 videos with "
        "commit 0353643's `vmae_ray` against +1.5 ms, +4%, at this commit, one run on 2026-11-24); B-frames are about half the "
        "frames of a streaming-style H.264 encode; and with fractional decode CPUs (`--decode-cpus 0.5`) the "
        "RATE_BASED autoscaler's coordinator rounds the cluster's leftover CPUs down to whole ones, so on 2 CPUs one "
        "decode task ran instead of two once its reservation settled (the job sets V2 unless "
        "`RAY_DATA_CLUSTER_AUTOSCALER` is set). The settling takes a while, so a short run barely shows it; on the "
        "600-clip ssv2 corpus (`python -m bench.corpus --preset small --scale 3`, then `RAY_DATA_CLUSTER_AUTOSCALER="
        "RATE_BASED|V2 python jobs/embed_videos.py --input bench_out/corpus/ssv2-<key> ...` with the ssv2 flags "
        "above) it was 15.2 against 20.9 clips/s end to end (62% against 95% CPU busy in the steady state), "
        "measured once on 2026-11-24 at commit 5d628dc, V2 set through the environment.\n")
    if ab.get("reconstruction") and "error" not in ab["reconstruction"]:
        lines.append(
            "`--reconstruction` is a cost, not a gain: besides the embedding pass it runs the encoder on the visible "
            "tenth of the tokens and the pretraining decoder over all of them. The bench model's encoder is one "
            "32-wide layer, so on CPU the decoder and the target arithmetic (per-patch normalisation of 2.2 million "
            "pixel values per clip) weigh far more than they do at VideoMAE-B size; a GPU running VideoMAE-B is "
            "compute-bound, and there the FLOPs ratio in the row is the expected cost. At VideoMAE-B size on this "
            "machine's CPU it is just that: 0.283 against 0.236 clips "
            "per CPU second, **0.84x** (random weights, transformers' default decoder of 4 layers 384 wide as in the "
            "MCG-NJU checkpoints, 2 clips, 1 thread: `python -m bench.ablation --workdir bench_out --clips 2 "
            "--batch-size 2 --threads 1`, measured once on 2026-11-29).\n")
    return "\n".join(lines) + "\n"


def _driver(d: dict) -> str:
    """Issue 16: what one driver process costs, before and after the workers write."""
    if not d:
        return ""
    if "error" in d:
        return f"## One driver for a fleet (issue 16)\n\nfailed: {d['error'][:500]}\n"
    sides = d.get("sides") or {}
    before, after = sides.get("before") or {}, sides.get("after") or {}

    def job(side: dict, geometry: str, key: str):
        return ((side.get("jobs") or {}).get(geometry) or {}).get(key)

    def fit(side: dict, key: str):
        return ((side.get("jobs") or {}).get("fit") or {}).get(key)

    def listing(side: dict, key: str):
        return (side.get("listing") or {}).get(key)

    def cell(x, nd=1, unit=""):
        return "-" if x is None else (f"{x:,.{nd}f}{unit}" if isinstance(x, (int, float)) else str(x))

    def ratio(a, b):
        return f"{a / b:.0f}x less" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 and a > b \
            else "-"

    blocks_ms = (after.get("ray_data_blocks") or {}).get("driver_cpu_ms_per_block")
    task_ms = (after.get("ray_data_blocks") or {}).get("driver_cpu_ms_per_task_and_block")
    receipt_ms = (after.get("receipts") or {}).get("ms_per_receipt")
    projection = after.get("projection") or {}
    rows = [
        ("driver CPU per clip, fit over both geometries' runs (µs)", fit(before, "driver_cpu_us_per_clip"),
         fit(after, "driver_cpu_us_per_clip")),
        ("driver CPU per clip, VideoMAE-B geometry, slope small -> large run (µs)",
         job(before, "videomae_b", "driver_cpu_us_per_clip_slope"), job(after, "videomae_b", "driver_cpu_us_per_clip_slope")),
        ("driver CPU per clip, 8x32x32 geometry, slope (µs)", job(before, "small", "driver_cpu_us_per_clip_slope"),
         job(after, "small", "driver_cpu_us_per_clip_slope")),
        ("driver CPU per clip, VideoMAE-B, the large run's total over its clips (µs)",
         job(before, "videomae_b", "driver_cpu_us_per_clip_ratio"), job(after, "videomae_b", "driver_cpu_us_per_clip_ratio")),
        ("driver CPU per second of run while waiting (Ray Data's executor polls), fit (CPU s / s)",
         fit(before, "cpu_seconds_per_wall_second"), fit(after, "cpu_seconds_per_wall_second")),
        ("clips per Ray Data block, VideoMAE-B (all operators)", 1.0, job(after, "videomae_b", "clips_per_ray_data_block")),
        ("mean clips per model call, VideoMAE-B large run (batch 8)", job(before, "videomae_b", "clips_per_model_call"),
         job(after, "videomae_b", "clips_per_model_call")),
        ("end-to-end clips/s, VideoMAE-B large run", job(before, "videomae_b", "clips_per_second"),
         job(after, "videomae_b", "clips_per_second")),
        ("end-to-end clips/s, 8x32x32 large run", job(before, "small", "clips_per_second"),
         job(after, "small", "clips_per_second")),
        ("driver peak memory per input, listing and diff (bytes)", listing(before, "bytes_per_input")
         or listing(before, "bytes_per_input_upper_bound"), listing(after, "bytes_per_input")),
        ("one driver core: clips/s it sustains, from the fit (after the waiting cost)",
         fit(before, "one_core_clips_per_second"),
         fit(after, "one_core_clips_per_second") or ("see the projections" if fit(after, "driver_cpu_us_per_clip")
                                                     is not None else None)),
    ]
    for inputs, p in sorted(projection.items(), key=lambda kv: int(kv[0])):
        rows.append((f"driver CPU per clip projected for {int(inputs):,} VideoMAE-B videos, uniform sampling "
                     f"({p['videos_per_task']} videos a decode task, {p['clips_per_actor_call']} clips an actor call, "
                     f"{p['clips_per_decoded_block']} a decoded block) (µs)",
                     fit(before, "driver_cpu_us_per_clip"), p["driver_cpu_us_per_clip"]))
        rows.append((f"one driver: H100s at 40% MFU ({d.get('h100_clips_per_second_at_40pct_mfu')} VideoMAE-B "
                     f"clips/s each), {int(inputs):,} videos",
                     fit(before, "h100s_at_40pct_mfu"), p["h100s_at_40pct_mfu"]))
    lines = ["## One driver for a fleet (issue 16)\n",
             f"Every driver below is its own process connected with `RAY_ADDRESS` to a Ray started first with "
             f"`ray start` (2 CPUs, private temp dir and ports, token authentication off); its CPU seconds and peak "
             f"RSS come from the kernel (`wait4`), so they are the driver's alone. *Before* is commit "
             f"`{d.get('before_commit')}` (the driver assembled and wrote every row; one clip per Ray Data block), "
             f"run from a `git worktree` with its own Ray; *after* is this commit. Ray Data's own driver CPU: "
             f"**{cell(blocks_ms, 2)} ms per block** (ten no-op tasks yielding many blocks each, the slope over two "
             f"block counts) and **{cell(task_ms, 2)} ms per task** with its block (no-op tasks of one block, the slope); "
             f"the driver's own work per receipt (416 inputs done): **{cell(receipt_ms, 3)} ms**. The projections "
             f"multiply these by the tasks, blocks and receipts a run of that size has (the job's own sizing, "
             f"`vmae_ray.graph`); at VideoMAE-B geometry this machine embeds about 30 clips/s, where Ray Data's "
             f"executor polling (the per-second cost) hides the per-clip cost, so the runs alone cannot show it. "
             f"Preset `{d.get('preset')}`; command: `{d.get('command', 'python -m bench.driver_bench')}`.\n",
             "| measure | before | after | |", "|---|---:|---:|---|"]
    for name, b, a in rows:
        if "fit over both" in name:
            # A fit whose per-clip term is not above zero cannot tell the per-clip cost from the
            # executor's per-second polling and this machine's noise: said as such.
            b, a = (f"below noise (fit {x:,.0f})" if isinstance(x, (int, float)) and x <= 0 else x for x in (b, a))
        lines.append(f"| {name} | {cell(b, 1 if not isinstance(b, int) else 0)} | {cell(a, 1 if not isinstance(a, int) else 0)} "
                     f"| {ratio(b, a) if 'per clip' in name or 'memory' in name else ''} |")
    lines.append("")
    for side_name, side in (("before", before), ("after", after)):
        runs = [(g, size, r) for g, e in (side.get("jobs") or {}).items() if isinstance(e, dict) and "runs" in e
                for size, r in e["runs"].items()]
        if runs:
            lines.append(f"Runs, {side_name}: " + "; ".join(
                f"{g} {size} videos: {r.get('clips')} clips, driver {r.get('cpu_seconds')} CPU s in "
                f"{r.get('wall_seconds')} s, peak {r.get('peak_rss_mib')} MiB" for g, size, r in runs) + ".")
        lst = (side.get("listing") or {}).get("runs") or {}
        if lst:
            lines.append(f"Listing and diff, {side_name}: " + "; ".join(
                f"{int(n):,} inputs: " + (r["skipped"] if "skipped" in r else
                                          f"peak {r.get('peak_rss_mib')} MiB, {r.get('cpu_seconds')} CPU s, "
                                          f"{r.get('wall_seconds')} s") for n, r in lst.items()) + ".")
    lines.append("")
    return "\n".join(lines) + "\n"


def _largest_vector_size(vec: dict) -> dict | None:
    sizes = [x for x in vec.get("sizes", []) if "error" not in x]
    return max(sizes, key=lambda x: x["rows"]) if sizes else None


def _mib(x: float | None) -> str:
    return "-" if x is None else (f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB")


def _vectors(vec: dict) -> str:
    """`vmae-ray search`/`index`/`dedup` at corpus scale, from `bench/vector_bench.py`."""
    sizes = vec.get("sizes", [])
    if not sizes:
        return ""
    lines = ["## Vector search, index and dedup at corpus scale\n",
             "Synthetic embeddings (`synthetic.clustered_unit_vectors`): D=768 float32 unit vectors spanning a "
             "32-dimensional subspace (embeddings of real corpora have an intrinsic dimension of tens), one cluster "
             "per 1,000 rows (cosine within a cluster about 0.5, across about 0), 2% planted near-duplicates (cosine "
             "about 0.97 to their source). Each size runs in a fresh process (`bench/vector_bench.py`), with the library's own "
             "functions: exact search is `vmae-ray search` without an index (`neighbours.cosine_top_k`), the index "
             "is the one `vmae-ray index` builds for that row count, dedup is `vmae-ray dedup`'s "
             "(`neighbours.near_duplicate_links`, threshold 0.9). Latency is one query at a time (a row of the "
             "table, its own row excluded), median over the queries; recall@10 is against the exact answers of "
             "the same queries, which are not the rows nprobe was tuned on. Memory is each phase's peak RSS above "
             "the RSS before it.\n"]
    for x in sizes:
        if "error" in x:
            lines.append(f"{x.get('command')}: failed: {x['error'][-300:]}\n")
    ok = [x for x in sizes if "error" not in x]
    lines += ["| rows | matrix | exact search | index | build (train + add + tune nprobe) | build memory | nprobe "
              "| approximate search | recall@10 | speed-up |",
              "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for x in [*ok, *([vec["ablation"]] if vec.get("ablation") and "error" not in vec["ablation"] else [])]:
        ph, idx, a = x["phases"], x["index"], x["approx_search"]
        parts = [ph[p]["seconds"] for p in ("index_train", "index_add", "index_tune") if p in ph]
        mem = max(ph[p]["peak_extra_mib"] for p in ("index_train", "index_add", "index_tune") if p in ph)
        tag = " (ablation: 4 sqrt(N) lists)" if x.get("nlist_per_sqrt_rows", 1.0) != 1.0 else ""
        lines.append(f"| {x['rows']:,}{tag} | {_mib(x['matrix_mib'])} | {x['exact_search']['median_ms']:.1f} ms | "
                     f"{idx['plan']} | {idx['build_seconds']:.1f} s ({' + '.join(f'{p:.1f}' for p in parts)}) | "
                     f"{_mib(mem)} (index {_mib(idx['index_mib'])}) | {idx['nprobe'] or '-'} | {a['median_ms']:.2f} ms | "
                     f"{a['recall_at_10']:.3f} | {x['speedup_vs_exact']:g}x |")
    lines.append("")
    dd = [x for x in ok if "dedup" in x]
    if dd:
        lines += ["| rows | dedup method | wall | peak memory above the matrix | pairs compared | links | groups "
                  "| link recall (sampled rows) | planted copies grouped with their source |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for x in dd:
            d, st = x["dedup"], x["dedup"]["stats"]
            method = ("all pairs (exact)" if st["method"] == "all_pairs" else
                      f"k-means partition, nlist {st['nlist']}, nprobe {st['nprobe']}")
            recall = (f"{st['link_recall']:.3f} ({st['recall_sample_links']} links of {st['recall_sample_rows']} rows)"
                      if st.get("link_recall") is not None else "-")
            lines.append(f"| {x['rows']:,} | {method} | {x['phases']['dedup']['seconds']:.1f} s | "
                         f"{_mib(x['phases']['dedup']['peak_extra_mib'])} | {100 * st['share_compared']:.2f}% | "
                         f"{d['links']} | {d['groups']} | {recall} | {d['planted_copies_grouped_with_source']} of "
                         f"{d['planted_copies']} |")
            if d.get("all_pairs"):
                ap = x["phases"].get("dedup_all_pairs", {})
                lines.append(f"| {x['rows']:,} | all pairs, to check | {ap.get('seconds', 0):.1f} s | "
                             f"{_mib(ap.get('peak_extra_mib'))} | 100% | {d['all_pairs']['links']} | same groups: "
                             f"{'yes' if d['all_pairs']['same_groups'] else '**no**'} | links found by the partition: "
                             f"{d['all_pairs']['link_recall']:.3f} | - |")
        lines.append("")
    lines.append("The index kind follows the row count: below 50,000 rows it is flat (exact; a FAISS scan of one "
                 "query is no faster than the exact numpy pass, so it only saves reading the tables), above it "
                 "IVF-Flat with sqrt(N) lists and the smallest nprobe whose recall@10 on 200 of the rows reaches "
                 "0.95. The ablation row builds FAISS's usual 4 sqrt(N) lists instead: k-means and the list "
                 "assignment cost N x nlist x D each, so the build takes several times longer on these 2 cores, for "
                 "a search that was already far below the exact latency.\n")
    big = _largest_vector_size(vec)
    lines.append(f"Peak RSS of the whole process at {big['rows']:,} rows: {_mib(big['peak_rss_mib'])} (the matrix, "
                 "the index's own copy of it, and the generator's temporaries). The index lists are the "
                 "vectors themselves (IVF-Flat: 4 bytes per dimension per row plus an 8-byte id); exact search and "
                 "dedup work on the matrix as read from the tables, in blocks.\n")
    return "\n".join(lines) + "\n"


def _misses(results: dict, meas: dict, res: dict, eff_rows: list) -> str:
    """What missed, and why, with this run's numbers."""
    lines = ["## What misses, and why\n"]
    for name, m in meas.items():
        r = _ratios(m)
        if r["vs_model_card"] is not None and r["vs_model_card"] < TARGETS["vs_model_card"]:
            card, vr = m.get("model_card"), m.get("vmae_ray")
            card_cpu = _cpu_per_clip(card, card["out"]["clips"]) if card and "error" not in card else None
            vr_cpu = _cpu_per_clip(vr, vr["summary"]["clips"]) if vr and "error" not in vr else None
            st = m.get("stages_alone") or {}
            d = st.get("decode", {}).get("clips_per_second")
            mo = st.get("model", {}).get("clips_per_second")
            eff = dict(eff_rows).get(name)
            ceiling = eff["shared_bound"] / r["model_card"] if eff and r["model_card"] else None
            steady = eff["steady"] / r["model_card"] if eff and r["model_card"] else None
            lines.append(
                f"- **vmae-ray vs model-card on {name}: {r['vs_model_card']:.1f}x (target {TARGETS['vs_model_card']:g}x).** "
                f"Per clip the model-card loop spent {_f(card_cpu)} CPU s and vmae-ray {_f(vr_cpu)} CPU s (all processes "
                "on the machine during the run, Ray's included)"
                + (", so vmae-ray does less work per clip" if card_cpu and vr_cpu and vr_cpu < card_cpu else "")
                + f"; this machine has {res.get('num_cpus')} cores: the loop keeps one busy (plus torch's second "
                "thread in the model), vmae-ray can add at most one more. "
                + (f"The ceiling here, with no overhead at all, is the shared-CPU bound over the loop's rate: "
                   f"{eff['shared_bound']:.1f} / {r['model_card']:.1f} clips/s = {ceiling:.1f}x (decode alone "
                   f"{d:.1f} clips/s per core, model alone {mo:.1f} clips/s per core, one after the other on each "
                   "clip). " if ceiling and d and mo else "")
                + (f"After start-up the run sustained {steady:.1f}x. " if steady else "")
                + "The rest is the fixed cost of each Ray job, which a run of seconds cannot amortise: the model "
                "actor's start (importing torch and transformers, about 4.5 CPU s, then loading the checkpoint) "
                "competes with decoding for the same two cores, as do each decode worker's start and its isolation "
                "child. With a GPU for the model and more cores for decoding, vmae-ray scales with the cores while "
                "the loop does not; that was not measurable here.")
    for name, e in eff_rows:
        if e["clips"] >= 200 and e["efficiency"] < TARGETS["efficiency"]:
            lines.append(
                f"- **Pipeline efficiency on {name}: {e['efficiency']:.2f} (target {TARGETS['efficiency']}).** "
                f"The stages alone ran on the whole machine each; in the pipeline they share its "
                f"{res.get('num_cpus')} cores (the model runs on CPU here), so the reachable rate is the shared-CPU "
                f"bound ({e['shared_bound']:.1f} clips/s), of which the run got {e['vs_shared']:.2f} after start-up. "
                "The rest is per-clip work the stages alone do not do: each clip crosses the isolated decoder's "
                "pipe (a 2.4 MB Arrow IPC message) and Ray's object store into the actor, which assembles and "
                "writes the tables; Ray's own processes take their share of the two cores. On a "
                "GPU node the model stage leaves the CPUs to decoding and the comparison becomes the one the "
                "target means; it could not be measured here.")
    for name, m in meas.items():
        d = m.get("decode_target")
        if d and "error" not in d and d["ratio_vs_straight_cpu"] > TARGETS["decode_ratio"]:
            lines.append(
                f"- **Decode vs libavcodec on {name}: {d['ratio_vs_straight_cpu']:.2f}x (target {TARGETS['decode_ratio']}x).** "
                "Short low-resolution clips with uniform sampling convert a third of their frames (16 of ~48), and "
                "at 240p converting a frame (bilinear resize to 413x232 and RGB in one libswscale call, ~0.3 ms) "
                "costs over half of decoding it (~0.5 ms): 16 conversions add about 20-25% to the clip. "
                "The decoder's own overhead (probe, frame matching, clip assembly and copy) is about 4%. Before this work the "
                "ratio was 2.2x (packed-RGB conversion was 2.6x slower). On long or HD video the same decoder is "
                "at or below the baseline (kinetics above).")
    driver_after = ((results.get("driver") or {}).get("sides") or {}).get("after") or {}
    blocks = driver_after.get("ray_data_blocks") or {}
    for inputs, p in sorted((driver_after.get("projection") or {}).items(), key=lambda kv: int(kv[0])):
        if p["driver_cpu_us_per_clip"] > TARGETS["driver_us_per_clip"]:
            lines.append(
                f"- **Driver CPU per clip at {int(inputs):,} videos: {p['driver_cpu_us_per_clip']:.1f} µs (target "
                f"{TARGETS['driver_us_per_clip']:g}).** The driver's share is Ray Data's executor: about "
                f"{_f(blocks.get('driver_cpu_ms_per_task_and_block'))} ms per task and "
                f"{_f(blocks.get('driver_cpu_ms_per_block'))} ms per block here. With one clip a video, a decode "
                f"task of {p['videos_per_task']} videos costs that per {p['videos_per_task']} clips; the job keeps "
                "at least 4096 decode tasks, and two per decode CPU (here 40 per GPU), so every CPU has work to the "
                "end and a retry redoes little, which at this size means small tasks. Several clips a video "
                "(stride sampling: the same tasks carry more clips) or more inputs (up to 1024 videos a task) bring "
                "it under the target; `--videos-per-task` trades balance for driver CPU by hand.")
    tot = results.get("total_seconds")
    if tot and tot >= TARGETS["bench_seconds"]:
        lines.append(
            f"- **`make bench` took {tot / 60:.1f} min (target {TARGETS['bench_seconds'] / 60:.0f}).** The driver "
            "step alone starts a Ray cluster for each side, runs eight jobs and lists manifests of 1M and 10M "
            "inputs twice; the read_videos peer takes minutes per corpus. `python -m bench.run --skip driver` "
            "leaves it out.")
    if len(lines) == 1:
        lines.append("Every target measured here was met.")
    return "\n".join(lines) + "\n"


def _err(r: dict | None) -> str:
    if not r:
        return "not run"
    return f"did not run ({r.get('error', '?')[:120]})"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0] if argv else "bench_out/results.json") as f:
        results = json.load(f)
    sys.stdout.write(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
