"""The Ray adapters without Ray: EmbedActor is a plain class, called here as Ray Data would.

It embeds, assembles and writes into a real staging folder; what it wrote is read back with
pyarrow and compared with the embedder called directly on the same clips.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vmae_ray.assembly import Labeler, OutputSchemas
from vmae_ray.embedder import VideoMAEEmbedder
from vmae_ray.schema import (
    DECODED_SCHEMA,
    clips_schema,
    embedded_schema,
    error_row,
    errors_schema,
    videos_schema,
)
from vmae_ray.stages import EmbedActor, clips_row, decoded_table, row_clips
from vmae_ray.staging import VideoWriter
from vmae_ray.storage import StorageOptions


@pytest.fixture(scope="module")
def spec(tiny_classifier):
    from vmae_ray.checkpoint import load_model_spec

    return load_model_spec(tiny_classifier)


def writer_for(out: str, spec) -> VideoWriter:
    dim = spec.hidden_size
    schemas = OutputSchemas(clips_schema(dim, with_labels=True), videos_schema(dim, with_labels=True), errors_schema())
    return VideoWriter(out, StorageOptions(), "r1", schemas, embedded_schema(dim, with_logits=True), "s1",
                       labels=Labeler(id2label=spec.id2label, top_k=2))


def actor_for(tiny_classifier, out, spec) -> EmbedActor:
    return EmbedActor(tiny_classifier, storage=StorageOptions(), cache_root=None, device="cpu", dtype="float32",
                      compile=False, batch_size=4, writer=writer_for(out, spec))


class Clip:
    def __init__(self, index: int, pixels: np.ndarray):
        self.clip_index, self.start_seconds, self.end_seconds = index, float(index), index + 1.0
        self.frame_indices, self.pixels = [index], pixels


def video_rows(shape, clips_per_video: list[int], *, seed: int = 0, split: dict[int, int] | None = None,
               bad: int | None = None) -> tuple[pa.Table, dict[int, np.ndarray]]:
    """Decoded rows: video i has clips_per_video[i] clips (one row; ``split`` {video: clips in
    its first row} sends it as two rows); ``bad`` video has a frame too few; an error row too."""
    rng = np.random.default_rng(seed)
    tables, pixels = [], {}
    for i, n in enumerate(clips_per_video):
        clip_shape = (shape[0] - 1, *shape[1:]) if i == bad else shape
        clips = [Clip(k, rng.integers(0, 256, clip_shape, dtype=np.uint8)) for k in range(n)]
        pixels[i] = np.stack([c.pixels for c in clips])
        common = {"input_number": i, "video_id": f"v{i}", "uri": f"/v/{i}.mp4", "num_clips": n, "codec": "h264"}
        cut = (split or {}).get(i)
        for part in ([clips[:cut], clips[cut:]] if cut else [clips]):
            tables.append(clips_row(common, part, decode_seconds=0.25))
    tables.append(decoded_table([error_row({"input_number": len(clips_per_video), "video_id": "broken",
                                            "uri": "/v/broken.mp4"}, stage="probe", error_type="corrupt",
                                           message="bad header")]))
    return pa.concat_tables(tables), pixels


def read(out: str, rel: str) -> pa.Table:
    return pq.read_table(os.path.join(out, "_staging", "r1", rel))


def test_clips_travel_as_one_row_per_video_and_come_back_as_a_view():
    shape = (4, 8, 8, 3)
    rows, pixels = video_rows(shape, [3, 1])
    assert rows.schema == DECODED_SCHEMA and rows.num_rows == 3
    np.testing.assert_array_equal(row_clips(rows, 0), pixels[0])
    assert rows.column("clip_index").to_pylist()[0] == [0, 1, 2]


def test_an_actor_call_embeds_in_full_model_calls_and_writes_whole_videos(tiny_classifier, spec, tmp_path):
    out = str(tmp_path / "out")
    actor = actor_for(tiny_classifier, out, spec)
    batch, pixels = video_rows(spec.clip_shape, [3, 2, 4, 1])  # 10 clips: calls of 4, 4, 2
    (receipt,) = actor(batch).to_pylist()
    stats = json.loads(receipt["stats"])
    assert stats["model_calls"] == {"4": 2, "2": 1} and stats["clips"] == 10 and stats["errors"] == 1
    assert sorted(receipt["done"]) == [0, 1, 2, 3, 4] and receipt["parts"] == []
    stem = f"part-r1-{receipt['attempt']}.parquet"
    assert sorted(receipt["files"]) == [f"clips/{stem}", f"errors/{stem}", f"videos/{stem}"]
    clips, errors, videos = (read(out, f) for f in sorted(receipt["files"]))
    assert errors.column("video_id").to_pylist() == ["broken"] and errors.column("error_type").to_pylist() == ["corrupt"]
    # The embeddings and labels are the embedder's own on the same clips (one direct call).
    expected, logits = VideoMAEEmbedder(tiny_classifier, device="cpu", dtype="float32").embed(
        np.concatenate([pixels[i] for i in range(4)]))
    got = np.array(clips.column("embedding").to_pylist())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    first = 0
    for i, n in enumerate([3, 2, 4, 1]):
        np.testing.assert_allclose(videos.column("embedding").to_pylist()[i], expected[first:first + n].mean(axis=0),
                                   rtol=1e-5, atol=1e-6)
        first += n
    top = [spec.id2label[int(k)] for k in np.argsort(-logits, axis=1, kind="stable")[:, 0]]
    assert [labels[0] for labels in clips.column("top_labels").to_pylist()] == top


def test_a_failed_model_call_makes_its_videos_error_rows_whole(tiny_classifier, spec, tmp_path):
    out = str(tmp_path / "out")
    actor = actor_for(tiny_classifier, out, spec)
    # Clips 0-3 are call 1, 4-7 call 2 (video 1's clips 3..5 span both), 8-9 call 3: video 2 is bad.
    batch, _ = video_rows(spec.clip_shape, [3, 3, 2, 2], bad=2)
    (receipt,) = actor(batch).to_pylist()
    files = {f.split("/")[0]: f for f in receipt["files"]}
    errors = read(out, files["errors"]).to_pylist()
    failed = sorted(r["video_id"] for r in errors if r["error_type"] == "embed_failed")
    assert failed == ["v1", "v2"]  # call 2 held clips of videos 1 and 2: both whole videos fail
    assert all(r["stage"] == "embed" for r in errors if r["error_type"] == "embed_failed")
    assert sorted(read(out, files["videos"]).column("video_id").to_pylist()) == ["v0", "v3"]
    assert sorted(read(out, files["clips"]).column("video_id").to_pylist()) == ["v0"] * 3 + ["v3"] * 2


def test_a_video_split_across_calls_goes_to_parts_then_is_finished(tiny_classifier, spec, tmp_path):
    out = str(tmp_path / "out")
    actor = actor_for(tiny_classifier, out, spec)
    batch, pixels = video_rows(spec.clip_shape, [5], split={0: 2})
    first, second = batch.slice(0, 1), batch.slice(1, 2)  # two calls: clips 0-1, then 2-4 and the error
    (r1,) = actor(first).to_pylist()
    (r2,) = actor(second).to_pylist()
    assert r1["done"] == [] and r1["parts"] == [{"input_number": 0, "num_clips": 5, "clip_index": [0, 1]}]
    assert r2["done"] == [1] and r2["parts"][0]["clip_index"] == [2, 3, 4]
    parts = [f for r in (r1, r2) for f in r["files"] if f.startswith("parts/")]
    finished = actor.writer.finish([(0, parts)])
    assert finished["done"] == [0] and finished["attempt"].startswith("fin")
    videos = read(out, next(f for f in finished["files"] if f.startswith("videos/")))
    clips = read(out, next(f for f in finished["files"] if f.startswith("clips/")))
    assert clips.column("clip_index").to_pylist() == [0, 1, 2, 3, 4]
    expected, _ = VideoMAEEmbedder(tiny_classifier, device="cpu", dtype="float32").embed(pixels[0])
    # The video row of a split video: the mean of all its clips, as for any video.
    np.testing.assert_allclose(videos.column("embedding").to_pylist()[0], expected.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_a_video_that_yields_fewer_clips_than_planned_is_an_error_row(synthetic_corpus, monkeypatch):
    """Downstream a video is complete when all its planned clips arrived: one whose decoder
    stops short (zero clips here) must end as an error row, not wait unfinished forever."""
    from vmae_ray.decoding import DecodeLimits, FrameGeometry, VideoDecoder
    from vmae_ray.stages import DecodeParams, decode_video

    params = DecodeParams(sampling="stride", num_frames=4, frame_stride=1, clips_per_video=2,
                          geometry=FrameGeometry(40, 32, 32), limits=DecodeLimits(), isolate=False)
    path = synthetic_corpus["a_h264.mp4"]
    item = {"video_id": "v", "uri": path, "input_number": 7}
    (good,) = [r for t in decode_video(item, params, StorageOptions()) for r in t.drop_columns(["pixels"]).to_pylist()]
    assert (good["kind"], good["num_clips"], good["clip_index"], good["input_number"]) == ("clip", 2, [0, 1], 7)
    monkeypatch.setattr(VideoDecoder, "clips", lambda self, plans, geometry, **kw: iter(()))
    (row,) = [r for t in decode_video(item, params, StorageOptions()) for r in t.to_pylist()]
    assert (row["kind"], row["stage"], row["error_type"], row["input_number"]) == ("error", "decode", "corrupt", 7)
    assert "0 of 2 planned clips" in row["message"]


def test_a_long_video_is_sent_as_rows_of_bounded_bytes(synthetic_corpus):
    from vmae_ray.decoding import DecodeLimits, FrameGeometry
    from vmae_ray.stages import DecodeParams, decode_video

    clip_bytes = 4 * 32 * 32 * 3
    params = DecodeParams(sampling="stride", num_frames=4, frame_stride=1, clips_per_video=5,
                          geometry=FrameGeometry(40, 32, 32), limits=DecodeLimits(), isolate=False,
                          max_row_bytes=2 * clip_bytes)
    tables = list(decode_video({"video_id": "v", "uri": synthetic_corpus["a_h264.mp4"]}, params, StorageOptions()))
    assert [t.column("clip_index").to_pylist()[0] for t in tables] == [[0, 1], [2, 3], [4]]
    assert all(len(t.column("pixels")[0].as_py()) <= 2 * clip_bytes for t in tables)


def test_a_cuda_error_breaks_the_device_and_out_of_memory_does_not():
    """A sticky CUDA error makes the model actor exit (Ray restarts it and retries its calls)
    instead of turning every later input into an embed_failed row."""
    import torch

    from vmae_ray.stages import device_is_broken

    assert device_is_broken(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert device_is_broken(RuntimeError("CUDA error: uncorrectable ECC error encountered"))
    assert not device_is_broken(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not device_is_broken(RuntimeError("shape '[2, 3]' is invalid for input of size 5"))
    assert not device_is_broken(ValueError("a clip of the wrong size"))
