"""Command line: `vmae-ray COMMAND ...`, and the `embed` command's flags.

`vmae-ray embed ...` and `python jobs/embed_videos.py ...` are the same parser. It parses and
validates everything before Ray starts: a bad flag exits with status 2 and a message naming
the flag and its allowed values. Other commands live in their own modules (see `COMMANDS`)
and are imported only when run, so every command starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from vmae_ray.config import (
    DEFAULT_BATCH_SIZE_CPU,
    DEFAULT_BATCH_SIZE_GPU,
    DEFAULT_MODEL,
    DEFAULT_STRIDE_CLIPS_PER_VIDEO,
    DEVICES,
    DTYPES,
    GEOMETRY_MODES,
    INTERPOLATIONS,
    LABEL_MODES,
    ON_DAMAGE,
    STORAGE_OPTIONS_ENV,
    CommandParser,
    ConfigError,
    EmbedConfig,
    load_yaml,
    parse_clips_per_video,
    parse_num_actors,
    parse_storage_options,
)
from vmae_ray.reconstruction import DEFAULT_MASK_RATIO, DEFAULT_MASK_SEED
from vmae_ray.sampling import SAMPLING_POLICIES


def build_parser(prog: str = "vmae-ray embed") -> argparse.ArgumentParser:
    p = CommandParser(
        prog=prog,
        description="Embed a video corpus with VideoMAE on Ray and write Parquet tables "
        "(clips/, videos/, errors/, _SUCCESS) under --output.",
        argument_default=argparse.SUPPRESS,  # so we can tell given flags from defaults
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--input",
                    help="directory/prefix, glob, or manifest (.parquet/.csv/.jsonl with a 'uri' column); any fsspec URI")
    io.add_argument("--output", help="directory/prefix for the tables; any fsspec URI")
    io.add_argument("--config", help="YAML file with the same options (flags win)")
    io.add_argument("--storage-options", help="fsspec options as a JSON object, or @FILE with one (keeps secrets off the "
                    "command line); default: $VMAE_RAY_STORAGE_OPTIONS")
    io.add_argument("--limit", type=int, help="process at most N of the inputs that still need work (new, changed, "
                    "or failed with --retry-failed); the rest wait for the next run")
    io.add_argument("--extensions", help="comma-separated extensions to take from a directory listing")

    model = p.add_argument_group("model")
    model.add_argument("--model", help=f"local dir, s3:// prefix or hub id (default {DEFAULT_MODEL})")
    model.add_argument("--dtype", choices=DTYPES, help="auto: bf16/fp16 on GPU, fp32 on CPU")
    model.add_argument("--device", choices=DEVICES)
    model.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    model.add_argument("--labels", choices=LABEL_MODES, help="top labels: auto = when the checkpoint has a trained classifier")
    model.add_argument("--top-k", type=int, help="labels per clip/video (default 5)")
    model.add_argument("--head", help="a linear head (vmae-ray probe fit) that gives the labels; it wins over a "
                       "checkpoint's classifier and must come from tables of the same checkpoint and sampling")
    model.add_argument("--model-cache-dir", help="node-local cache for remote checkpoints")
    model.add_argument("--reconstruction", action="store_true",
                       help="also score each clip with the pretraining decoder's masked-patch loss "
                       "(reconstruction_loss, reconstruction_mask); needs a VideoMAEForPreTraining checkpoint")
    add_mask_arguments(model)

    add_sampling_arguments(p.add_argument_group("sampling"))

    res = p.add_argument_group("resources")
    res.add_argument("--batch-size", type=int,
                     help=f"clips per model call (default {DEFAULT_BATCH_SIZE_GPU} on GPU, {DEFAULT_BATCH_SIZE_CPU} on CPU)")
    res.add_argument("--num-actors", help="model actors: N or MIN,MAX (default: one per GPU, or 1)")
    res.add_argument("--gpus-per-actor", type=float, help="default 1 when the cluster has GPUs, else 0")
    res.add_argument("--cpus-per-actor", type=float)
    res.add_argument("--decode-cpus", type=float, help="CPUs per decode task (default 1)")
    res.add_argument("--decode-threads", type=int, help="libavcodec threads per decode (default 1; 0 = auto)")
    res.add_argument("--decode-memory-mb", type=int, help="memory reserved per decode task (default 1024)")
    res.add_argument("--videos-per-task", type=int,
                     help="inputs per decode task (default: from the run's size, at most 1024, so that a large run "
                     "is thousands of tasks that every node can take)")
    res.add_argument("--block-mib", type=int, help="Ray Data block size for decoded clips, MiB (default 512): larger "
                     "blocks cost the driver less per clip")

    run = p.add_argument_group("runs, resume, limits")
    run.add_argument("--overwrite", action="store_true", help="discard the committed tables under --output and start over")
    run.add_argument("--no-resume", dest="resume", action="store_false", help="fail if --output already has committed results")
    run.add_argument("--retry-failed", action="store_true", help="process inputs that ended in errors/ again")
    run.add_argument("--run-id", help="id for this run (default: time + random)")
    run.add_argument("--dry-run", action="store_true",
                     help="list and diff, print what a run would do (new, changed, done, no longer listed), and exit "
                     "without decoding or writing anything")
    run.add_argument("--prune", action="store_true",
                     help="remove the rows (clips, videos, errors) of inputs that are no longer listed")
    run.add_argument("--wait-for-lock", nargs="?", type=float, const=float("inf"), metavar="SECONDS",
                     help="when another run holds --output, wait for it (up to SECONDS) instead of exiting")
    run.add_argument("--lease-seconds", type=float,
                     help="a run's lease on --output expires this long after its last renewal (default 120)")
    run.add_argument("--progress-bars", action="store_true", help="show Ray Data's own progress bars too")
    run.add_argument("--max-frame-pixels", type=int, help="refuse videos whose frames have more pixels (default 8192*8192)")
    run.add_argument("--max-duration-seconds", type=float, help="refuse longer videos (default 21600)")
    run.add_argument("--max-bytes", type=int, help="refuse larger files (default 64 GiB)")
    run.add_argument("--progress-seconds", type=float, help="seconds between progress lines (default 10)")
    run.add_argument("--commit-every-seconds", type=float,
                     help="commit finished videos at least this often, so a crash loses at most this much work (default 600)")
    run.add_argument("--decode-timeout-seconds", type=float,
                     help="a video whose decoder makes no progress this long becomes a 'timeout' error (default 300)")
    run.add_argument("--no-decode-isolation", dest="decode_isolation", action="store_false",
                     help="decode in the Ray worker itself instead of a child process (a decoder crash then kills the task)")
    run.add_argument("--on-damage", choices=ON_DAMAGE,
                     help="a damaged video (cut short, undecodable packets, decoder errors): embed (default) from what "
                     "decodes, marked damaged on videos/; error: an errors/ row of type 'damaged'")
    return p


def add_sampling_arguments(group) -> None:
    """The sampling flags, shared by every command that decodes videos as the job does."""
    group.add_argument("--sampling", choices=SAMPLING_POLICIES,
                       help="uniform: SSv2 segments, one clip; stride: Kinetics dense clips")
    group.add_argument("--num-frames", type=int, help="frames per clip (default: the checkpoint's num_frames)")
    group.add_argument("--frame-stride", type=int, help="stride sampling: frames between sampled frames (default 4)")
    group.add_argument("--clips-per-video", help="stride sampling: N evenly spaced clips "
                       f"(default {DEFAULT_STRIDE_CLIPS_PER_VIDEO}), or 'all' to cover the video")
    group.add_argument("--interpolation", choices=INTERPOLATIONS,
                       help="libswscale resize filter (default auto: the one matching the checkpoint's resample)")
    group.add_argument("--geometry", choices=GEOMETRY_MODES,
                       help="displayed (default): frames as players show them, display matrix (rotation, mirror) and "
                       "sample aspect ratio applied; stored: the picture as stored in the file")


def add_mask_arguments(group) -> None:
    """The tube-masking flags of reconstruction scores (embed --reconstruction, show)."""
    group.add_argument("--mask-ratio", type=float,
                       help=f"fraction of each frame's tokens masked (default {DEFAULT_MASK_RATIO}, the VideoMAE paper's)")
    group.add_argument("--mask-seed", type=int,
                       help=f"seed of the masks, drawn per clip from (seed, the clip's pixels) (default {DEFAULT_MASK_SEED})")


_CONVERTERS = {
    "num_actors": parse_num_actors,
    "clips_per_video": parse_clips_per_video,
    "storage_options": parse_storage_options,
    "extensions": lambda v: tuple(e if e.startswith(".") else "." + e for e in (v.split(",") if isinstance(v, str) else v)),
}


def config_from_args(argv: Sequence[str] | None = None, prog: str = "vmae-ray embed") -> EmbedConfig:
    """Parse flags (and --config), validate, and return the config; exits 2 on bad input."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    try:
        values: dict = {}
        config_path = args.pop("config", None)
        if config_path:
            values.update(load_yaml(config_path))
        values.update(args)
        # Secrets can come from the environment instead of the command line, which Ray
        # records as the job's entrypoint.
        if "storage_options" not in values and os.environ.get(STORAGE_OPTIONS_ENV):
            values["storage_options"] = os.environ[STORAGE_OPTIONS_ENV]
        for name, convert in _CONVERTERS.items():
            if name in values:
                values[name] = convert(values[name])
        # A stride given on the command line with uniform sampling would be silently ignored:
        # say so (a --config file may hold one for its stride runs).
        if values.get("sampling", "uniform") == "uniform" and "frame_stride" in args:
            raise ConfigError("--frame-stride", "applies to --sampling stride only (uniform sampling takes the "
                              "middle frame of num_frames equal segments)")
        # Uniform sampling means one clip; only stride takes the default of several.
        if values.get("sampling") == "stride" and "clips_per_video" not in values:
            values["clips_per_video"] = DEFAULT_STRIDE_CLIPS_PER_VIDEO
        # Paths are resolved here, where they were typed, before anything is shipped to workers.
        return EmbedConfig(**values).validate().resolved()
    except ConfigError as exc:
        parser.error(str(exc))
    except TypeError as exc:  # a YAML value of the wrong kind
        parser.error(f"--config: {exc}")
    raise AssertionError("unreachable")


