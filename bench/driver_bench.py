"""What one driver process costs, before and after the workers write (issue 16), side by side.

    python -m bench.driver_bench --workdir bench_out/driver [--before 91b2140] [--preset small|tiny]

Every run's driver is its own process (`jobs/embed_videos.py`, or for the listing measurements
a small script) connected with RAY_ADDRESS to a Ray started beforehand with `ray start` (a
private temp dir, ports of its own, token authentication off: our own settings). Its CPU
seconds and peak RSS come from the kernel (`os.wait4` of the child), so they are the
driver's alone, not Ray's. The code before the change is a `git worktree` of ``--before``;
each side's Ray runs with that side's package on PYTHONPATH, so its workers run its code.

Measured, per side:
- driver CPU per clip of the real job at VideoMAE-B clip geometry (16x224x224) and at a small
  one (8x32x32): the slope between a small and a large run (``(cpu_large - cpu_small) /
  (clips_large - clips_small)``), and the plain ratio of the large run;
- end-to-end clips/s and mean clips per model call of the large run;
- Ray Data's own driver cost per block: a no-op pipeline at two block counts, the slope;
- driver peak memory per input of listing and diffing a manifest of 1M and 10M inputs (after:
  ``--dry-run``; before: `pipeline.prepare`, which listed and diffed on the driver), the slope;
- the implied ceiling of one driver: clips/s one core sustains at its CPU per clip, in H100s
  at 40% MFU (VideoMAE-B: 180 GFLOPs per clip forward; H100 SXM dense bf16 peak 989 TFLOPS).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE_COMMIT = "91b2140"  # main before issue 16: the driver assembled and wrote every row

GFLOPS_PER_CLIP = 180.0  # VideoMAE-B forward, 16x224x224 (DESIGN.md's performance model)
H100_BF16_TFLOPS = 989.0
MFU = 0.40
H100_CLIPS_PER_SECOND = H100_BF16_TFLOPS * 1e3 * MFU / GFLOPS_PER_CLIP

# Clip geometries: (name, checkpoint recipe for make_tiny_checkpoint). A tiny encoder, so that the
# model is cheap on CPU; the clips have the real sizes (2.4 MB at VideoMAE-B's).
GEOMETRIES = {
    "videomae_b": dict(classifier=False, num_frames=16, image_size=224, patch_size=16, tubelet_size=2,
                       hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, seed=0),
    "small": dict(classifier=False, num_frames=8, image_size=32, patch_size=16, tubelet_size=2,
                  hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, seed=0),
}
PRESETS = {
    # videos in the corpus; (small, large) run sizes in videos; clips per video; manifest sizes
    "small": {"videos": 240, "runs": (40, 240), "clips_per_video": 8, "manifests": (1_000_000, 10_000_000),
              "blocks": (200, 2000)},
    "tiny": {"videos": 12, "runs": (3, 12), "clips_per_video": 4, "manifests": (20_000, 100_000),
             "blocks": (20, 200)},
}


def log(msg: str) -> None:
    print(f"[driver-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# A Ray of our own


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RayHead:
    """`ray start --head` with a private temp dir and ports, the given code on PYTHONPATH."""

    def __init__(self, code_root: str, num_cpus: int, workdir: str):
        self.temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths
        self.port = _free_port()
        ports = {n: _free_port() for n in ("node-manager-port", "object-manager-port", "ray-client-server-port",
                                           "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                           "runtime-env-agent-port", "metrics-export-port")}
        low = random.randrange(40000, 50000)
        self.env = {**os.environ, "PYTHONPATH": code_root, "RAY_AUTH_MODE": "disabled",
                    "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_worker_niceness": "0"}
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(name, None)
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", f"--port={self.port}",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
               "--disable-usage-stats", f"--min-worker-port={low}", f"--max-worker-port={low + 200}",
               f"--object-store-memory={2 * 2**30}", *(f"--{k}={v}" for k, v in ports.items())]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"ray start failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        import psutil

        me = os.getpid()
        victims = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or ())
            if proc.info["pid"] != me and (self.temp_dir in cmd or f":{self.port}" in cmd):
                victims.append(proc)
        for proc in list(victims):
            try:
                victims += proc.children(recursive=True)
            except psutil.Error:
                pass
        for proc in victims:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=20)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# Runs the driver and reports its rusage. Linux carries a process's peak RSS across fork and
# exec (ru_maxrss starts at the parent's): the launcher is a small fresh interpreter, so the
# driver's floor is the launcher's few MiB, not this process's hundreds.
LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_kib": usage.ru_maxrss,
               "exit": os.waitstatus_to_exitcode(status)}, f)
sys.exit(0)
"""


