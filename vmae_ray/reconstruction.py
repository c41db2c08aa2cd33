"""Masked-patch reconstruction scores: a VideoMAE pretraining checkpoint's own loss on a clip.

A pretraining checkpoint (`VideoMAEForPreTraining`, e.g. MCG-NJU/videomae-base-short-ssv2)
carries the decoder that predicts the pixels of masked tubes from the visible ones. Its loss
on a clip says how predictable the clip is from a tenth of its patches: low for static,
blank or redundant footage, high for noise, glitches and content unlike what it learned.

Two halves, both without Ray:

- masks (numpy only, importable without torch): `clip_mask` draws VideoMAE's tube mask for a
  clip from a generator seeded by (mask seed, a digest of the clip's pixels), so the same
  pixels get the same mask (and score) wherever the file lives, in reruns and resumed runs
  alike, and different clips independent ones; `pack_mask`/`unpack_mask` store it as
  `numpy.packbits` bytes.
- the loss (torch): `MaskedReconstruction` runs the embedder's encoder on the visible tokens,
  then `encoder_to_decoder`, mask tokens + the decoder's position table and the decoder, and
  compares its prediction of the masked tokens with `reconstruction_targets`.

Conventions (source: transformers 5.x `VideoMAEForPreTraining.forward`, which follows the
VideoMAE repo's `engine_for_pretraining.py` and `masking_generator.TubeMaskingGenerator`):

- token order is (time slot, patch row, patch column); a token's target is its tubelet's
  pixels ordered (frame in tubelet, y, x, channel), channel innermost;
- the target is the pixels in [0, 1] (the processor's rescale, without mean/std); with
  `norm_pix_loss` each token and channel is normalised over its tubelet_size * patch^2
  pixels: (x - mean) / (sqrt(unbiased var) + 1e-6);
- the loss is the mean squared error over the masked tokens and all their target values.

transformers rebuilds the [0, 1] pixels by un-normalising `pixel_values` with ImageNet's
mean/std whatever the checkpoint's preprocessor says; here they come from the uint8 clip
itself, which is the same for every checkpoint normalised with ImageNet mean/std (all
MCG-NJU ones, on which the decoder was trained) and the pixels the model was trained to
predict for any other. The per-patch statistics are taken on the whole pixel values 0..255
(`patch_normalisation`), where float32 sums are exact: a flat patch gets a target of exactly 0.
"""

from __future__ import annotations

import hashlib

import numpy as np

DEFAULT_MASK_RATIO = 0.9  # the VideoMAE paper's ratio for pretraining (Tong et al. 2022)
DEFAULT_MASK_SEED = 0
# Every DIGEST_STRIDE-th byte of a clip's pixels goes into the digest its mask is drawn from
# (`content_digest`): 9,372 of a 16x224x224x3 clip's 2.4 MB.
DIGEST_STRIDE = 257
NORM_PIX_EPS = 1e-6  # added to the per-patch standard deviation, as in transformers and the VideoMAE repo


# --------------------------------------------------------------------------------------
# Tube masks (numpy)


def masked_per_frame(tokens_per_frame: int, mask_ratio: float) -> int:
    """Masked tokens per time slot: int(mask_ratio * tokens_per_frame), as VideoMAE's TubeMaskingGenerator.

    Raises ValueError unless at least one token is masked and at least one stays visible.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio!r}")
    count = int(mask_ratio * tokens_per_frame)
    if not 0 < count < tokens_per_frame:
        raise ValueError(
            f"mask ratio {mask_ratio} masks {count} of the {tokens_per_frame} tokens of a frame; "
            "at least one must be masked and one visible")
    return count


def content_digest(pixels: np.ndarray) -> bytes:
    """16 bytes that stand for a uint8 clip's pixels: blake2b of its shape and of every
    `DIGEST_STRIDE`-th byte of its (T, H, W, C) pixels in C order.

    Byte-identical clips get the same digest wherever their files live; clips that differ
    anywhere a stride sample falls (in practice: any two different frames of real video) get
    independent ones. A sample, not every byte, because the digest is taken in the model actor,
    next to the GPU: blake2b of a whole 16x224x224 clip (2.4 MB) costs 1.5-3 ms of CPU, as much
    as a few H100 model calls; the sample (9.4 KB) costs about 30 us. The stride is prime, so
    the samples cycle through the channels and move across columns from row to row.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"expected a uint8 clip, got {pixels.dtype}")
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(pixels.shape, dtype="<u4").tobytes())
    digest.update(np.ascontiguousarray(pixels.reshape(-1)[::DIGEST_STRIDE]).tobytes())
    return digest.digest()


