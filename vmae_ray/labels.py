"""Top-k labels from classifier logits: pure numpy, shared by every producer of labels.

Used for a fine-tuned classifier checkpoint's logits inside the job and, in the same way,
for a linear probe head's logits.
"""

from __future__ import annotations

import numpy as np


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
