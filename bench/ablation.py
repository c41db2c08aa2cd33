"""Ablations: each throughput measure of this codebase switched off and on, in one run.

Each function measures one change against the code path it replaced, on the bench corpora and
model, so BENCHMARKS.md can state what each one is worth here:

* ``model_folding``: `VideoMAEEmbedder.embed` (rescale/mean/std folded into the patch
  embedding, uint8 in) against normalising the clip first and calling the model
  (`pixel_values` + the model's forward, what the embedder did before), CPU ms per clip, and
  the largest difference between the two embeddings.
* ``isolation``: the decode task's UDF with crash isolation (decoding in a child process, rows
  back as Arrow IPC messages) against decoding in the task's own process, CPU ms per clip of
  both processes together.
* ``preroll_skip``: the decoder with non-reference frames skipped in the pre-roll after a
  keyframe seek against decoding every pre-roll frame (`PREROLL_MARGIN_FRAMES` set beyond any
  video), CPU ms per clip.
* ``cluster_autoscaler``: the job end to end with Ray Data's cluster autoscaler as vmae-ray
  sets it (V2) and with Ray 2.60's default (RATE_BASED), on a running Ray.
* ``model_batches``: the job end to end with full model batches (one clip per block, so the
  actor pool's bundler fills every call) and with Ray Data's default block size (a decode
  task's clips in one block): clips/s, and clips per model call.
* ``reconstruction``: the model stage without and with ``--reconstruction``
  (`VideoMAEEmbedder.embed` against `embed_with_reconstruction`, which also runs the encoder on
  the visible tenth of the tokens and the pretraining decoder), clips per CPU second, on the
  bench geometry laid out as a pretraining checkpoint; plus the analytic FLOPs of both at
  VideoMAE-B size (`reconstruction_flops`), which is what a GPU pays.

Timings are best of ``repeats`` interleaved runs (CPU time where stated, which other load on a
shared machine barely moves).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil


def _best(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Interleaved best-of-N of functions that return a cost."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], fn())
    return best


def model_folding(checkpoint: str, clips: list[np.ndarray], *, batch_size: int, threads: int,
                  repeats: int = 3) -> dict[str, Any]:
    import torch

    from vmae_ray.embedder import VideoMAEEmbedder

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        embedder = VideoMAEEmbedder(checkpoint, device="cpu", dtype="float32")
        pool = [clips[i % len(clips)] for i in range(max(16, len(clips)))]
        batches = [np.stack(pool[i:i + batch_size]) for i in range(0, len(pool), batch_size)]
        owner = embedder._encoder_owner

        def unfolded_embed(batch):
            with torch.inference_mode():
                hidden = owner(pixel_values=embedder.pixel_values(batch)).last_hidden_state
                return hidden.float().mean(1).numpy()

        def timed(fn) -> Callable[[], float]:
            def run() -> float:
                started = time.process_time()
                for b in batches:
                    fn(b)
                return 1000 * (time.process_time() - started) / len(pool)
            return run

        folded_fn = lambda b: embedder.embed(b)[0]  # noqa: E731
        folded_fn(batches[0]), unfolded_embed(batches[0])  # warm-up
        best = _best({"folded": timed(folded_fn), "unfolded": timed(unfolded_embed)}, repeats)
        # Pretraining-layout bench model: no classifier head, so embed() is the token mean too.
        diff = float(np.abs(folded_fn(batches[0]) - unfolded_embed(batches[0])).max())
    finally:
        torch.set_num_threads(previous)
    return {"clips": len(pool), "batch_size": batch_size, "torch_threads": threads,
            "folded_ms_per_clip": best["folded"], "unfolded_ms_per_clip": best["unfolded"],
            "speedup": best["unfolded"] / best["folded"], "max_abs_embedding_diff": diff}


def _decode_cpu(paths: list[str], params, storage) -> tuple[float, int]:
    """CPU seconds of this process and its children while `decode_batch` runs over ``paths``."""
    import pyarrow as pa

    from vmae_ray.schema import KIND_CLIP
    from vmae_ray.stages import decode_batch

    me = psutil.Process()

    def children_cpu() -> float:
        total = 0.0
        for child in me.children(recursive=True):
            try:
                t = child.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    items = [{"input_number": i, "video_id": os.path.basename(p), "uri": p, "size_bytes": os.path.getsize(p),
              "input_fingerprint": None} for i, p in enumerate(paths)]
    # The isolated decoder's child is started on first use: start it before timing.
    list(decode_batch(pa.Table.from_pylist(items[:1]), params=params, storage=storage))
    c0, k0 = time.process_time(), children_cpu()
    clips = 0
    for item in items:
        for table in decode_batch(pa.Table.from_pylist([item]), params=params, storage=storage):
            clips += sum(len(k) for kind, k in zip(table.column("kind").to_pylist(),
                                                   table.column("clip_index").to_pylist()) if kind == KIND_CLIP)
    return time.process_time() - c0 + children_cpu() - k0, clips


def isolation(paths: list[str], spec, wl, *, repeats: int = 2) -> dict[str, Any]:
    from bench.peers import decode_params
    from vmae_ray.storage import StorageOptions

    storage = StorageOptions({})
    clips = {}

    def run(isolate: bool) -> Callable[[], float]:
        params = decode_params(spec, wl, isolate=isolate)

        def go() -> float:
            seconds, n = _decode_cpu(paths, params, storage)
            clips[isolate] = n
            return 1000 * seconds / max(n, 1)
        return go

    best = _best({"isolated": run(True), "in_process": run(False)}, repeats)
    return {"videos": len(paths), "clips": clips.get(True), "isolated_ms_per_clip": best["isolated"],
            "in_process_ms_per_clip": best["in_process"],
            "overhead_ms_per_clip": best["isolated"] - best["in_process"],
            "overhead_fraction": best["isolated"] / best["in_process"] - 1}


def preroll_skip(paths: list[str], wl, geometry, *, repeats: int = 2) -> dict[str, Any]:
    from vmae_ray import decoding
    from vmae_ray.decoding import VideoDecoder

    clips = {}

    def run(skip: bool) -> Callable[[], float]:
        def go() -> float:
            saved = decoding.PREROLL_MARGIN_FRAMES
            decoding.PREROLL_MARGIN_FRAMES = saved if skip else 10**12
            try:
                started, n = time.process_time(), 0
                for path in paths:
                    with VideoDecoder(path) as dec:
                        plans = dec.plan(sampling=wl.sampling, num_frames=wl.num_frames,
                                         frame_stride=wl.frame_stride, clips_per_video=wl.clips_per_video)
                        n += sum(1 for _ in dec.clips(plans, geometry))
                clips[skip] = n
                return 1000 * (time.process_time() - started) / max(n, 1)
            finally:
                decoding.PREROLL_MARGIN_FRAMES = saved
        return go

    best = _best({"skip": run(True), "no_skip": run(False)}, repeats)
    return {"videos": len(paths), "clips": clips.get(True), "skip_ms_per_clip": best["skip"],
            "no_skip_ms_per_clip": best["no_skip"], "speedup": best["no_skip"] / best["skip"]}


def cluster_autoscaler(wl, checkpoint: str, res, output: str) -> dict[str, Any]:
    """The job end to end under each Ray Data cluster autoscaler (Ray already started)."""
    from bench.peers import vmae_ray_peer
    from vmae_ray.graph import CLUSTER_AUTOSCALER_ENV

    saved = os.environ.get(CLUSTER_AUTOSCALER_ENV)
    out: dict[str, Any] = {}
    try:
        for version in ("RATE_BASED", "V2"):
            os.environ[CLUSTER_AUTOSCALER_ENV] = version
            started = time.perf_counter()
            summary, _argv = vmae_ray_peer(wl, checkpoint, res, os.path.join(output, version))
            seconds = time.perf_counter() - started
            out[version] = {"clips": summary.clips, "seconds": seconds, "clips_per_second": summary.clips / seconds,
                            "after_startup_clips_per_second":
                                summary.stage_report.get("after_startup_clips_per_second")}
    finally:
        if saved is None:
            os.environ.pop(CLUSTER_AUTOSCALER_ENV, None)
        else:
            os.environ[CLUSTER_AUTOSCALER_ENV] = saved
    out["speedup"] = out["V2"]["clips_per_second"] / out["RATE_BASED"]["clips_per_second"]
    return out


def reconstruction_flops(cfg: dict, *, mask_ratio: float = 0.9) -> dict[str, float]:
    """Matmul GFLOPs per clip of the embedding alone and of what --reconstruction adds.

    ``cfg``: `bench.gpu_model.BASE`-style encoder geometry plus the decoder's
    (``decoder_hidden_size``, ``decoder_num_hidden_layers``, ``decoder_intermediate_size``;
    transformers' VideoMAEConfig defaults 384, 4, 1536 when absent, those of the MCG-NJU
    checkpoints). Added: the patch embedding again (all tokens, then the visible ones are kept),
    the encoder on the visible tokens, encoder_to_decoder, the decoder over all tokens and its
    head on the masked ones. Counted as `bench.gpu_model.analytic_flops` does (2 per
    multiply-accumulate, norms/softmax left out).
    """
    from bench.gpu_model import analytic_flops

    slots = cfg["num_frames"] // cfg["tubelet_size"]
    per_frame = (cfg["image_size"] // cfg["patch_size"]) ** 2
    n = slots * per_frame
    visible = slots * (per_frame - int(mask_ratio * per_frame))
    masked = n - visible
    d, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    dd = cfg.get("decoder_hidden_size", 384)
    di = cfg.get("decoder_intermediate_size", 1536)
    dl = cfg.get("decoder_num_hidden_layers", 4)
    target = 3 * cfg["tubelet_size"] * cfg["patch_size"] ** 2
    patch = 2 * n * target * d
    encoder_visible = layers * (8 * visible * d * d + 4 * visible * d * i + 4 * visible * visible * d)
    decoder = 2 * visible * d * dd + dl * (8 * n * dd * dd + 4 * n * dd * di + 4 * n * n * dd) + 2 * masked * dd * target
    embed = analytic_flops(cfg)
    extra = patch + encoder_visible + decoder
    return {"embed_gflops": embed / 1e9, "extra_gflops": extra / 1e9, "ratio": embed / (embed + extra)}


def reconstruction(checkpoint: str, clips: list[np.ndarray], *, batch_size: int, threads: int,
                   mask_ratio: float = 0.9, repeats: int = 3, min_clips: int = 16) -> dict[str, Any]:
    """The model stage without and with --reconstruction on the same clips, and VideoMAE-B's FLOPs."""
    import torch

    from bench.gpu_model import BASE
    from vmae_ray.embedder import VideoMAEEmbedder
    from vmae_ray.reconstruction import clip_mask

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        embedder = VideoMAEEmbedder(checkpoint, device="cpu", dtype="float32", reconstruction=True)
        spec = embedder.spec
        pool = [clips[i % len(clips)] for i in range(max(min_clips, len(clips)))]
        batches = []
        for start in range(0, len(pool), batch_size):
            masks = np.stack([clip_mask(clip, mask_seed=0, mask_ratio=mask_ratio,
                                        num_time_slots=spec.num_time_slots, tokens_per_frame=spec.tokens_per_frame)
                              for clip in pool[start:start + batch_size]])
            batches.append((np.stack(pool[start:start + batch_size]), masks))

        def timed(fn) -> Callable[[], float]:
            def run() -> float:
                started = time.process_time()
                for b, m in batches:
                    fn(b, m)
                return (time.process_time() - started) / len(pool)
            return run

        def embed_only(b, m):
            return embedder.embed(b)

        def with_scores(b, m):
            return embedder.embed_with_reconstruction(b, m)

        embed_only(*batches[0]), with_scores(*batches[0])  # warm-up
        best = _best({"off": timed(embed_only), "on": timed(with_scores)}, repeats)
    finally:
        torch.set_num_threads(previous)
    return {"clips": len(pool), "batch_size": batch_size, "torch_threads": threads, "mask_ratio": mask_ratio,
            "tokens": spec.num_tokens, "off_clips_per_cpu_second": 1 / best["off"],
            "on_clips_per_cpu_second": 1 / best["on"], "ratio": best["off"] / best["on"],
            "videomae_b": reconstruction_flops(BASE, mask_ratio=mask_ratio)}