def mask_rng(mask_seed: int, digest: bytes) -> np.random.Generator:
    """The generator a clip's mask is drawn from: SeedSequence([mask_seed, *digest as little-endian
    uint32 words]) for the clip's `content_digest`. Stable across processes, reruns and resumes
    (no salted `hash`)."""
    words = np.frombuffer(digest, dtype="<u4").tolist()
    return np.random.default_rng(np.random.SeedSequence([int(mask_seed), *words]))


def tube_mask(rng: np.random.Generator, *, num_time_slots: int, tokens_per_frame: int,
              mask_ratio: float) -> np.ndarray:
    """VideoMAE tube masking: one spatial mask, the same in every time slot.

    Returns a bool array (num_time_slots * tokens_per_frame,), True = masked, in the model's
    token order; `masked_per_frame` tokens are masked per slot, at the positions of
    ``rng.permutation(tokens_per_frame)[:count]``.
    """
    count = masked_per_frame(tokens_per_frame, mask_ratio)
    spatial = np.zeros(tokens_per_frame, dtype=bool)
    spatial[rng.permutation(tokens_per_frame)[:count]] = True
    return np.tile(spatial, num_time_slots)


def clip_mask(pixels: np.ndarray, *, mask_seed: int, mask_ratio: float, num_time_slots: int,
              tokens_per_frame: int) -> np.ndarray:
    """The mask of one uint8 clip (T, H, W, 3): bool (num_time_slots * tokens_per_frame,), drawn
    from its pixels (`content_digest`) and ``mask_seed``, so that the same pixels get the same
    mask, and the same score, whatever file, path or clip index they came from."""
    return tube_mask(mask_rng(mask_seed, content_digest(pixels)), num_time_slots=num_time_slots,
                     tokens_per_frame=tokens_per_frame, mask_ratio=mask_ratio)


def pack_mask(mask: np.ndarray) -> bytes:
    """A bool mask as `numpy.packbits` bytes (big-endian bit order, zero-padded to whole bytes)."""
    return np.packbits(np.asarray(mask, dtype=bool)).tobytes()


def unpack_mask(data: bytes, num_tokens: int) -> np.ndarray:
    """`pack_mask`'s inverse: the bool mask of ``num_tokens`` tokens (the `bool_masked_pos` of transformers)."""
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:num_tokens].astype(bool)


# --------------------------------------------------------------------------------------
# Targets and pixels (torch)


