"""`make demo`: the job end to end on this machine, with nothing downloaded.

Builds a small randomly initialised VideoMAE classification checkpoint (safetensors, a
preprocessor_config.json and an id2label head, so the labels path runs), a small corpus
of synthetic videos made with PyAV plus the real files of ../shared/media when present,
writes a manifest with a passthrough column, runs the same command users run (local Ray,
local files) and prints where the tables are and a few rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

SHARED_MEDIA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "media")

# (file name, make_video keyword arguments): a mix of codecs, sizes, rates and lengths.
SYNTHETIC = [
    ("walk_h264_320x240.mp4", dict(codec="h264", width=320, height=240, fps=30, num_frames=90, gop_size=30)),
    ("pan_h264_640x360.mp4", dict(codec="h264", width=640, height=360, fps=25, num_frames=125, gop_size=50, audio=True)),
    ("short_h264_160x120.mp4", dict(codec="h264", width=160, height=120, fps=30, num_frames=8, gop_size=8)),
    ("vfr_h264_256x144.mkv", dict(codec="h264", width=256, height=144, fps=30, num_frames=75, gop_size=30, vfr=True)),
    ("clip_vp9_240p.webm", dict(codec="libvpx-vp9", width=426, height=240, fps=12, num_frames=36, gop_size=12)),
    ("tall_mpeg4_144x256.avi", dict(codec="mpeg4", width=144, height=256, fps=24, num_frames=48, gop_size=12)),
]


def build_corpus(workdir: str) -> str:
    """Write the demo videos and a CSV manifest; returns the manifest path."""
    from vmae_ray.synthetic import make_video

    videos = os.path.join(workdir, "videos")
    os.makedirs(videos, exist_ok=True)
    uris, sources = [], []
    for i, (name, kwargs) in enumerate(SYNTHETIC):
        path = os.path.join(videos, name)
        if not os.path.exists(path):
            make_video(path, seed=i, **kwargs)
        uris.append(os.path.abspath(path))
        sources.append("synthetic")
    media = os.path.abspath(SHARED_MEDIA)
    if os.path.isdir(media):
        for name in sorted(os.listdir(media)):
            if name.endswith(".md") or not os.path.isfile(os.path.join(media, name)):
                continue
            uris.append(os.path.join(media, name))
            sources.append("shared/media")
    else:
        print(f"note: {media} not found; the demo runs on synthetic videos only")
    manifest = os.path.join(workdir, "manifest.csv")
    pacsv.write_csv(pa.table({"uri": uris, "source": sources}), manifest)
    return manifest


def build_checkpoint(workdir: str) -> str:
    from vmae_ray.synthetic import make_tiny_checkpoint

    path = os.path.join(workdir, "checkpoint")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_tiny_checkpoint(path, classifier=True, num_frames=16, image_size=64, num_labels=8)
    return path


def show(output: str) -> None:
    def read(table: str) -> pa.Table:
        folder = os.path.join(output, table)
        files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet")) if os.path.isdir(folder) else []
        return pa.concat_tables([pq.read_table(os.path.join(folder, f)) for f in files]) if files else pa.table({})

    videos, clips, errors = read("videos"), read("clips"), read("errors")
    print(f"\ntables under {os.path.abspath(output)}:")
    print(f"  videos/ {videos.num_rows} rows   clips/ {clips.num_rows} rows   errors/ {errors.num_rows} rows   _SUCCESS")
    if videos.num_rows:
        print(f"  embedding type: {videos.schema.field('embedding').type}")
        print("\nvideos (first rows):")
        for row in videos.select(["uri", "num_clips", "duration_seconds", "width", "height", "codec",
                                  "stream_index", "top_labels", "source"]).slice(0, 6).to_pylist():
            row["uri"] = os.path.basename(row["uri"])
            row["top_labels"] = row["top_labels"][:2]
            print("  ", row)
    if errors.num_rows:
        print("\nerrors:")
        for row in errors.select(["uri", "stage", "error_type", "message"]).to_pylist():
            row["uri"] = os.path.basename(row["uri"])
            print("  ", row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_out")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    started = time.perf_counter()
    checkpoint = build_checkpoint(args.workdir)
    manifest = build_corpus(args.workdir)
    print(f"checkpoint: {checkpoint}\nmanifest:   {manifest} (built in {time.perf_counter() - started:.1f}s)")
    output = os.path.join(args.workdir, "tables")
    from vmae_ray.cli import run_embed

    command = ["--input", manifest, "--output", output, "--model", checkpoint, "--sampling", "stride",
               "--clips-per-video", "2", "--overwrite"]
    print("running: vmae-ray embed " + " ".join(command), flush=True)
    code = run_embed(command, prog="vmae-ray embed")
    show(output)
    if code == 0:
        code = write_demo_report(output, args.workdir)
    return code


def write_demo_report(output: str, workdir: str) -> int:
    """`vmae-ray report` on the demo's tables, the map coloured by the manifest's `source` column."""
    from vmae_ray.report import run_report

    path = os.path.abspath(os.path.join(workdir, "report.html"))
    command = ["--tables", output, "--output", path, "--color-by", "source"]
    print("\nrunning: vmae-ray report " + " ".join(command), flush=True)
    code = run_report(command, prog="vmae-ray report")
    print(f"open it in a browser: file://{path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
