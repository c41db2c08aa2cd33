"""VideoMAE checkpoints: where they are, and what they need as input (`ModelSpec`).

No torch and no transformers here: the driver reads a checkpoint's spec before Ray starts
(to validate flags and size the decode stage), and a bad flag must be reported in about a
second, not after importing a deep-learning stack. Loading weights is `vmae_ray.embedder`.

Everything that decides correctness is read from the checkpoint itself (config.json,
preprocessor_config.json, *.safetensors), never from constants here, because HF's class
defaults (mean/std 0.5) differ from what MCG-NJU checkpoints ship (ImageNet mean/std). The
only defaults below are transformers' own, for keys a file omits (as transformers applies
them); a test compares them with `VideoMAEConfig` and `VideoMAEImageProcessorPil`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# transformers 5 saves a video processor (VideoMAEVideoProcessor) here. When a directory has
# both, this one wins: transformers 5 reads it first (AutoVideoProcessor: video processor file,
# then the image processor's), and it is the one written for video input, the newer of the two.
VIDEO_PREPROCESSOR_FILE = "video_preprocessor_config.json"
PREPROCESSOR_FILES = (VIDEO_PREPROCESSOR_FILE, PREPROCESSOR_FILE)  # the first found wins
MODEL_CARD_FILE = "README.md"
# Weights as published: safetensors (one file or shards), else PyTorch's pickled state dict
# (the 2022 hub repos may ship only this), one file or shards listed in an index.
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"
PICKLE_WEIGHTS_INDEX_FILE = "pytorch_model.bin.index.json"
CLASSIFIER_ARCHITECTURE = "VideoMAEForVideoClassification"
PRETRAINING_ARCHITECTURE = "VideoMAEForPreTraining"

# transformers' defaults for the keys this module reads, applied only where a file omits a
# key (what `VideoMAEConfig.from_dict` and `VideoMAEImageProcessorPil` do). Source:
# transformers 5.x, models/videomae/configuration_videomae.py and
# image_processing_pil_videomae.py (IMAGENET_STANDARD mean/std = 0.5, rescale 1/255).
CONFIG_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "num_frames": 16,
    "tubelet_size": 2,
    "hidden_size": 768,
    "use_mean_pooling": True,
    "norm_pix_loss": True,
}
PREPROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 2,  # PIL bilinear
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be located or whose configuration this job cannot honour."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the decode stage and the writer need to know about a checkpoint.

    Read from config.json and preprocessor_config.json only (cheap: no weights), so the
    driver can validate a run and size the decode stage before any actor loads the model.

    Preprocessing contract (what the decode stage must produce): resize so the short side is
    `resize_shortest_edge` (long side `int(short_edge * long / short)`, as transformers
    computes it) with the `resample` filter, then center-crop `crop_height` x `crop_width`
    (top = (h - crop_height) // 2). Only aspect-preserving `shortest_edge` resizing is
    supported: a preprocessor with size={'height','width'} (a squashing resize) or
    do_resize=false is refused rather than approximated. With do_center_crop=false the crop
    is the square `resize_shortest_edge` (identical to transformers for square videos; for
    other aspect ratios transformers would hand the model a non-square input it cannot take).
    """

    model_ref: str  # as given by the user
    model_dir: str  # the local directory it was read from
    num_frames: int  # frames per clip the model takes (config.num_frames)
    tubelet_size: int
    patch_size: int
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
    has_decoder: bool  # a pretraining checkpoint: encoder + the decoder that predicts masked pixels
    norm_pix_loss: bool  # the decoder's target is per-patch normalised pixels (config.norm_pix_loss)
    license: str | None  # the model card's `license:` field, when the directory has a README.md
    fingerprint: str  # sha256 of configs + weight file names/sizes: never mix checkpoints

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """Shape of one uint8 clip the embedder accepts: (num_frames, crop_height, crop_width, 3)."""
        return (self.num_frames, self.crop_height, self.crop_width, 3)

    @property
    def num_tokens(self) -> int:
        """Tokens per clip: (num_frames / tubelet_size) * (crop / patch_size)^2 (1568 for VideoMAE-B)."""
        return self.num_time_slots * self.tokens_per_frame

    @property
    def num_time_slots(self) -> int:
        """Tubelets along time: num_frames / tubelet_size (8 for VideoMAE-B)."""
        return self.num_frames // self.tubelet_size

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per time slot: (crop_height / patch_size) * (crop_width / patch_size) (196 for VideoMAE-B)."""
        return (self.crop_height // self.patch_size) * (self.crop_width // self.patch_size)

    @property
    def has_labels(self) -> bool:
        return self.id2label is not None


# --------------------------------------------------------------------------------------
# Locating the checkpoint


def is_hub_id(ref: str) -> bool:
    """"org/name" or "name": what huggingface_hub accepts as a repo id."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", ref) is not None