def run_driver(cmd: list[str], env: dict, cwd: str, log_path: str, timeout: float = 1800) -> dict[str, Any]:
    """Run one driver process; its exit status, wall seconds, CPU seconds and peak RSS (wait4)."""
    started = time.perf_counter()
    usage_path = log_path + ".rusage.json"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, usage_path, *cmd], env=env, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - started
    try:
        with open(usage_path) as f:
            usage = json.load(f)
    except (OSError, ValueError):
        usage = {"cpu_seconds": None, "peak_rss_kib": 0, "exit": -1}
    return {"exit": usage["exit"], "wall_seconds": round(wall, 3),
            "cpu_seconds": None if usage["cpu_seconds"] is None else round(usage["cpu_seconds"], 3),
            "peak_rss_mib": round(usage["peak_rss_kib"] / 1024, 1), "log": log_path}


# ---------------------------------------------------------------------------------------------
# Inputs


def ensure_before(workdir: str, commit: str) -> str | None:
    """A checkout of the code before the change (git worktree), or None when git cannot make one."""
    path = os.path.join(workdir, f"before-{commit}")
    if os.path.isfile(os.path.join(path, "vmae_ray", "pipeline.py")):
        return path
    out = subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "--force", path, commit],
                         capture_output=True, text=True)
    if out.returncode != 0:
        log(f"no checkout of {commit}: {out.stderr.strip()[:300]}")
        return None
    return path


def ensure_corpus(workdir: str, count: int) -> str:
    """``count`` short 96x72 videos (cheap to decode: the driver, not the decoder, is measured)."""
    from vmae_ray.synthetic import make_video

    folder = os.path.join(workdir, f"videos-{count}")
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        path = os.path.join(folder, f"v{i:05d}.mp4")
        if not os.path.exists(path):
            make_video(path, codec="h264", width=96, height=72, fps=24, num_frames=96, gop_size=24, seed=i,
                       bit_exact=True)
    return folder


def ensure_checkpoint(workdir: str, geometry: str) -> str:
    from vmae_ray.synthetic import make_tiny_checkpoint

    path = os.path.join(workdir, f"checkpoint-{geometry}")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_tiny_checkpoint(path, **GEOMETRIES[geometry])
    return path


