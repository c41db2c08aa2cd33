"""VideoMAE checkpoints: what they need as input (ModelSpec) and how they embed clips.

Plain PyTorch/transformers, no Ray: the Ray embed stage only adapts batches to
`VideoMAEEmbedder.embed`. Everything that decides correctness is read from the checkpoint
itself (config.json, preprocessor_config.json, *.safetensors), never from constants here,
because HF's class defaults (mean/std 0.5) differ from what MCG-NJU checkpoints ship
(ImageNet mean/std).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
CLASSIFIER_ARCHITECTURE = "VideoMAEForVideoClassification"
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Keys a VideoMAEForPreTraining checkpoint (e.g. MCG-NJU/videomae-base-short-ssv2) carries
# beyond the encoder. Loading such a checkpoint into VideoMAEModel reports exactly these as
# "unexpected"; anything else unexpected means the file and the architecture disagree.
_PRETRAINING_ONLY_KEY = re.compile(r"^(?:decoder\.|encoder_to_decoder\.|mask_token$)")

# Attention q/v biases as stored in files: original checkpoints use q_bias/v_bias, files
# written by newer transformers may use query.bias/value.bias. Some transformers releases
# silently left these at zero, so they are compared against the file after loading.
_QV_BIAS_KEY = re.compile(
    r"^(?:videomae\.)?encoder\.layer\.(\d+)\.attention\.attention\.(q_bias|v_bias|query\.bias|value\.bias)$"
)


class ModelLoadError(RuntimeError):
    """The checkpoint's weights do not load completely and exactly into the model."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the decode stage and the writer need to know about a checkpoint.

    Read from config.json and preprocessor_config.json only (cheap: no weights), so the
    driver can validate a run and size the decode stage before any actor loads the model.
    Mean/std/size/resample come from the checkpoint's preprocessor_config.json; transformers'
    `VideoMAEImageProcessorPil` class defaults apply only to keys the file omits (those
    defaults are IMAGENET_STANDARD mean/std 0.5/0.5, while MCG-NJU checkpoints ship ImageNet
    mean/std 0.485.../0.229...).

    Preprocessing contract (what the decode stage must produce): resize so the short side is
    `resize_shortest_edge` (long side `int(short_edge * long / short)`, as transformers
    computes it) with the `resample` filter, then center-crop `crop_height` x `crop_width`
    (top = (h - crop_height) // 2). Only aspect-preserving `shortest_edge` resizing is
    supported: a preprocessor with size={'height','width'} (a squashing resize) or
    do_resize=false is refused with a ValueError rather than approximated. With
    do_center_crop=false the crop is the square `resize_shortest_edge` (identical to
    transformers for square videos; for other aspect ratios transformers would hand the model
    a non-square input it cannot take).
    """

    model_ref: str  # as given by the user
    num_frames: int  # frames per clip the model takes (config.num_frames)
    tubelet_size: int
    image_size: int  # config.image_size (square)
    resize_shortest_edge: int
    crop_height: int
    crop_width: int
    rescale_factor: float  # 1.0 when the preprocessor has do_rescale=false
    image_mean: tuple[float, float, float]  # (0, 0, 0) when do_normalize=false
    image_std: tuple[float, float, float]  # (1, 1, 1) when do_normalize=false
    resample: int  # PIL resample code (2 = bilinear)
    hidden_size: int  # embedding dimension D
    id2label: dict[int, str] | None  # only for fine-tuned classifiers; None means no labels
    architecture: str
    fingerprint: str  # sha256 of configs + weight file names/sizes: never mix checkpoints

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """Shape of one uint8 clip the embedder accepts: (num_frames, crop_height, crop_width, 3)."""
        return (self.num_frames, self.crop_height, self.crop_width, 3)

    @property
    def has_labels(self) -> bool:
        return self.id2label is not None


# --------------------------------------------------------------------------------------
# Locating the checkpoint


def _is_hub_id(ref: str) -> bool:
    # "org/name" or "name": what huggingface_hub accepts as a repo id.
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", ref) is not None


def resolve_model_dir(model_ref: str, storage=None, cache_root: str | None = None) -> str:
    """Return a local directory holding the checkpoint named by `model_ref`.

    - an existing local directory: itself;
    - `file://...`: its path;
    - any other URI with '://' (s3://, gs://, ...): downloaded once per node by
      `vmae_ray.storage.download_dir` (cached under `cache_root`);
    - otherwise a Hugging Face hub id, fetched with `huggingface_hub.snapshot_download`
      restricted to *.json and *.safetensors (pickled .bin weights are never downloaded).
    """
    if not isinstance(model_ref, str) or not model_ref:
        raise ValueError(f"--model must be a non-empty string, got {model_ref!r}")
    if model_ref.startswith("file://"):
        parsed = urlparse(model_ref)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"--model {model_ref!r}: file:// URIs must name a local path")
        path = unquote(parsed.path)
        if not os.path.isdir(path):
            raise ValueError(f"--model {model_ref!r}: no such local directory {path!r}")
        return path
    if "://" in model_ref:
        from vmae_ray.storage import download_dir  # lazy: only remote checkpoints need fsspec

        return download_dir(model_ref, storage, cache_root)
    expanded = os.path.expanduser(model_ref)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise ValueError(f"--model {model_ref!r} is a file; expected a checkpoint directory")
    # Hub ids have at most one '/'; anything path-like that does not exist is a typo, not a
    # hub id, and should not turn into a confusing network error.
    if model_ref.startswith((".", "/", "~")) or not _is_hub_id(model_ref):
        raise ValueError(
            f"--model {model_ref!r}: no such local directory, and not a hub id (org/name); "
            "expected a local dir, file://, s3://... URI, or a hub id"
        )
    from huggingface_hub import snapshot_download

    cache_dir = os.path.join(cache_root, "huggingface") if cache_root else None
    try:
        return snapshot_download(
            repo_id=model_ref, allow_patterns=["*.json", "*.safetensors"], cache_dir=cache_dir
        )
    except Exception as exc:  # network, auth, not found: one clear message before Ray starts
        raise ValueError(
            f"--model {model_ref!r}: could not fetch it from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}); without hub access pass a local or s3:// checkpoint dir"
        ) from exc


# --------------------------------------------------------------------------------------
# Reading the spec


def _read_json(path: Path, what: str, model_ref: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"--model {model_ref!r}: missing {path.name} ({what}) in {path.parent}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model {model_ref!r}: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--model {model_ref!r}: {path} is not a JSON object")
    return data


def _weight_files(model_dir: Path, model_ref: str) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (
            f" (found pickled weights {pickles}; they are refused because unpickling runs code: "
            "convert them to safetensors)"
            if pickles
            else ""
        )
        raise ValueError(f"--model {model_ref!r}: no *.safetensors weights in {model_dir}{hint}")
    return files


def _size_dict(value: Any, default_to_square: bool) -> dict[str, int]:
    # Legacy preprocessor files store size/crop_size as a bare int; transformers reads an int
    # size as the shortest edge (VideoMAE uses default_to_square=False) and an int crop_size
    # as a square.
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    raise ValueError(f"unsupported size value {value!r}")


def _triple(value: Any, name: str, model_ref: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"--model {model_ref!r}: {name} must have 3 values (RGB), got {value!r}")
    return (values[0], values[1], values[2])


def _fingerprint(model_dir: Path, weight_files: list[Path]) -> str:
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, PREPROCESSOR_FILE):
        digest.update(name.encode() + b"\0" + (model_dir / name).read_bytes() + b"\0")
    # Names and sizes, not contents: hashing gigabytes of weights on every start is not worth
    # it, and a re-trained checkpoint also changes its config or its file sizes in practice.
    for path in weight_files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()


def _spec_from_dir(model_dir: str, model_ref: str) -> ModelSpec:
    from transformers import VideoMAEConfig, VideoMAEImageProcessorPil

    root = Path(model_dir)
    raw_config = _read_json(root / CONFIG_FILE, "model config", model_ref)
    model_type = raw_config.get("model_type")
    if model_type != "videomae":
        raise ValueError(
            f"--model {model_ref!r}: config.json has model_type={model_type!r}; only 'videomae' is supported"
        )
    pre = _read_json(root / PREPROCESSOR_FILE, "image preprocessing", model_ref)
    weight_files = _weight_files(root, model_ref)

    # VideoMAEConfig supplies transformers' defaults for keys the file omits.
    config = VideoMAEConfig.from_dict(raw_config)
    image_size = config.image_size
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ValueError(f"--model {model_ref!r}: only square image_size is supported, got {image_size!r}")
        image_size = image_size[0]
    image_size = int(image_size)
    if config.num_channels != 3:
        raise ValueError(f"--model {model_ref!r}: num_channels={config.num_channels}; clips are RGB (3)")
    if config.num_frames % config.tubelet_size:
        raise ValueError(
            f"--model {model_ref!r}: num_frames={config.num_frames} is not a multiple of "
            f"tubelet_size={config.tubelet_size}"
        )

    defaults = VideoMAEImageProcessorPil
    if not pre.get("do_resize", defaults.do_resize):
        raise ValueError(
            f"--model {model_ref!r}: preprocessor has do_resize=false; videos of any size need a resize "
            "to the model's input, so this checkpoint's preprocessing is not supported"
        )
    size = _size_dict(pre.get("size", defaults.size), default_to_square=False)
    if set(size) != {"shortest_edge"}:
        raise ValueError(
            f"--model {model_ref!r}: preprocessor size={size}; only {{'shortest_edge': N}} (aspect-preserving "
            "resize, as in the MCG-NJU checkpoints) is supported"
        )
    shortest_edge = size["shortest_edge"]
    if pre.get("do_center_crop", defaults.do_center_crop):
        crop = _size_dict(pre.get("crop_size", defaults.crop_size), default_to_square=True)
        if set(crop) != {"height", "width"}:
            raise ValueError(f"--model {model_ref!r}: crop_size must have height and width, got {crop}")
        crop_height, crop_width = crop["height"], crop["width"]
    else:
        crop_height = crop_width = shortest_edge
    if (crop_height, crop_width) != (image_size, image_size):
        raise ValueError(
            f"--model {model_ref!r}: preprocessing yields {crop_height}x{crop_width} frames but the model's "
            f"image_size is {image_size}x{image_size}"
        )
    if shortest_edge < max(crop_height, crop_width):
        raise ValueError(
            f"--model {model_ref!r}: shortest_edge={shortest_edge} is smaller than the crop "
            f"{crop_height}x{crop_width} (transformers would zero-pad); not supported"
        )

    rescale_factor = float(pre.get("rescale_factor", defaults.rescale_factor))
    if not pre.get("do_rescale", defaults.do_rescale):
        rescale_factor = 1.0
    if pre.get("do_normalize", defaults.do_normalize):
        image_mean = _triple(pre.get("image_mean", defaults.image_mean), "image_mean", model_ref)
        image_std = _triple(pre.get("image_std", defaults.image_std), "image_std", model_ref)
        if min(image_std) <= 0:
            raise ValueError(f"--model {model_ref!r}: image_std must be positive, got {image_std}")
    else:
        image_mean, image_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = int(pre.get("resample", defaults.resample))
    if resample not in range(6):
        raise ValueError(f"--model {model_ref!r}: resample={resample} is not a PIL filter code (0..5)")

    architectures = list(raw_config.get("architectures") or [])
    is_classifier = CLASSIFIER_ARCHITECTURE in architectures
    id2label = None
    if is_classifier:
        id2label = {int(k): str(v) for k, v in (raw_config.get("id2label") or {}).items()}
        if not id2label:
            raise ValueError(f"--model {model_ref!r}: a {CLASSIFIER_ARCHITECTURE} checkpoint without id2label")

    return ModelSpec(
        model_ref=model_ref,
        num_frames=int(config.num_frames),
        tubelet_size=int(config.tubelet_size),
        image_size=image_size,
        resize_shortest_edge=int(shortest_edge),
        crop_height=int(crop_height),
        crop_width=int(crop_width),
        rescale_factor=rescale_factor,
        image_mean=image_mean,
        image_std=image_std,
        resample=resample,
        hidden_size=int(config.hidden_size),
        id2label=id2label,
        architecture=CLASSIFIER_ARCHITECTURE if is_classifier else (architectures[0] if architectures else "VideoMAEModel"),
        fingerprint=_fingerprint(root, weight_files),
    )


def load_model_spec(model_ref: str, storage=None, cache_root: str | None = None) -> ModelSpec:
    """Read a checkpoint's ModelSpec (configs only, no weights).

    Raises ValueError naming the problem for: a missing config.json or
    preprocessor_config.json, a model_type other than 'videomae', no *.safetensors weights
    (pickled .bin files are refused), or preprocessing this job cannot reproduce.
    """
    return _spec_from_dir(resolve_model_dir(model_ref, storage, cache_root), model_ref)


# --------------------------------------------------------------------------------------
# Embedding


def _resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    return resolved


def _resolve_dtype(dtype: str, device):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_load_report():
    # transformers logs its load report (a table of every unexpected key) as a warning; for a
    # pretraining checkpoint that is ~100 expected decoder keys per actor. The guard below
    # judges the report and raises with the keys that matter, so the table is dropped. A
    # filter rather than a level: transformers 5.x runs an extra tensor-parallel check (and
    # logs every layer) when this logger's level is raised.
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    report_logger.addFilter(report_filter)
    try:
        yield
    finally:
        report_logger.removeFilter(report_filter)


def _check_loading_info(info: dict[str, Any], model_dir: str, allow_pretraining_keys: bool) -> int:
    """Raise ModelLoadError unless every weight of the model came from the file.

    Returns how many expected pretraining-decoder keys were ignored.
    """
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    errors = list(info.get("error_msgs") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    ignored = [k for k in unexpected if allow_pretraining_keys and _PRETRAINING_ONLY_KEY.match(k)]
    unexplained = [k for k in unexpected if k not in set(ignored)]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint (would be random): {missing}")
    if mismatched:
        problems.append(
            "shape mismatch (key, file shape, model shape): "
            + str([(k, tuple(a), tuple(b)) for k, a, b in mismatched])
        )
    if unexplained:
        problems.append(f"unexpected keys (checkpoint and architecture disagree): {unexplained}")
    if errors:
        problems.append(f"errors: {errors}")
    if problems:
        raise ModelLoadError(f"checkpoint {model_dir} does not load cleanly: " + "; ".join(problems))
    return len(ignored)


def _verify_qv_biases(encoder_owner, weight_files: list[Path], model_dir: str) -> int:
    """Compare every attention q/v bias in the model with the file; returns how many matched."""
    import torch
    from safetensors import safe_open

    layers = encoder_owner.encoder.layer
    checked = 0
    for path in weight_files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                match = _QV_BIAS_KEY.match(key)
                if match is None:
                    continue
                index, name = int(match.group(1)), match.group(2)
                attention = layers[index].attention.attention
                linear = attention.query if name in ("q_bias", "query.bias") else attention.value
                loaded = linear.bias
                expected = f.get_tensor(key)
                if loaded is None or not torch.equal(loaded.detach().cpu(), expected.to(loaded.dtype)):
                    raise ModelLoadError(
                        f"checkpoint {model_dir}: {key} did not load (the model's value differs from the "
                        "file; some transformers releases load VideoMAE q/v biases as zeros)"
                    )
                checked += 1
    if encoder_owner.config.qv_bias and checked == 0:
        raise ModelLoadError(f"checkpoint {model_dir}: config has qv_bias=true but the file has no q/v biases")
    return checked


class VideoMAEEmbedder:
    """Loads a VideoMAE checkpoint once and embeds batches of uint8 clips.

    An actor constructs one; construction fails loudly (ModelLoadError) rather than embed
    with weights that did not load:
    - weights come from *.safetensors only (use_safetensors=True) and the model class is
      chosen here, never from remote code;
    - a fine-tuned classifier (architectures has VideoMAEForVideoClassification) loads as
      VideoMAEForVideoClassification and yields labels; anything else loads as
      VideoMAEModel. A VideoMAEForPreTraining checkpoint (e.g.
      MCG-NJU/videomae-base-short-ssv2) loads its encoder; its decoder, encoder_to_decoder
      and mask_token are the only unexpected keys tolerated;
    - any missing or shape-mismatched weight, any other unexpected key, and any attention
      q/v bias that differs from the file raises ModelLoadError.

    Clips cross the object store and the host-to-device copy as uint8, a quarter of the float32
    size, and are never normalised as such: rescale, mean and std are folded into the patch
    embedding's weights (`FoldedPatchEmbedding`), which is exact and saves three passes over
    every clip (on CPU, most of the model stage's time with a small encoder). The clip embedding is the mean over the encoder's output tokens
    (VideoMAE has no CLS token), computed in float32, followed by fc_norm when a classifier
    has it: exactly the features its classifier sees. For VideoMAEModel it is
    last_hidden_state.mean(1), including the model's own final layernorm when
    use_mean_pooling=false (the pretraining checkpoints). Outputs are float32 numpy arrays.
    """

    def __init__(
        self,
        model_ref: str,
        *,
        storage=None,
        cache_root: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
    ):
        import torch
        from transformers import VideoMAEForVideoClassification, VideoMAEModel

        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.model_dir = resolve_model_dir(model_ref, storage, cache_root)
        self.spec = _spec_from_dir(self.model_dir, model_ref)
        is_classifier = self.spec.has_labels
        model_cls = VideoMAEForVideoClassification if is_classifier else VideoMAEModel
        try:
            with _quiet_load_report():
                model, info = model_cls.from_pretrained(
                    self.model_dir,
                    output_loading_info=True,
                    use_safetensors=True,
                    trust_remote_code=False,
                    attn_implementation="sdpa",
                    dtype=self.dtype,
                    # Mismatches are reported by the guard (with shapes) instead of transformers
                    # raising "look at the above report" about a report we silenced.
                    ignore_mismatched_sizes=True,
                )
        except Exception as exc:
            raise ModelLoadError(f"cannot load {model_cls.__name__} from {self.model_dir}: {exc}") from exc
        ignored = _check_loading_info(info, self.model_dir, allow_pretraining_keys=not is_classifier)
        encoder_owner = model.videomae if is_classifier else model
        checked = _verify_qv_biases(encoder_owner, _weight_files(Path(self.model_dir), model_ref), self.model_dir)
        logger.info(
            "loaded %s from %s (%s, %s); %d q/v biases verified, %d pretraining-decoder keys ignored",
            model_cls.__name__, self.model_dir, self.device, self.dtype, checked, ignored,
        )

        self.model = model.to(self.device).eval().requires_grad_(False)
        self._encoder_owner = encoder_owner
        self._is_classifier = is_classifier
        # Channels-last constants: clips arrive as (B, T, H, W, 3), so mean/std broadcast on the
        # last axis before the permute to VideoMAE's (B, T, C, H, W). Only `pixel_values` (the
        # processor-equivalent reference) uses them; `embed` folds them into the patch embedding.
        self._mean = torch.tensor(self.spec.image_mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(self.spec.image_std, dtype=torch.float32, device=self.device)
        self._patches = FoldedPatchEmbedding(encoder_owner, self.spec, self.device, self.dtype)
        self._forward = torch.compile(self._features) if compile else self._features

    def _to_device(self, clips: np.ndarray):
        """uint8 clips (B, T, H, W, 3) as a tensor on the device, still uint8."""
        import torch

        clips = self._validate(clips)
        with warnings.catch_warnings():
            # Ray hands out read-only arrays from the object store; they are only read here.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            host = torch.from_numpy(clips)
        if self.device.type == "cuda":
            # Pinned memory makes the copy asynchronous and faster; uint8 is 4x less to copy.
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def pixel_values(self, clips: np.ndarray):
        """The processor's normalized tensor, (B, T, 3, H, W) in the model's dtype.

        This is what `VideoMAEImageProcessor` would hand the model; `embed` computes the same
        function without materialising it (see `FoldedPatchEmbedding`). Kept as the reference
        the parity tests compare against.
        """
        import torch

        x = self._to_device(clips).float()
        x = (x * self.spec.rescale_factor - self._mean) / self._std
        return x.permute(0, 1, 4, 2, 3).to(self.dtype, memory_format=torch.contiguous_format)

    def _validate(self, clips: np.ndarray) -> np.ndarray:
        if not isinstance(clips, np.ndarray) or clips.dtype != np.uint8:
            raise TypeError(f"clips must be a uint8 numpy array, got {type(clips).__name__} "
                            f"{getattr(clips, 'dtype', '')}")
        if clips.ndim != 5 or clips.shape[1:] != self.spec.clip_shape:
            raise ValueError(
                f"clips must have shape (B, {', '.join(map(str, self.spec.clip_shape))}), got {clips.shape}"
            )
        return np.ascontiguousarray(clips)

    def _features(self, clips):
        import torch.nn.functional as F

        # VideoMAEModel.forward without its embeddings module: the folded patch embedding
        # (uint8 in, normalisation inside the weights) + position embeddings, then the encoder
        # and, for use_mean_pooling=false checkpoints, the final layernorm.
        owner = self._encoder_owner
        hidden = owner.encoder(self._patches(clips)).last_hidden_state
        if owner.layernorm is not None:
            hidden = owner.layernorm(hidden)
        # Pool in float32: a mean over ~1568 tokens rounded to bf16 would lose precision.
        pooled = hidden.float().mean(dim=1)
        if not self._is_classifier:
            return pooled, None
        fc_norm = self.model.fc_norm
        if fc_norm is not None:
            pooled = F.layer_norm(
                pooled, fc_norm.normalized_shape, fc_norm.weight.float(), fc_norm.bias.float(), fc_norm.eps
            )
            head_input = pooled
        else:
            # Without mean pooling transformers' classifier reads the first token; logits follow
            # it so labels match the checkpoint, while the embedding stays the token mean.
            head_input = hidden[:, 0].float()
        classifier = self.model.classifier
        logits = F.linear(head_input, classifier.weight.float(), classifier.bias.float())
        return pooled, logits

    def embed(self, clips: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Embed uint8 clips (B, T, H, W, 3) -> ((B, D) float32 embeddings, (B, L) float32 logits or None)."""
        import torch

        with torch.inference_mode():
            embeddings, logits = self._forward(self._to_device(clips))
            embeddings = embeddings.cpu().numpy()
            logits = None if logits is None else logits.cpu().numpy()
        return embeddings, logits


class FoldedPatchEmbedding:
    """VideoMAE's patch embedding with the image processor's normalisation folded in.

    The processor feeds the model x' = (x * rescale - mean[c]) / std[c] and the patch
    embedding is a Conv3d whose kernel equals its stride (one tubelet x patch x patch block
    per token, no overlap, no padding). Per channel the normalisation is affine, so

        conv(W, x') + b = conv(W * rescale / std[c], x) + (b - sum W * mean[c] / std[c])

    exactly (up to float summation order). The conv is then a GEMM over non-overlapping
    blocks, which reads the channels-last uint8 clip (B, T, H, W, 3) directly: one reorder of
    the uint8 bytes, one conversion to the model's dtype, one matmul. With bf16 weights the
    input is exact (0..255 are bf16 integers), where the unfolded path rounds the normalised
    values to bf16.

    The input is centred on whole pixel values near the mean first (see __init__), which
    keeps half-precision results as close to float32 as the unfolded path's. The result
    equals the model's own `embeddings(pixel_values)` (patch projection plus the fixed sinusoid
    position table, kept on the device here instead of copied each call).
    """

    def __init__(self, encoder_owner, spec: ModelSpec, device, dtype):
        import torch

        embeddings = encoder_owner.embeddings
        proj = embeddings.patch_embeddings.projection
        tubelet, patch_h, patch_w = proj.kernel_size
        if tuple(proj.stride) != (tubelet, patch_h, patch_w) or any(proj.padding) or proj.groups != 1:
            raise ModelLoadError(f"unexpected VideoMAE patch embedding {proj}: kernel must equal stride")
        weight = proj.weight.detach().to(torch.float64)  # (D, C, tubelet, ph, pw)
        bias = proj.bias.detach().to(torch.float64) if proj.bias is not None else torch.zeros(weight.shape[0],
                                                                                             dtype=torch.float64)
        mean = torch.tensor(spec.image_mean, dtype=torch.float64, device=weight.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(spec.image_std, dtype=torch.float64, device=weight.device).view(1, -1, 1, 1, 1)
        # The input is centred on the whole pixel value nearest the mean, x - c (exact in any
        # dtype: integers within +-255), so that it stays about zero-mean as the processor's
        # output is. Folding the whole mean into the bias instead would feed 0..255 and turn the
        # half-precision rounding of every weight into an error common to all tokens, which
        # mean pooling does not average away (measured: 3x the bf16 error of the unfolded path).
        center = torch.round(mean / spec.rescale_factor)
        folded_w = weight * (spec.rescale_factor / std)
        folded_b = bias + (weight * ((center * spec.rescale_factor - mean) / std)).sum(dim=(1, 2, 3, 4))
        # GEMM layout: one row per output channel over (tubelet, ph, pw, C), the order in which
        # a channels-last block is laid out after the reorder in __call__.
        # float16 cannot hold the folded weights well: W * rescale / std is ~1/60 of W, and the
        # small ones fall below fp16's normal range (6e-5) and lose precision. That one GEMM runs
        # in float32 then (about 1% of VideoMAE-B's FLOPs); bf16 has float32's range.
        self.compute_dtype = torch.float32 if dtype == torch.float16 else dtype
        self.weight = folded_w.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1).to(device, self.compute_dtype)
        self.bias = folded_b.to(device, self.compute_dtype)
        self.position = embeddings.position_embeddings.detach().to(device, dtype)  # (1, N, D)
        self.tubelet, self.patch_h, self.patch_w = tubelet, patch_h, patch_w
        self.dtype = dtype
        # Per element of a block (tubelet, ph, pw, C), C innermost; None when nothing to subtract.
        channels = center.view(-1)
        self.center = (channels.repeat(tubelet * patch_h * patch_w).to(device, self.compute_dtype)
                       if bool((channels != 0).any()) else None)

    def __call__(self, clips):
        """uint8 (B, T, H, W, C) on the device -> tokens (B, N, D) in the model's dtype."""
        import torch.nn.functional as F

        b, t, h, w, c = clips.shape
        tt, ph, pw = self.tubelet, self.patch_h, self.patch_w
        blocks = clips.view(b, t // tt, tt, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        blocks = blocks.reshape(b, (t // tt) * (h // ph) * (w // pw), tt * ph * pw * c).to(self.compute_dtype)
        if self.center is not None:
            blocks = blocks.sub_(self.center)
        # As the model: the projection in its dtype, then the position table added in it.
        return F.linear(blocks, self.weight, self.bias).to(self.dtype) + self.position


def top_k_labels(
    logits: np.ndarray, id2label: dict[int, str], k: int
) -> tuple[list[list[str]], list[list[float]]]:
    """Top-k labels per row of `logits` (B, L) by softmax probability, highest first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    logits = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    shifted = logits - logits.max(axis=1, keepdims=True)  # stable softmax
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    # Stable sort so ties keep class order, which keeps output deterministic across runs.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    labels = [[id2label.get(int(i), str(int(i))) for i in row] for row in order]
    scores = [[float(probs[r, i]) for i in row] for r, row in enumerate(order)]
    return labels, scores


# --------------------------------------------------------------------------------------
# Test and demo checkpoints

_DEMO_ACTIONS = ("juggling", "surfing", "cooking", "dancing", "archery", "skiing", "drumming", "knitting")


def make_tiny_checkpoint(
    path,
    *,
    classifier: bool = True,
    num_frames: int = 8,
    image_size: int = 64,
    patch_size: int = 16,
    tubelet_size: int = 2,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 128,
    num_labels: int = 5,
    pretraining_layout: bool = False,
    seed: int = 0,
) -> str:
    """Write a small randomly initialised VideoMAE checkpoint for tests and the demo.

    The directory holds what a hub checkpoint holds: config.json, model.safetensors (with the
    original q_bias/v_bias key names) and a preprocessor_config.json whose values are NOT the
    library defaults (shortest_edge = image_size + 8 then a center crop, ImageNet mean/std,
    bilinear), so code that hard-codes constants fails its tests.

    - pretraining_layout=True: a VideoMAEForPreTraining checkpoint (encoder + decoder,
      use_mean_pooling=false, no labels) like MCG-NJU/videomae-base-short-ssv2;
    - else classifier=True: a VideoMAEForVideoClassification with fc_norm and labels
      'label_0_juggling', ...;
    - else: a bare VideoMAEModel.
    Every bias (including the attention q/v biases) and every layernorm is random and
    non-trivial, so a weight that silently fails to load changes the outputs. Deterministic
    in `seed`; the global torch RNG is left untouched.
    """
    import torch
    from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification, VideoMAEModel

    is_classifier = classifier and not pretraining_layout
    config_kwargs: dict[str, Any] = dict(
        num_frames=num_frames,
        image_size=image_size,
        patch_size=patch_size,
        tubelet_size=tubelet_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        qv_bias=True,
        # The MCG-NJU pretraining checkpoints use a final encoder layernorm instead of mean
        # pooling + fc_norm; mirror that so both code paths are exercised.
        use_mean_pooling=not pretraining_layout,
        decoder_hidden_size=max(hidden_size // 2, num_attention_heads),
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=num_attention_heads,
        decoder_intermediate_size=max(intermediate_size // 2, 1),
    )
    if is_classifier:
        id2label = {i: f"label_{i}_{_DEMO_ACTIONS[i % len(_DEMO_ACTIONS)]}" for i in range(num_labels)}
        config_kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    config = VideoMAEConfig(**config_kwargs)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if pretraining_layout:
            model = VideoMAEForPreTraining(config)
        elif is_classifier:
            model = VideoMAEForVideoClassification(config)
        else:
            model = VideoMAEModel(config)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                if name.endswith("bias"):
                    param.copy_(0.1 * noise)  # zero biases would hide a bias that failed to load
                elif param.ndim == 1:  # layernorm scales
                    param.copy_(1.0 + 0.1 * noise)
    model.eval()

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # save_original_format writes q_bias/v_bias like the hub checkpoints do, so loading
    # exercises transformers' renaming of those keys.
    model.save_pretrained(out, save_original_format=True)
    preprocessor = {
        "image_processor_type": "VideoMAEImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size + 8},
        "resample": 2,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    (out / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
    if not any(out.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file in {out}")
    return str(out)
