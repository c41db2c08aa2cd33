"""Planning: everything the driver decides before it starts Ray, and the settings fingerprints.

`prepare(config)` checks what can be checked without Ray (the checkpoint's files, a --head,
flags against the checkpoint, the --input's plan, the --output's committed state) and returns
the `Plan`; a bad argument is a ConfigError naming its flag. Lower modules raise plain
errors; this is where they become ConfigError.

The fingerprints say which settings produced a table: `settings_fingerprint` covers everything
that changes results (an output is never a mix of two), `embedding_fingerprint` only what
decides the embedding values (a linear head applies across outputs that share it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from vmae_ray import schema
from vmae_ray.assembly import Labeler, OutputSchemas
from vmae_ray.checkpoint import CheckpointError, ModelSpec, is_non_commercial, load_model_spec
from vmae_ray.config import ConfigError, EmbedConfig, check_output_option, storage_errors_of
from vmae_ray.decoding import SWSCALE_FOR_PIL_RESAMPLE, DecodeLimits, FrameGeometry
from vmae_ray.heads import HeadError, LinearHead
from vmae_ray.listing import VIDEO_EXTENSIONS, ListingPlan, plan_listing
from vmae_ray.reconstruction import masked_per_frame
from vmae_ray.stages import DecodeParams
from vmae_ray.storage import StorageOptions
from vmae_ray.writing import CommittedState, OutputStore

log = logging.getLogger("vmae_ray")

# Bump when the meaning of the output changes, so old and new rows are never mixed.
# 2: time span from the video packets, displayed geometry, no cover art. 3: colour as players
# read it (untagged HD as BT.709), HDR tone-mapped to SDR, raw streams and timestamp restarts
# played through, damaged files embedded from what decodes; videos/ gains damaged, damage, hdr.
OUTPUT_VERSION = 3


def software_versions() -> dict[str, str]:
    """The versions `_SUCCESS` records: from the installed packages' metadata, so the driver does
    not import torch and transformers (seconds of CPU) just to name them."""
    from importlib.metadata import PackageNotFoundError, version

    import av

    from vmae_ray import __version__

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    return {
        "vmae_ray": __version__, "python": platform.python_version(), "torch": of("torch"),
        "transformers": of("transformers"), "av": av.__version__, "ray": of("ray"),
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
        # "masks": drawn from each clip's pixels (before: from its video_id), so scores of runs
        # of the older kind are never mixed with these.
        settings["reconstruction"] = {"mask_ratio": config.mask_ratio, "mask_seed": config.mask_seed,
                                      "masks": "pixels"}
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


@dataclass
class Plan:
    """What the driver decided before starting Ray."""

    config: EmbedConfig
    storage: StorageOptions
    spec: ModelSpec
    num_frames: int
    with_labels: bool
    settings_fingerprint: str
    embedding_fingerprint: str
    listing: ListingPlan
    store: OutputStore
    state: CommittedState  # what _SUCCESS said when planned (re-read after recovery)
    head: LinearHead | None = None  # --head: gives the labels, from the clip embeddings

    @property
    def id2label(self) -> dict[int, str] | None:
        """The label names of this run's labels (the head's, else the classifier's), or None."""
        if self.head is not None:
            return self.head.id2label
        return self.spec.id2label if self.with_labels else None

    @property
    def labeler(self) -> Labeler | None:
        if not self.with_labels:
            return None
        return Labeler(id2label=self.id2label, top_k=self.config.top_k, head=self.head)

    @property
    def passthrough_schema(self) -> pa.Schema:
        return self.listing.passthrough_schema

    def output_schemas(self) -> OutputSchemas:
        dim, passthrough, recon = self.spec.hidden_size, self.passthrough_schema, self.config.reconstruction
        return OutputSchemas(
            clips=schema.clips_schema(dim, with_labels=self.with_labels, passthrough=passthrough,
                                      with_reconstruction=recon),
            videos=schema.videos_schema(dim, with_labels=self.with_labels, passthrough=passthrough,
                                        with_reconstruction=recon),
            errors=schema.errors_schema(passthrough=passthrough),
        )

    def embedded_schema(self) -> pa.Schema:
        return schema.embedded_schema(self.spec.hidden_size, with_logits=self.with_labels and self.head is None,
                                      with_reconstruction=self.config.reconstruction,
                                      passthrough=self.passthrough_schema)

    def replace_all(self, state: CommittedState) -> bool:
        """Whether this run replaces every committed row (--overwrite of an output that has some)."""
        return state.exists and self.config.overwrite


def prepare(config: EmbedConfig) -> Plan:
    """All checks that need no Ray: checkpoint config, flags against it, the --input's listing
    plan, the --output's committed state (read only: recovery needs the lease, `pipeline`).

    Raises ConfigError naming the flag for anything wrong.
    """
    storage = StorageOptions(config.storage_options).with_driver_environment(
        [config.input, config.output, config.model])
    with storage_errors_of("--model", config.model, storage):  # credentials, endpoint
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
    with storage_errors_of("--head", config.head, storage):
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

    # The input is planned (it exists, a manifest's columns) before --output is touched: a typo
    # in --input must not cost the committed tables of an --overwrite run.
    with storage_errors_of("--input", config.input, storage):  # credentials, endpoint
        try:
            listing = plan_listing(config.input, storage, extensions=config.extensions or VIDEO_EXTENSIONS)
        except FileNotFoundError as exc:
            raise ConfigError("--input", f"not found: {exc}") from exc
        except PermissionError as exc:
            raise ConfigError("--input", f"access denied listing {config.input}: {exc}") from exc
        except ValueError as exc:
            raise ConfigError("--input", str(exc)) from exc

    # A file, files vmae-ray did not write, another command's output: refused here, before
    # recovery touches anything. A dry run writes nothing, not even the write check.
    if config.dry_run:
        store = OutputStore(config.output, storage)
        with storage_errors_of("--output", config.output, storage):
            try:
                store.check_owned()
            except ValueError as exc:
                raise ConfigError("--output", str(exc)) from exc
    else:
        store = check_output_option(config.output, storage, schema.TABLES)
    with storage_errors_of("--output", config.output, storage):
        try:
            state = store.read_state()
        except ValueError as exc:
            raise ConfigError("--output", str(exc)) from exc
    plan = Plan(config, storage, spec, num_frames, with_labels, fingerprint,
                embedding_fingerprint(config, spec, num_frames), listing, store, state, head=head)
    check_state(plan, state)
    return plan


def check_state(plan: Plan, state: CommittedState) -> None:
    """Refuse a run that would mix results of other settings into --output (or reuse a run id)."""
    config = plan.config
    if config.run_id and any(r.get("run_id") == config.run_id for r in state.manifest.get("runs", [])):
        raise ConfigError("--run-id",
                          f"{config.run_id!r} was already used for {config.output}; run ids name files and must be new")
    if state.exists and not config.resume and not config.overwrite:
        raise ConfigError("--no-resume", f"{config.output} already holds committed results; use --overwrite or another --output")
    if state.exists and not config.overwrite and state.settings_fingerprint != plan.settings_fingerprint:
        # Results of different settings are never mixed in one table, and a changed flag in a
        # nightly job must not silently re-embed (and replace) a whole corpus: refused, unless
        # --overwrite says to replace everything.
        changed = changed_settings(state.manifest.get("config") or {}, config.to_dict(redact=True))
        raise ConfigError("--output", f"{config.output} holds results made with other settings "
                          f"({changed or 'the checkpoint or its preprocessing'}); rerun with the settings it was "
                          "made with to add to it, pass --overwrite to process everything again and replace all "
                          "its rows, or use another --output")


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


