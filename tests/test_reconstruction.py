"""Reconstruction scores (`embed --reconstruction`): masks, parity with transformers, the loading
guard on the decoder, what the score means, and the job end to end (with the licence on record).

References: transformers' own `VideoMAEForPreTraining(pixel_values, bool_masked_pos).loss`, fed
by `VideoMAEImageProcessorPil` from the checkpoint's own preprocessor file; numpy's packbits
for the stored masks. Checkpoints are tiny VideoMAEs from `make_tiny_checkpoint` (8 frames of
64x64, patch 16: 4 time slots of 16 tokens; ImageNet mean/std), one of them trained for a few
hundred steps by `train_tiny_pretraining`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.conftest import copy_checkpoint, decoded_clip, edit_json
from tests.test_pipeline import read_table, run_job, success
from vmae_ray.assembly import OutputSchemas, assemble
from vmae_ray.cli import config_from_args, main
from vmae_ray.embedder import ModelLoadError, VideoMAEEmbedder
from vmae_ray.reconstruction import clip_mask, masked_per_frame, pack_mask, unpack_mask
from vmae_ray.schema import RESERVED_COLUMNS, clips_schema, embedded_schema, errors_schema, videos_schema
from vmae_ray.synthetic import (
    TEXTURE_CLIP_KINDS,
    TRAINED_PRETRAINING,
    make_tiny_checkpoint,
    texture_clip,
    train_tiny_pretraining,
)

NC_MODEL_CARD = "---\nlicense: cc-by-nc-4.0\ntags:\n- video\n---\n# VideoMAE (tiny test copy)\n"


def masks_for(spec, clips: np.ndarray, *, mask_ratio=0.9, mask_seed=0) -> np.ndarray:
    """The job's masks for these uint8 clips (B, T, H, W, 3)."""
    return np.stack([clip_mask(clip, mask_seed=mask_seed, mask_ratio=mask_ratio,
                               num_time_slots=spec.num_time_slots, tokens_per_frame=spec.tokens_per_frame)
                     for clip in clips])


def hf_losses(model_dir: str, clips: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """transformers' loss for each clip alone: pixel_values from the HF image processor (clips are
    already at the model's size, so no resize/crop), the model from the same directory."""
    from transformers import VideoMAEForPreTraining, VideoMAEImageProcessorPil

    processor = VideoMAEImageProcessorPil.from_pretrained(model_dir)
    pixel_values = torch.from_numpy(processor([list(c) for c in clips], do_resize=False, do_center_crop=False,
                                              return_tensors="np")["pixel_values"])
    model = VideoMAEForPreTraining.from_pretrained(model_dir, use_safetensors=True).eval()
    with torch.no_grad():
        return np.array([model(pixel_values[i:i + 1], bool_masked_pos=torch.from_numpy(masks[i:i + 1])).loss.item()
                         for i in range(len(clips))])


def parity_clips(spec, seed: int = 0) -> np.ndarray:
    """Noise, a smooth drifting texture, a clip with a flat letterbox bar, and a blank clip."""
    rng = np.random.default_rng(seed)
    t, h, w, _ = spec.clip_shape
    noise = rng.integers(0, 256, spec.clip_shape, dtype=np.uint8)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.stack([128 + 100 * np.sin((x + 3 * k) / 7.0 + c) * np.cos(y / 11.0) for c in range(3)], -1)
                       for k in range(t)]).astype(np.uint8)
    bar = noise.copy()
    bar[:, : spec.patch_size] = 16
    blank = np.full(spec.clip_shape, 77, dtype=np.uint8)
    return np.stack([noise, smooth, bar, blank])


# --------------------------------------------------------------------------------------
# Masks (no torch)


