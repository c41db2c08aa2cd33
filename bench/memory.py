"""Decode-task memory on long 1080p video, measured in a fresh process per case.

``python -m bench.memory --path LONG.mp4 --checkpoint CKPT --clips-per-video all`` runs the
decode task's own function (`vmae_ray.stages.decode_video`: open, probe, plan, decode,
convert, one Arrow row per clip) over one file, dropping each row as it comes (as Ray Data
does once a block is handed on), and prints JSON: peak RSS of the process (VmHWM, which
includes the interpreter and imported libraries), RSS before decoding, and RSS
sampled along the way, so growth with video length is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """VmHWM: this address space's peak RSS. (``ru_maxrss`` would not do: Linux keeps it
    across exec, so a child of a large parent starts with the parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: str, checkpoint: str, sampling: str, frame_stride: int, clips_per_video: int | None) -> dict:
    from bench.peers import Workload, decode_params
    from vmae_ray.checkpoint import load_model_spec
    from vmae_ray.schema import KIND_CLIP, KIND_ERROR
    from vmae_ray.stages import decode_video
    from vmae_ray.storage import StorageOptions

    spec = load_model_spec(checkpoint)
    wl = Workload("memory", [path], os.path.dirname(path), sampling, frame_stride, clips_per_video,
                  num_frames=spec.num_frames)
    params = decode_params(spec, wl)
    item = {"video_id": os.path.basename(path), "uri": path, "size_bytes": os.path.getsize(path),
            "input_fingerprint": None}
    import av  # noqa: F401 - imported before the baseline reading, like in a warm task

    rss_before = _rss()
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sampler():
        t0 = time.perf_counter()
        while not stop.wait(0.5):
            samples.append((round(time.perf_counter() - t0, 1), _rss()))

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    clips, error = 0, None
    started = time.perf_counter()
    for table in decode_video(item, params, StorageOptions({})):
        kind = table.column("kind")[0].as_py()
        if kind == KIND_CLIP:
            clips += len(table.column("clip_index")[0].as_py())
        elif kind == KIND_ERROR:
            error = table.to_pylist()[0]["message"]
        del table
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    mib = 2**20
    peak = _peak_rss()
    step = max(1, len(samples) // 8)
    return {"path": path, "bytes": os.path.getsize(path), "clips": clips, "error": error,
            "seconds": round(seconds, 2), "rss_before_mib": round(rss_before / mib, 1),
            "peak_rss_mib": round(peak / mib, 1),
            "rss_samples_mib": [(t, round(r / mib, 1)) for t, r in samples[::step]]}


def run_case(path: str, checkpoint: str, sampling: str, frame_stride: int, clips_per_video: int | None,
             timeout: float = 600) -> dict:
    """`measure` in a fresh interpreter (so the peak is this case's alone)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "bench.memory", "--path", path, "--checkpoint", checkpoint,
           "--sampling", sampling, "--frame-stride", str(frame_stride),
           "--clips-per-video", "all" if clips_per_video is None else str(clips_per_video)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["command"] = " ".join(["python", *cmd[1:]])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--sampling", default="stride")
    p.add_argument("--frame-stride", type=int, default=4)
    p.add_argument("--clips-per-video", default="all")
    a = p.parse_args(argv)
    cpv = None if a.clips_per_video == "all" else int(a.clips_per_video)
    print(json.dumps(measure(a.path, a.checkpoint, a.sampling, a.frame_stride, cpv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
