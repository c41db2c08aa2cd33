"""Benchmark corpora of a stated shape, generated with PyAV and cached by their spec.

A corpus is a list of `VideoSpec`s (codec, size, rate, length, keyframe interval, bitrate).
`ensure_corpus` writes it under ``ROOT/<name>-<hash of the spec>/`` once; a later call with
the same spec finds ``manifest.json`` (written last) and reuses the files. Change any field
(or `GENERATOR_VERSION`) and a new directory is made.

How the videos are made (so that generating a corpus is cheap, and decoding it is not):

* Pictures are synthesised directly in YUV 4:2:0: a large random-plus-sinusoid texture that
  pans (bouncing, so there are no jumps), low-amplitude per-frame noise and a moving block.
  This gives real encoder work and realistic bitrates (about 3 Mbit/s at 720p, 6 Mbit/s at
  1080p with x264 ``superfast`` CRF 23), so decode cost per frame is in the range of real
  camera footage. ``content="static"`` drops the pan and the noise (a long low-bitrate video).
* H.264 uses a fixed keyframe interval (``keyint = min-keyint = gop``, no scene cuts), so the
  stated GOP is the GOP in the file; x264 ``superfast`` keeps CABAC, and ``bframes`` B-frames
  are always placed (``b-adapt=0``: B P pattern with B-pyramid, as streaming encodes have).
* Long H.264 videos are built from a unique segment of ``segment_seconds`` (a whole number of
  GOPs, encoded once) whose packets are repeated with shifted timestamps up to the stated
  length. GOPs are closed, so every repeat decodes exactly like the first: the file is a
  valid stream of the stated length whose per-frame decode cost is the segment's. This is
  what makes a one-hour 1080p file possible to generate in seconds.
* VP9 WebM clips (Something-Something v2 shape: 240p, 12 fps, 2-6 s) are encoded directly
  with libvpx realtime at a target bitrate.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

GENERATOR_VERSION = 3


@dataclass(frozen=True)
class VideoSpec:
    name: str  # file name, extension picks the container (.mp4, .webm, .mkv)
    codec: str  # "h264" or "libvpx-vp9"
    width: int
    height: int
    fps: int
    seconds: float
    gop: int  # keyframe interval in frames
    seed: int = 0
    crf: int | None = 23  # x264 constant quality; None -> bit_rate
    bit_rate: int | None = None  # bits/s (VP9, or x264 when crf is None)
    preset: str = "superfast"  # x264 preset
    # Consecutive B-frames, placed always (b-adapt=0), as in typical streaming encodes (about
    # half the frames are non-reference B-frames with x264's B-pyramid). Left to x264's
    # adaptive choice, this synthetic motion gets almost none (4% of frames).
    bframes: int = 3
    content: str = "motion"  # "motion" or "static"
    segment_seconds: float = 10.0  # unique content; longer videos repeat it (H.264 only)

    @property
    def num_frames(self) -> int:
        return max(1, int(round(self.seconds * self.fps)))


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    videos: tuple[VideoSpec, ...]

    def key(self) -> str:
        payload = {"generator": GENERATOR_VERSION, "name": self.name,
                   "videos": [dataclasses.asdict(v) for v in self.videos]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        groups: dict[tuple, list[VideoSpec]] = {}
        for v in self.videos:
            groups.setdefault((v.codec, v.width, v.height, v.fps, v.content), []).append(v)
        parts = []
        for (codec, w, h, fps, content), vs in groups.items():
            secs = [v.seconds for v in vs]
            gops = sorted({v.gop for v in vs})
            parts.append(
                f"{len(vs)} x {codec} {w}x{h} {fps} fps{' (static)' if content == 'static' else ''}, "
                f"{min(secs):g}-{max(secs):g} s (total {sum(secs):g} s), GOP {'/'.join(map(str, gops))}"
            )
        return "; ".join(parts)


@dataclass
class Corpus:
    spec: CorpusSpec
    directory: str
    files: list[dict]  # per video: name, path, facts measured after writing

    @property
    def paths(self) -> list[str]:
        return [f["path"] for f in self.files]


# --------------------------------------------------------------------------------------------
# Presets


def kinetics_corpus(scale: float = 1.0) -> CorpusSpec:
    """720p and 1080p H.264 at 30 fps, 10-60 s, GOP 60-250 (Kinetics-like long videos).

    ``scale`` multiplies the number of videos (the mix of lengths and GOPs cycles).
    """
    shapes_720 = [(10, 60), (20, 120), (30, 250), (60, 90)]
    shapes_1080 = [(15, 60), (45, 250)]
    videos = []
    n720 = max(1, int(round(len(shapes_720) * scale)))
    n1080 = max(1, int(round(len(shapes_1080) * scale)))
    for i in range(n720):
        seconds, gop = shapes_720[i % len(shapes_720)]
        videos.append(VideoSpec(f"k720_{i:03d}_{seconds}s_gop{gop}.mp4", "h264", 1280, 720, 30, seconds, gop, seed=100 + i))
    for i in range(n1080):
        seconds, gop = shapes_1080[i % len(shapes_1080)]
        videos.append(VideoSpec(f"k1080_{i:03d}_{seconds}s_gop{gop}.mp4", "h264", 1920, 1080, 30, seconds, gop, seed=200 + i))
    return CorpusSpec("kinetics", tuple(videos))


def ssv2_corpus(count: int = 200) -> CorpusSpec:
    """Something-Something v2 shape: 240p VP9 WebM, 12 fps, 2-6 s clips."""
    rng = np.random.default_rng(7)
    seconds = np.round(rng.uniform(2.0, 6.0, size=count), 1)
    videos = tuple(
        VideoSpec(f"ssv2_{i:05d}.webm", "libvpx-vp9", 428, 240, 12, float(seconds[i]), 60, seed=1000 + i,
                  crf=None, bit_rate=300_000)
        for i in range(count)
    )
    return CorpusSpec("ssv2", videos)


def long_corpus(minutes: tuple[float, ...] = (2.0, 8.0, 60.0)) -> CorpusSpec:
    """Long low-bitrate 1080p H.264 (static content, GOP 250) for the decode-memory check."""
    videos = tuple(
        VideoSpec(f"long1080_{m:g}min.mp4", "h264", 1920, 1080, 30, m * 60.0, 250, seed=7, crf=30,
                  content="static", segment_seconds=250 / 30)
        for m in minutes
    )
    return CorpusSpec("long1080", videos)


PRESETS = {
    # This 2-core machine: the whole bench in under 15 minutes.
    "small": {"kinetics_scale": 1.0, "ssv2_count": 200, "long_minutes": (2.0, 8.0, 60.0)},
    # A workstation: about 5x the small preset.
    "medium": {"kinetics_scale": 5.0, "ssv2_count": 1000, "long_minutes": (2.0, 8.0, 60.0)},
    # A real node (many cores, a GPU): enough work for steady-state numbers.
    "large": {"kinetics_scale": 25.0, "ssv2_count": 10000, "long_minutes": (2.0, 8.0, 60.0)},
    # The unit-test smoke run: seconds, not minutes.
    "tiny": {"kinetics_scale": 0.0, "ssv2_count": 3, "long_minutes": ()},
}


def preset_corpora(preset: str, scale: float = 1.0) -> dict[str, CorpusSpec]:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    p = PRESETS[preset]
    out: dict[str, CorpusSpec] = {}
    if p["kinetics_scale"] > 0:
        out["kinetics"] = kinetics_corpus(p["kinetics_scale"] * scale)
    if preset == "tiny":
        out["kinetics"] = CorpusSpec("kinetics", (
            VideoSpec("tiny_h264.mp4", "h264", 320, 180, 30, 4.0, 30, seed=1, segment_seconds=2.0),
        ))
    out["ssv2"] = ssv2_corpus(max(1, int(round(p["ssv2_count"] * scale))))
    if p["long_minutes"]:
        out["long1080"] = long_corpus(tuple(p["long_minutes"]))
    return out


# --------------------------------------------------------------------------------------------
# Pictures


def _texture(h: int, w: int, rng: np.random.Generator, amplitude: float = 100.0) -> np.ndarray:
    small = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2)).astype(np.float32)
    big = np.kron(small, np.ones((8, 8), np.float32))[:h, :w]
    fx, fy = rng.uniform(11, 37), rng.uniform(11, 37)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    waves = 128 + amplitude * np.sin(xx / fx) * np.cos(yy / fy)
    return np.clip(0.6 * big + 0.4 * waves, 0, 255).astype(np.uint8)


def _bounce(travel: int, span: int) -> int:
    if span <= 0:
        return 0
    t = travel % (2 * span)
    return t if t <= span else 2 * span - t


class _Scene:
    """YUV 4:2:0 pictures, (h * 3 / 2, w) uint8, as `av.VideoFrame.from_ndarray` takes them."""

    def __init__(self, width: int, height: int, seed: int, content: str):
        rng = np.random.default_rng(seed)
        self.w, self.h, self.static = width, height, content == "static"
        self.margin = 0 if self.static else max(16, (min(width, height) // 8) // 2 * 2)
        m = self.margin
        self.y = _texture(height + m, width + m, rng)
        # A second layer moving the other way: the sum is not one translation, so motion
        # compensation leaves a residual, as with real footage (parallax, deformation).
        self.y2 = None
        if not self.static:
            yy, xx = np.mgrid[0:height + m, 0:width + m].astype(np.float32)
            fx = rng.uniform(18, 24)
            self.y2 = (8 + 8 * np.sin(xx / fx + yy / (1.3 * fx))).astype(np.uint8)
            self.y = (self.y.astype(np.uint16) * 235 // 255).astype(np.uint8)
        self.u = (_texture(height // 2 + m // 2, width // 2 + m // 2, rng) // 2 + 64).astype(np.uint8)
        self.v = (_texture(height // 2 + m // 2, width // 2 + m // 2, rng) // 2 + 64).astype(np.uint8)
        self.noise = [] if self.static else [rng.integers(0, 3, (height, width), dtype=np.uint8) for _ in range(7)]
        self.velocity = (int(rng.integers(1, 4)) * 2, int(rng.integers(1, 3)) * 2)
        self.block = max(8, min(width, height) // 6)
        self.block_color = int(rng.integers(0, 256))

    def frame(self, k: int) -> np.ndarray:
        h, w, m = self.h, self.w, self.margin
        ox, oy = _bounce(k * self.velocity[0], m), _bounce(k * self.velocity[1], m)
        out = np.empty((h * 3 // 2, w), np.uint8)
        y = out[:h]
        np.copyto(y, self.y[oy:oy + h, ox:ox + w])
        if self.y2 is not None:
            y += self.y2[m - oy:m - oy + h, m - ox:m - ox + w]
        if self.noise:
            y += self.noise[k % len(self.noise)]
        b = self.block
        bx, by = _bounce(k * 5, w - b), _bounce(k * 3, h - b)
        y[by:by + b, bx:bx + b] = self.block_color if self.static else (self.block_color + 8 * k) % 256
        cu = self.u[oy // 2:oy // 2 + h // 2, ox // 2:ox // 2 + w // 2]
        cv = self.v[oy // 2:oy // 2 + h // 2, ox // 2:ox // 2 + w // 2]
        flat = out.reshape(-1)  # the U then V planes follow Y, (h/2)*(w/2) bytes each
        q = (h // 2) * (w // 2)
        flat[h * w:h * w + q] = cu.reshape(-1)
        flat[h * w + q:] = cv.reshape(-1)
        return out


# --------------------------------------------------------------------------------------------
# Encoding


def _open_stream(container, spec: VideoSpec):
    import av  # noqa: F401

    stream = container.add_stream(spec.codec, rate=spec.fps)
    stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
    cc = stream.codec_context
    cc.gop_size = spec.gop
    cc.time_base = Fraction(1, spec.fps)
    cc.thread_count = 1  # one file per worker process; the pool uses the cores
    if cc.name == "libx264":
        options = {"preset": spec.preset,
                   "x264-params": f"keyint={spec.gop}:min-keyint={spec.gop}:scenecut=0:open-gop=0"
                                  f":bframes={spec.bframes}:b-adapt=0"}
        if spec.crf is not None:
            options["crf"] = str(spec.crf)
        else:
            cc.bit_rate = int(spec.bit_rate)
        cc.options = options
    elif cc.name in ("libvpx-vp9", "libvpx"):
        # Realtime speed, without alt-ref frames and look-ahead: decord 0.6.0 (behind
        # ray.data.read_videos) fails on libvpx's default realtime VP9 with "avcodec_send_packet
        # ... -11 (EAGAIN)" for every file; real SSv2 files (encoded with alt-ref) decode fine.
        options = {"deadline": "realtime", "cpu-used": "8", "row-mt": "0", "auto-alt-ref": "0",
                   "lag-in-frames": "0"}
        if spec.bit_rate is not None:
            cc.bit_rate = int(spec.bit_rate)
        else:
            options.update({"crf": str(spec.crf or 32), "b": "0"})
        cc.options = options
    return stream


def _prefix_cut(packets: list[tuple], limit: int) -> int:
    """Largest n <= limit such that the first n packets (decode order) show frames 0..n-1."""
    best, max_pts = 0, -1
    for i, (pts, *_rest) in enumerate(packets[:limit]):
        max_pts = max(max_pts, pts)
        if max_pts == i:
            best = i + 1
    return best


def write_video(spec: VideoSpec, path: str) -> str:
    """Encode one video of `spec` at `path` (see the module docstring for how)."""
    import av

    total = spec.num_frames
    scene = _Scene(spec.width, spec.height, spec.seed, spec.content)
    repeat = spec.codec == "h264" and spec.segment_seconds * spec.fps < total
    seg = total
    if repeat:
        seg = spec.gop * max(1, int(round(spec.segment_seconds * spec.fps / spec.gop)))
        repeat = seg < total
        seg = min(seg, total)
    tb = Fraction(1, spec.fps)
    with av.open(path, mode="w") as container:
        stream = _open_stream(container, spec)
        packets: list[tuple[int, int, bool, bytes]] = []

        def take(encoded):
            for p in encoded:
                if repeat:
                    packets.append((int(p.pts), int(p.dts), bool(p.is_keyframe), bytes(p)))
                else:
                    container.mux(p)

        for k in range(seg):
            frame = av.VideoFrame.from_ndarray(scene.frame(k), format="yuv420p")
            frame.pts, frame.time_base = k, tb
            take(stream.encode(frame))
        take(stream.encode(None))
        if repeat:
            packets.sort(key=lambda p: p[1])  # decode order
            reps = math.ceil(total / seg)
            for r in range(reps):
                left = total - r * seg
                n = len(packets) if left >= seg else _prefix_cut(packets, left)
                for pts, dts, key, payload in packets[:n]:
                    pkt = av.Packet(payload)
                    pkt.stream = stream
                    pkt.time_base = tb
                    pkt.pts, pkt.dts, pkt.duration = pts + r * seg, dts + r * seg, 1
                    pkt.is_keyframe = key
                    container.mux(pkt)
    return path


def probe_file(path: str) -> dict:
    """Facts of a written file: packets, keyframes, duration, bitrate (demux only, no decode)."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        packets = keyframes = 0
        first = last = None
        for p in c.demux(s):
            if p.size == 0 or p.pts is None:
                continue
            packets += 1
            keyframes += bool(p.is_keyframe)
            t = float(p.pts * s.time_base)
            first = t if first is None else min(first, t)
            last = t if last is None else max(last, t)
        duration = (last - first) + 1.0 / float(s.average_rate or 30) if packets else 0.0
        size = os.path.getsize(path)
        return {"frames": packets, "keyframes": keyframes, "duration_seconds": round(duration, 3),
                "bytes": size, "bit_rate": int(size * 8 / duration) if duration > 0 else 0,
                "codec": s.codec_context.name, "width": s.codec_context.width, "height": s.codec_context.height}


