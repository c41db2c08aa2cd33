"""The pipeline: list -> decode (Ray tasks, CPU) -> embed (Ray actor pool) -> write/commit.

`run(config)` is the whole job. Everything that can be checked without Ray (flags, the
checkpoint's config files, the output's committed state, the input listing) is checked
first, so bad input fails before a cluster is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vmae_ray import schema
from vmae_ray.assembly import Finished, ResultAssembler
from vmae_ray.checkpoint import CheckpointError, ModelSpec, is_non_commercial, load_model_spec
from vmae_ray.config import (
    ConfigError,
    EmbedConfig,
    Resources,
    check_output_option,
    plan_resources,
    storage_errors_of,
)
from vmae_ray.decoding import SWSCALE_FOR_PIL_RESAMPLE, DecodeLimits, FrameGeometry
from vmae_ray.heads import HeadError, LinearHead
from vmae_ray.listing import VIDEO_EXTENSIONS, VideoInput, list_inputs
from vmae_ray.reading import CommittedOutput
from vmae_ray.reconstruction import masked_per_frame
from vmae_ray.stages import DecodeParams, EmbedActor, decode_batch
from vmae_ray.storage import StorageOptions
from vmae_ray.writing import CommittedState, OutputStore, ShardWriter, new_run_id

log = logging.getLogger("vmae_ray")

# Bump when the meaning of the output changes, so old and new rows are never mixed.
# 2: time span from the video packets, displayed geometry, no cover art. 3: colour as players
# read it (untagged HD as BT.709), HDR tone-mapped to SDR, raw streams and timestamp restarts
# played through, damaged files embedded from what decodes; videos/ gains damaged, damage, hdr.
OUTPUT_VERSION = 3


@dataclass
class RunSummary:
    run_id: str
    output: str
    inputs_listed: int = 0
    inputs_skipped: int = 0
    videos_ok: int = 0
    videos_failed: int = 0
    clips: int = 0
    wall_seconds: float = 0.0
    ray_start_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    stage_report: dict[str, Any] = field(default_factory=dict)
    errors_by_type: dict[str, int] = field(default_factory=dict)

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.pipeline_seconds if self.pipeline_seconds > 0 else 0.0


def _versions() -> dict[str, str]:
    import av
    import ray
    import torch
    import transformers

    from vmae_ray import __version__

    return {
        "vmae_ray": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "av": av.__version__, "ray": ray.__version__,
        "pyarrow": pa.__version__, "ffmpeg": ".".join(map(str, av.library_versions.get("libavcodec", ()))),
    }


# The options whose change changes results (what settings_fingerprint covers, as flags).
RESULT_OPTIONS = ("model", "sampling", "num_frames", "frame_stride", "clips_per_video", "interpolation", "geometry",
                  "labels", "top_k", "head", "reconstruction", "mask_ratio", "mask_seed", "on_damage")


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'--sampling: uniform -> stride, ...' for the RESULT_OPTIONS that differ between two
    configs (as `EmbedConfig.to_dict` records them in `_SUCCESS`); '' when none does (then the
    checkpoint at the same path changed, or an older output recorded less)."""
    parts = [f"--{name.replace('_', '-')}: {old.get(name)!r} -> {new.get(name)!r}"
             for name in RESULT_OPTIONS if name in old and old.get(name) != new.get(name)]
    return ", ".join(parts)


def embedding_settings(config: EmbedConfig, spec: ModelSpec, num_frames: int) -> dict[str, Any]:
    # What decides the embedding values: the checkpoint, which frames make a clip, the pixels.
    return {
        "output_version": OUTPUT_VERSION, "model": spec.fingerprint, "sampling": config.sampling,
        "num_frames": num_frames, "frame_stride": config.frame_stride if config.sampling == "stride" else None,
        "clips_per_video": config.clips_per_video if config.sampling == "stride" else 1,
        "interpolation": interpolation_for(config, spec), "geometry": config.geometry,
    }