def ensure_manifest(workdir: str, rows: int, *, with_identity: bool) -> str:
    """A Parquet manifest of ``rows`` S3 URIs (with Size and ETag columns when ``with_identity``)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(workdir, f"manifest-{rows}{'-identity' if with_identity else ''}.parquet")
    if os.path.exists(path):
        return path
    writer = None
    step = 1_000_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        ids = np.arange(start, start + n)
        uris = pa.array([f"s3://corpus-bucket/videos/{i // 1000:05d}/clip_{i:09d}.mp4" for i in ids.tolist()])
        columns = {"uri": uris}
        if with_identity:
            columns["size"] = pa.array(1_000_000 + ids % 997, pa.int64())
            columns["etag"] = pa.array([f"{i * 2654435761 % 2**32:08x}" for i in ids.tolist()])
        table = pa.table(columns)
        if writer is None:
            writer = pq.ParquetWriter(path + ".tmp", table.schema)
        writer.write_table(table)
    writer.close()
    os.replace(path + ".tmp", path)
    return path


# ---------------------------------------------------------------------------------------------
# Measurements


def parse_summary(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = re.search(r"clips: (\d+); wall ([\d.]+)s .*pipeline ([\d.]+)s\); ([\d.]+) clips/s", text)
    if m:
        out.update(clips=int(m[1]), pipeline_seconds=float(m[3]), clips_per_second=float(m[4]))
    m = re.search(r"model calls: (\d+), ([\d.]+) clips per call \(batch size (\d+)\)", text)
    if m:
        out.update(model_calls=int(m[1]), clips_per_model_call=float(m[2]), batch_size=int(m[3]))
    m = re.search(r"(\d+) ok, (\d+) failed", text)
    if m:
        out.update(videos_ok=int(m[1]), videos_failed=int(m[2]))
    m = re.search(r"; ([\d.]+) clips/s from then on", text)
    if m:
        out["after_startup_clips_per_second"] = float(m.group(1))
    return out


def job_runs(side: str, code: str, head: RayHead, workdir: str, corpus: str, preset: dict) -> dict[str, Any]:
    """The job at each geometry, a small and a large run; per geometry the slope of driver CPU
    over clips, and over all runs of the side a fit cpu = a + b * wall + c * clips (Ray Data's
    executor polls while it waits, a cost per second on a slow machine, not per clip)."""
    out: dict[str, Any] = {}
    points = []
    for geometry in GEOMETRIES:
        checkpoint = ensure_checkpoint(workdir, geometry)
        runs = {}
        for size in preset["runs"]:
            target = os.path.join(workdir, "out", side, geometry, str(size))
            shutil.rmtree(target, ignore_errors=True)
            cmd = [sys.executable, os.path.join(code, "jobs", "embed_videos.py"), "--input", corpus, "--output",
                   target, "--model", checkpoint, "--sampling", "stride", "--frame-stride", "1",
                   "--clips-per-video", str(preset["clips_per_video"]), "--limit", str(size), "--batch-size", "8",
                   "--progress-seconds", "600"]
            log(f"{side}: {geometry}, {size} videos")
            result = run_driver(cmd, {**head.env, "RAY_ADDRESS": head.address}, code,
                                os.path.join(workdir, f"{side}-{geometry}-{size}.log"))
            text = open(result["log"], errors="replace").read()
            result.update(parse_summary(text))
            result["command"] = " ".join(["python", *cmd[1:]])
            if result["exit"] != 0:
                result["tail"] = text[-1500:]
            try:
                with open(os.path.join(target, "_SUCCESS")) as f:
                    report = json.load(f).get("stage_report") or {}
                operators = [op for op in report.get("operators") or [] if isinstance(op, dict)]
                if operators:
                    result["ray_data_blocks"] = sum(op.get("blocks", 0) for op in operators)
                    result["operators"] = operators
            except OSError:
                pass
            runs[str(size)] = result
            if result.get("clips"):
                points.append((result["wall_seconds"], result["clips"], result["cpu_seconds"]))
        small, large = (runs[str(s)] for s in preset["runs"])
        entry: dict[str, Any] = {"runs": runs}
        if small.get("clips") and large.get("clips") and large["clips"] > small["clips"]:
            slope = (large["cpu_seconds"] - small["cpu_seconds"]) / (large["clips"] - small["clips"])
            entry["driver_cpu_us_per_clip_slope"] = round(1e6 * slope, 1)
            entry["driver_cpu_us_per_clip_ratio"] = round(1e6 * large["cpu_seconds"] / large["clips"], 1)
            entry["clips_per_second"] = large.get("clips_per_second")
            entry["clips_per_model_call"] = large.get("clips_per_model_call")
            if large.get("ray_data_blocks"):
                entry["clips_per_ray_data_block"] = round(large["clips"] / large["ray_data_blocks"], 1)
        out[geometry] = entry
    if len(points) >= 3:
        import numpy as np

        x = np.array([[1.0, w, c] for w, c, _ in points])
        y = np.array([cpu for _, _, cpu in points])
        (a, b, c), *_ = np.linalg.lstsq(x, y, rcond=None)
        out["fit"] = {"fixed_cpu_seconds": round(float(a), 3), "cpu_seconds_per_wall_second": round(float(b), 4),
                      "driver_cpu_us_per_clip": round(1e6 * float(c), 1), "points": len(points)}
    return out


BLOCKS_SCRIPT = """
import os, resource, sys, time
import ray, ray.data
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
blocks = int(sys.argv[1])
ds = ray.data.range(blocks * 10, override_num_blocks=blocks).map_batches(lambda b: b, batch_size=None)
t0 = time.process_time()
n = sum(1 for _ in ds.iter_batches(batch_size=None))
print("BLOCKS", n, time.process_time() - t0)
"""


def ray_data_blocks(code: str, head: RayHead, workdir: str, counts: tuple[int, int]) -> dict[str, Any]:
    """Ray Data's own driver CPU per block: a no-op map over ``counts`` blocks, the slope."""
    script = os.path.join(workdir, "blocks.py")
    with open(script, "w") as f:
        f.write(BLOCKS_SCRIPT)
    runs = {}
    for n in counts:
        r = run_driver([sys.executable, script, str(n)], {**head.env, "RAY_ADDRESS": head.address}, code,
                       os.path.join(workdir, f"blocks-{n}.log"))
        runs[str(n)] = r
    a, b = (runs[str(n)] for n in counts)
    return {"runs": runs, "driver_cpu_ms_per_block": round(1e3 * (b["cpu_seconds"] - a["cpu_seconds"]) /
                                                           (counts[1] - counts[0]), 3),
            "command": f"python {script} N (N = {counts[0]}, {counts[1]}), RAY_ADDRESS set"}


PREPARE_SCRIPT = """
import os, sys
from vmae_ray.cli import config_from_args
from vmae_ray.pipeline import prepare
plan = prepare(config_from_args(sys.argv[1:]))
print("TODO", len(plan.todo))
"""


