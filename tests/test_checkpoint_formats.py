"""Checkpoints laid out as they are published, each built here exactly so.

The MCG-NJU VideoMAE repos of 2022 (the default `MCG-NJU/videomae-base-short-ssv2` among
them) hold `config.json` with the original `qkv_bias` key, weights as `pytorch_model.bin`
with the original key names (`...attention.attention.q_bias` / `v_bias`), a legacy
`preprocessor_config.json` written for `VideoMAEFeatureExtractor` (an integer `size`, no
`crop_size`) and a model card whose front matter names the licence. Larger checkpoints shard
their `.bin` weights behind `pytorch_model.bin.index.json`; transformers 5 saves a video
processor as `video_preprocessor_config.json`. Each layout is written from one tiny random
pretraining checkpoint (`make_tiny_checkpoint`, at the real 224x224 input size), and
embeddings are compared with an independent reference: the weights read by hand with
`torch.load(weights_only=True)` into a transformers model built from the config, fed by
transformers' PIL image processor made from the checkpoint's own numbers, on frames PyAV
decoded.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vmae_ray.checkpoint import (
    PREPROCESSOR_FILE,
    VIDEO_PREPROCESSOR_FILE,
    CheckpointError,
    check_pickle_weights,
    hub_allow_patterns,
    spec_from_dir,
    weight_files,
)
from vmae_ray.embedder import ModelLoadError, VideoMAEEmbedder, load_pickle_weights
from vmae_ray.synthetic import make_tiny_checkpoint, make_video

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# preprocessor_config.json of MCG-NJU/videomae-base-short-ssv2 as published (2022).
LEGACY_PREPROCESSOR = {
    "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "VideoMAEFeatureExtractor",
    "image_mean": MEAN, "image_std": STD, "resample": 2, "size": 224,
}
# video_preprocessor_config.json as transformers 5 writes it for VideoMAEVideoProcessor
# (BaseVideoProcessor.to_dict: every attribute, sorted, video_processor_type last added).
VIDEO_PROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "data_format": "channels_first", "default_to_square": False,
    "device": None, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
    "do_resize": True, "do_sample_frames": False, "fps": None, "image_mean": MEAN, "image_std": STD,
    "input_data_format": None, "num_frames": None, "pad_size": None, "resample": 2,
    "rescale_factor": 0.00392156862745098, "return_metadata": False, "size": {"shortest_edge": 232},
    "video_metadata": None, "video_processor_type": "VideoMAEVideoProcessor",
}
MODEL_CARD = "---\nlicense: cc-by-nc-4.0\ntags:\n- video-classification\n---\n\n# VideoMAE (base-sized model)\n"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny pretraining checkpoint at the published input size (224x224; 32 px patches keep it small)."""
    return Path(make_tiny_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", pretraining_layout=True, num_frames=4,
                                     image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, seed=5))


def _state(source: Path) -> OrderedDict:
    # save_original_format: the original key names (q_bias/v_bias), as the hub files have them.
    state = OrderedDict(load_file(str(source / "model.safetensors")))
    assert any(k.endswith("attention.attention.q_bias") for k in state)
    return state