def embedding_fingerprint(config: EmbedConfig, spec: ModelSpec, num_frames: int) -> str:
    """Hash of what decides the embedding values (model, sampling, frames, preprocessing), and
    nothing else: a linear head fitted on one output's embeddings applies to another's exactly
    when the two agree, whatever labels, heads or other columns each run added."""
    settings = {"embedding": embedding_settings(config, spec, num_frames)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def settings_fingerprint(config: EmbedConfig, spec: ModelSpec, num_frames: int, with_labels: bool,
                         head_fingerprint: str | None = None) -> str:
    """Hash of everything that changes results: model, sampling, preprocessing, labels, the
    linear head (`--head`) when one gives the labels."""
    settings = {
        **embedding_settings(config, spec, num_frames),
        "labels": with_labels, "top_k": config.top_k if with_labels else None,
    }
    if head_fingerprint is not None:  # absent otherwise, so runs without a head keep their fingerprint
        settings["head"] = head_fingerprint
    if config.reconstruction:
        # Only when on, so outputs made before the option existed keep their fingerprint.
        settings["reconstruction"] = {"mask_ratio": config.mask_ratio, "mask_seed": config.mask_seed}
    if config.on_damage != "embed":  # likewise: where damaged videos go
        settings["on_damage"] = config.on_damage
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def interpolation_for(config: EmbedConfig, spec: ModelSpec) -> str:
    if config.interpolation != "auto":
        return config.interpolation
    return SWSCALE_FOR_PIL_RESAMPLE.get(int(spec.resample), "BILINEAR")


def decode_params(config: EmbedConfig, spec: ModelSpec, num_frames: int) -> DecodeParams:
    """What the decode step needs for these settings and this checkpoint (also used to decode a
    single video the way a committed run did, e.g. a search query)."""
    return DecodeParams(
        sampling=config.sampling, num_frames=num_frames, frame_stride=config.frame_stride,
        clips_per_video=config.clips_per_video,
        geometry=FrameGeometry(spec.resize_shortest_edge, spec.crop_height, spec.crop_width,
                               interpolation_for(config, spec), apply_display=config.geometry == "displayed"),
        limits=DecodeLimits(config.max_frame_pixels, config.max_duration_seconds, config.max_bytes),
        threads=config.decode_threads,
        isolate=config.decode_isolation,
        timeout_seconds=config.decode_timeout_seconds,
        on_damage=config.on_damage,
    )


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s vmae-ray %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # child loggers (vmae_ray.writing, ...) reach it by propagation


@dataclass
class Plan:
    """What the driver decided before starting Ray."""

    config: EmbedConfig
    storage: StorageOptions
    spec: ModelSpec
    num_frames: int
    with_labels: bool
    settings_fingerprint: str
    store: OutputStore
    state: CommittedState
    inputs: dict[str, VideoInput]
    todo: list[VideoInput]
    superseded: set[str]
    passthrough_schema: pa.Schema
    skipped: int
    replace_all: bool = False
    head: LinearHead | None = None  # --head: gives the labels (on the driver, from the embeddings)
    embedding_fingerprint: str = ""

    @property
    def id2label(self) -> dict[int, str] | None:
        """The label names of this run's labels (the head's, else the classifier's), or None."""
        if self.head is not None:
            return self.head.id2label
        return self.spec.id2label if self.with_labels else None


def prepare(config: EmbedConfig) -> Plan:
    """All checks that need no Ray: checkpoint config, output state, input listing.

    Lower modules raise plain errors; this is where they become ConfigError naming the flag.
    """
    storage = StorageOptions(config.storage_options).with_driver_environment(
        [config.input, config.output, config.model])
    with storage_errors_of("--model", config.model):  # credentials, endpoint
        try:
            spec = load_model_spec(config.model, storage, config.model_cache_dir)
        except CheckpointError as exc:  # its own message first: storage_errors_of would relabel its cause
            raise ConfigError("--model", str(exc)) from exc
    num_frames = config.num_frames or spec.num_frames
    if num_frames != spec.num_frames:
        raise ConfigError(
            "--num-frames",
            f"the checkpoint was trained with num_frames={spec.num_frames} (its position embeddings are "
            f"fixed to that length); got {num_frames}",
        )
    with storage_errors_of("--head", config.head):
        head = _load_head(config, spec, num_frames, storage) if config.head else None
    if config.labels == "on" and spec.id2label is None and head is None:
        raise ConfigError(
            "--labels",
            f"{config.model} has no trained classifier ({spec.architecture}); labels would come from a random "
            "head. Use a fine-tuned VideoMAEForVideoClassification checkpoint, or --labels off",
        )
    with_labels = head is not None or (spec.id2label is not None and config.labels != "off")
    check_reconstruction(config, spec)
    fingerprint = settings_fingerprint(config, spec, num_frames, with_labels,
                                       head_fingerprint=head.fingerprint if head else None)

    # The input is listed before --output is touched: a typo in --input must not cost the
    # committed tables of an --overwrite run.
    with storage_errors_of("--input", config.input):  # credentials, endpoint
        try:
            listing = list_inputs(config.input, storage, extensions=config.extensions or VIDEO_EXTENSIONS,
                                  limit=config.limit)
        except FileNotFoundError as exc:
            raise ConfigError("--input", f"not found: {exc}") from exc
        except PermissionError as exc:
            raise ConfigError("--input", f"access denied listing {config.input}: {exc}") from exc
        except ValueError as exc:
            raise ConfigError("--input", str(exc)) from exc
    inputs = {item.video_id: item for item in listing.inputs}

    # A file, files vmae-ray did not write, another command's output: refused here, before
    # recovery touches anything.
    store = check_output_option(config.output, storage, schema.TABLES)
    with storage_errors_of("--output", config.output):
        try:
            state = store.recover()
        except ValueError as exc:
            raise ConfigError("--output", str(exc)) from exc
        except OSError as exc:
            raise ConfigError("--output", f"cannot write to {config.output}: {type(exc).__name__}: {exc}") from exc
    if config.run_id and any(r.get("run_id") == config.run_id for r in state.manifest.get("runs", [])):
        raise ConfigError("--run-id",
                          f"{config.run_id!r} was already used for {config.output}; run ids name files and must be new")
    if state.exists and not config.resume and not config.overwrite:
        raise ConfigError("--no-resume", f"{config.output} already holds committed results; use --overwrite or another --output")
    replace_all = False
    if state.exists and config.overwrite:
        # Nothing is deleted now: a run that fails before its first commit (a bad --device,
        # say) leaves the old tables as they were; the first commit replaces them all.
        replace_all = True
    elif state.exists and state.settings_fingerprint != fingerprint:
        # Results of different settings are never mixed in one table, and a changed flag in a
        # nightly job must not silently re-embed (and replace) a whole corpus: refused, unless
        # --overwrite says to replace everything.
        changed = changed_settings(state.manifest.get("config") or {}, config.to_dict(redact=True))
        raise ConfigError("--output", f"{config.output} holds results made with other settings "
                          f"({changed or 'the checkpoint or its preprocessing'}); rerun with the settings it was "
                          "made with to add to it, pass --overwrite to process everything again and replace all "
                          "its rows, or use another --output")

    todo, superseded, skipped = list(listing.inputs), set(), 0
    if state.exists and not replace_all:
        done: dict[str, tuple[str, str]] = {}
        committed = CommittedOutput(config.output, state.manifest, storage)
        for table in (schema.VIDEOS, schema.ERRORS):
            t = committed.read(table, ["video_id", "input_fingerprint"])
            for vid, fp in zip(t.column("video_id").to_pylist(), t.column("input_fingerprint").to_pylist()):
                done[vid] = (table, fp)
        todo = []
        for item in listing.inputs:
            previous = done.get(item.video_id)
            if previous is None:
                todo.append(item)
            elif previous[1] != item.fingerprint:
                todo.append(item)  # the object changed: its old rows are replaced
                superseded.add(item.video_id)
            elif previous[0] == schema.ERRORS and config.retry_failed:
                todo.append(item)
                superseded.add(item.video_id)
            else:
                skipped += 1
    return Plan(config, storage, spec, num_frames, with_labels, fingerprint, store, state, inputs, todo,
                superseded, listing.passthrough_schema, skipped, replace_all, head=head,
                embedding_fingerprint=embedding_fingerprint(config, spec, num_frames))


def _load_head(config: EmbedConfig, spec: ModelSpec, num_frames: int, storage: StorageOptions) -> LinearHead:
    """The --head of this run, checked against the run's checkpoint and embedding settings."""
    try:
        head = LinearHead.load(config.head, storage)
        head.check_embeddings(model_fingerprint=spec.fingerprint,
                              embedding_fingerprint=embedding_fingerprint(config, spec, num_frames),
                              embedding_dim=spec.hidden_size, what=f"this run ({config.model})",
                              embedding_settings=embedding_settings(config, spec, num_frames))
    except (HeadError, OSError) as exc:
        raise ConfigError("--head", str(exc)) from exc
    if spec.id2label is not None:
        # The head wins over the checkpoint's own classifier: it is what the user asked for.
        log.warning("--head: the labels come from the head %s; the classifier of %s is not used",
                    config.head, config.model)
    return head


def check_reconstruction(config: EmbedConfig, spec: ModelSpec) -> None:
    """--reconstruction needs the pretraining decoder, and --mask-ratio must leave tokens on both sides."""
    if not config.reconstruction:
        return
    if not spec.has_decoder:
        raise ConfigError(
            "--reconstruction",
            f"{config.model} is a {spec.architecture} checkpoint without the pretraining decoder that predicts "
            "masked patches; use a VideoMAEForPreTraining checkpoint (e.g. MCG-NJU/videomae-base-short-ssv2), "
            "or leave --reconstruction off")
    try:
        masked_per_frame(spec.tokens_per_frame, config.mask_ratio)
    except ValueError as exc:
        raise ConfigError("--mask-ratio", str(exc)) from exc


def licence_lines(spec: ModelSpec) -> tuple[str | None, str | None]:
    """(what the summary says about the checkpoint's licence, a warning for a non-commercial one)."""
    if not spec.license:
        return None, None
    line = f"model licence: {spec.license} (from the checkpoint's model card)"
    if not is_non_commercial(spec.license):
        return line, None
    return line, (f"{spec.model_ref} is licensed {spec.license}, a non-commercial licence: its embeddings "
                  "and outputs may not be used commercially")


def _init_ray() -> float:
    import ray

    started = time.perf_counter()
    if not ray.is_initialized():
        # With RAY_ADDRESS set (ray job submit, a cluster) this connects; otherwise it
        # starts a local Ray on this machine.
        address = os.environ.get("RAY_ADDRESS") or None
        runtime_env = None
        if address is None:
            # A local Ray's workers must import this package even when it runs from a
            # checkout that is not installed (python jobs/embed_videos.py from anywhere).
            package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            pythonpath = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
            runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    return time.perf_counter() - started


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


# Ray Data's cluster autoscaler sets the CPUs its operators may use. Ray 2.60's default
# (RATE_BASED) gets from its coordinator what it asked for plus a share of the rest rounded
# down to whole CPUs, so with fractional decode tasks (--decode-cpus 0.5) and a fixed-size
# cluster the leftover half CPU is never granted and decoding runs one task short: measured
# on 2 CPUs, one decode task instead of two, 62% CPU use, 15 clips/s vs 21 with V2 (the
# utilization-based autoscaler, which uses the whole cluster and still requests nodes on an
# autoscaling one). A user's own setting wins.
CLUSTER_AUTOSCALER_ENV = "RAY_DATA_CLUSTER_AUTOSCALER"
DEFAULT_CLUSTER_AUTOSCALER = "V2"


# Most model calls per actor task, and the most bytes of clips a task holds.
MAX_CALLS_PER_TASK = 8
MAX_TASK_BYTES = 64 * 2**20
# Fewest actor tasks per actor a run aims for: small runs keep commits and progress steady.
MIN_TASKS_PER_ACTOR = 4


def model_task_rows(batch_size: int, clip_bytes: int, least_clips: int, max_actors: int) -> int:
    """Clips per model-actor task: a multiple k of `batch_size` (the actor splits the task into
    k model calls), k at most MAX_CALLS_PER_TASK and at most MAX_TASK_BYTES of clips (a Ray task
    costs a few ms of scheduling and transfer, as much as a small model's whole call on CPU),
    and small enough that `least_clips` (a lower bound on the run's clips) gives every actor at
    least MIN_TASKS_PER_ACTOR tasks: a small run is not one task, committed all at once.

    >>> model_task_rows(8, 16 * 224 * 224 * 3, 10_000, 2)  # VideoMAE-B clips: 64 MiB is 3 calls
    24
    >>> model_task_rows(2, 16 * 224 * 224 * 3, 12, 1)
    2
    """
    by_bytes = MAX_TASK_BYTES // (batch_size * clip_bytes)
    by_run = least_clips // (batch_size * max_actors * MIN_TASKS_PER_ACTOR)
    return batch_size * max(1, min(MAX_CALLS_PER_TASK, by_bytes, by_run))


def build_dataset(plan: Plan, res: Resources, *, full_batches: bool = True):
    """The Ray Data graph: from_items -> decode (task pool) -> embed (actor pool).

    Every model call but the last gets exactly `batch_size` clips. The model stage sees clip
    rows only (every clip row carries its video's facts, so no other row is needed; only a
    failed video's error row shares its batches), and every decoded clip is a block of its own:
    the actor pool's bundler gathers whole blocks until it holds a task's rows (a multiple of
    `batch_size`), so with one-row blocks each bundle is exactly that many, and the actor
    splits it into full model calls. With Ray Data's default block size a decode task's clips
    share one block, and bundles of such blocks leave a partial call each. ``full_batches=False``
    keeps the default (`make bench` measures both).
    """
    import ray
    from ray.data import ActorPoolStrategy

    # Read by Ray Data in this (the driver's) process when the dataset executes.
    os.environ.setdefault(CLUSTER_AUTOSCALER_ENV, DEFAULT_CLUSTER_AUTOSCALER)

    config = plan.config
    params = decode_params(config, plan.spec, plan.num_frames)
    records = [
        {"video_id": v.video_id, "uri": v.uri, "size_bytes": v.size_bytes, "input_fingerprint": v.fingerprint}
        for v in plan.todo
    ]
    # Several blocks per decode slot keeps the CPUs busy when videos differ in length.
    num_blocks = max(1, min(len(records), 4 * res.decode_slots * 8, 4096))
    ds = ray.data.from_items(records, override_num_blocks=num_blocks)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"params": params, "storage": plan.storage},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=config.decode_cpus,
        # A memory reservation sizes decode concurrency to the node and, being a remote
        # argument the actor stage does not share, keeps Ray Data from fusing decode into
        # the model actors: CPU decode and GPU embedding must scale apart.
        memory=config.decode_memory_mb * 2**20,
    )
    clip_bytes = plan.num_frames * plan.spec.crop_height * plan.spec.crop_width * 3
    rows_per_task = res.batch_size
    if full_batches:
        # A decode task's output buffer closes a block once it holds more than the target
        # size: below one clip's bytes, every clip row leaves as a block of its own, at no
        # cost in tasks or copies (a strict StreamingRepartition to batch_size rows gave full
        # batches too, but its extra tasks cost 25% of the clips/s after start-up on 2 CPUs).
        # The dataset's own context: no other dataset is affected.
        ds.context.target_max_block_size = max(1, clip_bytes // 2)
        # Every video that decodes gives at least one clip: a lower bound, whatever the sampling.
        rows_per_task = model_task_rows(res.batch_size, clip_bytes, len(plan.todo), res.num_actors[1])
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "model_ref": config.model, "storage": plan.storage, "cache_root": config.model_cache_dir,
            "device": res.device, "dtype": config.dtype, "compile": config.compile,
            "with_logits": plan.with_labels and plan.head is None,  # a head's logits come from the embedding
            "batch_size": res.batch_size,
            "reconstruction": (config.mask_ratio, config.mask_seed) if config.reconstruction else None,
        },
        compute=ActorPoolStrategy(min_size=res.num_actors[0], max_size=res.num_actors[1]),
        batch_size=rows_per_task,
        batch_format="pyarrow",
        num_gpus=res.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
    )
    return ds