def listing_memory(side: str, code: str, head: RayHead, workdir: str, checkpoint: str,
                   sizes: tuple[int, int]) -> dict[str, Any]:
    """Driver peak RSS of listing and diffing manifests of two sizes; per input: the slope."""
    import psutil

    runs = {}
    for rows in sizes:
        if side == "before" and rows * 1200 > psutil.virtual_memory().available * 0.6:
            runs[str(rows)] = {"skipped": f"about {rows * 1200 / 2**30:.0f} GiB needed on the driver, "
                                          f"{psutil.virtual_memory().available / 2**30:.0f} GiB free"}
            continue
        manifest = ensure_manifest(workdir, rows, with_identity=side == "after")
        target = os.path.join(workdir, "out", side, f"dry-{rows}")
        shutil.rmtree(target, ignore_errors=True)
        args = ["--input", manifest, "--output", target, "--model", checkpoint]
        if side == "after":
            cmd = [sys.executable, os.path.join(code, "jobs", "embed_videos.py"), *args, "--dry-run"]
        else:
            script = os.path.join(workdir, "prepare_before.py")
            with open(script, "w") as f:
                f.write(PREPARE_SCRIPT)
            cmd = [sys.executable, script, *args]
        log(f"{side}: listing and diff of {rows} inputs")
        r = run_driver(cmd, {**head.env, "RAY_ADDRESS": head.address}, code,
                       os.path.join(workdir, f"{side}-list-{rows}.log"), timeout=1800)
        r["command"] = " ".join(["python", *cmd[1:]])
        if r["exit"] != 0:
            r["tail"] = open(r["log"], errors="replace").read()[-1500:]
        runs[str(rows)] = r
    out: dict[str, Any] = {"runs": runs}
    a, b = (runs.get(str(n), {}) for n in sizes)
    if a.get("exit") == 0 and b.get("exit") == 0:
        out["bytes_per_input"] = round((b["peak_rss_mib"] - a["peak_rss_mib"]) * 2**20 / (sizes[1] - sizes[0]), 1)
    elif a.get("exit") == 0:
        out["bytes_per_input_upper_bound"] = round(a["peak_rss_mib"] * 2**20 / sizes[0], 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench_out", "driver"))
    p.add_argument("--before", default=BEFORE_COMMIT, help="the commit to compare with ('' for after only)")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--skip", default="", help="comma-separated: jobs,blocks,listing")
    p.add_argument("--json", help="write the results here too")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    skip = set(filter(None, a.skip.split(",")))
    workdir = os.path.abspath(a.workdir)
    os.makedirs(workdir, exist_ok=True)
    sides = {"after": ROOT}
    if a.before:
        before = ensure_before(workdir, a.before)
        if before:
            sides = {"before": before, "after": ROOT}
    corpus = ensure_corpus(workdir, preset["videos"])
    results: dict[str, Any] = {"preset": a.preset, "before_commit": a.before if "before" in sides else None,
                               "h100_clips_per_second_at_40pct_mfu": round(H100_CLIPS_PER_SECOND),
                               "sides": {}}
    for side, code in sides.items():
        head = RayHead(code, num_cpus=2, workdir=workdir)
        try:
            entry: dict[str, Any] = {"code": code}
            if "jobs" not in skip:
                entry["jobs"] = job_runs(side, code, head, workdir, corpus, preset)
            if "blocks" not in skip and side == "after":
                entry["ray_data_blocks"] = ray_data_blocks(code, head, workdir, preset["blocks"])
            if "listing" not in skip:
                entry["listing"] = listing_memory(side, code, head, workdir, ensure_checkpoint(workdir, "small"),
                                                  preset["manifests"])
            results["sides"][side] = entry
        finally:
            head.stop()
    blocks = (results["sides"].get("after") or {}).get("ray_data_blocks", {}).get("driver_cpu_ms_per_block")
    for entry in results["sides"].values():
        fit = (entry.get("jobs") or {}).get("fit")
        if not fit:
            continue
        per_clip = max(fit["driver_cpu_us_per_clip"], 0.0) * 1e-6
        b_geometry = (entry["jobs"].get("videomae_b") or {})
        # Where the fit cannot see the per-clip cost through the noise (it is that small), the
        # Ray Data blocks each clip costs, at the measured cost per block, bound it instead.
        if blocks and b_geometry.get("clips_per_ray_data_block"):
            modelled = blocks * 1e-3 / b_geometry["clips_per_ray_data_block"]
            fit["modelled_us_per_clip_from_blocks"] = round(1e6 * modelled, 1)
            per_clip = max(per_clip, modelled)
        spare = max(0.0, 1.0 - fit["cpu_seconds_per_wall_second"])
        if per_clip > 0:
            fit["one_core_clips_per_second"] = round(spare / per_clip)
            fit["h100s_at_40pct_mfu"] = round(spare / per_clip / H100_CLIPS_PER_SECOND, 1)
    text = json.dumps(results, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