def publish(source: Path, dst: Path, *, weights: str = "bin", preprocessor: str = "legacy") -> Path:
    """``source`` laid out as published: weights 'bin' (pytorch_model.bin), 'shards' (two .bin
    shards and their index) or 'safetensors'; preprocessor 'legacy', 'video' (transformers 5)
    or 'both'; config with the original `qkv_bias` key; a model card with a licence."""
    dst.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    config["qkv_bias"] = config.pop("qv_bias")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    state = _state(source)
    if weights == "bin":
        torch.save(state, dst / "pytorch_model.bin")
    elif weights == "shards":
        keys = list(state)
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map = {}
        for name, part in zip(names, halves):
            torch.save(OrderedDict((k, state[k]) for k in part), dst / name)
            weight_map.update(dict.fromkeys(part, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": weight_map}))
    else:
        shutil.copy(source / "model.safetensors", dst / "model.safetensors")
    if preprocessor in ("legacy", "both"):
        (dst / PREPROCESSOR_FILE).write_text(json.dumps(LEGACY_PREPROCESSOR, indent=2))
    if preprocessor in ("video", "both"):
        (dst / VIDEO_PREPROCESSOR_FILE).write_text(json.dumps(VIDEO_PROCESSOR, indent=2, sort_keys=True))
    (dst / "README.md").write_text(MODEL_CARD)
    # What hub repos also carry; not weights, and (a pickle of TrainingArguments) never loaded.
    (dst / "training_args.bin").write_bytes(b"not model weights")
    return dst


def reference_embeddings(model_dir: Path, frames: list[np.ndarray], preprocessing: dict) -> np.ndarray:
    """The independent reference: a transformers VideoMAEModel built from config.json, its
    weights read by hand (torch.load weights_only=True, original key names renamed by hand),
    pixel values from transformers' PIL processor made with ``preprocessing``'s numbers."""
    from transformers import VideoMAEConfig, VideoMAEImageProcessorPil, VideoMAEModel

    config = json.loads((model_dir / "config.json").read_text())
    model = VideoMAEModel(VideoMAEConfig(**config)).eval()
    state = {}
    for path in sorted(model_dir.glob("pytorch_model*.bin")) or [model_dir / "model.safetensors"]:
        part = torch.load(path, weights_only=True) if path.suffix == ".bin" else load_file(str(path))
        state.update(part)
    mine = {}
    for key, tensor in state.items():
        if not key.startswith("videomae."):
            continue  # the decoder, encoder_to_decoder, mask_token: not in VideoMAEModel
        key = key[len("videomae."):].replace("attention.attention.q_bias", "attention.attention.query.bias")
        mine[key.replace("attention.attention.v_bias", "attention.attention.value.bias")] = tensor
    missing, unexpected = model.load_state_dict(mine, strict=False)
    assert unexpected == [] and missing == [], (missing, unexpected)
    size = preprocessing["size"]
    processor = VideoMAEImageProcessorPil(
        size={"shortest_edge": size} if isinstance(size, int) else size,
        crop_size=preprocessing.get("crop_size", {"height": 224, "width": 224}),
        image_mean=preprocessing["image_mean"], image_std=preprocessing["image_std"],
        resample=preprocessing["resample"])
    pixel_values = torch.from_numpy(processor([frames], return_tensors="np")["pixel_values"])
    with torch.no_grad():
        return model(pixel_values=pixel_values).last_hidden_state.mean(1).numpy()


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[np.ndarray]:
    """Four frames decoded by PyAV (the clip: num_frames=4), RGB as stored."""
    path = make_video(str(tmp_path_factory.mktemp("v") / "clip.mp4"), width=160, height=120, num_frames=4, seed=3)
    with av.open(path) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _uint8_clip(frames: list[np.ndarray], preprocessing: dict) -> np.ndarray:
    """The same frames resized and cropped by transformers' PIL processor, as uint8 (no
    normalisation), for VideoMAEEmbedder.embed."""
    from transformers import VideoMAEImageProcessorPil

    size = preprocessing["size"]
    processor = VideoMAEImageProcessorPil(size={"shortest_edge": size} if isinstance(size, int) else size,
                                          crop_size=preprocessing.get("crop_size", {"height": 224, "width": 224}),
                                          resample=preprocessing["resample"], do_rescale=False, do_normalize=False)
    values = processor([frames], return_tensors="np")["pixel_values"][0]  # (T, C, H, W)
    return np.round(values.transpose(0, 2, 3, 1)).astype(np.uint8)[None]


@pytest.mark.parametrize("weights,preprocessor", [("bin", "legacy"), ("shards", "legacy"), ("bin", "video"),
                                                  ("safetensors", "video")])
def test_published_layout_loads_and_embeds_as_the_reference(source, frames, tmp_path, weights, preprocessor):
    model_dir = publish(source, tmp_path / "published", weights=weights, preprocessor=preprocessor)
    spec = spec_from_dir(str(model_dir))
    numbers = LEGACY_PREPROCESSOR if preprocessor == "legacy" else VIDEO_PROCESSOR
    # The spec as transformers reads the file: an integer size is the shortest edge, the crop
    # transformers' default 224 when the legacy file has none.
    expected_edge = 224 if preprocessor == "legacy" else 232
    assert (spec.resize_shortest_edge, spec.crop_height, spec.crop_width) == (expected_edge, 224, 224)
    assert spec.image_mean == tuple(MEAN) and spec.image_std == tuple(STD)
    assert spec.license == "cc-by-nc-4.0" and spec.has_decoder
    expected_files = {"bin": ["pytorch_model.bin"], "safetensors": ["model.safetensors"],
                      "shards": ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]}[weights]
    assert [p.name for p in weight_files(model_dir)] == expected_files

    embedder = VideoMAEEmbedder(str(model_dir), device="cpu", dtype="float32")
    clip = _uint8_clip(frames, numbers)
    ours, _ = embedder.embed(clip)
    reference = reference_embeddings(model_dir, frames, numbers)
    # Same pixels, same weights: float32 summation order only (the folded patch embedding).
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)
    # The q/v biases are the file's (the guard compares them; here the model's own values).
    layer = embedder.model.encoder.layer[0].attention.attention
    state = _state(source)
    assert torch.equal(layer.query.bias, state["videomae.encoder.layer.0.attention.attention.q_bias"])
    assert torch.equal(layer.value.bias, state["videomae.encoder.layer.0.attention.attention.v_bias"])