class _Committer:
    """Commits finished videos: periodically during the run and once at the end.

    Each commit is a consistent state (whole videos only: a video's clip rows and its
    video row, or its error row, are committed together), so a crash loses at most the
    work since the last commit and a rerun resumes from there. `_SUCCESS` says whether
    the run it describes is complete.
    """

    def __init__(self, plan: Plan, writer: ShardWriter, assembler: ResultAssembler, summary: RunSummary,
                 started: float):
        self.plan, self.writer, self.assembler, self.summary = plan, writer, assembler, summary
        self.started = started
        self.state = plan.state
        self.superseded = set(plan.superseded)
        self.replace_all = plan.replace_all
        # Keep the history of runs, unless this run replaces results of other settings.
        self.base_runs = plan.state.manifest.get("runs", []) if plan.state.exists and not plan.replace_all else []
        self.versions = _versions()
        self.resources: Resources | None = None
        self.last_commit = time.perf_counter()
        self.commits = 0

    def commit(self, *, complete: bool) -> None:
        plan, summary, a = self.plan, self.summary, self.assembler
        staged = self.writer.take_staged()
        summary.videos_ok, summary.videos_failed, summary.clips = a.num_videos, a.num_errors, a.num_clips
        summary.errors_by_type = dict(sorted(a.errors_by_type.items()))
        summary.wall_seconds = time.perf_counter() - self.started
        counts = {"inputs_listed": summary.inputs_listed, "inputs_skipped": summary.inputs_skipped,
                  "inputs_processed": len(plan.todo) if complete else a.finished_count,
                  "videos_ok": summary.videos_ok, "videos_failed": summary.videos_failed, "clips": summary.clips,
                  "errors_by_type": summary.errors_by_type}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        run_entry = {"run_id": summary.run_id, "complete": complete, "committed_at": now, "counts": counts,
                     "wall_seconds": round(summary.wall_seconds, 3)}
        config = plan.config
        manifest = {
            "run_id": summary.run_id, "complete": complete, "committed_at": now, "counts": counts,
            "settings_fingerprint": plan.settings_fingerprint, "embedding_fingerprint": plan.embedding_fingerprint,
            # What the fingerprint hashes, so that a head's refusal can say which setting differs.
            "embedding_settings": embedding_settings(config, plan.spec, plan.num_frames),
            "config": config.to_dict(redact=True),
            "model": {"ref": config.model, "architecture": plan.spec.architecture,
                      "fingerprint": plan.spec.fingerprint, "num_frames": plan.num_frames,
                      "embedding_dim": plan.spec.hidden_size, "labels": plan.with_labels,
                      "license": plan.spec.license, "non_commercial": is_non_commercial(plan.spec.license),
                      "reconstruction": ({"mask_ratio": config.mask_ratio, "mask_seed": config.mask_seed,
                                          "norm_pix_loss": plan.spec.norm_pix_loss}
                                         if config.reconstruction else None)},
            **({"head": {"uri": config.head, **plan.head.describe()}} if plan.head is not None else {}),
            "versions": self.versions, "resources": dataclasses.asdict(self.resources) if self.resources else {},
            "stage_report": summary.stage_report,
            "runs": self.base_runs + [run_entry],
        }
        success = plan.store.commit(summary.run_id, staged, manifest, self.state, self.superseded,
                                    replace_all=self.replace_all)
        self.state = CommittedState(success)
        self.superseded = set()
        self.replace_all = False
        self.last_commit = time.perf_counter()
        self.commits += 1

    def maybe_commit(self) -> None:
        # A checkpoint with no newly finished video would only rewrite _SUCCESS.
        if (time.perf_counter() - self.last_commit >= self.plan.config.commit_every_seconds
                and self.writer.has_rows):
            self.commit(complete=False)
            log.info("checkpoint: committed %d videos, %d errors so far", self.assembler.num_videos,
                     self.assembler.num_errors)