def resolve_model_dir(model_ref: str, storage=None, cache_root: str | None = None) -> str:
    """Return a local directory holding the checkpoint named by `model_ref`.

    - an existing local directory: itself;
    - `file://...`: its path;
    - any other URI with '://' (s3://, gs://, ...): downloaded once per node by
      `vmae_ray.storage.download_dir` (cached under `cache_root`);
    - otherwise a Hugging Face hub id, fetched with `huggingface_hub.snapshot_download`
      restricted to *.json, the weights and the model card: *.safetensors, or *.bin only when
      the repo has no safetensors (`hub_allow_patterns`; .bin weights are then loaded with
      weights_only=True, see `check_pickle_weights`).

    Raises CheckpointError with the reason (no such directory, a file, hub unreachable).
    """
    if not isinstance(model_ref, str) or not model_ref:
        raise CheckpointError(f"expected a non-empty checkpoint reference, got {model_ref!r}")
    if model_ref.startswith("file://"):
        parsed = urlparse(model_ref)
        if parsed.netloc not in ("", "localhost"):
            raise CheckpointError(f"{model_ref!r}: file:// URIs must name a local path")
        path = unquote(parsed.path)
        if not os.path.isdir(path):
            raise CheckpointError(f"{model_ref!r}: no such local directory {path!r}")
        return path
    if "://" in model_ref:
        from vmae_ray.storage import download_dir  # lazy: only remote checkpoints need fsspec

        try:
            return download_dir(model_ref, storage, cache_root)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{model_ref!r}: cannot download it: {type(exc).__name__}: {exc}") from exc
    expanded = os.path.expanduser(model_ref)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise CheckpointError(f"{model_ref!r} is a file; expected a checkpoint directory")
    # Hub ids have at most one '/'; anything path-like that does not exist is a typo, not a
    # hub id, and should not turn into a confusing network error.
    if model_ref.startswith((".", "/", "~")) or not is_hub_id(model_ref):
        raise CheckpointError(
            f"{model_ref!r}: no such local directory, and not a hub id (org/name); "
            "expected a local dir, a file:// or s3://... URI, or a hub id"
        )
    from huggingface_hub import HfApi, snapshot_download

    cache_dir = os.path.join(cache_root, "huggingface") if cache_root else None
    try:
        files = HfApi().list_repo_files(model_ref)
        return snapshot_download(repo_id=model_ref, allow_patterns=hub_allow_patterns(files), cache_dir=cache_dir)
    except Exception as exc:  # network, auth, not found: one clear message before Ray starts
        raise CheckpointError(
            f"{model_ref!r}: could not fetch it from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}); without hub access pass a local or s3:// checkpoint dir"
        ) from exc


def hub_allow_patterns(repo_files: list[str]) -> list[str]:
    """What to download of a hub repo whose files are ``repo_files``: configs (*.json), the model
    card, and the weights: *.safetensors, or only when the repo has none, the pickled *.bin ones
    (never both: a repo with safetensors never has its pickles fetched)."""
    patterns = ["*.json", MODEL_CARD_FILE]
    if any(name.endswith(".safetensors") for name in repo_files):
        return patterns + ["*.safetensors"]
    return patterns + ["*.bin"]