# name -> (module, function, one-line description). A command's function takes (argv, prog)
# and returns the exit status.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "embed": ("vmae_ray.cli", "run_embed", "embed a video corpus with VideoMAE on Ray (the job)"),
    "probe": ("vmae_ray.probe", "run_probe", "fit a linear head on a few labelled videos (fit), or label tables with it (apply)"),
    "show": ("vmae_ray.show", "run_show", "draw a clip's masked-patch reconstruction as a PNG (pretraining checkpoints)"),
    "search": ("vmae_ray.search", "run_search", "the k nearest videos or clips to a video (exact, or with the index)"),
    "index": ("vmae_ray.search", "run_index", "build or update the approximate nearest-neighbour index of the tables"),
    "dedup": ("vmae_ray.dedup", "run_dedup", "near-duplicate groups of videos (cosine >= a threshold)"),
    "report": ("vmae_ray.report", "run_report", "one self-contained HTML page about a committed output"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {description}" for name, (_, _, description) in COMMANDS.items()]
    return ("usage: vmae-ray COMMAND [options]   (vmae-ray COMMAND --help for a command's options; "
            "vmae-ray --version)\n\n"
            "commands:\n" + "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    """`vmae-ray COMMAND ...`: dispatch to the command's module; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from vmae_ray import __version__

        print(f"vmae-ray {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"vmae-ray: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}\n\n{_usage()}",
              file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:], prog=f"vmae-ray {argv[0]}")


def run_embed(argv: Sequence[str], prog: str = "vmae-ray embed") -> int:
    """The embed command: parse, validate, run the job; returns the exit status (README, "Exit
    status"): 0, 2 for a bad argument, 3 when every input it processed failed, 4 with listing
    errors, 75 when another run holds --output; a failed run raises (status 1)."""
    config = config_from_args(argv, prog=prog)
    from vmae_ray.lease import LeaseHeldError
    from vmae_ray.pipeline import run  # heavy imports only after the flags are good
    from vmae_ray.progress import EXIT_LOCKED

    try:
        summary = run(config)
    except ConfigError as exc:
        # A bad argument found by the pre-flight checks (checkpoint files, --output state,
        # --input listing): same contract as a bad flag, exit 2 with the option named.
        build_parser(prog).error(str(exc))
    except LeaseHeldError as exc:
        print(f"{prog}: --output: {exc}", file=sys.stderr, flush=True)
        return EXIT_LOCKED
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
