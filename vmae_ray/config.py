"""Job configuration: one dataclass, validated before Ray starts.

Pure logic, no Ray and no I/O beyond reading a YAML file. The command line (`vmae_ray.cli`)
and `--config FILE.yaml` both end here; flags win over the file. Every error names the
option and its allowed values, so a bad flag fails before any work starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from vmae_ray.embedder import DTYPES
from vmae_ray.reconstruction import DEFAULT_MASK_RATIO, DEFAULT_MASK_SEED
from vmae_ray.sampling import SAMPLING_POLICIES

DEFAULT_MODEL = "MCG-NJU/videomae-base-short-ssv2"
DEVICES = ("auto", "cpu", "cuda")
LABEL_MODES = ("auto", "on", "off")
INTERPOLATIONS = ("auto", "BILINEAR", "AREA", "BICUBIC", "FAST_BILINEAR", "LANCZOS", "POINT")
# displayed: frames as a player shows them (display matrix and sample aspect ratio applied);
# stored: the decoded picture as stored in the file (the behaviour before display geometry).
GEOMETRY_MODES = ("displayed", "stored")
# A damaged video (cut short, undecodable packets, decoder errors): embed: from what decodes,
# marked `damaged` on videos/ with what was wrong in `damage`; error: an errors/ row `damaged`.
ON_DAMAGE = ("embed", "error")

# Defaults that depend on the cluster, stated once (the help text and `plan_resources` read
# them): clips per model call, and clips per video for stride sampling.
DEFAULT_BATCH_SIZE_GPU = 32
DEFAULT_BATCH_SIZE_CPU = 4
DEFAULT_STRIDE_CLIPS_PER_VIDEO = 4


class ConfigError(ValueError):
    """A bad option; the message names the option and what it accepts."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


class CommandParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: --flag: what is wrong`` and a pointer to
    --help, exit status 2 (argparse's own contract), instead of the whole usage text first."""

    def __init__(self, *args, **kwargs):
        # A shortened flag (--dry for --dry-run) is refused as unknown rather than guessed at:
        # a nightly command line should say exactly what it means.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # argparse says "argument --sampling: invalid choice: ..."; our own errors "--flag: ...".
        if message.startswith("argument "):
            message = message[len("argument "):]
        message = " ".join(message.split())  # one line, even when a library's message had several
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


@dataclass
class EmbedConfig:
    """Every option of `vmae-ray embed`. Field names are the flags with '-' as '_'."""

    input: str = ""
    output: str = ""
    model: str = DEFAULT_MODEL
    sampling: str = "uniform"
    num_frames: int | None = None  # None: the checkpoint's config.num_frames
    frame_stride: int = 4
    # None: clips covering the whole video (stride only); the CLI gives stride sampling
    # DEFAULT_STRIDE_CLIPS_PER_VIDEO when the flag is absent.
    clips_per_video: int | None = 1
    # None: decided from the cluster by `plan_resources`.
    batch_size: int | None = None
    num_actors: tuple[int, int] | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    decode_cpus: float = 1.0
    decode_threads: int = 1
    decode_memory_mb: int = 1024
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    labels: str = "auto"
    top_k: int = 5
    head: str | None = None  # a linear head dir (`vmae-ray probe fit`): labels from it
    # Masked-patch reconstruction scores (pretraining checkpoints): VideoMAE tube masking.
    reconstruction: bool = False
    mask_ratio: float = DEFAULT_MASK_RATIO
    mask_seed: int = DEFAULT_MASK_SEED
    limit: int | None = None
    resume: bool = True
    overwrite: bool = False
    retry_failed: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    extensions: tuple[str, ...] | None = None
    interpolation: str = "auto"  # auto: the swscale filter closest to the checkpoint's resample
    geometry: str = "displayed"  # one of GEOMETRY_MODES
    on_damage: str = "embed"  # one of ON_DAMAGE
    max_frame_pixels: int = 8192 * 8192
    max_duration_seconds: float = 6 * 3600.0
    max_bytes: int = 64 * 2**30
    model_cache_dir: str | None = None
    run_id: str | None = None
    progress_seconds: float = 10.0
    decode_timeout_seconds: float = 300.0
    decode_isolation: bool = True
    commit_every_seconds: float = 600.0
    # Listing, diff and scale (issue "one driver for a whole fleet").
    dry_run: bool = False  # list and diff, print what a run would do, write nothing
    prune: bool = False  # remove the rows of inputs no longer listed
    videos_per_task: int | None = None  # inputs per decode task; None: from the run's size
    block_mib: int = 512  # Ray Data's target block size for decoded clips
    progress_bars: bool = False  # Ray Data's own progress bars
    # One writer per output: the lease on --output.
    wait_for_lock: float | None = None  # seconds to wait for another run's lease; None: refuse at once
    lease_seconds: float = 120.0  # a lease not renewed for this long is stale (its holder died)

    def validate(self) -> EmbedConfig:
        if not self.input:
            raise ConfigError("--input", "required: a directory, prefix, glob or manifest (.parquet/.csv/.jsonl) URI")
        if not self.output:
            raise ConfigError("--output", "required: a directory or prefix URI for the tables")
        if not self.model:
            raise ConfigError("--model", "required: a local dir, an s3:// prefix or a hub id")
        _choice("--sampling", self.sampling, SAMPLING_POLICIES)
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--device", self.device, DEVICES)
        _choice("--labels", self.labels, LABEL_MODES)
        _choice("--interpolation", self.interpolation, INTERPOLATIONS)
        _choice("--geometry", self.geometry, GEOMETRY_MODES)
        _choice("--on-damage", self.on_damage, ON_DAMAGE)
        _positive("--num-frames", self.num_frames, allow_none=True)
        _positive("--frame-stride", self.frame_stride)
        _positive("--batch-size", self.batch_size, allow_none=True)
        _positive("--top-k", self.top_k)
        _positive("--limit", self.limit, allow_none=True)
        _positive("--decode-threads", self.decode_threads, allow_zero=True)
        _positive("--decode-memory-mb", self.decode_memory_mb)
        _positive("--videos-per-task", self.videos_per_task, allow_none=True)
        _positive("--block-mib", self.block_mib)
        _positive("--wait-for-lock", self.wait_for_lock, allow_none=True, allow_zero=True)
        _positive("--lease-seconds", self.lease_seconds)
        if self.lease_seconds < 10:
            raise ConfigError("--lease-seconds", f"expected at least 10 seconds (the lease is renewed every third of it); "
                              f"got {self.lease_seconds!r}")
        _positive("--max-frame-pixels", self.max_frame_pixels)
        _positive("--max-duration-seconds", self.max_duration_seconds)
        _positive("--max-bytes", self.max_bytes)
        _positive("--progress-seconds", self.progress_seconds)
        _positive("--decode-timeout-seconds", self.decode_timeout_seconds)
        _positive("--commit-every-seconds", self.commit_every_seconds)
        _positive("--cpus-per-actor", self.cpus_per_actor, allow_zero=True)
        _positive("--decode-cpus", self.decode_cpus)
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError("--gpus-per-actor", f"must be >= 0, got {self.gpus_per_actor}")
        if self.clips_per_video is not None:
            _positive("--clips-per-video", self.clips_per_video)
        if self.sampling == "uniform" and self.clips_per_video != 1:
            raise ConfigError(
                "--clips-per-video",
                "uniform sampling takes one clip spanning the whole video; use --sampling stride for several clips",
            )
        if self.num_actors is not None:
            lo, hi = self.num_actors
            if lo < 1 or hi < lo:
                raise ConfigError("--num-actors", f"expected N or MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
        if self.head is not None and self.labels == "off":
            raise ConfigError("--head", "gives labels; it cannot be combined with --labels off")
        if not (isinstance(self.mask_ratio, (int, float)) and not isinstance(self.mask_ratio, bool)
                and 0 < self.mask_ratio < 1):
            raise ConfigError("--mask-ratio", f"expected a fraction of tokens to mask, 0 < r < 1; got {self.mask_ratio!r}")
        if not (isinstance(self.mask_seed, int) and not isinstance(self.mask_seed, bool) and self.mask_seed >= 0):
            raise ConfigError("--mask-seed", f"expected a non-negative integer; got {self.mask_seed!r}")
        if not self.reconstruction:
            for option, value, default in (("--mask-ratio", self.mask_ratio, DEFAULT_MASK_RATIO),
                                           ("--mask-seed", self.mask_seed, DEFAULT_MASK_SEED)):
                if value != default:
                    raise ConfigError(option, "has no effect without --reconstruction")
        if self.dry_run and self.overwrite:
            raise ConfigError("--dry-run", "lists and diffs what a run would do; --overwrite would process everything: "
                              "drop one of them")
        if self.prune and self.overwrite:
            raise ConfigError("--prune", "has no meaning with --overwrite (the rows of inputs no longer listed go anyway)")
        if _same_place(self.input, self.output):
            raise ConfigError("--output", f"is the same place as --input ({self.input}); the tables need a folder of their "
                              "own (a sub-folder is fine: it is not listed as input)")
        if self.overwrite and self.retry_failed:
            raise ConfigError("--retry-failed", "has no meaning with --overwrite (everything is processed again)")
        if self.run_id is not None and not self.run_id.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("--run-id", "letters, digits, '-' and '_' only")
        return self

    def resolved(self, cwd: str | None = None) -> EmbedConfig:
        """This config with every relative local path made absolute against ``cwd`` (default: the
        working directory of this process, where the command was typed): --input, --output,
        --model (a local checkpoint), --head, --model-cache-dir. Workers run elsewhere, and
        `_SUCCESS` must name what other commands can find from any folder. Raises ConfigError
        for a --model that is a local path (it exists, or its first folder does, or it cannot be
        a hub id) that does not exist."""
        cwd = cwd or os.getcwd()
        changes: dict[str, Any] = {}
        for name in ("input", "output", "head", "model_cache_dir"):
            value = getattr(self, name)
            if value and _is_local_path(value):
                changes[name] = _absolute(value, cwd)
        if self.model and _is_local_path(self.model):
            from vmae_ray.checkpoint import is_hub_id

            path = _absolute(self.model, cwd)
            first = self.model.split("/", 1)[0]
            local = (os.path.exists(path) or self.model.startswith((".", "/", "~")) or not is_hub_id(self.model)
                     or ("/" in self.model and os.path.isdir(os.path.join(cwd, first))))
            if local:
                if not os.path.isdir(path):
                    what = "is a file; expected a checkpoint directory" if os.path.exists(path) else "no such local directory"
                    raise ConfigError("--model", f"{self.model!r}: {what} (looked for {path}, from {cwd})")
                changes["model"] = path
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """JSON-ready settings for `_SUCCESS` and logs, with storage secrets redacted."""
        out = dataclasses.asdict(self)
        if out["wait_for_lock"] is not None and out["wait_for_lock"] == float("inf"):
            out["wait_for_lock"] = None  # JSON has no infinity; how long to wait is not a result setting
        if redact:
            from vmae_ray.storage import StorageOptions

            out["storage_options"] = StorageOptions(self.storage_options).redacted()
        if out["num_actors"] is not None:
            out["num_actors"] = list(out["num_actors"])
        if out["extensions"] is not None:
            out["extensions"] = list(out["extensions"])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EmbedConfig:
        """The config a `to_dict` (e.g. the `config` of `_SUCCESS`) describes; unknown keys are
        ignored (a newer job may record more), redacted storage options are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if k in names}
        if kept.get("num_actors") is not None:
            kept["num_actors"] = tuple(kept["num_actors"])
        if kept.get("extensions") is not None:
            kept["extensions"] = tuple(kept["extensions"])
        kept["storage_options"] = {}
        return cls(**kept)


@dataclass(frozen=True)
class Resources:
    """How the job uses the cluster: decided once on the driver by `plan_resources`."""

    device: str  # "cuda" or "cpu": where the model runs
    gpus_per_actor: float
    num_actors: tuple[int, int]  # (min, max) model actors
    batch_size: int  # clips per model call
    decode_slots: int  # decode tasks that fit beside the model actors
    cluster_cpus: float
    cluster_gpus: float


def plan_resources(config: EmbedConfig, cluster: dict[str, float], *, gpus_to_add: float | None = 0.0) -> Resources:
    """Resources for a run on a cluster with ``cluster`` (Ray's `cluster_resources()`) whose
    autoscaler can add ``gpus_to_add`` GPUs (0: a fixed cluster; None: unknown).

    Defaults: one GPU per actor when the cluster has or can add GPUs, or with --device cuda
    (else the model runs on CPU, holding no GPU); an autoscaling pool of 1 to (GPUs / GPUs per
    actor) actors, or 1 on CPU; DEFAULT_BATCH_SIZE_GPU clips per call on GPU,
    DEFAULT_BATCH_SIZE_CPU on CPU; as many decode tasks as the CPUs left beside the actors that
    fit on the cluster now. Raises ConfigError (--gpus-per-actor or --device) when GPUs are
    asked of a cluster that has none and can add none: the actors would fail, or wait for ever.
    """
    gpus_now = float(cluster.get("GPU", 0))
    gpus = gpus_now + (gpus_to_add or 0.0)
    cpus = float(cluster.get("CPU", 1))
    wants_gpu = (config.gpus_per_actor or 0) > 0 or config.device == "cuda"
    if wants_gpu and gpus == 0 and gpus_to_add is not None:
        flag = "--gpus-per-actor" if (config.gpus_per_actor or 0) > 0 else "--device"
        raise ConfigError(flag, "GPUs requested, but the Ray cluster has no GPUs and its autoscaler can add none "
                          f"({cpus:g} CPUs); run on a GPU node, or use --device cpu")
    if config.gpus_per_actor is not None:
        gpus_per_actor = config.gpus_per_actor
    else:
        gpus_per_actor = 1.0 if (gpus >= 1 or config.device == "cuda") and config.device != "cpu" else 0.0
    device = config.device if config.device != "auto" else ("cuda" if gpus_per_actor > 0 else "cpu")
    if config.num_actors is not None:
        num_actors = config.num_actors
    elif gpus_per_actor > 0:
        num_actors = (1, max(1, int(gpus // gpus_per_actor)))
    else:
        num_actors = (1, 1)
    # CPUs of the actors that can run now; actors waiting for GPU nodes take those nodes' CPUs.
    actors_now = num_actors[1] if gpus_per_actor == 0 else min(num_actors[1], int(gpus_now // gpus_per_actor))
    actor_cpus = config.cpus_per_actor * actors_now
    batch_size = config.batch_size or (DEFAULT_BATCH_SIZE_GPU if device == "cuda" else DEFAULT_BATCH_SIZE_CPU)
    decode_slots = max(1, int((cpus - actor_cpus) // config.decode_cpus)) if cpus > actor_cpus else 1
    return Resources(device=device, gpus_per_actor=gpus_per_actor, num_actors=num_actors, batch_size=batch_size,
                     decode_slots=decode_slots, cluster_cpus=cpus, cluster_gpus=gpus_now)


def _is_local_path(value: str) -> bool:
    return "://" not in value


def _absolute(value: str, cwd: str) -> str:
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))


def _same_place(a: str, b: str) -> bool:
    """Whether two local paths or URIs name the same folder (trailing slashes and file:// aside)."""
    def norm(u: str) -> str:
        u = u[len("file://"):] if u.startswith("file://") else u
        if "://" in u:
            return u.rstrip("/")
        return os.path.normpath(os.path.abspath(os.path.expanduser(u)))

    return bool(a) and bool(b) and norm(a) == norm(b)


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(option, f"expected one of {', '.join(allowed)}; got {value!r}")


def _positive(option: str, value, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(option, f"expected a {'non-negative' if allow_zero else 'positive'} number; got {value!r}")


def parse_num_actors(text: str | int | list | tuple | None) -> tuple[int, int] | None:
    """``N`` or ``MIN,MAX`` (an autoscaling actor pool)."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        return (text, text)
    if isinstance(text, (list, tuple)) and len(text) == 2:
        parts = [str(p) for p in text]
    else:
        parts = str(text).split(",")
    try:
        values = [int(p.strip()) for p in parts]
    except ValueError:
        raise ConfigError("--num-actors", f"expected N or MIN,MAX (integers); got {text!r}") from None
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[0], values[1])
    raise ConfigError("--num-actors", f"expected N or MIN,MAX; got {text!r}")


def parse_clips_per_video(text: str | int | None) -> int | None:
    """A positive integer, or ``all`` for clips covering the whole video."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "all"):
        return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError("--clips-per-video", f"expected a positive integer or 'all'; got {text!r}") from None
    return value


def parse_storage_options(text: str | dict | None) -> dict[str, Any]:
    """A JSON object, or ``@FILE`` naming a JSON file.

    The file form keeps secrets off the command line, which Ray records as the job's
    entrypoint and shows in `ray list jobs` and the dashboard (and `ps` shows locally).
    """
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return text
    if isinstance(text, str) and text.startswith("@"):
        path = text[1:]
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError("--storage-options", f"cannot read {path}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("--storage-options", f"expected a JSON object; {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options", "expected a JSON object")
    return value


STORAGE_OPTIONS_ENV = "VMAE_RAY_STORAGE_OPTIONS"
# Where S3 credentials can come from (README: "Storage and credentials"), said by an
# access-denied message; a `ray job submit` job is told that its submitting shell's do not reach it.
CREDENTIALS_HINT = ("give this process S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                    "an instance profile (IAM role) on the node, or key/secret in --storage-options @FILE; under "
                    "`ray job submit` the submitting shell's variables do not reach the job (see the README, "
                    "Storage and credentials)")
CREDENTIALS_HINT_RAY_JOB = ("this is a `ray job submit` job: the AWS_* variables of the shell that submitted it do not "
                            "reach it; give the cluster credentials with an instance profile (IAM role) on its nodes, "
                            "`ray job submit --runtime-env-json '{\"env_vars\": {...}}'`, or --storage-options @FILE "
                            "naming a file on the cluster outside --working-dir (see the README, Storage and "
                            "credentials)")


def check_output_option(output: str, storage, tables: tuple[str, ...]):
    """`writing.check_committed_output` for a command's ``--output``, before any work: returns
    the OutputStore; raises ConfigError naming --output (a file, another output, files vmae-ray
    did not write, not writable, credentials, endpoint)."""
    from vmae_ray.writing import check_committed_output

    with storage_errors_of("--output", output, storage):  # credentials, endpoint
        try:
            return check_committed_output(output, storage, tables)
        except ValueError as exc:
            raise ConfigError("--output", str(exc)) from exc
        except OSError as exc:
            raise ConfigError("--output", f"cannot write to {output}: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def storage_errors_of(option: str, uri: str, storage=None):
    """Storage errors raised inside become ConfigError naming ``option`` and ``uri``: no or bad
    credentials and access denied, not found, an endpoint that cannot be reached
    (`storage.classify_storage_error`); anything else passes through.

    For S3, an access-denied message also says which credential sources this process had
    (`storage.credential_sources`; ``storage``: the options it used, when the caller has them)
    and where credentials can come from, under `ray job submit` too."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        from vmae_ray.storage import classify_storage_error, credential_sources, in_ray_job

        kind, why = classify_storage_error(exc), f"{type(exc).__name__}: {exc}"
        s3 = str(uri).startswith(("s3://", "s3a://"))
        if kind == "access_denied":
            hint = ""
            if s3:
                hint = f"; {credential_sources(storage)}; " + (CREDENTIALS_HINT_RAY_JOB if in_ray_job()
                                                              else CREDENTIALS_HINT)
            raise ConfigError(option, f"{uri}: access denied or no credentials ({why}){hint}") from exc
        if kind == "not_found":
            raise ConfigError(option, f"{uri}: not found ({why})") from exc
        if kind == "transient":
            hint = " (endpoint_url in --storage-options, AWS_ENDPOINT_URL)" if s3 else ""
            raise ConfigError(option, f"{uri}: the storage did not answer ({why}); check the endpoint{hint} and "
                              "the network") from exc
        raise


def storage_for(text: str | dict | None, uris: list[str]):
    """A command's storage options: ``--storage-options`` (JSON or ``@FILE``), else
    ``$VMAE_RAY_STORAGE_OPTIONS``, plus the driver's S3 environment for ``uris``
    (`StorageOptions.with_driver_environment`). Raises ConfigError naming --storage-options."""
    from vmae_ray.storage import StorageOptions

    if text is None:
        text = os.environ.get(STORAGE_OPTIONS_ENV)
    return StorageOptions(parse_storage_options(text)).with_driver_environment([u for u in uris if u])


def load_yaml(path: str) -> dict[str, Any]:
    """Options from a YAML file: keys are option names with '-' or '_'."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", "expected a mapping of option names to values")
    names = {f.name for f in dataclasses.fields(EmbedConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError("--config", f"unknown option {key!r} in {path}; known: {', '.join(sorted(names))}")
        out[name] = value
    return out
