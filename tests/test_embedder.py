"""Tests for vmae_ray.embedder: normalization parity, embeddings, loading guard.

Checkpoints are tiny random VideoMAEs written by `make_tiny_checkpoint` (recipe in its
docstring): 8 frames of 64x64, preprocessing "resize short side to 72, center-crop 64,
ImageNet mean/std", so nothing here passes with hard-coded library defaults.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import copy_checkpoint, edit_json
from vmae_ray.embedder import FoldedPatchEmbedding, ModelLoadError, VideoMAEEmbedder
from vmae_ray.labels import top_k_labels
from vmae_ray.synthetic import make_tiny_checkpoint


@pytest.fixture(scope="module")
def classifier_embedder(classifier_dir) -> VideoMAEEmbedder:
    return VideoMAEEmbedder(classifier_dir, device="cpu")


@pytest.fixture(scope="module")
def pretraining_embedder(pretraining_dir) -> VideoMAEEmbedder:
    return VideoMAEEmbedder(pretraining_dir, device="cpu")


def _random_clips(spec, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, *spec.clip_shape), dtype=np.uint8)


def _hf_processor(model_dir: str):
    # The PIL backend needs only Pillow; loaded from the checkpoint's own preprocessor file.
    from transformers import VideoMAEImageProcessorPil

    return VideoMAEImageProcessorPil.from_pretrained(model_dir)


def _hf_pixel_values(model_dir: str, clips: np.ndarray) -> torch.Tensor:
    """transformers' pixel values for already-cropped clips (no resize, no crop): (B, T, C, H, W)."""
    out = _hf_processor(model_dir)([list(c) for c in clips], do_resize=False, do_center_crop=False,
                                   return_tensors="np")["pixel_values"]
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------
# Normalization parity with transformers' image processor


def test_pixel_values_match_hf_processor_without_resize(classifier_dir, classifier_embedder):
    spec = classifier_embedder.spec
    clips = _random_clips(spec, batch=2)
    expected = _hf_pixel_values(classifier_dir, clips).numpy()
    ours = classifier_embedder.pixel_values(clips)
    assert ours.shape == (2, 8, 3, 64, 64)  # VideoMAE's (B, T, C, H, W)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5, rtol=0)


def _smooth_frames(rng, count: int, height: int, width: int) -> np.ndarray:
    # Smooth content (upsampled coarse noise) like real video; pure noise is the worst case
    # for any resizer and says little about real footage.
    from PIL import Image

    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)))
    return np.stack(out)


def _resize_and_crop(frame: np.ndarray, spec, resizer) -> np.ndarray:
    """The ModelSpec contract: short side -> resize_shortest_edge, long side int(), center crop."""
    height, width = frame.shape[:2]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(spec.resize_shortest_edge * long / short)
    new_w, new_h = (spec.resize_shortest_edge, new_long) if width <= height else (new_long, spec.resize_shortest_edge)
    resized = resizer(frame, new_w, new_h)
    top, left = (new_h - spec.crop_height) // 2, (new_w - spec.crop_width) // 2
    return resized[top : top + spec.crop_height, left : left + spec.crop_width]


