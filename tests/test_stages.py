"""The Ray adapters without Ray: EmbedActor is a plain class, called here as Ray Data would."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vmae_ray.embedder import VideoMAEEmbedder
from vmae_ray.schema import error_row
from vmae_ray.stages import EmbedActor, clip_table, decoded_table
from vmae_ray.storage import StorageOptions


@pytest.fixture(scope="module")
def actor(tiny_classifier):
    return EmbedActor(tiny_classifier, storage=StorageOptions(), cache_root=None, device="cpu", dtype="float32",
                      compile=False, with_logits=True, batch_size=4)


def clips_batch(shape, count: int, *, bad: int | None = None, seed: int = 0) -> tuple[pa.Table, list[np.ndarray]]:
    """``count`` clip rows (video v{i}) and one error row in the middle; clip ``bad`` has one frame too few."""
    rng = np.random.default_rng(seed)
    tables, pixels = [], []
    for i in range(count):
        clip_shape = (shape[0] - 1, *shape[1:]) if i == bad else shape
        clip = rng.integers(0, 256, clip_shape, dtype=np.uint8)
        pixels.append(clip)
        tables.append(clip_table({"kind": "clip", "video_id": f"v{i}", "uri": f"/v/{i}.mp4", "clip_index": 0,
                                  "num_clips": 1, "pixels_shape": list(clip_shape)}, clip))
        if i == count // 2:
            tables.append(decoded_table([error_row({"video_id": "broken", "uri": "/v/broken.mp4"}, stage="probe",
                                                   error_type="corrupt", message="bad header")]))
    return pa.concat_tables(tables), pixels


def test_a_batch_goes_to_the_model_batch_size_clips_at_a_time(actor, tiny_classifier):
    shape = actor.embedder.spec.clip_shape
    batch, pixels = clips_batch(shape, 10)
    out = actor(batch).to_pylist()
    clip_rows = [r for r in out if r["kind"] == "clip"]
    assert [r["video_id"] for r in clip_rows] == [f"v{i}" for i in range(10)]
    assert [r["model_call_clips"] for r in clip_rows] == [4] * 8 + [2] * 2
    assert len({r["model_call"] for r in clip_rows}) == 3
    (error,) = [r for r in out if r["kind"] == "error"]
    assert (error["video_id"], error["error_type"], error["embedding"]) == ("broken", "corrupt", None)
    # The embeddings and logits are the embedder's own on the same clips (one direct call).
    expected, logits = VideoMAEEmbedder(tiny_classifier, device="cpu", dtype="float32").embed(np.stack(pixels))
    np.testing.assert_allclose(np.array([r["embedding"] for r in clip_rows]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array([r["logits"] for r in clip_rows]), logits, rtol=1e-5, atol=1e-5)


def test_a_failed_model_call_makes_error_rows_of_its_clips_only(actor):
    shape = actor.embedder.spec.clip_shape
    batch, _ = clips_batch(shape, 10, bad=5)  # clip 5 is in the second call (clips 4..7)
    out = actor(batch).to_pylist()
    failed = sorted(r["video_id"] for r in out if r["kind"] == "error" and r["error_type"] == "embed_failed")
    assert failed == ["v4", "v5", "v6", "v7"]
    assert all(r["stage"] == "embed" and "shape" in r["message"] for r in out if r["error_type"] == "embed_failed")
    ok = [r for r in out if r["kind"] == "clip"]
    assert [r["video_id"] for r in ok] == ["v0", "v1", "v2", "v3", "v8", "v9"]
    assert all(r["embedding"] is not None for r in ok)


def test_a_video_that_yields_fewer_clips_than_planned_is_an_error_row(synthetic_corpus, monkeypatch):
    """Downstream a video is complete when all its planned clips arrived: one whose decoder
    stops short (zero clips here) must end as an error row, not wait unfinished forever."""
    from vmae_ray.decoding import DecodeLimits, FrameGeometry, VideoDecoder
    from vmae_ray.stages import DecodeParams, decode_video

    params = DecodeParams(sampling="stride", num_frames=4, frame_stride=1, clips_per_video=2,
                          geometry=FrameGeometry(40, 32, 32), limits=DecodeLimits(), isolate=False)
    path = synthetic_corpus["a_h264.mp4"]
    item = {"video_id": "v", "uri": path}
    good = [r for t in decode_video(item, params, StorageOptions()) for r in t.to_pylist()]
    assert [r["kind"] for r in good] == ["clip", "clip"] and {r["num_clips"] for r in good} == {2}
    monkeypatch.setattr(VideoDecoder, "clips", lambda self, plans, geometry, **kw: iter(()))
    (row,) = [r for t in decode_video(item, params, StorageOptions()) for r in t.to_pylist()]
    assert (row["kind"], row["stage"], row["error_type"]) == ("error", "decode", "corrupt")
    assert "0 of 2 planned clips" in row["message"]
