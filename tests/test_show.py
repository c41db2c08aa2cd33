"""`vmae-ray show`: the PNG's panels checked pixel by pixel.

References: the clip decoded again as the job decodes it (`pipeline.decode_params`,
`stages.decode_video`), the job's tube mask for that clip (`reconstruction.clip_mask` from the
clip's pixels), and transformers' `VideoMAEForPreTraining` logits un-normalised
by brute force in numpy (the VideoMAE repo's visualisation recipe) for the predicted patches.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import decoded_clip
from vmae_ray.checkpoint import load_model_spec
from vmae_ray.cli import main
from vmae_ray.reconstruction import clip_mask
from vmae_ray.show import MASK_FILL, GridLayout, pixel_mask

SAMPLING = ["--sampling", "stride", "--clips-per-video", "2", "--frame-stride", "2"]


def hf_prediction(model_dir: str, clip: np.ndarray, mask: np.ndarray) -> tuple[float, np.ndarray]:
    """transformers' loss and its predicted masked tubelets turned back into uint8 pixels with the
    input patch's mean and unbiased std (+1e-6), written with plain numpy loops."""
    from transformers import VideoMAEForPreTraining, VideoMAEImageProcessorPil

    processor = VideoMAEImageProcessorPil.from_pretrained(model_dir)
    pixel_values = torch.from_numpy(processor([list(clip)], do_resize=False, do_center_crop=False,
                                              return_tensors="np")["pixel_values"])
    model = VideoMAEForPreTraining.from_pretrained(model_dir, use_safetensors=True).eval()
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=torch.from_numpy(mask[None]))
    logits = out.logits[0].numpy().astype(np.float64)
    ts, p = model.config.tubelet_size, model.config.patch_size
    t, h, w, _ = clip.shape
    picture = clip.astype(np.float64) / 255
    predicted = picture.copy()
    masked_tokens = np.flatnonzero(mask)
    for k, token in enumerate(masked_tokens):
        slot, rest = divmod(token, (h // p) * (w // p))
        row, col = divmod(rest, w // p)
        block = picture[slot * ts:(slot + 1) * ts, row * p:(row + 1) * p, col * p:(col + 1) * p]  # (ts, p, p, 3)
        values = logits[k].reshape(ts, p, p, 3)
        if model.config.norm_pix_loss:
            flat = block.reshape(-1, 3)
            values = values * (flat.std(axis=0, ddof=1) + 1e-6) + flat.mean(axis=0)
        predicted[slot * ts:(slot + 1) * ts, row * p:(row + 1) * p, col * p:(col + 1) * p] = values
    return out.loss.item(), np.clip(np.rint(predicted * 255), 0, 255).astype(np.uint8)


def panel_frames(picture: np.ndarray, layout: GridLayout, column: int) -> np.ndarray:
    """The frames a column of the picture shows, back at model size (T, H, W, 3)."""
    frames = []
    z, fh, fw = layout.zoom, layout.frame_height, layout.frame_width
    for row in range(layout.rows):
        top, left = layout.panel_box(row, column)
        for k in range(layout.frames_per_panel):
            block = picture[top:top + fh * z, left + k * fw * z:left + (k + 1) * fw * z]
            assert (block == block[::z, ::z].repeat(z, 0).repeat(z, 1)).all(), "each model pixel is a z x z block"
            frames.append(block[::z, ::z])
    return np.stack(frames)


def test_show_draws_input_masked_and_reconstruction(pretraining_dir, synthetic_corpus, tmp_path, capsys):
    video, png = synthetic_corpus["a_h264.mp4"], tmp_path / "clip1.png"
    assert main(["show", "--model", pretraining_dir, "--video", video, "--clip", "1", "--output", str(png),
                 *SAMPLING]) == 0
    spec = load_model_spec(pretraining_dir)
    clip = decoded_clip(["--input", video, "--output", "unused", "--model", pretraining_dir, *SAMPLING], video, 1)
    mask = clip_mask(clip, mask_seed=0, mask_ratio=0.9, num_time_slots=spec.num_time_slots,
                     tokens_per_frame=spec.tokens_per_frame)
    picture = np.asarray(Image.open(png).convert("RGB"))
    layout = GridLayout.for_clip(num_frames=8, height=64, width=64, tubelet_size=2)
    assert (layout.rows, layout.zoom) == (4, 2)
    # The room left of and above the panels is made for the text drawn (measured): the panels
    # are found from the picture's size.
    extra_width, extra_height = picture.shape[1] - layout.size[0], picture.shape[0] - layout.size[1]
    assert extra_width >= 0 and extra_height >= 0
    layout = dataclasses.replace(layout, left=layout.left + extra_width, top=layout.top + extra_height)
    assert picture.shape == (layout.size[1], layout.size[0], 3)

    np.testing.assert_array_equal(panel_frames(picture, layout, 0), clip)
    hidden = pixel_mask(mask, num_frames=8, height=64, width=64, tubelet_size=2, patch_size=16)
    assert hidden.mean() == pytest.approx(14 / 16)
    masked = panel_frames(picture, layout, 1)
    assert (masked[hidden] == MASK_FILL).all(), "masked patches are blank"
    np.testing.assert_array_equal(masked[~hidden], clip[~hidden])
    loss, expected = hf_prediction(pretraining_dir, clip, mask)
    reconstruction = panel_frames(picture, layout, 2)
    np.testing.assert_array_equal(reconstruction[~hidden], clip[~hidden])
    difference = np.abs(reconstruction[hidden].astype(int) - expected[hidden].astype(int))
    assert difference.max() <= 1, "predicted patches: transformers' output un-normalised, within rounding"
    printed = float(re.search(r"reconstruction loss ([0-9.]+)", capsys.readouterr().out).group(1))
    assert printed == pytest.approx(loss, rel=1e-4)


def test_a_copy_at_another_path_draws_the_same_picture(pretraining_dir, synthetic_corpus, tmp_path, capsys):
    """The same bytes in two folders: the same mask and loss, so the same PNG byte for byte (the
    title names the file by its base name, the same here)."""
    import shutil

    original = synthetic_corpus["a_h264.mp4"]
    copy = tmp_path / "elsewhere" / "a_h264.mp4"
    copy.parent.mkdir()
    shutil.copy(original, copy)
    pictures, printed = [], []
    for i, video in enumerate((original, str(copy))):
        png = tmp_path / f"{i}.png"
        assert main(["show", "--model", pretraining_dir, "--video", video, "--clip", "1", "--output", str(png),
                     *SAMPLING]) == 0
        pictures.append(png.read_bytes())
        printed.append(re.search(r"reconstruction loss ([0-9.]+)", capsys.readouterr().out).group(1))
    assert printed[0] == printed[1]
    assert pictures[0] == pictures[1]


def test_show_refuses_bad_arguments(classifier_dir, pretraining_dir, synthetic_corpus, tmp_path, capsys):
    video = synthetic_corpus["a_h264.mp4"]
    for argv, message in [
        (["--model", classifier_dir, "--video", video], "--model: .* without the pretraining decoder"),
        (["--model", pretraining_dir, "--video", video, "--clip", "2", *SAMPLING], r"--clip: .* has 2 clip\(s\)"),
        (["--model", pretraining_dir, "--video", str(tmp_path / "missing.mp4")], "--video: .* does not exist"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["show", *argv, "--output", str(tmp_path / "x.png")])
        assert exc.value.code == 2
        assert re.search(message, capsys.readouterr().err), argv
    assert not (tmp_path / "x.png").exists()


def test_every_pixel_and_mask_option_reaches_the_config():
    """show must decode and mask exactly as the job with the same flags did (its loss is the table's)."""
    from vmae_ray.show import build_parser, show_config

    args = vars(build_parser().parse_args(["--model", "m", "--video", "v.mp4", "--geometry", "stored",
                                           "--interpolation", "AREA", "--sampling", "stride", "--frame-stride", "2",
                                           "--mask-ratio", "0.75", "--mask-seed", "3"]))
    args.pop("clip", None)
    config = show_config(args)
    assert (config.geometry, config.interpolation, config.sampling, config.frame_stride) == ("stored", "AREA", "stride", 2)
    assert (config.mask_ratio, config.mask_seed, config.reconstruction) == (0.75, 3, True)


def test_rows_are_labelled_with_the_video_frame_numbers():
    """A stride clip's frames 1, 5, 9, 13 (tubelet 2): rows say "frames 1, 5" and "frames 9, 13",
    the numbers in the video (the clip row's frame_indices), not positions in the clip."""
    from vmae_ray.show import draw

    clip = np.zeros((4, 32, 32, 3), np.uint8)
    mask = np.zeros(2 * 4 * 4, bool)
    kwargs = dict(tubelet_size=2, patch_size=8, rescale_factor=1 / 255, title="t")
    fig, _ = draw(clip, mask, np.zeros((4, 32, 32, 3)), frame_indices=[1, 5, 9, 13], **kwargs)
    labels = [t.get_text() for t in fig.texts if t.get_text().startswith(("frames", "clip frames"))]
    assert labels == ["frames 1, 5", "frames 9, 13"]
    fig, _ = draw(clip, mask, np.zeros((4, 32, 32, 3)), **kwargs)
    assert [t.get_text() for t in fig.texts if "frames" in t.get_text()] == ["clip frames 0-1", "clip frames 2-3"]


def test_every_label_and_the_title_fit_inside_the_picture():
    """Text extents as matplotlib's Agg renderer draws them: row labels (video frame numbers of
    up to 6 digits) lie whole between the picture's left edge and the first panel, the column
    headers and the title inside the picture, for a tiny model input and a VideoMAE-B one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from vmae_ray.show import draw

    title = ("some_rather_long_video_file_name_from_a_downloader [abc123].mp4  clip 12 (1234.50-1236.10 s)  "
             "reconstruction loss 1.0218\n176 of 196 tokens masked (ratio 0.9, seed 0, drawn from the clip's pixels); "
             "loss: MSE on per-patch normalised pixels")
    for frames, size, patch, first in ((4, 32, 8, 123456), (16, 224, 16, 99990)):
        clip = np.zeros((frames, size, size, 3), np.uint8)
        mask = np.zeros((frames // 2) * (size // patch) ** 2, bool)
        indices = list(range(first, first + 4 * frames, 4))
        fig, layout = draw(clip, mask, np.zeros(clip.shape), tubelet_size=2, patch_size=patch, rescale_factor=1 / 255,
                           title=title, frame_indices=indices)
        renderer = FigureCanvasAgg(fig).get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        assert (round(width), round(height)) == layout.size
        labels = [t for t in fig.texts if t.get_text().startswith("frames ")]
        assert len(labels) == frames // 2 and labels[-1].get_text() == f"frames {indices[-2]}, {indices[-1]}"
        first_panel = layout.panel_box(0, 0)[1]
        for text in fig.texts:
            box = text.get_window_extent(renderer)
            assert box.x0 >= 0 and box.x1 <= width and box.y0 >= 0 and box.y1 <= height, (text.get_text(), box, width)
        for text in labels:
            assert text.get_window_extent(renderer).x1 <= first_panel, (text.get_text(), first_panel)
