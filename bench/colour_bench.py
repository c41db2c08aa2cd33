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

import os
import shutil
import subprocess
import sys
import time

import av

from bench.ablation import _best
from bench.geometry_bench import GEOMETRY, baseline_decoder, decode_stage, targeted_main
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


def conversion_step(args, paths: dict[str, list[str]]) -> dict:
    """`conversion_cost` for SDR from the bench corpus and HDR made with ffmpeg's command line."""
    kinetics = paths["kinetics"]
    sources = {"sdr_720p_untagged": next(p for p in kinetics if "k720_" in p),
               "sdr_1080p_untagged": next(p for p in kinetics if "k1080_" in p)}
    if shutil.which("ffmpeg"):
        folder = os.path.join(args.workdir, "colour")
        os.makedirs(folder, exist_ok=True)
        for name, (transfer, width, height) in HDR_SOURCES.items():
            sources[name] = make_hdr(os.path.join(folder, f"{name}.mkv"), transfer, width, height)
    return conversion_cost(sources, args.baseline_rev, args.repeats)


def main(argv=None) -> int:
    return targeted_main(argv, description=__doc__.splitlines()[0], baseline_rev="91b2140", name="colour_bench", steps={
        "decode_stage": ("decode_stage", lambda a, paths: decode_stage(paths, a.baseline_rev, a.repeats)),
        "conversion": ("model_crop_ms_per_clip", conversion_step),
    })


if __name__ == "__main__":
    sys.exit(main())