def test_spec_contract_with_pil_resize_matches_hf_processor(classifier_dir, classifier_embedder):
    """Resizing by the ModelSpec contract with PIL reproduces the processor's full pipeline."""
    from PIL import Image

    spec = classifier_embedder.spec
    rng = np.random.default_rng(1)
    video = _smooth_frames(rng, spec.num_frames, 90, 160)  # 16:9, resized to 72x128 then cropped

    def pil(frame, w, h):
        return np.asarray(Image.fromarray(frame).resize((w, h), resample=spec.resample))

    clip = np.stack([_resize_and_crop(f, spec, pil) for f in video])[None]
    expected = _hf_processor(classifier_dir)([list(video)], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(classifier_embedder.pixel_values(clip).numpy(), expected, atol=1e-5, rtol=0)


def test_swscale_resize_tolerance_against_hf_processor(classifier_dir, classifier_embedder):
    """libswscale (the decode stage's resizer) vs the PIL processor: stated tolerance.

    Measured on smooth 90x160 and 360x640 frames resized to a short side of 72 (bilinear):
    at most 1 and 4 uint8 levels, mean under 0.5 level. The bound below is 5 levels max and a
    mean of 1 level, in normalized units (level / 255 / std).
    """
    av = pytest.importorskip("av")
    spec = classifier_embedder.spec
    processor = _hf_processor(classifier_dir)
    rng = np.random.default_rng(2)

    def swscale(frame, w, h):
        return av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
            width=w, height=h, format="rgb24", interpolation="BILINEAR"
        ).to_ndarray()

    level = 1 / 255 / min(spec.image_std)  # one uint8 level in normalized units, worst channel
    for height, width in [(90, 160), (360, 640)]:
        video = _smooth_frames(rng, spec.num_frames, height, width)
        clip = np.stack([_resize_and_crop(f, spec, swscale) for f in video])[None]
        expected = processor([list(video)], return_tensors="np")["pixel_values"]
        diff = np.abs(classifier_embedder.pixel_values(clip).numpy() - expected)
        print(f"swscale vs PIL {height}x{width}: max {diff.max() / level:.2f} levels, mean {diff.mean() / level:.3f}")
        assert diff.max() <= 5 * level
        assert diff.mean() <= 1 * level


# --------------------------------------------------------------------------------------
# Embeddings equal a direct transformers call


def test_classifier_embed_matches_transformers(classifier_dir, classifier_embedder):
    from transformers import VideoMAEForVideoClassification

    clips = _random_clips(classifier_embedder.spec, batch=3, seed=3)
    pixel_values = _hf_pixel_values(classifier_dir, clips)
    reference = VideoMAEForVideoClassification.from_pretrained(classifier_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected_logits = reference(pixel_values=pixel_values).logits.numpy()
        hidden = reference.videomae(pixel_values=pixel_values).last_hidden_state
        expected_embedding = reference.fc_norm(hidden.mean(1)).numpy()

    embeddings, logits = classifier_embedder.embed(clips)
    assert embeddings.dtype == np.float32 and logits.dtype == np.float32
    assert embeddings.shape == (3, 64) and logits.shape == (3, 5)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(embeddings, expected_embedding, atol=1e-4, rtol=0)


def test_pretraining_embed_matches_transformers(pretraining_dir, pretraining_embedder):
    from transformers import VideoMAEModel

    clips = _random_clips(pretraining_embedder.spec, batch=2, seed=4)
    pixel_values = _hf_pixel_values(pretraining_dir, clips)
    reference = VideoMAEModel.from_pretrained(pretraining_dir, attn_implementation="eager").eval()
    assert reference.layernorm is not None  # use_mean_pooling=false: the final encoder norm is used
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values).last_hidden_state.mean(1).numpy()
    embeddings, logits = pretraining_embedder.embed(clips)
    assert logits is None
    np.testing.assert_allclose(embeddings, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preprocessing", [
    {},
    {"do_normalize": False},
    {"do_rescale": False},
    {"image_mean": [0.1, 0.9, 0.5], "image_std": [0.05, 2.0, 0.7]},
])
def test_folded_patch_embedding_equals_model_embeddings(classifier_dir, tmp_path, preprocessing):
    """embed() never builds the normalised tensor: its folded patch embedding must equal the
    model's own embeddings module applied to the processor's output, whatever the
    checkpoint's rescale/mean/std (including normalisation or rescaling switched off)."""

    model_dir = copy_checkpoint(classifier_dir, tmp_path)
    edit_json(model_dir / "preprocessor_config.json", **preprocessing)
    embedder = VideoMAEEmbedder(str(model_dir), device="cpu")
    clips = _random_clips(embedder.spec, batch=2, seed=11)
    processed = _hf_pixel_values(str(model_dir), clips)
    np.testing.assert_allclose(embedder.pixel_values(clips).numpy(), processed.numpy(), atol=1e-4, rtol=1e-6)
    owner = embedder.model.videomae
    with torch.no_grad():
        expected = owner.embeddings(processed, None)
    folded = FoldedPatchEmbedding(owner, embedder.spec, torch.device("cpu"), torch.float32)
    got = folded(torch.from_numpy(clips))
    assert got.shape == expected.shape == (2, embedder.spec.num_frames // 2 * 16, 64)
    scale = expected.abs().max().item()
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=2e-5 * max(scale, 1.0), rtol=0)


