"""The Ray graph of the embed phase, and the Ray session it runs on.

::

    to-do files (staging) -> read, numbered       (tasks: one per to-do file)
      -> blocks of `videos_per_task` inputs       (Ray Data's streaming repartition)
      -> decode                                   (tasks, CPU: one per input block)
      -> embed + write                            (actor pool, GPU: receipts out)

Input blocks hold a bounded number of videos, so a large run is thousands of cheap decode
tasks that every node joining an autoscaling cluster takes a share of; decoded rows are
whole videos in blocks of `--block-mib`, so Ray Data's per-block cost on the driver is paid
per hundreds of clips; the model actors write the tables and return receipts.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from vmae_ray.config import EmbedConfig, Resources
from vmae_ray.stages import EmbedActor, decode_batch

log = logging.getLogger("vmae_ray")

# Ray Data's cluster autoscaler sets the CPUs its operators may use. Ray 2.60's default
# (RATE_BASED) gets from its coordinator what it asked for plus a share of the rest rounded
# down to whole CPUs, so with fractional decode tasks (--decode-cpus 0.5) and a fixed-size
# cluster the leftover half CPU is never granted and decoding runs one task short: measured
# on 2 CPUs, one decode task instead of two, 62% CPU use, 15 clips/s vs 21 with V2 (the
# utilization-based autoscaler, which uses the whole cluster and still requests nodes on an
# autoscaling one). A user's own setting wins.
CLUSTER_AUTOSCALER_ENV = "RAY_DATA_CLUSTER_AUTOSCALER"
DEFAULT_CLUSTER_AUTOSCALER = "V2"

# Inputs per decode task: at most this many (a task is cheap to retry), and a large run is
# split into at least TARGET_DECODE_TASKS of them.
MAX_VIDEOS_PER_TASK = 1024
TARGET_DECODE_TASKS = 4096
# Fewest decode tasks per decode slot, so a small run still uses every CPU.
MIN_TASKS_PER_SLOT = 2

# Model calls per actor call (one receipt, and one Ray task, each): more calls per actor call
# cost the driver less per clip (Ray Data's cost per task is about 10 ms of driver CPU here,
# BENCHMARKS.md); fewer give steadier commits on small runs.
MAX_CALLS_PER_RECEIPT = 32
# Most bytes of clips one actor call holds (its model calls take them batch_size at a time):
# 2 GiB is 27 model calls of 32 VideoMAE-B clips.
MAX_CALL_BYTES = 2 * 2**30
# Actor calls queued per actor: two (one running, one ready) keep a GPU busy; each holds its
# clips in the object store, so more would pin more of it.
TASKS_IN_FLIGHT_PER_ACTOR = 2
# Fewest actor calls per actor a run aims for: small runs commit and report progress steadily.
MIN_CALLS_PER_ACTOR = 4

# Clips per decoded row assumed for `--clips-per-video all` (unknown before decoding).
CLIPS_PER_ROW_ALL = 8

# What the workers of a run get in their environment from the driver's (tests set failpoints).
FORWARDED_ENV = ("VMAE_RAY_FAILPOINT", "VMAE_RAY_FAILPOINT_ONCE")


def videos_per_task(num_inputs: int, decode_slots: int, given: int | None = None) -> int:
    """Inputs per decode task: ``given`` (--videos-per-task), else enough tasks for the cluster
    to share (`TARGET_DECODE_TASKS` for a large run, `MIN_TASKS_PER_SLOT` per decode slot for a
    small one), at most `MAX_VIDEOS_PER_TASK`.

    >>> videos_per_task(1_000_000, 64), videos_per_task(100_000_000, 64), videos_per_task(16, 2)
    (245, 1024, 4)
    """
    if given:
        return given
    tasks = max(TARGET_DECODE_TASKS if num_inputs > TARGET_DECODE_TASKS else 1, MIN_TASKS_PER_SLOT * decode_slots)
    return max(1, min(MAX_VIDEOS_PER_TASK, math.ceil(num_inputs / tasks)))


def rows_per_call(batch_size: int, clip_bytes: int, clips_per_row: float, least_clips: int, max_actors: int) -> int:
    """Decoded rows (videos) per actor call: about k * `batch_size` clips, k at most
    `MAX_CALLS_PER_RECEIPT` and `MAX_CALL_BYTES` of clips, and small enough that ``least_clips``
    (a lower bound on the run's clips) gives every actor `MIN_CALLS_PER_ACTOR` calls.

    Only an actor call's last model call may be short of `batch_size`, so the more calls per
    receipt, the fuller the model calls on average.

    >>> rows_per_call(32, 16 * 224 * 224 * 3, 1.0, 1_000_000, 8)  # VideoMAE-B, one clip per video
    864
    >>> rows_per_call(2, 8 * 32 * 32 * 3, 3.0, 42, 1)  # 3 clips per video: 4 videos are 6 full calls
    4
    """
    by_bytes = MAX_CALL_BYTES // max(1, batch_size * clip_bytes)
    by_run = least_clips // max(1, batch_size * max_actors * MIN_CALLS_PER_ACTOR)
    calls = max(1, min(MAX_CALLS_PER_RECEIPT, by_bytes, by_run))
    rows = max(1, math.ceil(calls * batch_size / max(clips_per_row, 1.0)))
    if clips_per_row == int(clips_per_row):
        # Whole model calls: rows * clips_per_row a multiple of batch_size.
        step = batch_size // math.gcd(batch_size, int(clips_per_row))
        rows = math.ceil(rows / step) * step
    return rows


def clips_per_row(config: EmbedConfig) -> float:
    """Clips a decoded row holds, as far as the settings say (uniform: 1)."""
    if config.sampling != "stride":
        return 1.0
    return float(config.clips_per_video or CLIPS_PER_ROW_ALL)


def embed_dataset(*, todo_items: list[dict[str, Any]], store, run_id: str, params, storage, config: EmbedConfig,
                  res: Resources, writer, num_inputs: int, clip_bytes: int, done_ref=None):
    """The embed phase's dataset: its rows are receipts (`schema.RECEIPT_SCHEMA`)."""
    import ray
    from ray.data import ActorPoolStrategy

    from vmae_ray.diff import todo_reader

    # Read by Ray Data in this (the driver's) process when the dataset executes.
    os.environ.setdefault(CLUSTER_AUTOSCALER_ENV, DEFAULT_CLUSTER_AUTOSCALER)
    ds = ray.data.from_items(todo_items, override_num_blocks=max(1, len(todo_items)))
    ds = ds.map_batches(todo_reader, fn_kwargs={"store": store, "run_id": run_id, "done_ref": done_ref},
                        batch_size=1, batch_format="pyarrow", num_cpus=0.25)
    per_task = videos_per_task(num_inputs, res.decode_slots, config.videos_per_task)
    ds = ds.repartition(target_num_rows_per_block=per_task)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"params": params, "storage": storage},
        batch_size=None,  # one input block, one task
        batch_format="pyarrow",
        num_cpus=config.decode_cpus,
        # A memory reservation sizes decode concurrency to the node and, being a remote
        # argument the actor stage does not share, keeps Ray Data from fusing decode into
        # the model actors: CPU decode and GPU embedding must scale apart.
        memory=config.decode_memory_mb * 2**20,
    )
    # Decoded rows are whole videos: blocks of block_mib hold hundreds of VideoMAE-B clips,
    # so Ray Data's per-block cost on the driver is paid per hundreds of clips, not per clip.
    ds.context.target_max_block_size = config.block_mib * 2**20
    rows = rows_per_call(res.batch_size, clip_bytes, clips_per_row(config), num_inputs, res.num_actors[1])
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "model_ref": config.model, "storage": storage, "cache_root": config.model_cache_dir,
            "device": res.device, "dtype": config.dtype, "compile": config.compile,
            "batch_size": res.batch_size, "writer": writer,
            "reconstruction": (config.mask_ratio, config.mask_seed) if config.reconstruction else None,
        },
        compute=ActorPoolStrategy(min_size=res.num_actors[0], max_size=res.num_actors[1],
                                  max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR),
        batch_size=rows,
        batch_format="pyarrow",
        num_gpus=res.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
    )
    return ds


