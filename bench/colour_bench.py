"""What every-video-as-it-comes costs the decode stage (issue 17). A targeted run, not part of
`make bench`'s full run (its numbers are in `bench/report.py`, COLOUR_CHANGES).

1. **Decode stage against libavcodec** (`bench.decode_bench.compare`, the `make bench` step) on
   the `make bench` corpora (kinetics; the first 60 ssv2 videos), this checkout's decoder
   against a baseline revision's (its `vmae_ray/decoding.py` loaded from git), CPU ms per clip
   (`bench.geometry_bench.decode_stage`). The decoder now reads untagged HD as BT.709, records
   damage (libav's errors captured while it reads) and decodes packet by packet.
2. **Colour and tone mapping per clip**: `model_crop` alone on 16 decoded frames (one clip,
   224x224 crop after a 232 resize), before and after, for SDR 720p and 1080p from the bench
   corpus (untagged: now read as BT.709), and for HDR made with ffmpeg's command line (PQ and
   HLG, 10-bit HEVC, 1080p and 720p), which before was converted as SDR and is now tone-mapped.

    python -m bench.colour_bench --workdir bench_out [--baseline-rev 91b2140] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import av

from bench.ablation import _best
from bench.corpus import ensure_corpus, kinetics_corpus, ssv2_corpus
from bench.geometry_bench import GEOMETRY, baseline_decoder, decode_stage
from vmae_ray import decoding
from vmae_ray.decoding import FrameGeometry

HDR_SOURCES = {  # name: (transfer, width, height)
    "hdr_pq_1080p": ("smpte2084", 1920, 1080),
    "hdr_hlg_1080p": ("arib-std-b67", 1920, 1080),
    "hdr_pq_720p": ("smpte2084", 1280, 720),
}


def make_hdr(path: str, transfer: str, width: int, height: int) -> str:
    """16 frames of 10-bit HEVC tagged BT.2020 + ``transfer`` (ffmpeg's command line, libx265)."""
    if not os.path.exists(path):
        source = (f"testsrc2=s={width}x{height}:r=25,format=gbrp10le,scale=out_color_matrix=bt2020:out_range=tv,"
                  "format=yuv420p10le")
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-frames:v", "16", "-c:v", "libx265",
                        "-preset", "ultrafast", "-x265-params",
                        f"log-level=error:colorprim=bt2020:transfer={transfer}:colormatrix=bt2020nc",
                        "-color_primaries", "bt2020", "-color_trc", transfer, "-colorspace", "bt2020nc", path],
                       check=True)
    return path


def conversion_cost(sources: dict[str, str], rev: str, repeats: int, geometry: FrameGeometry = GEOMETRY) -> dict:
    """`model_crop` before and after: CPU ms for the 16 frames of one clip, per source."""
    before = sys.modules[baseline_decoder(rev).__module__].model_crop
    out = {}
    for name, path in sources.items():
        with av.open(path) as container:
            frames = [f for _, f in zip(range(16), container.decode(video=0))]
        resized = geometry.resized_size(frames[0].width, frames[0].height)

        def clip(crop, frames=frames, resized=resized):
            def run():
                started = time.process_time()
                for frame in frames:
                    crop(frame, geometry, resized)
                return 1000 * (time.process_time() - started)
            return run

        best = _best({"before": clip(before), "after": clip(decoding.model_crop)}, repeats)
        out[name] = {"size": f"{frames[0].width}x{frames[0].height}", "pix_fmt": frames[0].format.name,
                     "transfer": decoding.hdr_transfer(frames[0]), **{k: round(v, 2) for k, v in best.items()}}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--baseline-rev", default="91b2140", help="git revision whose decoder is 'before'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ssv2-videos", type=int, default=60)
    p.add_argument("--skip", default="", help="comma-separated: decode_stage, conversion")
    args = p.parse_args(argv)
    skip = set(args.skip.split(","))
    started = time.perf_counter()
    root = os.path.join(args.workdir, "corpus")
    kinetics = ensure_corpus(kinetics_corpus(1.0), root).paths
    paths = {"kinetics": kinetics, "ssv2": ensure_corpus(ssv2_corpus(200), root).paths[:args.ssv2_videos]}
    out_path = os.path.join(args.workdir, "colour_bench.json")
    results: dict = {}
    if os.path.exists(out_path):  # steps skipped in this run keep their last results
        with open(out_path) as f:
            results = json.load(f)
    results.update({"baseline_rev": args.baseline_rev, "repeats": args.repeats, "loadavg_start": os.getloadavg()})
    if "decode_stage" not in skip:
        results["decode_stage"] = decode_stage(paths, args.baseline_rev, args.repeats)
        print(json.dumps(results["decode_stage"], indent=1), flush=True)
    if "conversion" not in skip:
        sources = {"sdr_720p_untagged": next(p for p in kinetics if "k720_" in p),
                   "sdr_1080p_untagged": next(p for p in kinetics if "k1080_" in p)}
        if shutil.which("ffmpeg"):
            folder = os.path.join(args.workdir, "colour")
            os.makedirs(folder, exist_ok=True)
            for name, (transfer, width, height) in HDR_SOURCES.items():
                sources[name] = make_hdr(os.path.join(folder, f"{name}.mkv"), transfer, width, height)
        results["model_crop_ms_per_clip"] = conversion_cost(sources, args.baseline_rev, args.repeats)
        print(json.dumps(results["model_crop_ms_per_clip"], indent=1), flush=True)
    results["loadavg_end"] = os.getloadavg()
    results["seconds"] = round(time.perf_counter() - started, 1)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"done in {results['seconds']} s; {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
