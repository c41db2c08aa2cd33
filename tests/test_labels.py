"""Tests for vmae_ray.labels: top-k labels from logits."""

from __future__ import annotations

import numpy as np
import pytest

from vmae_ray.labels import top_k_labels


def test_top_k_labels():
    id2label = {0: "a", 1: "b", 2: "c"}
    logits = np.array([[0.0, 2.0, 1.0], [5.0, 5.0, -1.0]], dtype=np.float32)
    labels, scores = top_k_labels(logits, id2label, k=2)
    assert labels == [["b", "c"], ["a", "b"]]  # ties keep class order
    probs = np.exp([0.0, 2.0, 1.0]) / np.exp([0.0, 2.0, 1.0]).sum()
    np.testing.assert_allclose(scores[0], [probs[1], probs[2]], rtol=1e-6)
    tie = np.exp(5.0) / (2 * np.exp(5.0) + np.exp(-1.0))
    np.testing.assert_allclose(scores[1], [tie, tie], rtol=1e-6)
    all_labels, all_scores = top_k_labels(logits, id2label, k=10)  # k larger than the label count
    assert [len(r) for r in all_labels] == [3, 3]
    np.testing.assert_allclose([sum(r) for r in all_scores], [1.0, 1.0], rtol=1e-9)
    assert all(r == sorted(r, reverse=True) for r in all_scores)
    with pytest.raises(ValueError, match="k must be"):
        top_k_labels(logits, id2label, k=0)