def run(config: EmbedConfig) -> RunSummary:
    """Run the job; raises ConfigError for bad input before any Ray work starts."""
    _setup_logging()
    started = time.perf_counter()
    plan = prepare(config)
    run_id = config.run_id or new_run_id()
    summary = RunSummary(run_id=run_id, output=config.output, inputs_listed=len(plan.inputs),
                         inputs_skipped=plan.skipped)
    log.info("run %s: %d inputs listed, %d already done, %d to process; model %s (%s, D=%d)%s",
             run_id, len(plan.inputs), plan.skipped, len(plan.todo), config.model, plan.spec.architecture,
             plan.spec.hidden_size,
             (f", with labels from the head {config.head}" if plan.head else ", with labels") if plan.with_labels else "")
    _, licence_warning = licence_lines(plan.spec)
    if licence_warning:
        log.warning("%s", licence_warning)

    dim = plan.spec.hidden_size
    with_reconstruction = config.reconstruction
    schemas = {
        schema.CLIPS: schema.clips_schema(dim, with_labels=plan.with_labels, passthrough=plan.passthrough_schema,
                                          with_reconstruction=with_reconstruction),
        schema.VIDEOS: schema.videos_schema(dim, with_labels=plan.with_labels, passthrough=plan.passthrough_schema,
                                            with_reconstruction=with_reconstruction),
        schema.ERRORS: schema.errors_schema(passthrough=plan.passthrough_schema),
    }
    writer = ShardWriter(plan.store, run_id, schemas, config.rows_per_shard)
    assembler = ResultAssembler(plan.inputs, id2label=plan.id2label, head=plan.head,
                                top_k=config.top_k, run_id=run_id, settings_fingerprint=plan.settings_fingerprint,
                                with_reconstruction=with_reconstruction)
    committer = _Committer(plan, writer, assembler, summary, started)
    if plan.todo:
        summary.ray_start_seconds = _init_ray()
        import ray

        cluster = ray.cluster_resources()
        # A --device/--gpus-per-actor the cluster cannot serve is a ConfigError here, before any work.
        addable = gpus_the_cluster_can_add(cluster)
        res = committer.resources = plan_resources(config, cluster, gpus_to_add=addable)
        if plan.replace_all:  # said once the run is sure to start
            log.warning("--overwrite: every input is processed again and the committed rows of %s are replaced at "
                        "this run's first commit", config.output)
        if res.gpus_per_actor > 0 and not cluster.get("GPU"):
            log.warning("the cluster has no GPU now: the model actors wait for the autoscaler to add GPU nodes "
                        "(a cluster that cannot add them leaves this run waiting; stop it and use --device cpu)")
        log.info("ray: %g CPUs, %g GPUs (%s more the autoscaler can add); model actors %s on %s, %g GPU each, "
                 "batch %d", res.cluster_cpus, res.cluster_gpus, "unknown" if addable is None else f"{addable:g}",
                 res.num_actors, res.device, res.gpus_per_actor, res.batch_size)
        ds = build_dataset(plan, res)
        pipeline_started = time.perf_counter()
        last_report = pipeline_started
        flow = _Flow(pipeline_started)
        timeline = ClipTimeline()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                _write(writer, assembler.add(batch))
                now = time.perf_counter()
                flow.saw(batch)
                timeline.saw(now - pipeline_started, assembler.num_clips)
                if now - last_report >= config.progress_seconds:
                    last_report = now
                    elapsed = now - pipeline_started
                    log.info("progress: %d/%d videos (%d failed), %d clips, %.1f clips/s",
                             assembler.finished_count, len(plan.todo), assembler.num_errors,
                             assembler.num_clips, assembler.num_clips / max(elapsed, 1e-9))
                committer.maybe_commit()
        except Exception as exc:
            done = f"{committer.commits} checkpoint(s) committed" if committer.commits else "nothing was committed"
            raise RuntimeError(f"run {run_id} failed; {done}, rerun to resume ({_short(exc)})") from exc
        summary.pipeline_seconds = time.perf_counter() - pipeline_started
        _account_for_lost(plan, assembler, writer)
        summary.stage_report = _stage_report(assembler, res, summary.pipeline_seconds)
        summary.stage_report.update(flow.report())
        if summary.stage_report:  # a run that embedded no clip has no rate to chart
            summary.stage_report.update(timeline.report(summary.pipeline_seconds, assembler.num_clips))
    committer.commit(complete=True)
    _print_summary(summary, plan)
    return summary


