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
        # Workers below the ephemeral range the other ports come from (and outside Ray's default
        # 10002-19999), so they never collide.
        low = random.randrange(20000, 29000)
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
    from bench.compat import fix_checkout

    path = os.path.join(workdir, f"before-{commit}")
    if not os.path.isfile(os.path.join(path, "vmae_ray", "pipeline.py")):
        out = subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "--force", path, commit],
                             capture_output=True, text=True)
        if out.returncode != 0:
            log(f"no checkout of {commit}: {out.stderr.strip()[:300]}")
            return None
    fix_checkout(path)  # today's packages (bench.compat)
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
import os, sys, time
import pyarrow as pa
import ray, ray.data
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
tasks, per_task = int(sys.argv[1]), int(sys.argv[2])

def blocks(batch):
    for i in range(per_task):
        yield pa.table({"x": [i] * 100})

ds = ray.data.range(tasks, override_num_blocks=tasks).map_batches(blocks, batch_size=None, batch_format="pyarrow")
ds.context.target_max_block_size = 1000  # every yielded table leaves as a block of its own
n = sum(1 for _ in ds.iter_batches(batch_size=None))
print("BLOCKS", n)
"""


def ray_data_blocks(code: str, head: RayHead, workdir: str, counts: tuple[int, int]) -> dict[str, Any]:
    """Ray Data's own driver CPU per block and per task: no-op pipelines of ``counts`` tasks (one
    block each: the cost of a task and its block), and of 10 tasks yielding many blocks each
    (the cost of a block alone); the slopes."""
    script = os.path.join(workdir, "blocks.py")
    with open(script, "w") as f:
        f.write(BLOCKS_SCRIPT)

    def run(tasks: int, per_task: int) -> dict[str, Any]:
        r = run_driver([sys.executable, script, str(tasks), str(per_task)], {**head.env, "RAY_ADDRESS": head.address},
                       code, os.path.join(workdir, f"blocks-{tasks}x{per_task}.log"))
        m = re.search(r"BLOCKS (\d+)", open(r["log"], errors="replace").read())
        r["blocks"] = int(m.group(1)) if m else None
        return r

    few, many = counts
    by_task = [run(few, 1), run(many, 1)]
    by_block = [run(10, few // 10), run(10, many // 10)]

    def slope(pair: list[dict], key: str) -> float | None:
        a, b = pair
        if not (a.get("blocks") and b.get("blocks")) or b[key] == a[key]:
            return None
        return round(1e3 * (b["cpu_seconds"] - a["cpu_seconds"]) / (b[key] - a[key]), 3)

    for r in by_task:
        r["tasks"] = r["blocks"]
    return {"runs": {"tasks": by_task, "blocks": by_block},
            "driver_cpu_ms_per_block": slope(by_block, "blocks"),
            "driver_cpu_ms_per_task_and_block": slope(by_task, "tasks"),
            "command": f"python {script} TASKS BLOCKS_PER_TASK, RAY_ADDRESS set"}


def receipt_cost(rows_per_receipt: int = 416, receipts: int = 2000) -> dict[str, Any]:
    """The driver's own work per receipt (`commit.ReceiptLedger.offer` of a receipt row as it
    arrives, finishing ``rows_per_receipt`` inputs), in this process."""
    import pyarrow as pa

    from vmae_ray.commit import ReceiptLedger
    from vmae_ray.schema import RECEIPT_SCHEMA
    from vmae_ray.staging import CallStats

    stats = CallStats(clips=rows_per_receipt, videos=rows_per_receipt, model_calls={32: 13},
                      decoded_at={1_800_000_000 + i: 32 for i in range(4)}).to_json()
    rows = [{"attempt": f"w{i:08d}-00001", "files": [f"clips/part-r-w{i}.parquet", f"videos/part-r-w{i}.parquet"],
             "done": list(range(i * rows_per_receipt, (i + 1) * rows_per_receipt)), "parts": [], "stats": stats}
            for i in range(receipts)]
    tables = [pa.Table.from_pylist(rows[i:i + 4], schema=RECEIPT_SCHEMA) for i in range(0, receipts, 4)]
    ledger = ReceiptLedger(receipts * rows_per_receipt)
    started = time.process_time()
    for table in tables:
        for receipt in table.to_pylist():
            ledger.offer(receipt)
    per_receipt = (time.process_time() - started) / receipts
    return {"ms_per_receipt": round(1e3 * per_receipt, 4), "inputs_per_receipt": rows_per_receipt}


def projection(blocks: dict[str, Any], receipt: dict[str, Any], wait_cost: float | None) -> dict[str, Any]:
    """Driver CPU per clip of a fleet-sized run at VideoMAE-B geometry, from the measured costs
    per block, per task and per receipt and the job's own sizing (`graph`): 1M and 100M inputs,
    uniform sampling (one clip a video: the most tasks per clip), GPU defaults."""
    from vmae_ray.config import DEFAULT_BATCH_SIZE_GPU
    from vmae_ray.graph import rows_per_call, videos_per_task

    block_ms, task_ms = blocks.get("driver_cpu_ms_per_block"), blocks.get("driver_cpu_ms_per_task_and_block")
    if not block_ms or not task_ms:
        return {}
    clip_bytes = 16 * 224 * 224 * 3
    clips_per_block = (512 * 2**20) // clip_bytes
    out = {}
    for inputs, gpus in ((1_000_000, 64), (100_000_000, 500)):
        per_task = videos_per_task(inputs, decode_slots=40 * gpus)
        call = rows_per_call(DEFAULT_BATCH_SIZE_GPU, clip_bytes, 1.0, inputs, gpus)
        per_clip_ms = (
            task_ms / per_task  # a decode task (and its input block)
            + block_ms / per_task  # its block out of the streaming repartition
            + block_ms / clips_per_block  # decoded blocks
            + task_ms / call  # an actor task per call's bundle (at least one block: a call's rows)
            + receipt["ms_per_receipt"] / call  # the driver's own work per receipt
        )
        entry = {"videos_per_task": per_task, "clips_per_actor_call": call, "clips_per_decoded_block": clips_per_block,
                 "driver_cpu_us_per_clip": round(1e3 * per_clip_ms, 1)}
        spare = 1.0 - (wait_cost or 0.0)
        entry["one_core_clips_per_second"] = round(spare / (per_clip_ms * 1e-3))
        entry["h100s_at_40pct_mfu"] = round(spare / (per_clip_ms * 1e-3) / H100_CLIPS_PER_SECOND, 1)
        out[f"{inputs}"] = entry
    return out


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
                entry["receipts"] = receipt_cost()
            if "listing" not in skip:
                entry["listing"] = listing_memory(side, code, head, workdir, ensure_checkpoint(workdir, "small"),
                                                  preset["manifests"])
            results["sides"][side] = entry
        finally:
            head.stop()
    for entry in results["sides"].values():
        fit = (entry.get("jobs") or {}).get("fit")
        if not fit:
            continue
        per_clip = max(fit["driver_cpu_us_per_clip"], 0.0) * 1e-6
        spare = max(0.0, 1.0 - fit["cpu_seconds_per_wall_second"])
        if per_clip > 0:
            fit["one_core_clips_per_second"] = round(spare / per_clip)
            fit["h100s_at_40pct_mfu"] = round(spare / per_clip / H100_CLIPS_PER_SECOND, 1)
    after = results["sides"].get("after") or {}
    if after.get("ray_data_blocks") and after.get("receipts"):
        fit = (after.get("jobs") or {}).get("fit") or {}
        after["projection"] = projection(after["ray_data_blocks"], after["receipts"],
                                         fit.get("cpu_seconds_per_wall_second"))
    text = json.dumps(results, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
