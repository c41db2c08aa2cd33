"""Embedding clips with a VideoMAE encoder: loading guard, folded normalisation, pooling.

Plain PyTorch/transformers, no Ray: the Ray embed stage (`vmae_ray.stages.EmbedActor`) only
adapts batches to `VideoMAEEmbedder.embed`. What the checkpoint needs as input comes from
`vmae_ray.checkpoint.ModelSpec`, read without torch.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vmae_ray.checkpoint import ModelSpec, is_pickle_weights, resolve_model_dir, spec_from_dir, weight_files

logger = logging.getLogger(__name__)

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
# The same biases in a pretraining checkpoint's decoder (checked when the decoder is used).
_DECODER_QV_BIAS_KEY = re.compile(
    r"^decoder\.decoder_layers\.(\d+)\.attention\.attention\.(q_bias|v_bias|query\.bias|value\.bias)$"
)


class ModelLoadError(RuntimeError):
    """The checkpoint's weights do not load completely and exactly into the model."""




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
    # Its "Loading weights" progress bar goes too: a local load takes milliseconds, and in the
    # job every actor's bar lands in the driver's log. (The setting is process-wide: restored.)
    from transformers.utils import logging as hf_logging

    report_logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    report_logger.addFilter(report_filter)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        report_logger.removeFilter(report_filter)
        if bar_was_on:
            hf_logging.enable_progress_bar()


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


def load_pickle_weights(path: str | Path, model_dir: str) -> dict:
    """The state dict of a pickled weights file (pytorch_model.bin or a shard), read with
    ``torch.load(weights_only=True)``: tensors and plain containers only, never code. A file
    that needs more is refused (ModelLoadError naming --model); `checkpoint.check_pickle_weights`
    already refused such files without unpickling them, this is the second line."""
    import pickle
    import zipfile

    import torch

    try:
        # mmap: the tensors stay in the file until used (zip format only; legacy files are read).
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(f"--model {model_dir}: {Path(path).name} is refused: it needs more than tensors and "
                             f"plain containers to unpickle (torch.load weights_only=True: {exc})") from exc


def _file_tensors(path: Path, model_dir: str):
    """(key, tensor getter) of every tensor of a weights file, safetensors or pickled."""
    if is_pickle_weights(path):
        state = load_pickle_weights(path, model_dir)
        for key, tensor in state.items():
            yield key, (lambda t=tensor: t)
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            yield key, (lambda k=key: f.get_tensor(k))


def _verify_qv_biases(encoder_owner, files: list[Path], model_dir: str, decoder=None) -> int:
    """Compare every attention q/v bias in the model with the file; returns how many matched.

    Works on every weights format (safetensors, pytorch_model.bin and its shards) and both key
    names (original q_bias/v_bias, newer query.bias/value.bias). ``decoder``: a
    `VideoMAEDecoder` whose layers' biases are checked too (reconstruction).
    """
    import torch

    groups = {"encoder": (_QV_BIAS_KEY, encoder_owner.encoder.layer)}
    if decoder is not None:
        groups["decoder"] = (_DECODER_QV_BIAS_KEY, decoder.decoder_layers)
    checked = dict.fromkeys(groups, 0)
    for path in files:
        for key, tensor in _file_tensors(path, model_dir):
            found = next(((part, layers, m) for part, (pattern, layers) in groups.items()
                          if (m := pattern.match(key)) is not None), None)
            if found is None:
                continue
            part, layers, match = found
            index, name = int(match.group(1)), match.group(2)
            attention = layers[index].attention.attention
            linear = attention.query if name in ("q_bias", "query.bias") else attention.value
            loaded = linear.bias
            expected = tensor()
            if loaded is None or not torch.equal(loaded.detach().cpu(), expected.to(loaded.dtype)):
                raise ModelLoadError(
                    f"checkpoint {model_dir}: {key} did not load (the model's value differs from the "
                    "file; some transformers releases load VideoMAE q/v biases as zeros)"
                )
            checked[part] += 1
    if encoder_owner.config.qv_bias:
        for part, count in checked.items():
            if count == 0:
                raise ModelLoadError(f"checkpoint {model_dir}: config has qv_bias=true but the file has no {part} "
                                     "q/v biases")
    return sum(checked.values())