def _write(writer: ShardWriter, finished: Finished) -> None:
    writer.add(schema.CLIPS, finished.clips)
    writer.add(schema.VIDEOS, finished.videos)
    writer.add(schema.ERRORS, finished.errors)


def _account_for_lost(plan: Plan, assembler: ResultAssembler, writer: ShardWriter) -> None:
    """Every input ends in videos/ or errors/: anything unaccounted for becomes an error row."""
    lost = [v for v in plan.todo if not assembler.is_finished(v.video_id)]
    if not lost:
        return
    log.error("%d inputs produced no result; recording them as errors", len(lost))
    rows = [schema.error_row({"video_id": v.video_id, "uri": v.uri, "input_fingerprint": v.fingerprint,
                              "size_bytes": v.size_bytes},
                             stage="embed", error_type="unknown", message="the pipeline returned no result for this input")
            for v in lost]
    table = pa.Table.from_pylist(rows, schema=schema.embedded_schema(plan.spec.hidden_size, with_logits=False))
    _write(writer, assembler.add(table))


class _Flow:
    """Throughput after start-up: from the first embedded clip to the last.

    The first clip reaches the driver once the first model actor has started (imports,
    checkpoint load); meanwhile decoding has run ahead, and that backlog then drains at the
    model's speed, which would flatter the rate. So the rate counts only clips decoded after
    the first clip arrived (each clip row carries the time it was decoded), over the time
    from then to the last clip: what a long run converges to.
    """

    def __init__(self, started: float):
        self.started = started  # perf_counter at the start of the pipeline
        self.first_wall: float | None = None  # time.time() when the first clip arrived
        self.first_seconds = 0.0
        self.last_wall: float | None = None
        self.after = 0  # clips decoded after first_wall

    def saw(self, batch: pa.Table) -> None:
        if "decoded_at" not in batch.column_names:
            return
        decoded_at = [t for t, k in zip(batch.column("decoded_at").to_pylist(), batch.column("kind").to_pylist())
                      if k == schema.KIND_CLIP and t is not None]
        if not decoded_at:
            return
        now = time.time()
        if self.first_wall is None:
            self.first_wall, self.first_seconds = now, time.perf_counter() - self.started
            return
        self.after += sum(1 for t in decoded_at if t >= self.first_wall)
        self.last_wall = now

    def report(self) -> dict[str, Any]:
        if self.first_wall is None:
            return {}
        out: dict[str, Any] = {"first_clip_seconds": round(self.first_seconds, 3)}
        if self.last_wall is not None and self.last_wall > self.first_wall and self.after:
            out["after_startup_clips_per_second"] = round(self.after / (self.last_wall - self.first_wall), 3)
            out["after_startup_clips"] = self.after
        return out