def test_embed_accepts_read_only_arrays_and_checks_shape(classifier_embedder):
    clips = _random_clips(classifier_embedder.spec, batch=1)
    clips.setflags(write=False)  # as Ray hands them out from the object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embeddings, _ = classifier_embedder.embed(clips)
    assert embeddings.shape == (1, 64)
    with pytest.raises(ValueError, match="shape"):
        classifier_embedder.embed(np.zeros((1, 4, 64, 64, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        classifier_embedder.embed(np.zeros((1, 8, 64, 64, 3), np.float32))


def test_bfloat16_close_to_float32(classifier_dir, classifier_embedder):
    clips = _random_clips(classifier_embedder.spec, batch=2, seed=5)
    bf16 = VideoMAEEmbedder(classifier_dir, device="cpu", dtype="bfloat16")
    assert bf16.pixel_values(clips).dtype == torch.bfloat16
    reference, _ = classifier_embedder.embed(clips)
    embeddings, logits = bf16.embed(clips)
    assert embeddings.dtype == np.float32 and logits.dtype == np.float32
    cosine = (embeddings * reference).sum(1) / np.linalg.norm(embeddings, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.99


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_folded_half_precision_no_worse_than_unfolded(classifier_dir, classifier_embedder, dtype):
    """In bf16/fp16 the folded patch embedding (exact uint8 input; fp16 GEMM in float32) is at
    least as close to the float32 embedding as feeding the model the normalised clip."""
    clips = _random_clips(classifier_embedder.spec, batch=2, seed=12)
    reference, _ = classifier_embedder.embed(clips)
    half = VideoMAEEmbedder(classifier_dir, device="cpu", dtype=dtype)
    folded, _ = half.embed(clips)
    with torch.inference_mode():
        hidden = half.model.videomae(pixel_values=half.pixel_values(clips)).last_hidden_state.float().mean(1)
        fc = half.model.fc_norm
        unfolded = torch.nn.functional.layer_norm(hidden, fc.normalized_shape, fc.weight.float(), fc.bias.float(),
                                                  fc.eps).numpy()
    err_folded = np.abs(folded - reference).max()
    err_unfolded = np.abs(unfolded - reference).max()
    assert err_folded <= 1.25 * err_unfolded, (err_folded, err_unfolded)


def test_bad_dtype_is_rejected(classifier_dir):
    with pytest.raises(ValueError, match="allowed: auto, float32, bfloat16, float16"):
        VideoMAEEmbedder(classifier_dir, device="cpu", dtype="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_dtype_matches_cpu(classifier_dir, classifier_embedder):
    clips = _random_clips(classifier_embedder.spec, batch=4, seed=6)
    gpu = VideoMAEEmbedder(classifier_dir)
    assert gpu.device.type == "cuda" and gpu.dtype in (torch.bfloat16, torch.float16)
    reference, _ = classifier_embedder.embed(clips)
    embeddings, _ = gpu.embed(clips)
    cosine = (embeddings * reference).sum(1) / np.linalg.norm(embeddings, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.99


# --------------------------------------------------------------------------------------
# Weight-loading guard


def _rewrite_weights(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_encoder_weight_fails(classifier_dir, tmp_path):
    copy = copy_checkpoint(classifier_dir, tmp_path)
    key = "videomae.encoder.layer.1.output.dense.weight"
    _rewrite_weights(copy, lambda t: t.pop(key))
    with pytest.raises(ModelLoadError, match=r"missing.*videomae\.encoder\.layer\.1\.output\.dense\.weight"):
        VideoMAEEmbedder(str(copy), device="cpu")


def test_missing_q_bias_fails(classifier_dir, tmp_path):
    copy = copy_checkpoint(classifier_dir, tmp_path)
    _rewrite_weights(copy, lambda t: t.pop("videomae.encoder.layer.0.attention.attention.q_bias"))
    with pytest.raises(ModelLoadError, match=r"layer\.0\.attention\.attention\.query\.bias"):
        VideoMAEEmbedder(str(copy), device="cpu")


def test_missing_classifier_head_fails(classifier_dir, tmp_path):
    # Labels from a random head must never be emitted.
    copy = copy_checkpoint(classifier_dir, tmp_path)
    _rewrite_weights(copy, lambda t: (t.pop("classifier.weight"), t.pop("fc_norm.bias")))
    with pytest.raises(ModelLoadError, match=r"classifier\.weight.*fc_norm\.bias"):
        VideoMAEEmbedder(str(copy), device="cpu")


def test_mismatched_shape_fails(classifier_dir, tmp_path):
    copy = copy_checkpoint(classifier_dir, tmp_path)
    key = "videomae.encoder.layer.0.intermediate.dense.bias"
    _rewrite_weights(copy, lambda t: t.__setitem__(key, torch.zeros(7)))
    with pytest.raises(ModelLoadError, match=r"mismatch.*layer\.0\.intermediate\.dense\.bias"):
        VideoMAEEmbedder(str(copy), device="cpu")


def test_unexpected_key_fails_for_classifier(classifier_dir, tmp_path):
    copy = copy_checkpoint(classifier_dir, tmp_path)
    _rewrite_weights(copy, lambda t: t.__setitem__("decoder.head.weight", torch.zeros(3, 3)))
    with pytest.raises(ModelLoadError, match=r"unexpected.*decoder\.head\.weight"):
        VideoMAEEmbedder(str(copy), device="cpu")


def test_pretraining_layout_loads_with_decoder_keys(pretraining_dir, pretraining_embedder):
    with safe_open(str(Path(pretraining_dir) / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "mask_token" in keys and any(k.startswith("decoder.") for k in keys)
    assert pretraining_embedder.spec.id2label is None
    assert type(pretraining_embedder.model).__name__ == "VideoMAEModel"


@pytest.mark.parametrize("which", ["classifier", "pretraining"])
def test_qv_biases_equal_file_values(which, classifier_dir, pretraining_dir, classifier_embedder,
                                     pretraining_embedder):
    model_dir, embedder = ((classifier_dir, classifier_embedder) if which == "classifier"
                           else (pretraining_dir, pretraining_embedder))
    encoder = embedder.model.videomae.encoder if which == "classifier" else embedder.model.encoder
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        for i, layer in enumerate(encoder.layer):
            attention = layer.attention.attention
            for name, linear in (("q_bias", attention.query), ("v_bias", attention.value)):
                stored = f.get_tensor(f"videomae.encoder.layer.{i}.attention.attention.{name}")
                assert stored.abs().min() > 0  # the fixture makes them non-zero on purpose
                assert torch.equal(linear.bias, stored)


def test_zeroed_qv_bias_after_load_is_detected(classifier_dir, monkeypatch):
    """A transformers release that loads q/v biases as zeros, with a clean report, must fail."""
    from transformers import VideoMAEForVideoClassification

    original = VideoMAEForVideoClassification.from_pretrained.__func__

    def buggy_from_pretrained(cls, *args, **kwargs):
        model, info = original(cls, *args, **kwargs)
        with torch.no_grad():
            for layer in model.videomae.encoder.layer:
                layer.attention.attention.query.bias.zero_()
        return model, info

    monkeypatch.setattr(VideoMAEForVideoClassification, "from_pretrained", classmethod(buggy_from_pretrained))
    with pytest.raises(ModelLoadError, match="q_bias did not load"):
        VideoMAEEmbedder(classifier_dir, device="cpu")


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = load_file(make_tiny_checkpoint(tmp_path / "a", seed=7) + "/model.safetensors")
    b = load_file(make_tiny_checkpoint(tmp_path / "b", seed=7) + "/model.safetensors")
    c = load_file(make_tiny_checkpoint(tmp_path / "c", seed=8) + "/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_classifier_top_labels_come_from_checkpoint(classifier_embedder):
    clips = _random_clips(classifier_embedder.spec, batch=2, seed=9)
    _, logits = classifier_embedder.embed(clips)
    labels, scores = top_k_labels(logits, classifier_embedder.spec.id2label, k=3)
    assert all(label in classifier_embedder.spec.id2label.values() for row in labels for label in row)
    assert labels[0][0] == classifier_embedder.spec.id2label[int(np.argmax(logits[0]))]
    assert all(len(row) == 3 for row in scores)
