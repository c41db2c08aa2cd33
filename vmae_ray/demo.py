"""`make demo`: the job end to end on this machine, with nothing downloaded.

Builds a small randomly initialised VideoMAE checkpoint laid out like the default
`MCG-NJU/videomae-base-short-ssv2` (a pretraining checkpoint: encoder and decoder, no
classifier), a small corpus of synthetic videos made with PyAV plus the real files of
../shared/media when present, writes a manifest with passthrough columns, runs the same
command users run (local Ray, local files) and prints where the tables are and a few rows.

Labels come from a few examples, as with the default checkpoint: the corpus includes
videos of four scenes (`vmae_ray.synthetic.SCENES`: a colour cast each, everything else
random per video), a labels file names the scene of three videos per scene, `vmae-ray probe
fit` fits a linear head on their embeddings and `vmae-ray probe apply` labels every video
without decoding again; the demo prints the labels of the videos nobody labelled next to
the scene they were made with. (A random classifier head would give random labels.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
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


# Scene videos: SCENE_VIDEOS per scene, the first LABELLED_PER_SCENE of each labelled.
SCENE_VIDEOS = 6
LABELLED_PER_SCENE = 3
SCENE_RECIPE = dict(codec="h264", width=96, height=72, fps=24, num_frames=72, gop_size=24)


def build_corpus(workdir: str) -> str:
    """Write the demo videos, a CSV manifest (columns uri, source, scene) and labels.csv (uri,
    label: a few scene videos per scene); returns the manifest path."""
    from vmae_ray.synthetic import make_scene_corpus, make_video

    videos = os.path.join(workdir, "videos")
    os.makedirs(videos, exist_ok=True)
    uris, sources, scenes = [], [], []
    for i, (name, kwargs) in enumerate(SYNTHETIC):
        path = os.path.join(videos, name)
        if not os.path.exists(path):
            make_video(path, seed=i, bit_exact=True, **kwargs)
        uris.append(os.path.abspath(path))
        sources.append("synthetic")
    scene_videos = make_scene_corpus(os.path.join(workdir, "scenes"), per_scene=SCENE_VIDEOS, seed=100, bit_exact=True,
                                     **SCENE_RECIPE)
    labelled = []
    for path, scene in scene_videos:
        uris.append(os.path.abspath(path))
        sources.append("scene")
        scenes.append(scene)
        if int(os.path.splitext(path)[0].rsplit("_", 1)[1]) < LABELLED_PER_SCENE:
            labelled.append((os.path.abspath(path), scene))
    pacsv.write_csv(pa.table({"uri": [u for u, _ in labelled], "label": [s for _, s in labelled]}),
                    os.path.join(workdir, "labels.csv"))
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
    scene_column = [None] * len(SYNTHETIC) + scenes + [None] * (len(uris) - len(SYNTHETIC) - len(scenes))
    pacsv.write_csv(pa.table({"uri": uris, "source": sources, "scene": pa.array(scene_column, pa.string())}), manifest)
    return manifest


def build_checkpoint(workdir: str) -> str:
    from vmae_ray.synthetic import make_tiny_checkpoint

    # Laid out like the default checkpoint (pretraining: no classifier, so labels come from a head).
    path = os.path.join(workdir, "checkpoint_pretraining")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_tiny_checkpoint(path, pretraining_layout=True, num_frames=16, image_size=64)
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
        print("\nvideos (first rows other than the scene videos):")
        others = videos.filter(pc.field("source") != "scene")
        for row in others.select(["uri", "num_clips", "duration_seconds", "width", "height", "codec",
                                  "stream_index", "source"]).slice(0, 6).to_pylist():
            row["uri"] = os.path.basename(row["uri"])
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
        code = probe(args.workdir, output)
    if code == 0:
        code = search_a_copy(output, args.workdir)
    if code == 0:
        code = write_demo_report(output, args.workdir)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s")
    return code


def search_a_copy(output: str, workdir: str) -> int:
    """`vmae-ray search` with a video that is not in the tables: the demo's walk re-encoded at
    half size and x264 CRF 40 (`synthetic.transcode_video`), as a re-upload would be."""
    from vmae_ray.cli import main as vmae_ray
    from vmae_ray.synthetic import transcode_video

    copy = os.path.join(workdir, "walk_small.mp4")
    if not os.path.exists(copy):
        transcode_video(os.path.join(workdir, "videos", "walk_h264_320x240.mp4"), copy, width=160, height=120, crf=40,
                        bit_exact=True)
    command = ["search", "--tables", output, "--query", copy, "-k", "3"]
    print(f"\n{copy}: the walk video re-encoded at half size and CRF 40, not in the tables")
    print("running: vmae-ray " + " ".join(command), flush=True)
    return vmae_ray(command)


def write_demo_report(output: str, workdir: str) -> int:
    """`vmae-ray report` on the demo's tables, the map coloured by the manifest's `source` column."""
    from vmae_ray.report import run_report

    path = os.path.abspath(os.path.join(workdir, "report.html"))
    command = ["--tables", output, "--output", path, "--color-by", "source"]
    print("\nrunning: vmae-ray report " + " ".join(command), flush=True)
    code = run_report(command, prog="vmae-ray report")
    print(f"open it in a browser: file://{path}")
    return code


def probe(workdir: str, output: str) -> int:
    """Fit a head on the labelled scene videos, label every video with it, print the labels of
    the scene videos nobody labelled next to their scene."""
    from vmae_ray.cli import main as vmae_ray
    from vmae_ray.reading import CommittedOutput

    head, labels_out = os.path.join(workdir, "head"), os.path.join(workdir, "labels")
    for command in (["probe", "fit", "--tables", output, "--labels", os.path.join(workdir, "labels.csv"),
                     "--head", head, "--overwrite"],
                    ["probe", "apply", "--tables", output, "--head", head, "--output", labels_out, "--top-k", "2"]):
        print("\nrunning: vmae-ray " + " ".join(command), flush=True)
        code = vmae_ray(command)
        if code:
            return code
    labelled = set(pacsv.read_csv(os.path.join(workdir, "labels.csv")).column("uri").to_pylist())
    scene_of = {r["uri"]: r["scene"] for r in CommittedOutput.open(output).read("videos", ["uri", "scene"]).to_pylist()}
    rows = [r for r in CommittedOutput.open(labels_out).read("labels").to_pylist()
            if scene_of.get(r["uri"]) and r["uri"] not in labelled]
    rows.sort(key=lambda r: os.path.basename(r["uri"]))
    print(f"\nlabels of the {len(rows)} scene videos nobody labelled ({labels_out}/labels/):")
    print(f"  {'video':<16}{'scene (truth)':<15}{'top label':<11}{'score':>6}   second")
    for r in rows:
        mark = "" if r["top_labels"][0] == scene_of[r["uri"]] else "   <- wrong"
        print(f"  {os.path.basename(r['uri']):<16}{scene_of[r['uri']]:<15}{r['top_labels'][0]:<11}"
              f"{r['top_scores'][0]:>6.2f}   {r['top_labels'][1]} {r['top_scores'][1]:.2f}{mark}")
    right = sum(r["top_labels"][0] == scene_of[r["uri"]] for r in rows)
    print(f"  {right} of {len(rows)} right (chance: 1 in 4). Other videos get labels too: a head always answers one "
          "of its classes, with the scores saying how sure it is.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