def init_ray(config: EmbedConfig) -> float:
    """Connect to the Ray cluster at RAY_ADDRESS, or start a Ray of this machine's own (never
    joining a `ray start` cluster that happens to run here); returns the seconds it took."""
    import ray

    started = time.perf_counter()
    if ray.is_initialized():
        return 0.0
    address = os.environ.get("RAY_ADDRESS") or None
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if not config.progress_bars:
        env_vars["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    if address is None:
        # A local Ray's workers must import this package even when it runs from a checkout
        # that is not installed (python jobs/embed_videos.py from anywhere).
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address is None:
        # A Ray of its own for this one job, on this machine: its token-authentication notice
        # (Ray turns tokens on for local clusters) is not news for whoever runs the job.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address or "local", runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING,
             configure_logging=True)
    quiet_ray_data(config.progress_bars)
    return time.perf_counter() - started


def quiet_ray_data(progress_bars: bool) -> None:
    """Ray Data's own progress bars off unless asked for (vmae-ray prints its own progress
    line), and its execution logs and issue hints at warning level."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.print_on_execution_start = False
    try:
        ctx.issue_detectors_config.detectors = []
    except AttributeError:  # an older Ray Data
        pass
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Progress bars disabled. To enable, ...": --progress-bars is how, and the README says so.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def gpus_the_cluster_can_add(cluster: dict[str, float]) -> float | None:
    """GPUs the Ray cluster may still add: 0 for a Ray this driver started (a fixed local
    cluster); the autoscaler's recorded maximum less what the cluster has now, where Ray records
    one (`ray._private.state.state.get_max_resources_from_cluster_config`, which Ray Data's own
    planning reads) and it is finite; None (unknown) for a cluster this driver connected to that
    records none: an autoscaling `ray up` cluster may well add GPU nodes for actors that ask."""
    import ray

    try:
        node = ray._private.worker._global_node
        if node is not None and node.head:
            return 0.0
    except AttributeError:  # a private API: when it moves, assume we cannot tell
        pass
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:
        most = None
    if not most or not 0 <= float(most.get("GPU", 0)) < 1e6:  # Ray says sys.maxsize for "no limit"
        return None
    return max(0.0, float(most.get("GPU", 0)) - float(cluster.get("GPU", 0)))


def finish_remote():
    """The Ray task that finishes videos split across actor calls (`staging.VideoWriter.finish`)."""
    import ray

    @ray.remote(num_cpus=0.5, max_retries=3)
    def finish_split_videos(writer, videos):
        from vmae_ray.staging import receipts_table

        return receipts_table([writer.finish(videos)])

    return finish_split_videos


def lost_remote():
    """The Ray task that writes error rows for inputs no round could finish."""
    import ray

    @ray.remote(num_cpus=0.5, max_retries=3)
    def lost_inputs(writer, store, run_id, todo_items, done_bits):
        import pyarrow as pa

        from vmae_ray.diff import todo_reader
        from vmae_ray.schema import DECODED_SCHEMA, error_row
        from vmae_ray.staging import CallStats, receipts_table

        table = todo_reader(pa.Table.from_pylist(todo_items), store=store, run_id=run_id, done_ref=ray.put(done_bits))
        rows = [error_row(item, stage="embed", error_type="unknown",
                          message="the pipeline returned no result for this input")
                for item in table.select(["input_number", "video_id", "uri", "input_fingerprint",
                                          "size_bytes"]).to_pylist()]
        errors = pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
        for name in table.column_names:
            if name not in errors.column_names:
                errors = errors.append_column(table.schema.field(name), table.column(name))
        receipt = writer.write(writer.embedded_schema.empty_table(), errors, failed={}, stats=CallStats())
        return receipts_table([receipt])

    return lost_inputs