def test_video_processor_file_wins_over_the_image_processor_file(source, tmp_path):
    model_dir = publish(source, tmp_path / "both", weights="bin", preprocessor="both")
    spec = spec_from_dir(str(model_dir))
    assert spec.resize_shortest_edge == VIDEO_PROCESSOR["size"]["shortest_edge"] == 232
    assert LEGACY_PREPROCESSOR["size"] == 224  # the other file says otherwise: the video one was read
    # And the fingerprint follows the file read: editing the ignored file changes nothing.
    before = spec.fingerprint
    (model_dir / PREPROCESSOR_FILE).write_text(json.dumps({**LEGACY_PREPROCESSOR, "size": 256}))
    assert spec_from_dir(str(model_dir)).fingerprint == before
    (model_dir / VIDEO_PREPROCESSOR_FILE).write_text(json.dumps({**VIDEO_PROCESSOR, "size": {"shortest_edge": 240}}))
    assert spec_from_dir(str(model_dir)).fingerprint != before


def test_guard_applies_to_bin_weights(source, tmp_path):
    """A missing q_bias, an unexpected key: refused for .bin weights as for safetensors."""
    model_dir = publish(source, tmp_path / "bin", weights="bin")
    state = _state(source)
    state.pop("videomae.encoder.layer.0.attention.attention.q_bias")
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="q_bias|query.bias"):
        VideoMAEEmbedder(str(model_dir), device="cpu")
    state = _state(source)
    state["videomae.encoder.layer.0.surprise"] = torch.zeros(2)
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="surprise"):
        VideoMAEEmbedder(str(model_dir), device="cpu")


def test_guard_compares_bin_biases_with_the_file(source, tmp_path, monkeypatch):
    """A q/v bias that did not load (zeros, as some transformers releases did) is caught for .bin."""
    from transformers import VideoMAEModel

    model_dir = publish(source, tmp_path / "bin", weights="bin")
    original = VideoMAEModel.from_pretrained.__func__

    def zeroing(cls, *args, **kwargs):
        model, info = original(cls, *args, **kwargs)
        with torch.no_grad():
            model.encoder.layer[0].attention.attention.value.bias.zero_()
        return model, info

    monkeypatch.setattr(VideoMAEModel, "from_pretrained", classmethod(zeroing))
    with pytest.raises(ModelLoadError, match="v_bias did not load"):
        VideoMAEEmbedder(str(model_dir), device="cpu")