class VideoMAEEmbedder:
    """Loads a VideoMAE checkpoint once and embeds batches of uint8 clips.

    An actor constructs one; construction fails loudly (ModelLoadError) rather than embed
    with weights that did not load:
    - weights come from *.safetensors, else from pytorch_model.bin (or its shards) read with
      torch.load(weights_only=True), tensors and plain containers only, so no code from the
      file runs (`load_pickle_weights`); the model class is chosen here, never from remote code;
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
    every clip (on CPU, most of the model stage's time with a small encoder). The clip
    embedding is the mean over the encoder's output tokens (VideoMAE has no CLS token),
    computed in float32, followed by fc_norm when a classifier has it: exactly the features
    its classifier sees. For VideoMAEModel it is
    last_hidden_state.mean(1), including the model's own final layernorm when
    use_mean_pooling=false (the pretraining checkpoints). Outputs are float32 numpy arrays.

    With ``reconstruction=True`` (a pretraining checkpoint only; ValueError otherwise) the whole
    `VideoMAEForPreTraining` loads, the guard allows no unexpected key and checks the decoder's
    q/v biases too, and `embed_with_reconstruction` also returns each clip's pretraining loss
    (`vmae_ray.reconstruction.MaskedReconstruction`, sharing this encoder and patch embedding).
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
        reconstruction: bool = False,
    ):
        import torch
        from transformers import VideoMAEForPreTraining, VideoMAEForVideoClassification, VideoMAEModel

        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.model_dir = resolve_model_dir(model_ref, storage, cache_root)
        self.spec = spec_from_dir(self.model_dir, model_ref)
        is_classifier = self.spec.has_labels
        if reconstruction and not self.spec.has_decoder:
            raise ValueError(f"{self.model_dir} is a {self.spec.architecture} checkpoint without the pretraining "
                             "decoder; reconstruction needs a VideoMAEForPreTraining checkpoint")
        if is_classifier:
            model_cls = VideoMAEForVideoClassification
        else:
            model_cls = VideoMAEForPreTraining if reconstruction else VideoMAEModel
        files = weight_files(self.model_dir)
        pickled = any(is_pickle_weights(path) for path in files)
        if pickled:
            for path in files:  # refused here, with --model named, before transformers reads them
                load_pickle_weights(path, self.model_dir)
        try:
            with _quiet_load_report():
                model, info = model_cls.from_pretrained(
                    self.model_dir,
                    output_loading_info=True,
                    use_safetensors=not pickled,
                    weights_only=True,  # pytorch_model.bin: tensors and plain containers only
                    trust_remote_code=False,
                    attn_implementation="sdpa",
                    dtype=self.dtype,
                    # Mismatches are reported by the guard (with shapes) instead of transformers
                    # raising "look at the above report" about a report we silenced.
                    ignore_mismatched_sizes=True,
                )
        except Exception as exc:
            raise ModelLoadError(f"cannot load {model_cls.__name__} from {self.model_dir}: {exc}") from exc
        # With the decoder in use, its weights are held to the same standard as the encoder's.
        ignored = _check_loading_info(info, self.model_dir,
                                      allow_pretraining_keys=not is_classifier and not reconstruction)
        encoder_owner = model if model_cls is VideoMAEModel else model.videomae
        checked = _verify_qv_biases(encoder_owner, files, self.model_dir,
                                    decoder=model.decoder if reconstruction else None)
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
        self.reconstruction = None
        if reconstruction:
            from vmae_ray.reconstruction import MaskedReconstruction

            self.reconstruction = MaskedReconstruction(self.model, self._patches, self.spec, self.device, self.dtype)

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

    def _masks_to_device(self, masks: np.ndarray, num_clips: int):
        import torch

        if self.reconstruction is None:
            raise RuntimeError("this embedder was built without reconstruction=True")
        masks = np.asarray(masks)
        if masks.dtype != bool or masks.shape != (num_clips, self.spec.num_tokens):
            raise ValueError(f"masks must be bool ({num_clips}, {self.spec.num_tokens}), got {masks.dtype} {masks.shape}")
        return torch.from_numpy(np.ascontiguousarray(masks)).to(self.device)

    def embed_with_reconstruction(self, clips: np.ndarray, masks: np.ndarray
                                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """`embed`, plus each clip's pretraining loss under its mask.

        uint8 clips (B, T, H, W, 3) and bool masks (B, N) (True = masked, the same count per
        clip) -> (embeddings (B, D), logits or None, losses (B,) float32). The encoder runs once
        over all tokens for the embedding and once over the visible ones for the loss.
        """
        import torch

        with torch.inference_mode():
            device_clips = self._to_device(clips)
            device_masks = self._masks_to_device(masks, len(clips))
            embeddings, logits = self._forward(device_clips)
            losses = self.reconstruction.loss(device_clips, device_masks)
            return (embeddings.cpu().numpy(), None if logits is None else logits.cpu().numpy(),
                    losses.cpu().numpy())

    def reconstruct(self, clips: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each clip's loss (B,) float32 and its reconstruction (B, T, H, W, 3) float32 in [0, 1]
        (visible patches from the input, masked ones predicted; see `MaskedReconstruction.reconstruct`)."""
        import torch

        with torch.inference_mode():
            device_clips = self._to_device(clips)
            losses, pixels = self.reconstruction.reconstruct(device_clips, self._masks_to_device(masks, len(clips)))
            return losses.cpu().numpy(), pixels.cpu().numpy()


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