def test_tube_masks_are_drawn_from_the_pixels_reproducible_distinct_and_packed():
    import hashlib

    kw = dict(mask_seed=0, mask_ratio=0.9, num_time_slots=8, tokens_per_frame=196)  # VideoMAE-B geometry
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
    mask = clip_mask(clip, **kw)
    assert mask.dtype == bool and mask.shape == (1568,)
    slots = mask.reshape(8, 196)
    assert (slots == slots[0]).all(), "tube masking: the same spatial mask in every time slot"
    assert slots[0].sum() == int(0.9 * 196) == 176
    # The same pixels (another array: a copy read from another path) draw the same mask.
    assert (clip_mask(clip.copy(), **kw) == mask).all()
    # Other pixels (one frame changed), another seed: other masks.
    changed = clip.copy()
    changed[5] = rng.integers(0, 256, changed[5].shape, dtype=np.uint8)
    others = [clip_mask(changed, **kw), clip_mask(clip, **{**kw, "mask_seed": 1})]
    assert all((other != mask).any() for other in others)
    # Written out from the documented recipe: blake2b-128 of the shape (4 little-endian uint32)
    # and every 257th byte, as uint32 words after the seed in a SeedSequence.
    digest = hashlib.blake2b(np.array(clip.shape, "<u4").tobytes() + clip.tobytes()[::257], digest_size=16).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    order = np.random.default_rng(np.random.SeedSequence([0, *words])).permutation(196)
    assert sorted(np.flatnonzero(slots[0]).tolist()) == sorted(order[:176].tolist())
    packed = pack_mask(mask)
    assert packed == np.packbits(mask).tobytes() and len(packed) == 196
    assert (np.unpackbits(np.frombuffer(packed, np.uint8))[:1568].astype(bool) == mask).all()
    assert (unpack_mask(packed, 1568) == mask).all()


def test_mask_ratio_must_leave_tokens_on_both_sides():
    assert masked_per_frame(16, 0.9) == 14 and masked_per_frame(196, 0.75) == 147
    for ratio in (0.0, 1.0, 0.05):  # 0.05 * 16 masks none
        with pytest.raises(ValueError):
            masked_per_frame(16, ratio)


# --------------------------------------------------------------------------------------
# Parity with transformers


@pytest.fixture(scope="module")
def norm_pix_off_dir(pretraining_dir, tmp_path_factory) -> str:
    copy = copy_checkpoint(pretraining_dir, tmp_path_factory.mktemp("nopix"))
    edit_json(copy / "config.json", norm_pix_loss=False)
    return str(copy)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_matches_transformers_pretraining_loss(pretraining_dir, norm_pix_off_dir, norm_pix_loss):
    """Stated tolerance: 1e-4 relative in float32 on CPU (measured: equal to float32 rounding)."""
    model_dir = pretraining_dir if norm_pix_loss else norm_pix_off_dir
    scorer = VideoMAEEmbedder(model_dir, device="cpu", reconstruction=True)
    spec = scorer.spec
    assert spec.norm_pix_loss is norm_pix_loss and scorer.reconstruction.norm_pix_loss is norm_pix_loss
    clips = parity_clips(spec)
    masks = masks_for(spec, clips)
    embeddings, logits, losses = scorer.embed_with_reconstruction(clips, masks)
    assert losses.dtype == np.float32 and logits is None
    expected = hf_losses(model_dir, clips, masks)
    np.testing.assert_allclose(losses, expected, rtol=1e-4)
    # The embedding is the one the plain embedder gives: reconstruction adds, never changes.
    plain, _ = VideoMAEEmbedder(model_dir, device="cpu").embed(clips)
    np.testing.assert_array_equal(embeddings, plain)


