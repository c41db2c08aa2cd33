"""The three peers, and each stage alone, on one workload (corpus + sampling + model).

Peers (same corpus, same clip plans, same model weights):

1. ``model_card``: the Hugging Face model-card way, in one Python process: PyAV decodes every
   frame and converts every frame to an RGB ndarray (``to_ndarray(format="rgb24")``); the
   clip plan picks frames; ``VideoMAEImageProcessorPil`` (loaded from the checkpoint dir)
   preprocesses; the model runs once per video (all of its clips in one batch). Only the
   selected RGB frames are kept (a literal "list of every frame" does not fit in memory for a
   1080p minute), which only helps this peer.
2. ``read_videos``: Ray Data's built-in ``ray.data.read_videos`` (decord; one row per frame,
   every frame decoded), using its own ``resize=`` option to the checkpoint's resize size (at
   full resolution the frames of this corpus would be ~20 GB in the object store), grouped
   back into clips with ``groupby("path").map_groups`` and embedded by the same model in an
   actor pool with the same resources as vmae-ray's.
3. ``vmae_ray``: ``vmae_ray.pipeline.run(config_from_args([...]))``, the job users run.

Stages alone:

* decode alone: `vmae_ray.stages.decode_batch` (the decode task's UDF: open, probe, plan,
  decode, convert, Arrow rows; by default in its crash-isolation child process) over the
  corpus from this process, one video per call, one core.
* model alone: `vmae_ray.embedder.VideoMAEEmbedder.embed` on clips decoded beforehand, with the
  batch size and torch thread count the pipeline's actor gets.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmae_ray.sampling import FrameMatcher, plan_clips, select_frame_indices


@dataclass
class Workload:
    name: str
    paths: list[str]
    input_dir: str
    sampling: str  # "uniform" or "stride"
    frame_stride: int
    clips_per_video: int | None
    num_frames: int = 16
    description: str = ""

    def cli_sampling_args(self) -> list[str]:
        args = ["--sampling", self.sampling]
        if self.sampling == "stride":
            args += ["--frame-stride", str(self.frame_stride),
                     "--clips-per-video", "all" if self.clips_per_video is None else str(self.clips_per_video)]
        return args

    def sampling_text(self) -> str:
        if self.sampling == "uniform":
            return f"uniform, {self.num_frames} segments, 1 clip/video"
        cpv = "all (back to back)" if self.clips_per_video is None else str(self.clips_per_video)
        return f"stride {self.frame_stride} x {self.num_frames} frames, {cpv} clips/video"


@dataclass
class Resources:
    """What the Ray peers get (both of them, the same)."""

    decode_cpus: float = 1.0
    cpus_per_actor: float = 1.0
    num_actors: int = 1
    batch_size: int = 4

    def cli_args(self) -> list[str]:
        return ["--decode-cpus", str(self.decode_cpus), "--cpus-per-actor", str(self.cpus_per_actor),
                "--num-actors", str(self.num_actors), "--batch-size", str(self.batch_size)]

    def torch_threads(self) -> int:
        return max(1, int(round(self.cpus_per_actor)))


# --------------------------------------------------------------------------------------------
# 1. model card


def _stream_timing(container, stream) -> tuple[float, float]:
    tb = stream.time_base
    if stream.duration is not None and tb:
        duration = float(stream.duration * tb)
    else:
        duration = (container.duration or 0) / 1_000_000
    rate = stream.average_rate or stream.guessed_rate
    return duration, float(rate) if rate else 30.0


def model_card_loop(paths: list[str], checkpoint: str, wl: Workload) -> dict[str, Any]:
    """Peer 1. Returns counts and where the time went."""
    import av
    import torch
    from transformers import VideoMAEImageProcessorPil, VideoMAEModel

    processor = VideoMAEImageProcessorPil.from_pretrained(checkpoint)
    model = VideoMAEModel.from_pretrained(checkpoint).eval()
    clips = videos = frames_decoded = 0
    decode_s = preprocess_s = model_s = 0.0
    for path in paths:
        t0 = time.perf_counter()
        with av.open(path) as container:
            stream = container.streams.video[0]
            duration, fps = _stream_timing(container, stream)
            plans = plan_clips(sampling=wl.sampling, duration_seconds=duration, fps=fps, num_frames=wl.num_frames,
                               frame_stride=wl.frame_stride, clips_per_video=wl.clips_per_video,
                               start_seconds=float(stream.start_time * stream.time_base) if stream.start_time else 0.0)
            matcher = FrameMatcher(plans)
            chosen: list[list[np.ndarray | None]] = [[None] * len(p.target_seconds) for p in plans]
            prev = None
            for i, frame in enumerate(container.decode(stream)):
                rgb = frame.to_ndarray(format="rgb24")  # every frame, as the model card does
                frames_decoded += 1
                for clip_pos, frame_pos, owner in matcher.push(i, frame.time):
                    chosen[clip_pos][frame_pos] = rgb if owner == i else prev
                prev = rgb
            for clip_pos, frame_pos, _owner in matcher.finish():
                chosen[clip_pos][frame_pos] = prev
        t1 = time.perf_counter()
        inputs = processor([list(c) for c in chosen], return_tensors="pt")
        t2 = time.perf_counter()
        with torch.inference_mode():
            out = model(**inputs).last_hidden_state.float().mean(1)
        t3 = time.perf_counter()
        assert out.shape[0] == len(chosen)
        decode_s, preprocess_s, model_s = decode_s + t1 - t0, preprocess_s + t2 - t1, model_s + t3 - t2
        clips += len(chosen)
        videos += 1
    return {"videos": videos, "clips": clips, "frames_decoded": frames_decoded,
            "decode_seconds": decode_s, "preprocess_seconds": preprocess_s, "model_seconds": model_s,
            "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------
# 2. ray.data.read_videos


def _clips_from_frames(group: dict, *, sampling: str, num_frames: int, frame_stride: int,
                       clips_per_video: int | None, crop: tuple[int, int]) -> dict:
    """map_groups UDF: all frames of one video (rows of read_videos) -> clip rows."""
    order = np.argsort(group["frame_index"])
    frames = group["frame"][order]
    stamps = np.asarray(group["frame_timestamp"])[order]
    starts = stamps[:, 0] if stamps.ndim == 2 else stamps
    n = len(starts)
    if n > 1:
        period = float(np.median(np.diff(starts)))
        fps = 1.0 / period if period > 0 else 30.0
    else:
        fps = 30.0
    duration = float(starts[-1] - starts[0]) + 1.0 / fps
    plans = plan_clips(sampling=sampling, duration_seconds=duration, fps=fps, num_frames=num_frames,
                       frame_stride=frame_stride, clips_per_video=clips_per_video, start_seconds=float(starts[0]))
    chosen = select_frame_indices(starts.tolist(), plans)
    ch, cw = crop
    h, w = frames.shape[1:3]
    top, left = max(0, (h - ch) // 2), max(0, (w - cw) // 2)
    pixels = np.stack([frames[idx][:, top:top + ch, left:left + cw] for idx in chosen])
    path = group["path"][0]
    return {"path": np.array([path] * len(chosen)), "clip_index": np.arange(len(chosen), dtype=np.int32),
            "pixels": pixels}


class _EmbedClips:
    """Actor for the read_videos peer: the same embedder (model + normalisation) as vmae-ray."""

    def __init__(self, checkpoint: str):
        from vmae_ray.embedder import VideoMAEEmbedder

        self.embedder = VideoMAEEmbedder(checkpoint, device="cpu", dtype="float32")

    def __call__(self, batch: dict) -> dict:
        embeddings, _ = self.embedder.embed(np.ascontiguousarray(batch["pixels"]))
        return {"path": batch["path"], "clip_index": batch["clip_index"], "embedding": embeddings}


def read_videos_peer(paths: list[str], checkpoint: str, wl: Workload, res: Resources, spec,
                     num_partitions: int | None = None) -> dict[str, Any]:
    """Peer 2; needs decord. Returns counts.

    ``num_partitions`` of the groupby shuffle: Ray's default (200 hash partitions) costs
    seconds of shuffle overhead on a small corpus, so the bench passes one partition per
    video up to 2 per CPU, the peer's best setting found here.
    """
    import sys

    import av
    import ray
    from ray import cloudpickle
    from ray.data import ActorPoolStrategy

    from vmae_ray.decoding import FrameGeometry

    # The UDFs below live in this module, which Ray's workers may not be able to import (the
    # bench is not part of the installed package): ship them by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    with av.open(paths[0]) as c:
        w, h = c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height
    out_w, out_h = FrameGeometry(spec.resize_shortest_edge, spec.crop_height, spec.crop_width).resized_size(w, h)
    ds = ray.data.read_videos(paths, include_paths=True, include_timestamps=True, resize=(out_h, out_w),
                              num_cpus=res.decode_cpus)
    ds = ds.groupby("path", num_partitions=num_partitions).map_groups(
        _clips_from_frames, batch_format="numpy", num_cpus=res.decode_cpus,
        fn_kwargs={"sampling": wl.sampling, "num_frames": wl.num_frames, "frame_stride": wl.frame_stride,
                   "clips_per_video": wl.clips_per_video, "crop": (spec.crop_height, spec.crop_width)},
    )
    ds = ds.map_batches(_EmbedClips, fn_constructor_kwargs={"checkpoint": checkpoint},
                        compute=ActorPoolStrategy(size=res.num_actors), batch_size=res.batch_size,
                        batch_format="numpy", num_cpus=res.cpus_per_actor)
    clips = 0
    videos = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        clips += len(batch["clip_index"])
        videos.update(batch["path"].tolist())
    return {"videos": len(videos), "clips": clips, "resize": [out_h, out_w]}


# --------------------------------------------------------------------------------------------
# 3. vmae-ray


def vmae_ray_peer(wl: Workload, checkpoint: str, res: Resources, output: str, extra: list[str] | None = None):
    """Peer 3: the job itself. Returns (RunSummary, argv)."""
    from vmae_ray.cli import config_from_args
    from vmae_ray.pipeline import run

    argv = ["--input", wl.input_dir, "--output", output, "--model", checkpoint, "--overwrite",
            "--progress-seconds", "30", *wl.cli_sampling_args(), *res.cli_args(), *(extra or [])]
    return run(config_from_args(argv)), argv


# --------------------------------------------------------------------------------------------
# Stages alone


def decode_params(spec, wl: Workload, threads: int = 1, isolate: bool | None = None):
    """The DecodeParams `planning.decode_params` builds for this workload, with the job's defaults.

    ``isolate`` (decode in a child process) defaults to the job's own default.
    """
    import dataclasses

    from vmae_ray.config import EmbedConfig
    from vmae_ray.decoding import SWSCALE_FOR_PIL_RESAMPLE, DecodeLimits, FrameGeometry
    from vmae_ray.stages import DecodeParams

    defaults = EmbedConfig()
    geometry = FrameGeometry(spec.resize_shortest_edge, spec.crop_height, spec.crop_width,
                             SWSCALE_FOR_PIL_RESAMPLE.get(int(spec.resample), "BILINEAR"))
    kwargs = dict(sampling=wl.sampling, num_frames=wl.num_frames, frame_stride=wl.frame_stride,
                  clips_per_video=wl.clips_per_video, geometry=geometry, limits=DecodeLimits(), threads=threads)
    fields = {f.name for f in dataclasses.fields(DecodeParams)}
    if "isolate" in fields:
        kwargs["isolate"] = getattr(defaults, "decode_isolation", True) if isolate is None else isolate
    if "timeout_seconds" in fields and hasattr(defaults, "decode_timeout_seconds"):
        kwargs["timeout_seconds"] = defaults.decode_timeout_seconds
    return DecodeParams(**kwargs)


def decode_alone(paths: list[str], spec, wl: Workload, *, keep: int = 48,
                 isolate: bool | None = None) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The decode task's UDF (`stages.decode_batch`, one video per call as the job calls it)
    over the corpus in this process; returns (stats, some clips).

    With the job's default settings, decoding runs in its child process (crash isolation)
    and the rows come back over a pipe, as in the pipeline; ``isolate=False`` measures the
    decoding itself in this process.
    """
    import pyarrow as pa

    from vmae_ray.schema import KIND_CLIP, KIND_ERROR
    from vmae_ray.stages import decode_batch, row_clips
    from vmae_ray.storage import StorageOptions

    params = decode_params(spec, wl, isolate=isolate)
    storage = StorageOptions({})
    kept: list[np.ndarray] = []
    clips = errors = 0
    started, cpu0 = time.perf_counter(), time.process_time()
    for path in paths:
        item = {"input_number": len(kept), "video_id": os.path.basename(path), "uri": path,
                "size_bytes": os.path.getsize(path), "input_fingerprint": None}
        for table in decode_batch(pa.Table.from_pylist([item]), params=params, storage=storage):
            kinds = table.column("kind").to_pylist()
            for i, kind in enumerate(kinds):
                if kind == KIND_CLIP:
                    row_pixels = row_clips(table, i)  # a video's clips (or a chunk of them)
                    clips += len(row_pixels)
                    kept += list(row_pixels[: max(0, keep - len(kept))])
                elif kind == KIND_ERROR:
                    errors += 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    return {"videos": len(paths), "clips": clips, "errors": errors, "seconds": wall,
            "driver_cpu_seconds": cpu, "isolated": bool(getattr(params, "isolate", False)),
            "clips_per_second": clips / wall if wall > 0 else None}, kept


def model_alone(checkpoint: str, clips: list[np.ndarray], *, batch_size: int, threads: int,
                min_clips: int = 32) -> dict[str, Any]:
    """`VideoMAEEmbedder.embed` on decoded clips (cycled up to ``min_clips``), after one warm-up batch."""
    import torch

    from vmae_ray.embedder import VideoMAEEmbedder

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        embedder = VideoMAEEmbedder(checkpoint, device="cpu", dtype="float32")
        pool = [clips[i % len(clips)] for i in range(max(min_clips, len(clips)))]
        batches = [np.stack(pool[i:i + batch_size]) for i in range(0, len(pool), batch_size)]
        embedder.embed(batches[0])  # warm-up
        started = time.perf_counter()
        for b in batches:
            embedder.embed(b)
        wall = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return {"clips": len(pool), "seconds": wall, "clips_per_second": len(pool) / wall, "batch_size": batch_size,
            "torch_threads": threads}