def patchify(pixels, tubelet_size: int, patch_size: int):
    """Channels-last clips (B, T, H, W, C) -> (B, N, tubelet_size * patch_size^2, C) in the model's token order."""
    b, t, h, w, c = pixels.shape
    ts, p = tubelet_size, patch_size
    blocks = pixels.reshape(b, t // ts, ts, h // p, p, w // p, p, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return blocks.reshape(b, (t // ts) * (h // p) * (w // p), ts * p * p, c)


def unpatchify(patches, *, num_frames: int, height: int, width: int, tubelet_size: int, patch_size: int):
    """`patchify`'s inverse: (B, N, tubelet_size * patch_size^2, C) -> (B, T, H, W, C)."""
    b, c = patches.shape[0], patches.shape[-1]
    ts, p = tubelet_size, patch_size
    blocks = patches.reshape(b, num_frames // ts, height // p, width // p, ts, p, p, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return blocks.reshape(b, num_frames, height, width, c)


def masked_tubelets(clips, masks, *, tubelet_size: int, patch_size: int):
    """The pixels (0..255, float32) of the masked tokens: (B, M, C, tubelet_size * patch_size^2).

    ``clips``: uint8 (B, T, H, W, C) tensor; ``masks``: bool (B, N) with M True per row. Channel
    before pixel, so the per-channel statistics below reduce over contiguous memory.
    """
    b, t, h, w, c = clips.shape
    ts, p = tubelet_size, patch_size
    blocks = clips.reshape(b, t // ts, ts, h // p, p, w // p, p, c).permute(0, 1, 3, 5, 7, 2, 4, 6)
    blocks = blocks.reshape(b, (t // ts) * (h // p) * (w // p), c, ts * p * p)  # uint8: the cheap copy
    return blocks[masks].reshape(b, -1, c, ts * p * p).float()


def patch_normalisation(values, rescale_factor: float):
    """(mean, scale) over the last axis of pixel values (0..255), each (..., 1):
    target = (x - mean) / scale is transformers' (x' - mean') / (sqrt(unbiased var') + 1e-6) on
    x' = x * rescale_factor, computed in pixel units: sums of whole pixel values are exact in
    float32, so a flat patch (blank frames, letterbox bars) gets a target of exactly 0 instead
    of its float rounding divided by the epsilon."""
    import torch

    var, mean = torch.var_mean(values, dim=-1, correction=1, keepdim=True)
    return mean, var.sqrt_().add_(NORM_PIX_EPS / rescale_factor)


def reconstruction_targets(clips, masks, *, tubelet_size: int, patch_size: int, rescale_factor: float,
                           norm_pix_loss: bool):
    """What the decoder predicts for the masked tokens: (B, M, tubelet_size * patch_size^2 * 3) float32,
    in transformers' order (channel innermost), as its `labels`.

    ``clips``: uint8 (B, T, H, W, 3) tensor; ``masks``: bool (B, N), the same count M of True
    per row. Pixels in [0, 1] (x * rescale_factor) or, with ``norm_pix_loss``, normalised per
    token and channel (`patch_normalisation`).
    """
    values = masked_tubelets(clips, masks, tubelet_size=tubelet_size, patch_size=patch_size)
    if norm_pix_loss:
        mean, scale = patch_normalisation(values, rescale_factor)
        values = values.sub_(mean).div_(scale)  # in place: `masked_tubelets` returned a fresh tensor
    else:
        values = values.mul_(rescale_factor)
    return values.transpose(-1, -2).reshape(values.shape[0], values.shape[1], -1)


class MaskedReconstruction:
    """The pretraining decoder of a loaded `VideoMAEForPreTraining`, fed from the embedder's encoder.

    ``patches`` is the embedder's `FoldedPatchEmbedding` (uint8 in, normalisation folded in,
    position table added), so the encoder sees exactly what `VideoMAEModel` would see for the
    processor's `pixel_values`; only the visible tokens go through it here. The model runs in
    its dtype; targets and loss are float32.
    """

    def __init__(self, model, patches, spec, device, dtype):
        import torch

        self.spec = spec
        self.encoder_owner = model.videomae
        self.encoder_to_decoder = model.encoder_to_decoder
        self.mask_token = model.mask_token
        self.decoder = model.decoder
        self.norm_pix_loss = bool(model.config.norm_pix_loss)
        self.patches = patches
        # The decoder's fixed sinusoid table is a plain attribute of the model (not a buffer), so
        # `model.to(device)` leaves it on the host; transformers copies it on every call.
        self.position = model.position_embeddings.detach().to(device, dtype)  # (1, N, decoder D)
        self.dtype = dtype
        self._torch = torch

    def _check_masks(self, clips, masks):
        if masks.dtype != self._torch.bool or masks.ndim != 2 or tuple(masks.shape) != (clips.shape[0], self.spec.num_tokens):
            raise ValueError(f"masks must be bool (B, {self.spec.num_tokens}) for {clips.shape[0]} clips, "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        counts = masks.sum(dim=1)
        if bool((counts != counts[0]).any()) or int(counts[0]) in (0, masks.shape[1]):
            raise ValueError(f"every clip must have the same number of masked tokens, at least one masked and one "
                             f"visible; got {counts.tolist()}")

    def predict(self, clips, masks):
        """Decoder output for the masked tokens, (B, M, tubelet_size * patch_size^2 * 3) in the model's dtype.

        ``clips``: uint8 (B, T, H, W, 3) on the device; ``masks``: bool (B, N) on the device.
        Raises ValueError for masks of the wrong shape or with unequal counts per clip.
        """
        torch = self._torch
        self._check_masks(clips, masks)
        b = clips.shape[0]
        tokens = self.patches(clips)  # (B, N, D), position embeddings included
        visible = tokens[~masks].reshape(b, -1, tokens.shape[-1])
        owner = self.encoder_owner
        hidden = owner.encoder(visible).last_hidden_state
        if owner.layernorm is not None:
            hidden = owner.layernorm(hidden)
        hidden = self.encoder_to_decoder(hidden)
        width = hidden.shape[-1]
        position = self.position.expand(b, -1, -1)
        masked_position = position[masks].reshape(b, -1, width)
        # As transformers: visible tokens first, then one mask token per masked position; the
        # decoder returns its prediction for the last M tokens.
        decoder_input = torch.cat(
            [hidden + position[~masks].reshape(b, -1, width), self.mask_token.to(hidden.dtype) + masked_position], dim=1)
        return self.decoder(decoder_input, masked_position.shape[1]).logits

    def loss(self, clips, masks):
        """Per-clip pretraining loss, (B,) float32: MSE of `predict` against `reconstruction_targets`.

        Equals transformers' `VideoMAEForPreTraining(pixel_values, bool_masked_pos=mask).loss`
        for each clip alone (its batch loss is the mean of these: every clip masks as many tokens).
        """
        return self._predict_and_score(clips, masks)[1]

    def _predict_and_score(self, clips, masks):
        spec = self.spec
        predicted = self.predict(clips, masks).float()
        targets = reconstruction_targets(clips, masks, tubelet_size=spec.tubelet_size, patch_size=spec.patch_size,
                                         rescale_factor=spec.rescale_factor, norm_pix_loss=self.norm_pix_loss)
        return predicted, targets.sub_(predicted).square_().mean(dim=(1, 2))

    def reconstruct(self, clips, masks):
        """(per-clip loss (B,) float32, reconstructed clips (B, T, H, W, 3) float32 in [0, 1]).

        Visible tokens keep the input's pixels; masked ones are the decoder's prediction, with
        `norm_pix_loss` un-normalised by the input patch's own mean and standard deviation (the
        VideoMAE repo's `run_videomae_vis.py` does the same), then clipped to [0, 1].
        """
        spec = self.spec
        predicted, loss = self._predict_and_score(clips, masks)
        b, m = predicted.shape[:2]
        channels = clips.shape[-1]
        values = predicted.reshape(b, m, -1, channels)  # (B, M, pixels, C), transformers' order
        if self.norm_pix_loss:
            inputs = masked_tubelets(clips, masks, tubelet_size=spec.tubelet_size, patch_size=spec.patch_size)
            mean, scale = patch_normalisation(inputs, spec.rescale_factor)  # (B, M, C, 1)
            values = values * scale.transpose(-1, -2) + mean.transpose(-1, -2)
        else:
            values = values / spec.rescale_factor
        patches = patchify(clips.float(), spec.tubelet_size, spec.patch_size)
        patches[masks] = values.reshape(-1, *values.shape[2:])
        pixels = unpatchify(patches, num_frames=clips.shape[1], height=clips.shape[2], width=clips.shape[3],
                            tubelet_size=spec.tubelet_size, patch_size=spec.patch_size)
        return loss, (pixels * spec.rescale_factor).clamp(0.0, 1.0)