# --------------------------------------------------------------------------------------
# Reading the spec


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} ({what}) in {path.parent}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def weight_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's weight files, sorted: its *.safetensors, else its pickled PyTorch weights
    (pytorch_model.bin, or the shards pytorch_model.bin.index.json lists; other .bin files such as
    training_args.bin are not weights). Raises CheckpointError when there are none."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    index = model_dir / PICKLE_WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, "the index of the weight shards").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        shards = sorted({model_dir / str(name) for name in weight_map.values()})
        missing = [p.name for p in shards if not p.is_file() or p.parent != model_dir]
        if missing:
            raise CheckpointError(f"{index} lists weight shards that are not in {model_dir}: {missing}")
        return shards
    if (model_dir / PICKLE_WEIGHTS_FILE).is_file():
        return [model_dir / PICKLE_WEIGHTS_FILE]
    others = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = f" (found {others}, which are not model weights by name)" if others else ""
    raise CheckpointError(f"no weights in {model_dir}: expected *.safetensors, {PICKLE_WEIGHTS_FILE} or "
                          f"{PICKLE_WEIGHTS_INDEX_FILE}{hint}")


def is_pickle_weights(path: str | Path) -> bool:
    return not str(path).endswith(".safetensors")


# What `torch.load(..., weights_only=True)` needs to unpickle a state dict: tensors, their
# storages, dtypes and plain containers (a subset of torch's own allow-list,
# torch/_weights_only_unpickler.py). A file that names anything else would, unpickled fully,
# call it: such files are refused before any loading.
_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"), ("torch.serialization", "_get_layout"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("_codecs", "encode"), ("builtins", "set"),
    ("builtins", "bytearray"), ("builtins", "complex"),
    ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
    *(("torch._utils", f"_rebuild_{kind}") for kind in (
        "tensor", "tensor_v2", "tensor_v3", "parameter", "parameter_with_state", "qtensor", "sparse_tensor",
        "meta_tensor_no_storage", "nested_tensor")),
}
_TORCH_DTYPES = {
    "float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32", "int16", "int8",
    "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32",
    "uint64", "double", "float", "half", "long", "int", "short", "cfloat", "cdouble",
}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def _pickle_allows(module: str, name: str) -> bool:
    if (module, name) in _PICKLE_ALLOWED:
        return True
    # Legacy storage classes (torch.FloatStorage, ...) and dtypes (torch.float32, ...).
    return module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES)


def _pickle_globals(data: bytes) -> list[tuple[str, str] | None]:
    """Every (module, name) the pickle in ``data`` imports, in order (None: one whose name is
    computed, which a state dict never does). Read with pickletools: parsed, never executed."""
    found: list[tuple[str, str] | None] = []
    pushed: list[object] = []  # what string opcodes (or memo reads) pushed, else None
    memo: dict[int, object] = {}
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append((module, attr))
        elif name == "STACK_GLOBAL":
            module, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            found.append((module, attr) if isinstance(module, str) and isinstance(attr, str) else None)
        elif name in ("EXT1", "EXT2", "EXT4"):
            found.append(None)  # the copyreg extension registry: a computed import
        if name in _STRING_OPS:
            pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        else:
            pushed.append(None)
    return found