class ClipTimeline:
    """Clips of finished videos against seconds since the pipeline started, for `vmae-ray report`'s
    clips/s chart (``stage_report.clips_timeline`` in _SUCCESS: ``seconds`` and cumulative ``clips``).

    A point at most every `interval_seconds`, and at most `max_points` of them: when full, every
    other point goes and the interval doubles, so _SUCCESS stays a few KB however long the run.
    The last point is the run's end, where ``clips`` equals the run's count.
    """

    def __init__(self, interval_seconds: float = 1.0, max_points: int = 256):
        self.interval_seconds, self.max_points = interval_seconds, max_points
        self.seconds: list[float] = [0.0]
        self.clips: list[int] = [0]

    def saw(self, seconds: float, clips: int) -> None:
        if seconds - self.seconds[-1] < self.interval_seconds:
            return
        self.seconds.append(seconds)
        self.clips.append(clips)
        if len(self.seconds) > self.max_points:
            self.seconds, self.clips = self.seconds[::2], self.clips[::2]
            self.interval_seconds *= 2

    def report(self, seconds: float, clips: int) -> dict[str, Any]:
        if seconds > self.seconds[-1]:
            self.seconds.append(seconds)
            self.clips.append(clips)
        else:
            self.clips[-1] = clips
        return {"clips_timeline": {"seconds": [round(s, 3) for s in self.seconds], "clips": list(self.clips)}}


