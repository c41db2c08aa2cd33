"""`make bench`: every benchmark of vmae-ray on this machine, written to BENCHMARKS.md.

    python -m bench.run --workdir bench_out --results BENCHMARKS.md [--preset small]

Steps (each timed; the whole run is sized to finish in under 15 minutes on 2 cores):

1. corpora (generated once, cached under WORKDIR/corpus by their spec) and the bench model
   (a small randomly initialised VideoMAE, 16 frames of 224x224, written once);
2. without Ray: each stage alone (decode in-process, model on pre-decoded clips), the
   model-card peer, and the decode stage against libavcodec (bench.decode_bench);
3. Ray start-up, timed on its own (ray.init plus one trivial job to start workers);
4. per workload: vmae-ray (`pipeline.run`) and `ray.data.read_videos`, with peak memory and
   object-store use sampled throughout (bench.monitor);
5. decode-task memory on long 1080p video (bench.memory, a fresh process per case);
6. the GPU model stage (bench.gpu_model): measured on CUDA, else its CPU smoke mode only;
7. vector search, index and dedup on synthetic embeddings (bench.vector_bench, a fresh process
   per size): 20k rows with dedup checked against all pairs, 100k and 1M rows, and the index
   with 4 sqrt(N) lists at 100k beside the default sqrt(N).

Results go to WORKDIR/results.json and, rendered, to --results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The bench model: VideoMAE's clip geometry (16 frames, 224x224 crop after a 232 short-side
# resize, patch 16, tubelet 2 -> 1568 tokens) with a tiny encoder, so that on CPU the model
# stage is cheap next to decoding 720p/1080p and the runs show the decode path.
BENCH_MODEL = dict(classifier=False, num_frames=16, image_size=224, patch_size=16, tubelet_size=2,
                   hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, seed=0)

STEPS = ("model_card", "read_videos", "vmae_ray", "stages", "decode_target", "ablations", "memory", "gpu", "vectors",
         "driver")
# Sizes of the vector step per preset: (rows, extra arguments of bench.vector_bench).
VECTOR_RUNS = {
    "tiny": [(3000, ("--dedup-exact",))],
    "small": [(20_000, ("--dedup-exact",)), (100_000, ()), (1_000_000, ())],
}
VECTOR_ABLATION = {"small": (100_000, ("--nlist-factor", "4", "--no-dedup"))}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def describe_machine() -> dict[str, Any]:
    import av
    import psutil
    import pyarrow
    import ray
    import torch
    import transformers

    cpu_model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    decord_version = decord_status()
    gpu = "none"
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "av": av.__version__,
        "libavcodec": ".".join(map(str, av.library_versions.get("libavcodec", ()))),
        "libswscale": ".".join(map(str, av.library_versions.get("libswscale", ()))),
        "pyarrow": pyarrow.__version__,
        "decord": decord_version,
        "loadavg_start": _loadavg(),
    }


def decord_status() -> str:
    """decord's version, checked in a separate interpreter.

    Never import decord in this process: it carries its own FFmpeg libraries, and once they
    are loaded PyAV's libvpx-vp9 encoder fails to open ("Invalid argument") here, in this
    process and in the corpus workers it forks.
    """
    from importlib import metadata

    try:
        version = metadata.version("decord")
    except metadata.PackageNotFoundError:
        return "not installed"
    out = subprocess.run([sys.executable, "-c", "import decord"], capture_output=True, text=True)
    if out.returncode != 0:
        return f"{version}, not importable: {out.stderr.strip().splitlines()[-1][:200] if out.stderr else '?'}"
    return version


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def ensure_checkpoint(workdir: str, *, pretraining: bool = False) -> str:
    """The bench model (written once); ``pretraining``: the same geometry and encoder laid out as a
    pretraining checkpoint with its decoder (for --reconstruction)."""
    from vmae_ray.synthetic import make_tiny_checkpoint

    recipe = dict(BENCH_MODEL, pretraining_layout=True) if pretraining else BENCH_MODEL
    path = os.path.join(workdir, "checkpoint_pretraining" if pretraining else "checkpoint")
    stamp = os.path.join(path, "bench_model.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == recipe:
                return path
    make_tiny_checkpoint(path, **recipe)
    with open(stamp, "w") as f:
        json.dump(recipe, f)
    return path


def start_ray(num_cpus: int) -> dict[str, float]:
    """ray.init, then one trivial Ray Data job so worker processes exist; both timed.

    An already running Ray (a test session's) is used as it is.
    """
    import ray
    import ray.data

    if ray.is_initialized():
        ray.data.DataContext.get_current().enable_progress_bars = False
        return {"ray_init_seconds": 0.0, "ray_start_seconds": 0.0, "reused": True}

    # Ray starts its workers at niceness 15 (its worker_niceness default); the in-process
    # measurements run at 0. On a machine other jobs share, that alone would slow the Ray
    # peers against the in-process ones, so the bench puts Ray's workers at 0 too.
    os.environ.setdefault("RAY_worker_niceness", "0")
    started = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    init_s = time.perf_counter() - started
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ray.data.range(4, override_num_blocks=2).map_batches(lambda b: b).take_all()
    return {"ray_init_seconds": round(init_s, 2), "ray_start_seconds": round(time.perf_counter() - started, 2)}


def _guard(results: dict, key: str, fn, *args, **kwargs):
    """Run one measurement; an exception is recorded as the result, not the end of the run."""
    started = time.perf_counter()
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the report says what failed and why
        log(f"{key} failed: {type(exc).__name__}: {exc}")
        value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    results[key] = value
    log(f"{key} done in {time.perf_counter() - started:.1f}s")
    return value


def _ray_peer_measure(fn, *args, **kwargs) -> dict[str, Any]:
    from bench.monitor import ResourceMonitor

    with ResourceMonitor(interval=0.5) as mon:
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "memory": mon.peaks.as_dict(), "out": out}


def bench_workload(wl, checkpoint: str, spec, res, workdir: str, steps: set[str], results: dict,
                   decode_repeats: int, decode_target_videos: int | None) -> None:
    """The no-Ray measurements of one workload (stages alone, model card, decode target)."""
    from bench import decode_bench
    from bench.monitor import ResourceMonitor
    from bench.peers import decode_alone, decode_params, model_alone, model_card_loop

    r = results.setdefault(wl.name, {})
    if "stages" in steps:
        def stages():
            # As the job decodes (its default: in a child process), then the decoding alone.
            stats, kept = decode_alone(wl.paths, spec, wl)
            bare, _ = decode_alone(wl.paths, spec, wl, keep=0, isolate=False)
            model = model_alone(checkpoint, kept, batch_size=res.batch_size, threads=res.torch_threads())
            return {"decode": stats, "decode_in_process": bare, "model": model}

        _guard(r, "stages_alone", stages)
    if "model_card" in steps:
        def card():
            with ResourceMonitor(interval=0.5, ray_stats=False) as mon:
                started = time.perf_counter()
                out = model_card_loop(wl.paths, checkpoint, wl)
                seconds = time.perf_counter() - started
            return {"seconds": seconds, "memory": mon.peaks.as_dict(), "out": out}

        _guard(r, "model_card", card)
    if "decode_target" in steps:
        paths = wl.paths if decode_target_videos is None else wl.paths[:decode_target_videos]
        params = decode_params(spec, wl)
        _guard(r, "decode_target", decode_bench.compare, paths, sampling=wl.sampling, num_frames=wl.num_frames,
               frame_stride=wl.frame_stride, clips_per_video=wl.clips_per_video, geometry=params.geometry,
               repeats=decode_repeats)


def bench_workload_ray(wl, checkpoint: str, spec, res, workdir: str, steps: set[str], results: dict,
                       read_videos_partitions: int) -> None:
    from bench.peers import read_videos_peer, vmae_ray_peer

    r = results.setdefault(wl.name, {})
    if "vmae_ray" in steps:
        def vmae():
            m = _ray_peer_measure(vmae_ray_peer, wl, checkpoint, res, os.path.join(workdir, "out", wl.name))
            summary, argv = m.pop("out")
            m["summary"] = {"clips": summary.clips, "videos_ok": summary.videos_ok,
                            "videos_failed": summary.videos_failed, "wall_seconds": summary.wall_seconds,
                            "ray_start_seconds": summary.ray_start_seconds,
                            "pipeline_seconds": summary.pipeline_seconds, "stage_report": summary.stage_report,
                            "errors_by_type": summary.errors_by_type}
            m["command"] = "python jobs/embed_videos.py " + " ".join(argv)
            return m

        _guard(r, "vmae_ray", vmae)
    if "read_videos" in steps:
        status = decord_status()
        if status == "not installed" or "not importable" in status:
            r["read_videos"] = {"error": f"decord {status}; ray.data.read_videos needs it, so this peer "
                                         "could not run"}
        else:
            _guard(r, "read_videos", _ray_peer_measure, read_videos_peer, wl.paths, checkpoint, wl, res, spec,
                   num_partitions=read_videos_partitions)


def bench_memory(corpus, checkpoint: str) -> list[dict]:
    from bench.memory import run_case

    files = sorted(corpus.files, key=lambda f: f["duration_seconds"])
    cases = []
    # Every frame decoded (back-to-back clips) at two lengths: does RSS grow with length?
    for f in files[:-1]:
        cases.append((f, "stride", 4, None))
    # The full hour, 32 stride clips spread over it (keyframe seeks).
    cases.append((files[-1], "stride", 4, 32))
    out = []
    for f, sampling, stride, cpv in cases:
        log(f"memory: {f['name']} ({f['duration_seconds']:.0f} s), {sampling} {stride} clips={cpv or 'all'}")
        r = run_case(f["path"], checkpoint, sampling, stride, cpv)
        r.update({"name": f["name"], "duration_seconds": f["duration_seconds"], "frames": f["frames"],
                  "bit_rate": f["bit_rate"], "sampling": f"{sampling} {stride}x16, clips/video {cpv or 'all'}"})
        out.append(r)
    return out


def bench_gpu() -> dict[str, Any]:
    import torch

    cmd = [sys.executable, "-m", "bench.gpu_model"]
    if not torch.cuda.is_available():
        cmd.append("--smoke")
    env = dict(os.environ, PYTHONPATH=ROOT)
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"error": out.stderr[-2000:], "command": " ".join(["python", *cmd[1:]])}
    text = out.stdout[out.stdout.index("{"):]
    result = json.loads(text)
    result["command"] = " ".join(["python", *cmd[1:]])
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["cuda_available"] = torch.cuda.is_available()
    return result


def bench_driver(workdir: str, preset: str) -> dict[str, Any]:
    """bench.driver_bench in its own process (it starts Ray clusters of its own, before and after
    the change); its JSON results."""
    out = os.path.join(workdir, "driver.json")
    cmd = [sys.executable, "-m", "bench.driver_bench", "--workdir", os.path.join(workdir, "driver"),
           "--preset", "small" if preset == "small" else "tiny", "--json", out]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    with open(out) as f:
        result = json.load(f)
    result["command"] = "python " + " ".join(cmd[1:]).replace(ROOT + "/", "")
    return result


def bench_vectors(preset: str, rows: str | None) -> dict[str, Any]:
    from bench.vector_bench import run_in_subprocess

    runs = ([(int(r), ()) for r in rows.split(",")] if rows else VECTOR_RUNS.get(preset, VECTOR_RUNS["small"]))
    out: dict[str, Any] = {"sizes": []}
    for n, extra in runs:
        log(f"vectors: {n} rows {' '.join(extra)}")
        out["sizes"].append(run_in_subprocess(n, *extra))
    if not rows and preset in VECTOR_ABLATION:
        n, extra = VECTOR_ABLATION[preset]
        log(f"vectors: ablation, {n} rows {' '.join(extra)}")
        out["ablation"] = run_in_subprocess(n, *extra)
    return out


def main(argv=None) -> int:
    from bench.corpus import PRESETS, ensure_corpus, preset_corpora
    from bench.peers import Resources, Workload

    p = argparse.ArgumentParser(description="Run the vmae-ray benchmarks and write BENCHMARKS.md.")
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--results", default="BENCHMARKS.md", help="markdown report to write")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of videos of the preset")
    p.add_argument("--skip", default="", help=f"comma-separated steps to skip: {', '.join(STEPS)}")
    p.add_argument("--workloads", default="", help="comma-separated workload names to run (default all)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--decode-cpus", type=float, default=None, help="vmae-ray --decode-cpus (default: see Resources)")
    p.add_argument("--cpus-per-actor", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--decode-repeats", type=int, default=2, help="best-of-N for the decode-target timings")
    p.add_argument("--vector-rows", help="comma-separated row counts for the vector step (default: by preset)")
    args = p.parse_args(argv)
    bench_started = time.perf_counter()
    steps = set(STEPS) - {s.strip() for s in args.skip.split(",") if s.strip()}
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)

    results: dict[str, Any] = {"preset": args.preset, "scale": args.scale, "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "argv": sys.argv[:] if argv is None else ["-m", "bench.run", *argv]}
    results["_root"] = ROOT
    results["machine"] = describe_machine()
    log(f"machine: {results['machine']['nproc']} x {results['machine']['cpu_model']}, "
        f"{results['machine']['ram_gib']} GiB, load {results['machine']['loadavg_start']}")

    # 1. corpora and model
    t0 = time.perf_counter()
    specs = preset_corpora(args.preset, args.scale)
    corpora = {}
    results["corpora"] = {}
    for name, spec in specs.items():
        existed = os.path.exists(os.path.join(workdir, "corpus", f"{spec.name}-{spec.key()}", "manifest.json"))
        c = ensure_corpus(spec, os.path.join(workdir, "corpus"), log=log)
        corpora[name] = c
        with open(os.path.join(c.directory, "manifest.json")) as f:
            gen_s = json.load(f).get("generation_seconds")
        results["corpora"][name] = {
            "describe": spec.describe(), "videos": len(c.files), "directory": os.path.relpath(c.directory, ROOT),
            "bytes": sum(f["bytes"] for f in c.files), "frames": sum(f["frames"] for f in c.files),
            "seconds": round(sum(f["duration_seconds"] for f in c.files), 1),
            "mean_bit_rate": int(sum(f["bytes"] * 8 for f in c.files) / max(sum(f["duration_seconds"] for f in c.files), 1e-9)),
            "generation_seconds": gen_s, "cached": existed, "files": c.files if len(c.files) <= 12 else None,
        }
    checkpoint = ensure_checkpoint(workdir)
    from vmae_ray.checkpoint import load_model_spec

    spec = load_model_spec(checkpoint)
    results["model"] = {"checkpoint": os.path.relpath(checkpoint, ROOT), **BENCH_MODEL,
                        "resize_shortest_edge": spec.resize_shortest_edge, "crop": [spec.crop_height, spec.crop_width]}
    results["setup_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"corpora and checkpoint ready in {results['setup_seconds']}s")

    # On 2 CPUs: two decode tasks (0.5 CPU each as Ray counts) and one model actor with 1 CPU
    # (torch then gets 1 thread); the model is cheap, so decoding gets both cores.
    res = Resources(decode_cpus=0.5, cpus_per_actor=1.0, batch_size=args.batch_size)
    if args.decode_cpus is not None:
        res.decode_cpus = args.decode_cpus
    if args.cpus_per_actor is not None:
        res.cpus_per_actor = args.cpus_per_actor
    results["resources"] = {"decode_cpus": res.decode_cpus, "cpus_per_actor": res.cpus_per_actor,
                            "num_actors": res.num_actors, "batch_size": res.batch_size, "num_cpus": args.num_cpus}

    workloads = []
    if "kinetics" in corpora:
        c = corpora["kinetics"]
        workloads.append(Workload("kinetics", c.paths, c.directory, "stride", 4, 4, num_frames=spec.num_frames,
                                  description=c.spec.describe()))
    if "ssv2" in corpora:
        c = corpora["ssv2"]
        workloads.append(Workload("ssv2", c.paths, c.directory, "uniform", 4, 1, num_frames=spec.num_frames,
                                  description=c.spec.describe()))
    if args.workloads:
        wanted = set(args.workloads.split(","))
        workloads = [w for w in workloads if w.name in wanted]
    results["workloads"] = {w.name: {"description": w.description, "sampling": w.sampling_text(),
                                     "videos": len(w.paths)} for w in workloads}

    # 2. no Ray yet: stages alone, model card, decode target
    measurements: dict[str, Any] = {}
    results["measurements"] = measurements
    for wl in workloads:
        log(f"workload {wl.name}: stages alone / model card / decode target")
        bench_workload(wl, checkpoint, spec, res, workdir, steps, measurements, args.decode_repeats,
                       decode_target_videos=None if wl.name != "ssv2" else 60)

    # Ablations without Ray: each throughput change on and off.
    by_name = {w.name: w for w in workloads}
    ablations: dict[str, Any] = {}
    if "ablations" in steps:
        from bench import ablation
        from bench.peers import decode_params

        log("ablations: model folding, isolation transport, pre-roll skipping")
        rng = np.random.default_rng(0)
        clips = [rng.integers(0, 256, spec.clip_shape, dtype=np.uint8) for _ in range(8)]
        _guard(ablations, "model_folding", ablation.model_folding, checkpoint, clips, batch_size=res.batch_size,
               threads=res.torch_threads())
        _guard(ablations, "reconstruction", ablation.reconstruction, ensure_checkpoint(workdir, pretraining=True),
               clips, batch_size=res.batch_size, threads=res.torch_threads())
        if "ssv2" in by_name:
            _guard(ablations, "isolation", ablation.isolation, by_name["ssv2"].paths[:60], spec, by_name["ssv2"])
        if "kinetics" in by_name:
            wl = by_name["kinetics"]
            _guard(ablations, "preroll_skip", ablation.preroll_skip, wl.paths, wl, decode_params(spec, wl).geometry)
        results["ablations"] = ablations

    # 3./4. Ray
    if steps & {"vmae_ray", "read_videos", "ablations"} and workloads:
        log("starting Ray")
        import ray

        owns_ray = not ray.is_initialized()
        results["ray"] = start_ray(args.num_cpus)
        log(f"Ray started in {results['ray']['ray_start_seconds']}s")
        try:
            # vmae-ray on every workload before any read_videos: Ray reuses worker processes,
            # and one that has loaded decord's FFmpeg libraries should not decode with PyAV.
            for peer_steps in (steps & {"vmae_ray"}, steps & {"read_videos"}):
                for wl in workloads:
                    if peer_steps:
                        log(f"workload {wl.name}: {', '.join(sorted(peer_steps))}")
                    bench_workload_ray(wl, checkpoint, spec, res, workdir, peer_steps, measurements,
                                       read_videos_partitions=min(len(wl.paths), 2 * args.num_cpus))
                # After vmae-ray's own runs (which must not find warm workers), before read_videos.
                if "ablations" in steps and "ssv2" in by_name and "cluster_autoscaler" not in ablations:
                    log("ablations: Ray Data cluster autoscaler (ssv2, end to end)")
                    from bench import ablation

                    _guard(ablations, "cluster_autoscaler", ablation.cluster_autoscaler, by_name["ssv2"],
                           checkpoint, res, os.path.join(workdir, "out", "autoscaler"))
        finally:
            if owns_ray:
                ray.shutdown()

    # 5. memory
    if "memory" in steps and "long1080" in corpora:
        _guard(results, "memory", bench_memory, corpora["long1080"], checkpoint)

    # 6. GPU model stage
    if "gpu" in steps:
        _guard(results, "gpu", bench_gpu)

    # 7. vector search, index, dedup
    if "vectors" in steps:
        _guard(results, "vectors", bench_vectors, args.preset, args.vector_rows)

    # 8. the driver's own cost, before and after workers write (Ray clusters of its own)
    if "driver" in steps:
        log("driver: CPU per clip, per block, memory per input, before and after (bench.driver_bench)")
        _guard(results, "driver", bench_driver, workdir, args.preset)

    results["machine"]["loadavg_end"] = _loadavg()
    results["total_seconds"] = round(time.perf_counter() - bench_started, 1)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    from bench.report import render

    text = render(results)
    if args.results:
        with open(args.results, "w") as f:
            f.write(text)
    log(f"done in {results['total_seconds']}s; results in {os.path.join(workdir, 'results.json')}"
        + (f" and {args.results}" if args.results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
