"""Linear heads on embeddings (linear probes): one affine map from an embedding to logits.

Pure numpy and safetensors: no Ray, no torch, no scikit-learn. `vmae_ray.probe` fits a head
with scikit-learn and saves it here; applying it (`vmae-ray probe apply`, `vmae-ray embed
--head`) needs only this module. A head directory holds:

    head.safetensors   `weight` float64 (L, D) and `bias` float64 (L,): logits = weight @ x + bias
                       on the raw embedding x (the standardisation it was fitted with is folded in)
    head.json          id2label, level, the fingerprints of the tables it was fitted on, provenance;
                       written last, so a directory with head.json holds a whole head
    metrics.json       the cross-validated metrics of the fit (written by `vmae-ray probe fit`)

Weights are float64: folding a standardisation divides by per-feature standard deviations,
which are small next to the features' means for VideoMAE embeddings (their cosine similarity is
high), so W x and b are large and cancel; float32 would lose digits there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmae_ray.storage import StorageOptions, join, url_to_fs

FORMAT = "vmae-ray-head/1"
WEIGHTS_FILE = "head.safetensors"
HEAD_FILE = "head.json"
METRICS_FILE = "metrics.json"
# What a head was fitted on: one row per video (videos/) or per clip (clips/).
LEVELS = ("video", "clip")


class HeadError(ValueError):
    """A head directory that cannot be read, or a head that does not fit the embeddings."""


class HeadMismatchError(HeadError):
    """The head was fitted on embeddings of another model or of other settings."""


@dataclass(frozen=True)
class LinearHead:
    """A linear classifier over embeddings of dimension D with L labels.

    ``weight`` (L, D) and ``bias`` (L,) map a raw embedding to logits; softmax of the logits
    gives the class probabilities. ``model_fingerprint``, ``embedding_fingerprint`` and
    ``settings_fingerprint`` are those of the tables it was fitted on (`_SUCCESS`: model
    checkpoint; what decides the embedding values: checkpoint, sampling, frames,
    preprocessing; all settings of that run). Embeddings are comparable exactly when the first
    two match. ``info`` is free-form provenance (tables, label column, scikit-learn version).
    """

    weight: np.ndarray
    bias: np.ndarray
    id2label: dict[int, str]
    level: str
    model_fingerprint: str
    embedding_fingerprint: str
    settings_fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        weight = np.ascontiguousarray(self.weight, dtype=np.float64)
        bias = np.ascontiguousarray(self.bias, dtype=np.float64)
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise HeadError(f"weight must be (L, D) and bias (L,); got {weight.shape} and {bias.shape}")
        if sorted(self.id2label) != list(range(weight.shape[0])):
            raise HeadError(f"id2label must name the {weight.shape[0]} rows 0..{weight.shape[0] - 1}; "
                            f"got ids {sorted(self.id2label)}")
        if self.level not in LEVELS:
            raise HeadError(f"level {self.level!r}; expected one of {', '.join(LEVELS)}")
        if not np.isfinite(weight).all() or not np.isfinite(bias).all():
            raise HeadError("the head's weights are not finite")
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    @property
    def embedding_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def num_labels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights, the labels and the level: two heads that label alike hash alike."""
        digest = hashlib.sha256()
        digest.update(self.weight.tobytes() + b"\0" + self.bias.tobytes() + b"\0")
        digest.update(json.dumps({"id2label": {str(k): v for k, v in sorted(self.id2label.items())},
                                  "level": self.level}, sort_keys=True).encode())
        return digest.hexdigest()[:24]

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Logits (N, L) float64 of embeddings (N, D) or (D,) (any float dtype), computed in float64.

        Raises HeadError when D differs from the head's.
        """
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        if x.shape[1] != self.embedding_dim:
            raise HeadError(f"embeddings have dimension {x.shape[1]}; the head takes {self.embedding_dim}")
        return x @ self.weight.T + self.bias

    def check_embeddings(self, *, model_fingerprint: str | None, embedding_fingerprint: str | None,
                         embedding_dim: int | None = None, what: str = "these embeddings",
                         embedding_settings: dict[str, Any] | None = None) -> None:
        """Raise HeadMismatchError, naming both fingerprints, unless ``what`` (tables or a run)
        has this head's model and embedding settings (and dimension). With ``embedding_settings``
        (what the embedding fingerprint hashes) and the head's own record of them
        (``info["embedding_settings"]``, from the tables it was fitted on), the message also
        says which settings differ."""
        if model_fingerprint != self.model_fingerprint:
            raise HeadMismatchError(
                f"the head was fitted on embeddings of another model: head model fingerprint {self.model_fingerprint}, "
                f"{what}: {model_fingerprint}")
        if embedding_fingerprint != self.embedding_fingerprint:
            ours = self.info.get("embedding_settings")
            differ = ""
            if isinstance(ours, dict) and embedding_settings:
                keys = sorted(k for k in set(ours) | set(embedding_settings) if ours.get(k) != embedding_settings.get(k))
                differ = "; " + ", ".join(f"{k}: {ours.get(k)!r} for the head, {embedding_settings.get(k)!r} for {what}"
                                          for k in keys)
            raise HeadMismatchError(
                "the head was fitted on embeddings made with other settings (sampling, frames or preprocessing): head "
                f"embedding fingerprint {self.embedding_fingerprint}, {what}: {embedding_fingerprint}{differ}")
        if embedding_dim is not None and embedding_dim != self.embedding_dim:
            raise HeadMismatchError(f"the head takes {self.embedding_dim}-dimensional embeddings; {what} have {embedding_dim}")

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for manifests: fingerprint, level, labels, what it was fitted on."""
        return {"fingerprint": self.fingerprint, "level": self.level, "num_labels": self.num_labels,
                "labels": [self.id2label[i] for i in range(self.num_labels)],
                "model_fingerprint": self.model_fingerprint, "embedding_fingerprint": self.embedding_fingerprint,
                "settings_fingerprint": self.settings_fingerprint}

    # -- files --------------------------------------------------------------------------------
    def save(self, uri: str, storage: StorageOptions | None = None, *, metrics: dict[str, Any] | None = None) -> None:
        """Write the head directory at ``uri`` (local or any fsspec URI); head.json goes last."""
        from safetensors.numpy import save

        from vmae_ray.writing import write_bytes_atomic  # each file whole or not at all

        storage = storage or StorageOptions()
        fs, root = url_to_fs(uri, storage)
        fs.makedirs(root, exist_ok=True)
        write_bytes_atomic(fs, join(root, WEIGHTS_FILE), save({"weight": self.weight, "bias": self.bias},
                                                    metadata={"format": FORMAT}))
        if metrics is not None:
            write_bytes_atomic(fs, join(root, METRICS_FILE), json.dumps(metrics, indent=1).encode())
        config = {
            "format": FORMAT, "level": self.level, "embedding_dim": self.embedding_dim,
            "id2label": {str(k): v for k, v in sorted(self.id2label.items())},
            "model_fingerprint": self.model_fingerprint, "embedding_fingerprint": self.embedding_fingerprint,
            "settings_fingerprint": self.settings_fingerprint, "head_fingerprint": self.fingerprint, **self.info,
        }
        write_bytes_atomic(fs, join(root, HEAD_FILE), json.dumps(config, indent=1).encode())

    @classmethod
    def load(cls, uri: str, storage: StorageOptions | None = None) -> LinearHead:
        """Read a head directory. Raises HeadError for a missing or malformed head."""
        from safetensors.numpy import load

        storage = storage or StorageOptions()
        fs, root = url_to_fs(uri, storage)
        head_path = join(root, HEAD_FILE)
        if not fs.exists(head_path):
            raise HeadError(f"{uri} holds no head ({HEAD_FILE} missing; fit one with `vmae-ray probe fit`)")
        try:
            with fs.open(head_path, "rb") as f:
                config = json.loads(f.read().decode("utf-8"))
            with fs.open(join(root, WEIGHTS_FILE), "rb") as f:
                tensors = load(f.read())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeadError(f"cannot read the head in {uri}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise HeadError(f"{uri}/{HEAD_FILE} is not a vmae-ray head (format {FORMAT})")
        if set(tensors) != {"weight", "bias"}:
            raise HeadError(f"{uri}/{WEIGHTS_FILE} must hold 'weight' and 'bias'; has {sorted(tensors)}")
        known = {"format", "level", "embedding_dim", "id2label", "model_fingerprint", "embedding_fingerprint",
                 "settings_fingerprint", "head_fingerprint"}
        try:
            head = cls(weight=tensors["weight"], bias=tensors["bias"],
                       id2label={int(k): str(v) for k, v in config["id2label"].items()}, level=config["level"],
                       model_fingerprint=config["model_fingerprint"],
                       embedding_fingerprint=config["embedding_fingerprint"],
                       settings_fingerprint=config["settings_fingerprint"],
                       info={k: v for k, v in config.items() if k not in known})
        except KeyError as exc:
            raise HeadError(f"{uri}/{HEAD_FILE} lacks {exc.args[0]!r}") from None
        if config.get("embedding_dim") != head.embedding_dim:
            raise HeadError(f"{uri}: {HEAD_FILE} says embedding_dim {config.get('embedding_dim')}, the weights "
                            f"are {head.weight.shape}")
        # head.json names the weights and labels it was written with: a directory caught half
        # way through an overwrite (new weights, old labels) must not label anything.
        if config.get("head_fingerprint") not in (None, head.fingerprint):
            raise HeadError(f"{uri}: {WEIGHTS_FILE} and {HEAD_FILE} are not from the same fit (an interrupted "
                            "overwrite?); fit the head again")
        return head


def head_exists(uri: str, storage: StorageOptions | None = None) -> bool:
    """Whether ``uri`` holds a head (its head.json)."""
    fs, root = url_to_fs(uri, storage or StorageOptions())
    return fs.exists(join(root, HEAD_FILE))