def _stage_report(assembler: ResultAssembler, res: Resources, wall: float) -> dict[str, Any]:
    """Throughput each stage could sustain on its own, which one bounded the run, batch fill.

    Busy seconds are measured inside the UDFs; a stage's capacity is its clips per busy
    second times the number of workers it had. ``model_call_sizes`` counts the model calls
    by the number of clips they embedded ({clips: calls}).
    """
    times = assembler.times
    if times.clips == 0:
        return {}
    decode_rate = times.clips / times.decode_seconds if times.decode_seconds > 0 else float("inf")
    embed_rate = times.clips / times.embed_seconds if times.embed_seconds > 0 else float("inf")
    decode_capacity = decode_rate * res.decode_slots
    embed_capacity = embed_rate * res.num_actors[1]
    bottleneck = "decode" if decode_capacity < embed_capacity else "embed"
    # How many decode CPUs one model actor can keep busy: the CPU:GPU ratio to provision.
    cpus_per_actor_needed = embed_rate / decode_rate if decode_rate > 0 else 0.0
    return {
        "clips": times.clips, "pipeline_seconds": round(wall, 3),
        "end_to_end_clips_per_second": round(times.clips / wall, 3) if wall > 0 else None,
        "decode_clips_per_second_per_task": round(decode_rate, 3), "decode_slots": res.decode_slots,
        "decode_capacity_clips_per_second": round(decode_capacity, 3),
        "embed_clips_per_second_per_actor": round(embed_rate, 3), "embed_actors": res.num_actors[1],
        "embed_capacity_clips_per_second": round(embed_capacity, 3),
        "bottleneck": bottleneck,
        "decode_cpus_per_model_actor": round(cpus_per_actor_needed, 2),
        "batch_size": res.batch_size, "model_calls": len(times.model_calls),
        "model_call_sizes": {str(k): v for k, v in times.model_call_sizes().items()},
    }


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:500] if text else type(exc).__name__