def _command_pickle(marker: Path) -> bytes:
    class RunsACommand:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"videomae.embeddings.patch_embeddings.projection.weight": RunsACommand()}, protocol=2)


@pytest.mark.parametrize("form", ["zip", "legacy", "shard"])
def test_pickle_that_would_run_a_command_is_refused_and_never_runs(source, tmp_path, form):
    marker = tmp_path / "ran"
    model_dir = publish(source, tmp_path / "evil", weights="shards" if form == "shard" else "bin")
    target = model_dir / ("pytorch_model-00002-of-00002.bin" if form == "shard" else "pytorch_model.bin")
    if form == "legacy":
        target.write_bytes(_command_pickle(marker))  # a bare pickle, as torch.save wrote before 1.6
    else:
        # torch.save's zip layout with its data.pkl replaced: what a tampered upload looks like.
        with zipfile.ZipFile(target) as archive:
            entries = {n: archive.read(n) for n in archive.namelist()}
        with zipfile.ZipFile(target, "w") as archive:
            for name, data in entries.items():
                archive.writestr(name, _command_pickle(marker) if name.endswith("data.pkl") else data)

    with pytest.raises(CheckpointError, match=r"posix\.system|nt\.system|os\.system"):
        check_pickle_weights(target)
    with pytest.raises(CheckpointError, match="run code"):
        spec_from_dir(str(model_dir))
    with pytest.raises((CheckpointError, ModelLoadError)):
        VideoMAEEmbedder(str(model_dir), device="cpu")
    # torch.load(weights_only=True) on its own (the embedder's second line) refuses it too.
    with pytest.raises(ModelLoadError, match="--model"):
        load_pickle_weights(target, str(model_dir))
    assert not marker.exists(), "code from the file ran"


def test_refusal_names_model_before_ray(source, tmp_path):
    from vmae_ray.cli import config_from_args
    from vmae_ray.config import ConfigError
    from vmae_ray.planning import prepare

    marker = tmp_path / "ran"
    model_dir = publish(source, tmp_path / "evil", weights="bin")
    (model_dir / "pytorch_model.bin").write_bytes(_command_pickle(marker))
    config = config_from_args(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--model", str(model_dir)])
    with pytest.raises(ConfigError) as info:
        prepare(config)
    assert str(info.value).startswith("--model: ") and info.value.option == "--model"
    assert not marker.exists()


def test_a_state_dict_of_every_dtype_passes_the_scan(tmp_path):
    """The scan allows what torch.save writes for tensors (both formats), checked against torch itself."""
    state = OrderedDict((str(dtype), torch.zeros(3, dtype=dtype)) for dtype in
                        (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool))
    state["param"] = torch.nn.Parameter(torch.ones(2))
    for name, kwargs in (("zip.bin", {}), ("legacy.bin", {"_use_new_zipfile_serialization": False})):
        torch.save(state, tmp_path / name, **kwargs)
        check_pickle_weights(tmp_path / name)  # no error
        loaded = torch.load(tmp_path / name, weights_only=True)
        assert list(loaded) == list(state)


def test_hub_downloads_bin_only_without_safetensors():
    # The file lists of the hub repos as published (huggingface.co/MCG-NJU/...): only .bin,
    # and a repo that has both.
    only_bin = [".gitattributes", "README.md", "config.json", "preprocessor_config.json", "pytorch_model.bin"]
    both = [*only_bin, "model.safetensors"]
    assert "*.bin" in hub_allow_patterns(only_bin) and "*.safetensors" not in hub_allow_patterns(only_bin)
    assert "*.safetensors" in hub_allow_patterns(both) and "*.bin" not in hub_allow_patterns(both)
    for patterns in (hub_allow_patterns(only_bin), hub_allow_patterns(both)):
        assert "*.json" in patterns and "README.md" in patterns
