"""What frames-as-displayed costs the decode stage: the time span from the packets, the display
transforms, stream choice (issue 10). A targeted run, not part of `make bench`'s full run.

1. **Decode stage against libavcodec** (`bench.decode_bench.compare`, the `make bench` step) on
   the `make bench` corpora (kinetics; the first 60 ssv2 videos), with this checkout's decoder
   and with a baseline revision's (its `vmae_ray/decoding.py` loaded from git), CPU ms per clip.
   The decoder now seeks to the end of every file to find its last frame and decodes the first
   frame while probing; this says what that costs.
2. **Display transforms per clip.** The same videos remuxed (no re-encoding, so the same
   decoding work) with a display matrix (rotate 90; mirror) or a sample aspect ratio (4:3),
   decoded by `VideoDecoder` against the originals (best of N interleaved, CPU time); and
   `model_crop` alone on 16 decoded frames (one clip) with each transform.
3. **Bytes on S3** for a long Matroska file (a moto server over HTTP): the probe, which now
   finds the end from the packets, and a uniform-16 decode, before and after.

    python -m bench.geometry_bench --workdir bench_out [--baseline-rev 0e16f13] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av

from bench.ablation import _best
from bench.compat import on_current_packages
from bench.corpus import ensure_corpus, kinetics_corpus, ssv2_corpus
from bench.decode_bench import _Timer, compare, vmae_decode
from vmae_ray.decoding import IDENTITY, DisplayTransform, FrameGeometry, displayed_size, model_crop
from vmae_ray.synthetic import remux_with_display_geometry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The bench checkpoint's preprocessing (make_tiny_checkpoint(image_size=224)): resize 232, crop 224.
GEOMETRY = FrameGeometry(232, 224, 224, "BILINEAR")
WORKLOADS = {  # name: (sampling, frame_stride, clips_per_video), as bench.run's workloads
    "kinetics": ("stride", 4, 4),
    "ssv2": ("uniform", 4, 1),
}
TRANSFORMS = {  # name: remux recipe
    "rot90": dict(rotation_degrees=90),
    "hflip": dict(hflip=True),
    "sar_4_3": dict(sample_aspect_ratio=Fraction(4, 3)),
}


def baseline_decoder(rev: str):
    """The `VideoDecoder` class of ``vmae_ray/decoding.py`` at git revision ``rev``."""
    source = subprocess.check_output(["git", "show", f"{rev}:vmae_ray/decoding.py"], cwd=ROOT, text=True)
    source = on_current_packages("vmae_ray/decoding.py", source)
    module = types.ModuleType(f"vmae_ray_decoding_{rev}")
    module.__file__ = f"{rev}:vmae_ray/decoding.py"
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module.VideoDecoder


def decode_stage(paths: dict[str, list[str]], rev: str, repeats: int) -> dict:
    """`make bench`'s decode-target step for this checkout's decoder (libavcodec's straight and
    seek-floor baselines measured in the same run), then the decoder before and after, each
    video decoded by both in turn, best of ``repeats`` per video: CPU ms per clip. Interleaving
    keeps a change of load on a shared machine from favouring whichever ran last."""
    from vmae_ray.decoding import VideoDecoder

    decoders = {"after": VideoDecoder, "before": baseline_decoder(rev)}
    out = {}
    for name, files in paths.items():
        sampling, stride, clips = WORKLOADS[name]
        kwargs = dict(sampling=sampling, num_frames=16, frame_stride=stride, clips_per_video=clips, geometry=GEOMETRY)
        target = compare(files, decoder_cls=VideoDecoder, repeats=repeats, **kwargs)
        best = {k: [float("inf")] * len(files) for k in decoders}
        for r in range(repeats):
            for i, path in enumerate(files):
                order = list(decoders.items()) if (r + i) % 2 == 0 else list(decoders.items())[::-1]
                for label, cls in order:
                    timer, _ = vmae_decode(path, decoder_cls=cls, **kwargs)
                    best[label][i] = min(best[label][i], timer.cpu)
        clips_total = target["clips"]
        ms = {k: 1000 * sum(v) / clips_total for k, v in best.items()}
        out[name] = {"videos": len(files), "clips": clips_total,
                     "straight_ms_per_clip": target["straight_ms_per_clip_cpu"],
                     "seek_floor_ms_per_clip": target["seek_ms_per_clip_cpu"],
                     "target_step_vmae_ms_per_clip": target["vmae_ms_per_clip_cpu"],
                     "before_ms_per_clip": ms["before"], "after_ms_per_clip": ms["after"],
                     "before_ratio_vs_straight": ms["before"] / target["straight_ms_per_clip_cpu"],
                     "after_ratio_vs_straight": ms["after"] / target["straight_ms_per_clip_cpu"],
                     "after_over_before": ms["after"] / ms["before"]}
    return out


def transform_cost(paths: dict[str, list[str]], workdir: str, repeats: int) -> dict:
    """ms per clip of decoding the originals vs remuxed copies that carry a display geometry."""
    out = {}
    for name, files in paths.items():
        sampling, stride, clips = WORKLOADS[name]
        copies = {}
        for transform, recipe in TRANSFORMS.items():
            folder = os.path.join(workdir, "geometry", name, transform)
            copies[transform] = []
            for path in files:
                dst = os.path.join(folder, os.path.basename(path))
                if not os.path.exists(dst):
                    remux_with_display_geometry(path, dst, **recipe)
                copies[transform].append(dst)
        variants = {"original": files, **copies}

        def run(batch, sampling=sampling, stride=stride, clips=clips):
            def cost():
                total, count = 0.0, 0
                for path in batch:
                    timer, n = vmae_decode(path, sampling=sampling, num_frames=16, frame_stride=stride,
                                           clips_per_video=clips, geometry=GEOMETRY)
                    total, count = total + timer.cpu, count + n
                return 1000 * total / count
            return cost

        best = _best({k: run(v) for k, v in variants.items()}, repeats)
        out[name] = {k: round(v, 2) for k, v in best.items()}
    return out


def crop_cost(paths: dict[str, list[str]], repeats: int) -> dict:
    """`model_crop` alone: ms for 16 decoded frames (one clip) per transform, per frame size."""
    out = {}
    for name, files in paths.items():
        with av.open(files[0]) as container:
            frames = [f for _, f in zip(range(16), container.decode(video=0))]
        w, h = frames[0].width, frames[0].height
        cases = {
            "identity": (IDENTITY, Fraction(1)),
            "rot90": (DisplayTransform(90, False), Fraction(1)),
            "hflip": (DisplayTransform(0, True), Fraction(1)),
            "rot270_hflip": (DisplayTransform(270, True), Fraction(1)),
            "sar_4_3": (IDENTITY, Fraction(4, 3)),
        }

        def run(transform, sar, frames=frames, w=w, h=h):
            resized = GEOMETRY.resized_size(*displayed_size(w, h, sar, transform))

            def cost():
                with _Timer() as timer:
                    for _ in range(5):
                        for frame in frames:
                            model_crop(frame, GEOMETRY, resized, transform=transform)
                return 1000 * timer.cpu / 5
            return cost

        best = _best({k: run(*v) for k, v in cases.items()}, repeats)
        out[f"{name} ({w}x{h})"] = {k: round(v, 3) for k, v in best.items()}
    return out


def s3_bytes(workdir: str, rev: str) -> dict:
    """Bytes a long Matroska file costs on S3 (moto server over HTTP, ranged reads): the probe
    (span included), and a uniform-16 decode in all, for this checkout's decoder and the
    baseline's. The file is tests/test_timing.py's long MKV: 30 s of 160x120 H.264 at 2 Mbit/s
    starting at 10 s; ranged reads of 64 KiB blocks (open_input's large-object path)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

    from vmae_ray.decoding import VideoDecoder
    from vmae_ray.storage import StorageOptions, open_input
    from vmae_ray.synthetic import make_video

    path = os.path.join(workdir, "geometry", "long_from_10s.mkv")
    if not os.path.exists(path):
        make_video(path, width=160, height=120, fps=30, num_frames=900, gop_size=30, bit_rate=2_000_000,
                   start_seconds=10.0)
    size = os.path.getsize(path)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                                                 "region_name": "us-east-1"}}
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                              aws_access_key_id="k", aws_secret_access_key="s")
        client.create_bucket(Bucket="bench")
        with open(path, "rb") as f:
            client.put_object(Bucket="bench", Key="long.mkv", Body=f.read())
        out = {"bytes": size}
        for label, cls in (("after", VideoDecoder), ("before", baseline_decoder(rev))):
            with open_input("s3://bench/long.mkv", StorageOptions(options), whole_object_max_bytes=256 * 1024,
                            block_size=64 * 1024, size=size) as f:
                with cls(f, size_bytes=size) as decoder:
                    probe_bytes = f.cache.total_requested_bytes
                    duration = decoder.probe.duration_seconds
                    plans = decoder.plan(sampling="uniform", num_frames=16, frame_stride=1, clips_per_video=1)
                    list(decoder.clips(plans, GEOMETRY))
                out[label] = {"probe_bytes": probe_bytes, "decode_bytes": f.cache.total_requested_bytes,
                              "duration_seconds": round(duration, 3)}
    finally:
        server.stop()
    return out


