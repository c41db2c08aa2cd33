"""Tests for vmae_ray.checkpoint: locating a checkpoint and reading its spec, without torch.

Checkpoints are tiny random VideoMAEs written by `make_tiny_checkpoint` (recipe in its
docstring): 8 frames of 64x64, preprocessing "resize short side to 72, center-crop 64,
ImageNet mean/std", so nothing here passes with hard-coded library defaults.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import copy_checkpoint, edit_json
from vmae_ray.checkpoint import (
    CONFIG_DEFAULTS,
    PREPROCESSOR_DEFAULTS,
    is_non_commercial,
    load_model_spec,
    model_card_license,
    resolve_model_dir,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



def test_spec_reads_checkpoint_values(classifier_dir):
    spec = load_model_spec(classifier_dir)
    assert spec.model_ref == classifier_dir
    assert (spec.num_frames, spec.tubelet_size, spec.image_size, spec.hidden_size) == (8, 2, 64, 64)
    assert spec.resize_shortest_edge == 72  # not the class default 224
    assert (spec.crop_height, spec.crop_width) == (64, 64)
    assert spec.image_mean == IMAGENET_MEAN  # not the class default 0.5
    assert spec.image_std == IMAGENET_STD
    assert spec.rescale_factor == pytest.approx(1 / 255)
    assert spec.resample == 2
    assert spec.architecture == "VideoMAEForVideoClassification"
    assert spec.id2label == {i: f"label_{i}_{a}" for i, a in
                             enumerate(["juggling", "surfing", "cooking", "dancing", "archery"])}
    assert spec.clip_shape == (8, 64, 64, 3)
    assert len(spec.fingerprint) == 64


def test_spec_pretraining_layout_has_no_labels(pretraining_dir):
    spec = load_model_spec(pretraining_dir)
    assert spec.architecture == "VideoMAEForPreTraining"
    assert spec.id2label is None and not spec.has_labels


def test_fingerprint_changes_with_preprocessing(classifier_dir, tmp_path):
    copy = copy_checkpoint(classifier_dir, tmp_path)
    assert load_model_spec(str(copy)).fingerprint == load_model_spec(classifier_dir).fingerprint
    edit_json(copy / "preprocessor_config.json", image_mean=[0.45, 0.45, 0.45])
    spec = load_model_spec(str(copy))
    assert spec.image_mean == (0.45, 0.45, 0.45)
    assert spec.fingerprint != load_model_spec(classifier_dir).fingerprint


def test_spec_class_defaults_only_for_omitted_keys(classifier_dir, tmp_path):
    copy = copy_checkpoint(classifier_dir, tmp_path)
    edit_json(copy / "preprocessor_config.json", image_mean=None, image_std=None, resample=None)
    spec = load_model_spec(str(copy))
    assert spec.image_mean == (0.5, 0.5, 0.5) and spec.image_std == (0.5, 0.5, 0.5)
    assert spec.resample == 2


def test_spec_legacy_int_size_and_no_center_crop(classifier_dir, tmp_path):
    copy = copy_checkpoint(classifier_dir, tmp_path)
    edit_json(copy / "preprocessor_config.json", size=64, do_center_crop=False)
    spec = load_model_spec(str(copy))
    assert (spec.resize_shortest_edge, spec.crop_height, spec.crop_width) == (64, 64, 64)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: (d / "preprocessor_config.json").unlink(), "preprocessor_config.json"),
        (lambda d: edit_json(d / "config.json", model_type="vit"), "model_type='vit'"),
        (lambda d: edit_json(d / "preprocessor_config.json", size={"height": 64, "width": 64}), "shortest_edge"),
        (lambda d: edit_json(d / "preprocessor_config.json", crop_size={"height": 56, "width": 56}), "image_size"),
        (lambda d: edit_json(d / "preprocessor_config.json", do_resize=False), "do_resize"),
    ],
    ids=["no-config", "no-preprocessor", "not-videomae", "squash-resize", "crop-vs-image-size", "no-resize"],
)
def test_spec_errors(classifier_dir, tmp_path, edit, message):
    copy = copy_checkpoint(classifier_dir, tmp_path)
    edit(copy)
    with pytest.raises(ValueError, match=message):
        load_model_spec(str(copy))


def test_spec_refuses_missing_or_unreadable_weights(classifier_dir, tmp_path):
    # Pickled weights are read (tests/test_checkpoint_formats.py); a .bin that is not a
    # torch.save file, or only .bin files that are not weights by name, are refused.
    copy = copy_checkpoint(classifier_dir, tmp_path)
    for f in copy.glob("*.safetensors"):
        f.unlink()
    (copy / "training_args.bin").write_bytes(b"not weights")
    with pytest.raises(ValueError, match=r"no weights in .*\*\.safetensors, pytorch_model\.bin.*training_args\.bin"):
        load_model_spec(str(copy))
    (copy / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is not a PyTorch weights file"):
        load_model_spec(str(copy))


def test_resolve_model_dir_local_forms(classifier_dir):
    assert resolve_model_dir(classifier_dir) == classifier_dir
    assert resolve_model_dir("file://" + classifier_dir) == classifier_dir
    with pytest.raises(ValueError, match="no such local directory"):
        resolve_model_dir("./does/not/exist")
    with pytest.raises(ValueError, match="no such local directory"):
        resolve_model_dir("file:///does/not/exist")




def test_defaults_are_transformers_own():
    """The defaults for keys a file omits are transformers' (an independent reference)."""
    from transformers import VideoMAEConfig, VideoMAEImageProcessorPil

    config = VideoMAEConfig()
    for key, value in CONFIG_DEFAULTS.items():
        assert getattr(config, key) == value, key
    for key, value in PREPROCESSOR_DEFAULTS.items():
        expected = getattr(VideoMAEImageProcessorPil, key, None)
        if key == "rescale_factor":
            expected = VideoMAEImageProcessorPil().rescale_factor
        if isinstance(expected, (list, tuple)):
            expected = [float(v) for v in expected]
        assert expected == value, key


def test_reading_a_spec_imports_no_torch(classifier_dir):
    """The driver reads the spec before Ray starts; that must not import torch or transformers."""
    code = ("import sys; from vmae_ray.checkpoint import load_model_spec; "
            f"spec = load_model_spec({classifier_dir!r}); "
            "print(spec.hidden_size, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["64", "False", "False"]


def test_model_card_license(classifier_dir, tmp_path):
    copy = copy_checkpoint(classifier_dir, tmp_path)
    assert model_card_license(copy) is None
    (copy / "README.md").write_text("---\nlicense: cc-by-nc-4.0\ntags:\n- video\n---\n# VideoMAE\n")
    assert model_card_license(copy) == "cc-by-nc-4.0"
    assert load_model_spec(str(copy)).license == "cc-by-nc-4.0"
    (copy / "README.md").write_text("# no front matter\nlicense: mit\n")
    assert model_card_license(copy) is None
    assert is_non_commercial("cc-by-nc-4.0") and is_non_commercial("CC-BY-NC-SA-4.0")
    assert not is_non_commercial("apache-2.0") and not is_non_commercial("cc-by-4.0") and not is_non_commercial(None)
