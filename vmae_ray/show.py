"""`vmae-ray show`: one clip's masked-patch reconstruction as a picture.

    vmae-ray show --model CKPT --video PATH [--clip N] [--output FILE.png] [sampling and mask flags as embed]

The video is decoded here, without Ray, as the job decodes it (`pipeline.decode_params` and
`stages.decode_video`), and clip N is masked with the tube mask the job draws for it
(`reconstruction.clip_mask`: from the clip's pixels, --mask-ratio and --mask-seed), so the loss
in the title is the clip's `reconstruction_loss` in the tables, wherever the file lives. One
row per tubelet (frame pair) of the clip, three panels per row: the input, the input with the
masked patches blanked, and the reconstruction (visible patches from the input, masked ones
predicted by the decoder and, with norm_pix_loss, un-normalised with the input patch's own
mean and standard deviation, as the VideoMAE repo's visualisation does).

The picture is assembled pixel for pixel (`compose`, `GridLayout`) and placed unresampled with
matplotlib's `figimage`; matplotlib adds the text.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vmae_ray.config import (
    DEFAULT_MODEL,
    DEFAULT_STRIDE_CLIPS_PER_VIDEO,
    DEVICES,
    CommandParser,
    ConfigError,
    EmbedConfig,
    storage_errors_of,
    storage_for,
)
from vmae_ray.embedder import DTYPES

MASK_FILL = (128, 128, 128)  # masked patches in the middle panel: blank, mid grey
BACKGROUND = 255
MIN_FRAME_PIXELS = 128  # small model inputs (tests, tiny checkpoints) are enlarged to about this size
COLUMNS = ("input", "masked input", "reconstruction")
DPI = 100
TITLE_FONTSIZE = HEADER_FONTSIZE = 9
LABEL_FONTSIZE = 8
TEXT_GAP = 6  # pixels between a text and the panel it labels


@dataclass(frozen=True)
class GridLayout:
    """Where each panel lies in the picture, in pixels (rows: tubelets; columns: `COLUMNS`).

    A panel holds the tubelet's frames side by side, each `zoom` times its size (nearest
    neighbour: every model pixel is a zoom x zoom block).
    """

    rows: int  # tubelets (time slots) of the clip
    frames_per_panel: int  # tubelet_size
    frame_height: int
    frame_width: int
    zoom: int
    left: int = 96  # room for the row labels
    top: int = 64  # room for the title and the column headers
    gap: int = 8
    margin: int = 8
    min_width: int = 0  # room for a title wider than the panels

    @classmethod
    def for_clip(cls, *, num_frames: int, height: int, width: int, tubelet_size: int, **room: int) -> GridLayout:
        """The layout of a clip's panels; ``room`` (left, top, min_width) as `draw` measures its text."""
        zoom = max(1, math.ceil(MIN_FRAME_PIXELS / max(height, width)))
        return cls(rows=num_frames // tubelet_size, frames_per_panel=tubelet_size, frame_height=height,
                   frame_width=width, zoom=zoom, **room)

    @property
    def panel_height(self) -> int:
        return self.frame_height * self.zoom

    @property
    def panel_width(self) -> int:
        return self.frames_per_panel * self.frame_width * self.zoom

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture in pixels."""
        width = self.left + len(COLUMNS) * self.panel_width + (len(COLUMNS) - 1) * self.gap + self.margin
        height = self.top + self.rows * self.panel_height + (self.rows - 1) * self.gap + self.margin
        return max(width, self.min_width), height

    def panel_box(self, row: int, column: int) -> tuple[int, int]:
        """(top, left) pixel of a panel; it spans panel_height x panel_width pixels."""
        return (self.top + row * (self.panel_height + self.gap),
                self.left + column * (self.panel_width + self.gap))


def pixel_mask(mask: np.ndarray, *, num_frames: int, height: int, width: int, tubelet_size: int,
               patch_size: int) -> np.ndarray:
    """A token mask (N,) as a pixel mask (T, H, W): True where the pixel's token is masked."""
    grid = np.asarray(mask, dtype=bool).reshape(num_frames // tubelet_size, height // patch_size, width // patch_size)
    return grid.repeat(tubelet_size, axis=0).repeat(patch_size, axis=1).repeat(patch_size, axis=2)


def compose(clip: np.ndarray, masked: np.ndarray, reconstruction: np.ndarray, layout: GridLayout) -> np.ndarray:
    """The three uint8 clips (T, H, W, 3) laid out as one (height, width, 3) uint8 picture."""
    width, height = layout.size
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    z, fw = layout.zoom, layout.frame_width * layout.zoom
    for column, frames in enumerate((clip, masked, reconstruction)):
        for row in range(layout.rows):
            top, left = layout.panel_box(row, column)
            for k in range(layout.frames_per_panel):
                frame = frames[row * layout.frames_per_panel + k].repeat(z, axis=0).repeat(z, axis=1)
                canvas[top:top + layout.panel_height, left + k * fw:left + (k + 1) * fw] = frame
    return canvas


def text_size(text: str, fontsize: float) -> tuple[int, int]:
    """(width, height) in whole pixels of ``text`` (every line) as matplotlib's Agg renderer draws
    it at `DPI`: what `draw` makes room for."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(dpi=DPI)
    box = fig.text(0, 0, text, fontsize=fontsize).get_window_extent(FigureCanvasAgg(fig).get_renderer())
    return math.ceil(box.width), math.ceil(box.height)


def row_labels(num_frames: int, tubelet_size: int, frame_indices: list[int] | None) -> list[str]:
    """Each row's label: its frames' numbers in the video (``frame_indices``, the clip row's) or,
    without them, in the clip."""
    labels = []
    for first in range(0, num_frames, tubelet_size):
        if frame_indices is not None:
            labels.append("frames " + ", ".join(str(i) for i in frame_indices[first:first + tubelet_size]))
        else:
            labels.append(f"clip frames {first}-{first + tubelet_size - 1}")
    return labels


def draw(clip: np.ndarray, mask: np.ndarray, reconstruction: np.ndarray, *, tubelet_size: int, patch_size: int,
         rescale_factor: float, title: str, frame_indices: list[int] | None = None):
    """The figure for one clip: uint8 clip (T, H, W, 3), bool token mask (N,), reconstruction (T, H, W, 3)
    in [0, 1] (`VideoMAEEmbedder.reconstruct`). Each row is labelled with its frames' numbers in
    the video (``frame_indices``, the clip row's, T of them) or, without them, in the clip. The
    margins are made from the rendered size of the labels and the title, so every text is
    whole. Returns (matplotlib Figure, GridLayout)."""
    from matplotlib.figure import Figure

    num_frames, height, width = clip.shape[:3]
    labels = row_labels(num_frames, tubelet_size, frame_indices)
    defaults = GridLayout.for_clip(num_frames=num_frames, height=height, width=width, tubelet_size=tubelet_size)
    label_width = max(text_size(label, LABEL_FONTSIZE)[0] for label in labels)
    title_width, title_height = text_size(title, TITLE_FONTSIZE)
    header_height = max(text_size(name, HEADER_FONTSIZE)[1] for name in COLUMNS)
    layout = GridLayout.for_clip(
        num_frames=num_frames, height=height, width=width, tubelet_size=tubelet_size,
        left=max(defaults.left, defaults.margin + label_width + TEXT_GAP),
        top=max(defaults.top, defaults.margin + title_height + TEXT_GAP + header_height + 4),
        min_width=2 * defaults.margin + title_width)
    masked = clip.copy()
    masked[pixel_mask(mask, num_frames=num_frames, height=height, width=width, tubelet_size=tubelet_size,
                      patch_size=patch_size)] = MASK_FILL
    recon = np.clip(np.rint(reconstruction / rescale_factor), 0, 255).astype(np.uint8)
    canvas = compose(clip, masked, recon, layout)

    fig_width, fig_height = layout.size
    fig = Figure(figsize=(fig_width / DPI, fig_height / DPI), dpi=DPI)
    fig.figimage(canvas, xo=0, yo=0, origin="upper")

    def text(x: float, y: float, value: str, **kwargs) -> None:
        fig.text(x / fig_width, 1 - y / fig_height, value, **kwargs)

    text(layout.margin, layout.margin, title, ha="left", va="top", fontsize=TITLE_FONTSIZE)
    for column, name in enumerate(COLUMNS):
        top, left = layout.panel_box(0, column)
        text(left + layout.panel_width / 2, top - 4, name, ha="center", va="bottom", fontsize=HEADER_FONTSIZE)
    for row, label in enumerate(labels):
        top, _ = layout.panel_box(row, 0)
        text(layout.left - TEXT_GAP, top + layout.panel_height / 2, label, ha="right", va="center",
             fontsize=LABEL_FONTSIZE)
    return fig, layout


# --------------------------------------------------------------------------------------
# The command


def build_parser(prog: str = "vmae-ray show") -> argparse.ArgumentParser:
    from vmae_ray.cli import add_mask_arguments, add_sampling_arguments

    p = CommandParser(
        prog=prog, argument_default=argparse.SUPPRESS,
        description="Draw one clip's masked-patch reconstruction by a VideoMAE pretraining checkpoint: for each "
        "tubelet the input, the masked input and the reconstruction, with the clip's loss in the title.")
    p.add_argument("--model", help=f"a VideoMAEForPreTraining checkpoint: local dir, s3:// prefix or hub id "
                   f"(default {DEFAULT_MODEL})")
    p.add_argument("--video", required=True, help="one video: a path or any fsspec URI")
    p.add_argument("--clip", type=int, help="clip index, as in the clips table (default 0)")
    p.add_argument("--output", help="PNG file to write (default reconstruction.png)")
    add_mask_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--dtype", choices=DTYPES, help="auto: bf16/fp16 on GPU, fp32 on CPU")
    p.add_argument("--storage-options", help="fsspec options as a JSON object, or @FILE with one")
    p.add_argument("--model-cache-dir", help="local cache for remote checkpoints")
    return p


def show_config(args: dict) -> EmbedConfig:
    """The job's config for show's parsed flags (``vars(build_parser().parse_args(...))`` less
    --clip); raises ConfigError for a bad value."""
    from vmae_ray.config import parse_clips_per_video, parse_storage_options

    values = {"input": args.pop("video"), "output": args.pop("output", "reconstruction.png"), "reconstruction": True}
    # Every option that decides the pixels and the mask, so that show's loss is the table's.
    for name in ("model", "mask_ratio", "mask_seed", "sampling", "num_frames", "frame_stride", "interpolation",
                 "geometry", "device", "dtype", "model_cache_dir"):
        if name in args:
            values[name] = args[name]
    if "clips_per_video" in args:
        values["clips_per_video"] = parse_clips_per_video(args["clips_per_video"])
    elif values.get("sampling") == "stride":
        values["clips_per_video"] = DEFAULT_STRIDE_CLIPS_PER_VIDEO
    if args.get("storage_options") is not None:
        values["storage_options"] = parse_storage_options(args["storage_options"])
    return EmbedConfig(**values).validate()


def run_show(argv: Sequence[str], prog: str = "vmae-ray show") -> int:
    """The show command; exit status 0, 1 when the video cannot be decoded, 2 for a bad argument."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    clip_index = args.pop("clip", 0)
    try:
        config = show_config(args)
        if clip_index < 0:
            raise ConfigError("--clip", f"expected a clip index >= 0; got {clip_index}")
        return _show(config, clip_index)
    except ConfigError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")


def _show(config: EmbedConfig, clip_index: int) -> int:
    from vmae_ray.checkpoint import CheckpointError, load_model_spec
    from vmae_ray.listing import list_inputs
    from vmae_ray.reconstruction import clip_mask, masked_per_frame
    storage = storage_for(config.storage_options or None, [config.input, config.model])
    with storage_errors_of("--model", config.model, storage):  # credentials, endpoint
        try:
            spec = load_model_spec(config.model, storage, config.model_cache_dir)
        except CheckpointError as exc:
            raise ConfigError("--model", str(exc)) from exc
    if not spec.has_decoder:
        raise ConfigError("--model", f"{config.model} is a {spec.architecture} checkpoint without the pretraining "
                          "decoder; show needs a VideoMAEForPreTraining checkpoint (e.g. MCG-NJU/videomae-base-short-ssv2)")
    if config.num_frames not in (None, spec.num_frames):
        raise ConfigError("--num-frames", f"the checkpoint was trained with num_frames={spec.num_frames}")
    try:
        masked_per_frame(spec.tokens_per_frame, config.mask_ratio)
    except ValueError as exc:
        raise ConfigError("--mask-ratio", str(exc)) from exc
    with storage_errors_of("--video", config.input, storage):  # credentials, endpoint
        try:
            inputs = list_inputs(config.input, storage).to_pylist()
        except (OSError, ValueError) as exc:
            raise ConfigError("--video", str(exc)) from exc
    if len(inputs) != 1:
        raise ConfigError("--video", f"names {len(inputs)} videos; give one")
    video = inputs[0]

    found = _decode_clip(config, spec, storage, video, clip_index)
    if isinstance(found, str):
        print(f"vmae-ray show: {found}", file=sys.stderr)
        return 1
    row, clip = found

    from vmae_ray.embedder import VideoMAEEmbedder

    # The directory the spec was read from: the checkpoint is not located (or fetched) twice.
    embedder = VideoMAEEmbedder(spec.model_dir, storage=storage, cache_root=config.model_cache_dir,
                                device=config.device, dtype=config.dtype, reconstruction=True)
    mask = clip_mask(clip, mask_seed=config.mask_seed, mask_ratio=config.mask_ratio,
                     num_time_slots=spec.num_time_slots, tokens_per_frame=spec.tokens_per_frame)
    losses, reconstruction = embedder.reconstruct(clip[None], mask[None])
    loss = float(losses[0])
    target = "per-patch normalised pixels" if spec.norm_pix_loss else "pixels"
    title = (f"{os.path.basename(video['uri'])}  clip {clip_index} ({row['start_seconds']:.2f}-{row['end_seconds']:.2f} s)"
             f"  reconstruction loss {loss:.4f}\n"
             f"{int(mask.sum())} of {mask.size} tokens masked (ratio {config.mask_ratio}, seed {config.mask_seed}, "
             f"drawn from the clip's pixels); loss: MSE on {target}")
    fig, _ = draw(clip, mask, reconstruction[0], tubelet_size=spec.tubelet_size, patch_size=spec.patch_size,
                  rescale_factor=spec.rescale_factor, title=title, frame_indices=row.get("frame_indices"))
    fig.savefig(config.output, dpi=fig.dpi, format="png")
    print(f"wrote {config.output}: clip {clip_index} of {video['uri']}, reconstruction loss {loss:.6f}")
    return 0


def _decode_clip(config: EmbedConfig, spec, storage, video: dict, clip_index: int):
    """(facts of the clip, uint8 clip (T, H, W, 3)) of clip ``clip_index``, decoded as the job
    decodes it, or an error message. Raises ConfigError (--clip) when the video has fewer clips.
    """
    from vmae_ray.planning import decode_params
    from vmae_ray.stages import decode_video, video_clips

    params = decode_params(config, spec, config.num_frames or spec.num_frames)
    item = {"video_id": video["video_id"], "uri": video["uri"], "size_bytes": video["size_bytes"],
            "input_fingerprint": video["input_fingerprint"]}
    found = video_clips(list(decode_video(item, params, storage)))
    if isinstance(found, dict):
        return f"cannot decode {video['uri']}: {found['error_type']} ({found['stage']}): {found['message']}"
    facts, pixels = found
    if facts and clip_index >= facts[0]["num_clips"]:
        raise ConfigError("--clip", f"{video['uri']} has {facts[0]['num_clips']} clip(s) with these sampling flags "
                          f"(indices 0-{facts[0]['num_clips'] - 1}); got {clip_index}")
    for fact, clip in zip(facts, pixels):
        if fact["clip_index"] == clip_index:
            return fact, clip
    raise ConfigError("--clip", f"{video['uri']} produced no clip {clip_index}")