def base_pretraining_checkpoint(path: str) -> str:
    """A randomly initialised VideoMAE-B pretraining checkpoint (speed does not depend on the weights):
    `bench.gpu_model.BASE` with transformers' default decoder (384 wide, 4 layers, 6 heads), as
    the MCG-NJU pretraining checkpoints have; written once under ``path``."""
    import json

    from bench.gpu_model import BASE

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    torch.manual_seed(0)
    VideoMAEForPreTraining(VideoMAEConfig(**BASE, use_mean_pooling=False, norm_pix_loss=True)).save_pretrained(path)
    preprocessor = {"image_processor_type": "VideoMAEImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
                    "resample": 2, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f)
    return path


def main(argv=None) -> int:
    """One-off: the reconstruction ablation at VideoMAE-B size on this machine's CPU (slow: seconds per clip).

        python -m bench.ablation --workdir bench_out --clips 2 --batch-size 2 --threads 1
    """
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    checkpoint = base_pretraining_checkpoint(os.path.join(args.workdir, "checkpoint_videomae_b_pretraining"))
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (16, 224, 224, 3), dtype=np.uint8) for _ in range(args.clips)]
    result = reconstruction(checkpoint, clips, batch_size=args.batch_size, threads=args.threads,
                            repeats=args.repeats, min_clips=args.clips)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
