"""Model-stage benchmark at VideoMAE-Base size: clips/s and model FLOPs utilisation (MFU).

    python -m bench.gpu_model                 # on a CUDA machine: ViT-B, 16x224x224, bf16
    python -m bench.gpu_model --smoke         # anywhere: a tiny config on CPU, seconds

The full configuration is VideoMAE-Base (random weights: speed does not depend on them):
hidden 768, 12 layers, 12 heads, MLP 3072, patch 16, tubelet 2, 16 frames of 224x224, i.e.
1568 tokens per clip. FLOPs per clip are counted analytically (`analytic_flops`, 2 FLOPs per multiply-accumulate:
360.7 GFLOPs per clip, which is the "180 GFLOPs" of the VideoMAE paper, a multiply-accumulate
count) and also reported as `torch.utils.flop_counter.FlopCounterMode` sees one forward pass. MFU is achieved FLOP/s over
the dense bf16 peak of the device (H100/H200 SXM: 989 TFLOP/s; override with --peak-tflops).

Two measurements:

* ``forward``: ``model(pixel_values)`` on normalised bf16 clips already on the device: the
  model alone.
* ``embedder``: `vmae_ray.embedder.VideoMAEEmbedder.embed` on uint8 clips in host memory, as the
  pipeline's actor calls it (pinned host-to-device copy of uint8, the patch embedding with the
  normalisation folded into its weights, the encoder, float32 mean pooling, copy back).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40S": 362.0}

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            image_size=224, patch_size=16, tubelet_size=2, num_frames=16)
SMOKE = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=16, tubelet_size=2, num_frames=16)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def analytic_flops(cfg: dict) -> int:
    """Matmul FLOPs of one clip through the encoder, 2 per multiply-accumulate.

    Patch embedding plus, per layer, QKV and output projections (8 N d^2), the MLP
    (4 N d I) and attention scores and weighted sum (4 N^2 d). Norms, softmax and GELU are
    left out (well under 1%).
    """
    n = (cfg["num_frames"] // cfg["tubelet_size"]) * (cfg["image_size"] // cfg["patch_size"]) ** 2
    d, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    patch = 2 * n * (3 * cfg["tubelet_size"] * cfg["patch_size"] ** 2) * d
    return patch + layers * (8 * n * d * d + 4 * n * d * i + 4 * n * n * d)


def count_flops(model, pixel_values) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(pixel_values=pixel_values)
    return int(counter.get_total_flops())


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(*, smoke: bool, batch_size: int, steps: int, warmup: int, dtype: str, peak: float | None,
        compile: bool = False) -> dict:
    import numpy as np
    import torch
    from transformers import VideoMAEConfig, VideoMAEModel

    from vmae_ray.embedder import VideoMAEEmbedder
    from vmae_ray.synthetic import make_tiny_checkpoint

    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype if cuda else "fp32"]
    cfg = SMOKE if smoke else BASE
    result: dict = {"mode": "smoke" if smoke else "full", "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "dtype": str(torch_dtype).replace("torch.", ""), "batch_size": batch_size, "config": cfg,
                    "torch": torch.__version__}

    # Forward only, on device-resident normalised input.
    model = VideoMAEModel(VideoMAEConfig(**cfg)).eval().to(device=device, dtype=torch_dtype)
    x = torch.randn(batch_size, cfg["num_frames"], 3, cfg["image_size"], cfg["image_size"], device=device,
                    dtype=torch_dtype)
    counted = count_flops(model, x[:1])
    flops_per_clip = analytic_flops(cfg)
    forward = torch.compile(model) if compile else model
    with torch.inference_mode():
        for _ in range(warmup):
            forward(pixel_values=x)
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            forward(pixel_values=x)
        _sync(device)
        seconds = time.perf_counter() - started
    clips_per_s = steps * batch_size / seconds
    result["flops_per_clip"] = flops_per_clip
    # FlopCounterMode misses attention where SDPA runs a kernel it has no formula for (the
    # CPU path); the analytic count is the basis of MFU.
    result["flops_per_clip_counted"] = counted
    result["gflops_per_clip"] = round(flops_per_clip / 1e9, 2)
    result["forward_clips_per_second"] = round(clips_per_s, 2)
    result["forward_ms_per_clip"] = round(1000 / clips_per_s, 3)
    achieved = clips_per_s * flops_per_clip / 1e12
    result["forward_tflops"] = round(achieved, 2)
    if peak:
        result["peak_bf16_tflops"] = peak
        result["forward_mfu"] = round(achieved / peak, 4)
    del model, forward, x

    # The pipeline's embed path on uint8 host clips (checkpoint written with random weights).
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(os.path.join(tmp, "vmae-base-random"), classifier=False, **cfg)
        embedder = VideoMAEEmbedder(ckpt, device=device.type, dtype={"bf16": "bfloat16", "fp16": "float16",
                                                                      "fp32": "float32"}[dtype if cuda else "fp32"])
        rng = np.random.default_rng(0)
        clips = rng.integers(0, 256, (batch_size, cfg["num_frames"], cfg["image_size"], cfg["image_size"], 3),
                             dtype=np.uint8)
        for _ in range(warmup):
            embedder.embed(clips)
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            embedder.embed(clips)
        _sync(device)
        seconds = time.perf_counter() - started
    e_clips_per_s = steps * batch_size / seconds
    result["embedder_clips_per_second"] = round(e_clips_per_s, 2)
    result["embedder_ms_per_clip"] = round(1000 / e_clips_per_s, 3)
    if peak:
        result["embedder_mfu"] = round(e_clips_per_s * flops_per_clip / 1e12 / peak, 4)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="VideoMAE-Base model-stage benchmark (clips/s, MFU).")
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU: checks the code path only")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (full), 2 (smoke)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 full, 2 smoke)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by device name)")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    import torch

    if not a.smoke and not torch.cuda.is_available():
        print("no CUDA device: the full benchmark needs a GPU (use --smoke to check the code path on CPU)",
              file=sys.stderr)
        return 2
    batch = a.batch_size or (2 if a.smoke else 32)
    steps = a.steps or (2 if a.smoke else 20)
    warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 5)
    peak = a.peak_tflops
    if peak is None and not a.smoke:
        peak = peak_tflops(torch.cuda.get_device_name(0))
    result = run(smoke=a.smoke, batch_size=batch, steps=steps, warmup=warmup, dtype=a.dtype, peak=peak,
                 compile=a.compile)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