def _write_one(args: tuple[dict, str]) -> dict:
    spec_dict, path = args
    spec = VideoSpec(**spec_dict)
    write_video(spec, path)
    return {"name": spec.name, "path": path, **probe_file(path)}


def ensure_corpus(spec: CorpusSpec, root: str, *, workers: int | None = None, log=print) -> Corpus:
    """The corpus of `spec` under `root`, generated only when not already there."""
    directory = os.path.join(root, f"{spec.name}-{spec.key()}")
    manifest_path = os.path.join(directory, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        for entry in files:  # the directory may have moved with its workdir
            entry["path"] = os.path.join(directory, entry["name"])
        if all(os.path.exists(e["path"]) for e in files):
            return Corpus(spec, directory, files)
    tmp = directory + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    started = time.perf_counter()
    jobs = [(dataclasses.asdict(v), os.path.join(tmp, v.name)) for v in spec.videos]
    # Longest first, so the pool does not end on one long file.
    jobs.sort(key=lambda j: -j[0]["width"] * j[0]["height"] * min(j[0]["seconds"], j[0]["segment_seconds"]))
    workers = workers or (1 if len(jobs) <= 4 else max(1, min(os.cpu_count() or 1, len(jobs))))
    if workers == 1:
        results = [_write_one(j) for j in jobs]
    else:
        # spawn, not fork: the caller may have threads (Ray, a test session).
        import multiprocessing

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    by_name = {r["name"]: r for r in results}
    files = [by_name[v.name] for v in spec.videos]
    for entry in files:
        entry["path"] = os.path.join(directory, entry["name"])
    seconds = time.perf_counter() - started
    manifest = {"name": spec.name, "key": spec.key(), "generator_version": GENERATOR_VERSION,
                "describe": spec.describe(), "generation_seconds": round(seconds, 2),
                "spec": [dataclasses.asdict(v) for v in spec.videos], "files": files}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    log(f"corpus {spec.name}: {len(files)} videos generated in {seconds:.1f}s under {directory}")
    return Corpus(spec, directory, files)


def corpus_generation_seconds(corpus: Corpus) -> float | None:
    try:
        with open(os.path.join(corpus.directory, "manifest.json")) as f:
            return json.load(f).get("generation_seconds")
    except OSError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Generate (or find cached) benchmark corpora.")
    p.add_argument("--root", default="bench_out/corpus")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of videos of the preset")
    p.add_argument("--only", help="comma-separated corpus names (kinetics, ssv2, long1080)")
    args = p.parse_args(argv)
    specs = preset_corpora(args.preset, args.scale)
    if args.only:
        specs = {k: v for k, v in specs.items() if k in args.only.split(",")}
    for name, spec in specs.items():
        corpus = ensure_corpus(spec, args.root)
        total = sum(f["bytes"] for f in corpus.files)
        print(f"{name}: {len(corpus.files)} videos, {total / 2**20:.1f} MiB, {spec.describe()} -> {corpus.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