def _pickles_of(path: Path) -> list[bytes]:
    """The pickles of a torch.save file: data.pkl of the zip format (torch >= 1.6), or the
    leading pickles of the legacy format (magic number, protocol, system info, the object,
    the storage keys)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    data = path.read_bytes()
    pickles, offset = [], 0
    for _ in range(5):
        if offset >= len(data):
            break  # a bare pickle (or fewer than torch's five): all of it is scanned
        stream = io.BytesIO(data[offset:])
        end = 0
        for op, _, pos in pickletools.genops(stream):
            if op.name == "STOP":
                end = pos + 1
                break
        pickles.append(data[offset:offset + end])
        offset += end
    return pickles


def check_pickle_weights(path: str | Path) -> None:
    """Refuse a pickled weights file that needs more than ``torch.load(weights_only=True)``
    allows (tensors, storages, dtypes, plain containers): CheckpointError naming what it would
    import. The file is parsed, never unpickled, so no code from it runs; the load itself then
    uses weights_only=True as well (`vmae_ray.embedder`)."""
    path = Path(path)
    try:
        imports = [g for data in _pickles_of(path) for g in _pickle_globals(data)]
    except Exception as exc:  # noqa: BLE001 - not a pickle torch.save writes
        raise CheckpointError(f"{path.name} is not a PyTorch weights file ({type(exc).__name__}: {exc})") from exc
    refused = sorted({"a computed import" if g is None else f"{g[0]}.{g[1]}" for g in imports
                      if g is None or not _pickle_allows(*g)})
    if refused:
        raise CheckpointError(
            f"{path.name} needs more than tensors and plain containers to unpickle (it imports "
            f"{', '.join(refused[:5])}); it is refused because loading it would run code from the file. "
            "Use a checkpoint with safetensors weights, or a state dict saved with torch.save")


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
    raise CheckpointError(f"unsupported size value {value!r} in {PREPROCESSOR_FILE}")


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise CheckpointError(f"{name} must have 3 values (RGB), got {value!r}")
    return (values[0], values[1], values[2])


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"only a square {name} is supported, got {value!r}")
        value = value[0]
    return int(value)


def preprocessor_file(model_dir: str | Path) -> Path:
    """The preprocessing file a checkpoint directory is read with: video_preprocessor_config.json
    when there is one (transformers 5's video processor), else preprocessor_config.json (see
    VIDEO_PREPROCESSOR_FILE). Raises CheckpointError when it has neither."""
    for name in PREPROCESSOR_FILES:
        if (Path(model_dir) / name).is_file():
            return Path(model_dir) / name
    raise CheckpointError(f"missing {PREPROCESSOR_FILE} (image preprocessing) or {VIDEO_PREPROCESSOR_FILE} "
                          f"(video preprocessing) in {model_dir}")


def _fingerprint(model_dir: Path, preprocessor: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in (model_dir / CONFIG_FILE, preprocessor):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    # Names and sizes, not contents: hashing gigabytes of weights on every start is not worth
    # it, and a re-trained checkpoint also changes its config or its file sizes in practice.
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()


def model_card_license(model_dir: str | Path) -> str | None:
    """The `license:` field of the model card's YAML front matter (README.md), or None.

    Hub model cards start with a `---` block of YAML metadata; MCG-NJU's say
    `license: cc-by-nc-4.0`.
    """
    card = Path(model_dir) / MODEL_CARD_FILE
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.DOTALL)
    if not match:
        return None
    import yaml

    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    return str(value) if value else None


def is_non_commercial(license_id: str | None) -> bool:
    """True for Creative Commons NC licences (e.g. cc-by-nc-4.0) and other 'non-commercial' terms."""
    if not license_id:
        return False
    text = license_id.lower()
    return "-nc" in text or "noncommercial" in text.replace("-", "").replace(" ", "")


def spec_from_dir(model_dir: str, model_ref: str | None = None) -> ModelSpec:
    """Read the ModelSpec of a local checkpoint directory; raises CheckpointError on what it refuses."""
    root = Path(model_dir)
    model_ref = model_ref or model_dir
    raw_config = _read_json(root / CONFIG_FILE, "model config")
    model_type = raw_config.get("model_type")
    if model_type != "videomae":
        raise CheckpointError(f"config.json has model_type={model_type!r}; only 'videomae' is supported")
    preprocessor = preprocessor_file(root)
    pre = _read_json(preprocessor, "preprocessing")
    files = weight_files(root)
    for path in files:
        if is_pickle_weights(path):
            check_pickle_weights(path)

    def conf(key: str) -> Any:
        return raw_config.get(key, CONFIG_DEFAULTS[key])

    def prep(key: str) -> Any:
        return pre.get(key, PREPROCESSOR_DEFAULTS[key])

    image_size = _square(conf("image_size"), "image_size")
    patch_size = _square(conf("patch_size"), "patch_size")
    num_frames, tubelet_size = int(conf("num_frames")), int(conf("tubelet_size"))
    if int(conf("num_channels")) != 3:
        raise CheckpointError(f"num_channels={conf('num_channels')}; clips are RGB (3)")
    if num_frames % tubelet_size:
        raise CheckpointError(f"num_frames={num_frames} is not a multiple of tubelet_size={tubelet_size}")

    if not prep("do_resize"):
        raise CheckpointError(
            "preprocessor has do_resize=false; videos of any size need a resize to the model's input, so this "
            "checkpoint's preprocessing is not supported"
        )
    size = _size_dict(prep("size"), default_to_square=False)
    if set(size) != {"shortest_edge"}:
        raise CheckpointError(
            f"preprocessor size={size}; only {{'shortest_edge': N}} (aspect-preserving resize, as in the MCG-NJU "
            "checkpoints) is supported"
        )
    shortest_edge = size["shortest_edge"]
    if prep("do_center_crop"):
        crop = _size_dict(prep("crop_size"), default_to_square=True)
        if set(crop) != {"height", "width"}:
            raise CheckpointError(f"crop_size must have height and width, got {crop}")
        crop_height, crop_width = crop["height"], crop["width"]
    else:
        crop_height = crop_width = shortest_edge
    if (crop_height, crop_width) != (image_size, image_size):
        raise CheckpointError(
            f"preprocessing yields {crop_height}x{crop_width} frames but the model's image_size is "
            f"{image_size}x{image_size}"
        )
    if shortest_edge < max(crop_height, crop_width):
        raise CheckpointError(
            f"shortest_edge={shortest_edge} is smaller than the crop {crop_height}x{crop_width} (transformers "
            "would zero-pad); not supported"
        )
    if image_size % patch_size:
        raise CheckpointError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")

    rescale_factor = float(prep("rescale_factor")) if prep("do_rescale") else 1.0
    if prep("do_normalize"):
        image_mean = _triple(prep("image_mean"), "image_mean")
        image_std = _triple(prep("image_std"), "image_std")
        if min(image_std) <= 0:
            raise CheckpointError(f"image_std must be positive, got {image_std}")
    else:
        image_mean, image_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = int(prep("resample"))
    if resample not in range(6):
        raise CheckpointError(f"resample={resample} is not a PIL filter code (0..5)")

    architectures = list(raw_config.get("architectures") or [])
    is_classifier = CLASSIFIER_ARCHITECTURE in architectures
    id2label = None
    if is_classifier:
        id2label = {int(k): str(v) for k, v in (raw_config.get("id2label") or {}).items()}
        if not id2label:
            raise CheckpointError(f"a {CLASSIFIER_ARCHITECTURE} checkpoint without id2label")

    return ModelSpec(
        model_ref=model_ref,
        model_dir=str(root),
        num_frames=num_frames,
        tubelet_size=tubelet_size,
        patch_size=patch_size,
        image_size=image_size,
        resize_shortest_edge=int(shortest_edge),
        crop_height=int(crop_height),
        crop_width=int(crop_width),
        rescale_factor=rescale_factor,
        image_mean=image_mean,
        image_std=image_std,
        resample=resample,
        hidden_size=int(conf("hidden_size")),
        id2label=id2label,
        architecture=CLASSIFIER_ARCHITECTURE if is_classifier else (architectures[0] if architectures else "VideoMAEModel"),
        has_decoder=PRETRAINING_ARCHITECTURE in architectures and not is_classifier,
        norm_pix_loss=bool(conf("norm_pix_loss")),
        license=model_card_license(root),
        fingerprint=_fingerprint(root, preprocessor, files),
    )


def load_model_spec(model_ref: str, storage=None, cache_root: str | None = None) -> ModelSpec:
    """Locate a checkpoint and read its ModelSpec (configs only, no weights, no torch).

    Raises CheckpointError naming the problem for: a reference that names nothing, a missing
    config.json or preprocessing file (preprocessor_config.json or
    video_preprocessor_config.json), a model_type other than 'videomae', no weights
    (*.safetensors, pytorch_model.bin or its shards), pickled weights that need more than
    tensors and plain containers (`check_pickle_weights`), or preprocessing this job cannot
    reproduce.
    """
    return spec_from_dir(resolve_model_dir(model_ref, storage, cache_root), model_ref)