def test_loss_in_bfloat16_is_within_stated_tolerance(pretraining_dir):
    """bf16 (the GPU default) against float32, on CPU: within 1e-2 relative (measured: under 4e-4
    on the tiny checkpoints, the noisy clip included)."""
    reference = VideoMAEEmbedder(pretraining_dir, device="cpu", reconstruction=True)
    half = VideoMAEEmbedder(pretraining_dir, device="cpu", dtype="bfloat16", reconstruction=True)
    clips = parity_clips(reference.spec, seed=1)
    masks = masks_for(reference.spec, clips)
    np.testing.assert_allclose(half.embed_with_reconstruction(clips, masks)[2],
                               reference.embed_with_reconstruction(clips, masks)[2], rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loss_matches_transformers(pretraining_dir):
    """On a GPU in its default dtype (bf16, else fp16): within 1e-2 relative of transformers in float32."""
    gpu = VideoMAEEmbedder(pretraining_dir, reconstruction=True)
    assert gpu.device.type == "cuda" and gpu.dtype in (torch.bfloat16, torch.float16)
    clips = parity_clips(gpu.spec, seed=2)
    masks = masks_for(gpu.spec, clips)
    np.testing.assert_allclose(gpu.embed_with_reconstruction(clips, masks)[2], hf_losses(pretraining_dir, clips, masks),
                               rtol=1e-2)


# --------------------------------------------------------------------------------------
# The loading guard covers the decoder


def _edit_weights(model_dir, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("key", ["decoder.head.weight", "decoder.decoder_layers.0.attention.attention.q_bias",
                                 "encoder_to_decoder.weight", "mask_token"])
def test_missing_decoder_weight_fails_only_with_reconstruction(pretraining_dir, tmp_path, key):
    copy = copy_checkpoint(pretraining_dir, tmp_path)
    _edit_weights(copy, lambda t: t.pop(key))
    VideoMAEEmbedder(str(copy), device="cpu")  # embeddings alone never read the decoder
    with pytest.raises(ModelLoadError, match=r"missing"):
        VideoMAEEmbedder(str(copy), device="cpu", reconstruction=True)


def test_unexpected_key_fails_with_reconstruction(pretraining_dir, tmp_path):
    copy = copy_checkpoint(pretraining_dir, tmp_path)
    _edit_weights(copy, lambda t: t.__setitem__("decoder.extra.weight", torch.zeros(2)))
    with pytest.raises(ModelLoadError, match=r"unexpected keys.*decoder\.extra\.weight"):
        VideoMAEEmbedder(str(copy), device="cpu", reconstruction=True)


def test_checkpoint_without_decoder_is_refused(classifier_dir):
    with pytest.raises(ValueError, match="without the pretraining decoder"):
        VideoMAEEmbedder(classifier_dir, device="cpu", reconstruction=True)


# --------------------------------------------------------------------------------------
# What the score means: a checkpoint whose decoder learned something


@pytest.fixture(scope="module")
def trained_pretraining(tmp_path_factory) -> str:
    return train_tiny_pretraining(tmp_path_factory.mktemp("trained") / "ckpt", steps=800, seed=0)


def _scores_by_kind(model_dir: str) -> dict[str, np.ndarray]:
    scorer = VideoMAEEmbedder(model_dir, device="cpu", reconstruction=True)
    spec = scorer.spec
    rng = np.random.default_rng(1234)  # other clips than the training ones
    out = {}
    for kind in TEXTURE_CLIP_KINDS:
        clips = np.stack([texture_clip(kind, rng, num_frames=spec.num_frames, size=spec.crop_height,
                                       period=spec.patch_size) for _ in range(16)])
        out[kind] = scorer.embed_with_reconstruction(clips, masks_for(spec, clips))[2]
    return out


def test_score_orders_blank_texture_glitch_noise(trained_pretraining, tmp_path):
    """After 800 steps of pretraining on drifting textures (10-20 s on one core), the paper's 90%
    tube masking scores blank < drifting texture < glitched < noise (means of 16 unseen clips
    each); the same architecture untrained scores drifting texture and noise alike."""
    trained = {kind: float(v.mean()) for kind, v in _scores_by_kind(trained_pretraining).items()}
    assert trained["blank"] < 0.1 * trained["drifting"]
    assert trained["drifting"] < 0.9  # learned: an uninformed decoder scores about 1 on normalised targets
    assert trained["drifting"] + 0.1 < trained["glitched"] < trained["noise"]
    assert trained["still"] < trained["glitched"]
    untrained_dir = make_tiny_checkpoint(tmp_path / "untrained", pretraining_layout=True, seed=0, **TRAINED_PRETRAINING)
    untrained = {kind: float(v.mean()) for kind, v in _scores_by_kind(untrained_dir).items()}
    assert (trained["noise"] - trained["drifting"]) > 2 * abs(untrained["noise"] - untrained["drifting"])


# --------------------------------------------------------------------------------------
# Rows, schema, settings (no Ray)


def test_columns_exist_only_with_reconstruction():
    assert {"reconstruction_loss", "reconstruction_mask"} <= RESERVED_COLUMNS
    on, off = clips_schema(8, with_labels=False, with_reconstruction=True), clips_schema(8, with_labels=False)
    assert on.field("reconstruction_loss").type == pa.float32() and on.field("reconstruction_mask").type == pa.binary()
    assert "reconstruction_loss" not in off.names and "reconstruction_mask" not in off.names
    videos = videos_schema(8, with_labels=False, with_reconstruction=True)
    assert videos.field("reconstruction_loss").type == pa.float32() and "reconstruction_mask" not in videos.names


def test_video_loss_is_the_mean_of_its_clips():
    schema = embedded_schema(2, with_logits=False, with_reconstruction=True)
    rows = [{"input_number": 0, "video_id": "v", "uri": "/v.mp4", "clip_index": i, "num_clips": 3,
             "embedding": [0.0, 1.0], "reconstruction_loss": loss, "reconstruction_mask": bytes([i])}
            for i, loss in enumerate([0.5, 0.25, 1.0])]
    schemas = OutputSchemas(clips_schema(2, with_labels=False, with_reconstruction=True),
                            videos_schema(2, with_labels=False, with_reconstruction=True), errors_schema())
    clips, videos = assemble(pa.Table.from_pylist(rows, schema=schema), schemas=schemas,
                             common={"run_id": "r", "settings_fingerprint": "s"}, labeler=None, with_reconstruction=True)
    assert clips.column("reconstruction_mask").to_pylist() == [b"\x00", b"\x01", b"\x02"]
    assert videos.column("reconstruction_loss").to_pylist()[0] == pytest.approx((0.5 + 0.25 + 1.0) / 3)


def test_settings_fingerprint_separates_reconstruction_runs(tiny_pretraining):
    from vmae_ray.checkpoint import load_model_spec
    from vmae_ray.planning import settings_fingerprint

    spec = load_model_spec(tiny_pretraining)

    def fingerprint(*flags):
        return settings_fingerprint(config_from_args(["--input", "i", "--output", "o", *flags]), spec, 8, False)

    off, on = fingerprint(), fingerprint("--reconstruction")
    assert len({off, on, fingerprint("--reconstruction", "--mask-ratio", "0.75"),
                fingerprint("--reconstruction", "--mask-seed", "1")}) == 4
    assert on == fingerprint("--reconstruction", "--mask-ratio", "0.9", "--mask-seed", "0")


def test_flags_are_refused_before_ray(tiny_classifier, tiny_pretraining, tmp_path, capsys):
    """Exit status 2 naming the flag, from the checks `pipeline.run` makes before it starts Ray."""
    base = ["embed", "--input", str(tmp_path), "--output", str(tmp_path / "out")]
    cases = [
        ([*base, "--model", tiny_classifier, "--reconstruction"], "--reconstruction: .* without the pretraining decoder"),
        ([*base, "--model", tiny_pretraining, "--reconstruction", "--mask-ratio", "1.5"], "--mask-ratio"),
        ([*base, "--model", tiny_pretraining, "--reconstruction", "--mask-ratio", "0.2"], "--mask-ratio: .* masks 0 of the 4"),
        ([*base, "--model", tiny_pretraining, "--mask-seed", "3"], "--mask-seed: has no effect without --reconstruction"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert re.search(message, capsys.readouterr().err), argv


def test_licence_lines(tiny_pretraining):
    from vmae_ray.checkpoint import load_model_spec
    from vmae_ray.planning import licence_lines

    spec = load_model_spec(tiny_pretraining)
    assert spec.license is None and licence_lines(spec) == (None, None)
    line, warning = licence_lines(dataclasses.replace(spec, license="apache-2.0"))
    assert line == "model licence: apache-2.0 (from the checkpoint's model card)" and warning is None
    line, warning = licence_lines(dataclasses.replace(spec, license="cc-by-nc-4.0"))
    assert "cc-by-nc-4.0" in line and "non-commercial" in warning


# --------------------------------------------------------------------------------------
# End to end through Ray, with a model card on the checkpoint


@pytest.fixture(scope="module")
def reconstruction_run(ray_session, tiny_pretraining, synthetic_corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("recon")
    model = work / "model"
    shutil.copytree(tiny_pretraining, model)
    (model / "README.md").write_text(NC_MODEL_CARD)
    folder = work / "videos"
    folder.mkdir()
    for name in ("a_h264.mp4", "d_vfr.mkv"):
        shutil.copy(synthetic_corpus[name], folder / name)
    # A byte-identical copy at another path (another video_id): its scores must be the same.
    (folder / "elsewhere").mkdir()
    shutil.copy(synthetic_corpus["a_h264.mp4"], folder / "elsewhere" / "a_h264.mp4")
    out = str(work / "out")
    args = ["--input", str(folder), "--output", out, "--model", str(model), "--sampling", "stride",
            "--clips-per-video", "2", "--frame-stride", "2", "--reconstruction", "--mask-seed", "7"]
    return {"out": out, "model": str(model), "args": args, "summary": run_job(*args)}


def test_job_rows_recompute_with_plain_transformers(reconstruction_run):
    from vmae_ray.checkpoint import load_model_spec

    out, model = reconstruction_run["out"], reconstruction_run["model"]
    clips, videos = read_table(out, "clips"), read_table(out, "videos")
    assert clips.schema.field("reconstruction_loss").type == pa.float32()
    assert clips.schema.field("reconstruction_mask").type == pa.binary()
    assert videos.schema.field("reconstruction_loss").type == pa.float32()
    assert clips.num_rows == 6 and videos.num_rows == 3
    spec = load_model_spec(model)
    rows = clips.to_pylist()
    for r in rows:  # each stored mask is the one drawn from the clip's pixels with --mask-seed 7
        mask = unpack_mask(r["reconstruction_mask"], spec.num_tokens)
        clip = decoded_clip(reconstruction_run["args"], r["uri"], r["clip_index"])
        assert (mask == masks_for(spec, clip[None], mask_seed=7)[0]).all()
        assert mask.reshape(spec.num_time_slots, -1).sum(1).tolist() == [int(0.9 * spec.tokens_per_frame)] * 4
    # Recompute one stored row from its stored mask with plain transformers, on the clip decoded
    # again the way the job decodes it.
    row = rows[-1]
    clip = decoded_clip(reconstruction_run["args"], row["uri"], row["clip_index"])
    mask = unpack_mask(row["reconstruction_mask"], spec.num_tokens)
    assert row["reconstruction_loss"] == pytest.approx(hf_losses(model, clip[None], mask[None])[0], rel=1e-4)
    for video in videos.to_pylist():
        mine = [r["reconstruction_loss"] for r in rows if r["video_id"] == video["video_id"]]
        assert video["reconstruction_loss"] == pytest.approx(np.mean(mine), rel=1e-6)


def test_identical_copies_at_two_paths_score_the_same(reconstruction_run, capsys):
    """The same bytes at two paths (two video_ids): the same masks and losses, clip by clip, in the
    job's tables, and `show` on either path prints the loss the tables hold."""
    clips = read_table(reconstruction_run["out"], "clips").to_pylist()
    original = [r for r in clips if r["uri"].endswith("/videos/a_h264.mp4")]
    copy = [r for r in clips if r["uri"].endswith("/videos/elsewhere/a_h264.mp4")]
    assert len(original) == len(copy) == 2 and original[0]["video_id"] != copy[0]["video_id"]
    by_index = {r["clip_index"]: r for r in copy}
    for row in original:
        twin = by_index[row["clip_index"]]
        assert twin["reconstruction_mask"] == row["reconstruction_mask"]
        assert twin["reconstruction_loss"] == row["reconstruction_loss"]
    sampling = ["--sampling", "stride", "--clips-per-video", "2", "--frame-stride", "2", "--mask-seed", "7"]  # the run's
    for row in (original[1], copy[1]):
        assert main(["show", "--model", reconstruction_run["model"], "--video", row["uri"], "--clip", "1",
                     "--output", os.path.join(os.path.dirname(reconstruction_run["out"]), "show.png"), *sampling]) == 0
        printed = float(re.search(r"reconstruction loss ([0-9.]+)", capsys.readouterr().out).group(1))
        assert printed == pytest.approx(original[1]["reconstruction_loss"], abs=1e-6)


def test_licence_on_record_and_in_summary(reconstruction_run, capsys, caplog):
    manifest = success(reconstruction_run["out"])
    assert manifest["model"]["license"] == "cc-by-nc-4.0" and manifest["model"]["non_commercial"] is True
    assert manifest["model"]["reconstruction"] == {"mask_ratio": 0.9, "mask_seed": 7, "norm_pix_loss": True}
    assert manifest["config"]["reconstruction"] is True
    # A rerun has nothing to do but still reports the licence and warns.
    summary = run_job(*reconstruction_run["args"])
    assert summary.inputs_skipped == 3
    captured = capsys.readouterr()
    assert "model licence: cc-by-nc-4.0 (from the checkpoint's model card)" in captured.out
    assert "  WARNING: " in captured.out and "a non-commercial licence" in captured.out
    assert any(r.levelname == "WARNING" and "non-commercial licence" in r.getMessage() for r in caplog.records)