def targeted_main(argv, *, description: str, baseline_rev: str, name: str,
                  steps: dict[str, tuple[str, Callable[[argparse.Namespace, dict[str, list[str]]], Any]]]) -> int:
    """A targeted bench's command line (``--workdir --baseline-rev --repeats --ssv2-videos
    --skip``): runs each of ``steps`` ({step: (result key, fn(args, corpus paths))}) not
    skipped on the `make bench` corpora (kinetics; the first ssv2 videos) and merges the results
    into ``WORKDIR/NAME.json`` (steps skipped keep their last results)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--baseline-rev", default=baseline_rev, help="git revision whose decoder is 'before'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ssv2-videos", type=int, default=60)
    p.add_argument("--skip", default="", help=f"comma-separated: {', '.join(steps)}")
    args = p.parse_args(argv)
    skip = set(args.skip.split(","))
    started = time.perf_counter()
    root = os.path.join(args.workdir, "corpus")
    paths = {"kinetics": ensure_corpus(kinetics_corpus(1.0), root).paths,
             "ssv2": ensure_corpus(ssv2_corpus(200), root).paths[:args.ssv2_videos]}
    out_path = os.path.join(args.workdir, f"{name}.json")
    results: dict = {}
    if os.path.exists(out_path):
        with open(out_path) as f:
            results = json.load(f)
    results.update({"baseline_rev": args.baseline_rev, "repeats": args.repeats, "loadavg_start": os.getloadavg()})
    for step, (key, run) in steps.items():
        if step not in skip:
            results[key] = run(args, paths)
            print(json.dumps(results[key], indent=1), flush=True)
    results["loadavg_end"] = os.getloadavg()
    results["seconds"] = round(time.perf_counter() - started, 1)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"done in {results['seconds']} s; {out_path}")
    return 0


def main(argv=None) -> int:
    return targeted_main(argv, description=__doc__.splitlines()[0], baseline_rev="0e16f13", name="geometry_bench", steps={
        "decode_stage": ("decode_stage", lambda a, paths: decode_stage(paths, a.baseline_rev, a.repeats)),
        "transforms": ("transform_ms_per_clip", lambda a, paths: transform_cost(paths, a.workdir, a.repeats)),
        "crop": ("model_crop_ms_per_clip", lambda a, paths: crop_cost(paths, a.repeats)),
        "s3": ("s3_long_mkv", lambda a, paths: s3_bytes(a.workdir, a.baseline_rev)),
    })


if __name__ == "__main__":
    sys.exit(main())