def _print_summary(summary: RunSummary, plan: Plan) -> None:
    r = summary.stage_report
    lines = [
        f"vmae-ray run {summary.run_id} committed to {summary.output}",
        f"  inputs: {summary.inputs_listed} listed, {summary.inputs_skipped} already done, "
        f"{len(plan.todo)} processed -> {summary.videos_ok} ok, {summary.videos_failed} failed"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(summary.errors_by_type.items()))})" if summary.errors_by_type else ""),
        f"  clips: {summary.clips}; wall {summary.wall_seconds:.1f}s (ray start {summary.ray_start_seconds:.1f}s, "
        f"pipeline {summary.pipeline_seconds:.1f}s); {summary.clips_per_second:.2f} clips/s",
    ]
    if r.get("first_clip_seconds") is not None:
        line = f"  first clip after {r['first_clip_seconds']:.1f}s (model actor start-up)"
        if r.get("after_startup_clips_per_second"):
            line += (f"; {r['after_startup_clips_per_second']:.2f} clips/s from then on "
                     f"({r['after_startup_clips']} clips decoded after it)")
        lines.append(line)
    if r:
        lines.append(
            f"  stages: decode {r['decode_clips_per_second_per_task']:.2f} clips/s per task x {r['decode_slots']} "
            f"= {r['decode_capacity_clips_per_second']:.2f}; embed {r['embed_clips_per_second_per_actor']:.2f} clips/s "
            f"per actor x {r['embed_actors']} = {r['embed_capacity_clips_per_second']:.2f}; bound by {r['bottleneck']}"
        )
        if r.get("model_calls"):
            lines.append(f"  model calls: {r['model_calls']}, {r['clips'] / r['model_calls']:.1f} clips per call "
                         f"(batch size {r['batch_size']})")
        lines.append(
            f"  hint: one model actor keeps about {r['decode_cpus_per_model_actor']:.1f} decode CPUs busy; "
            + ("add decode CPUs (CPU workers) to speed up" if r["bottleneck"] == "decode"
               else "add model actors/GPUs to speed up")
        )
    licence, licence_warning = licence_lines(plan.spec)
    if licence:
        lines.append(f"  {licence}")
    if licence_warning:
        lines.append(f"  WARNING: {licence_warning}")
    print("\n".join(lines), flush=True)
