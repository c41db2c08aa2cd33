"""ResultAssembler without Ray: rows in any order, retried duplicates, errors mid-video.

Batches are built in the embedded-row contract (`schema.embedded_schema`) by hand, with
embeddings whose values say which video and clip they came from, so every released row can
be checked against what was sent.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vmae_ray.assembly import ResultAssembler
from vmae_ray.listing import VideoInput
from vmae_ray.schema import embedded_schema, error_row

DIM = 4


def clip(vid: str, index: int, num_clips: int, *, call: str = "a:1", call_clips: int = 1, logits=None) -> dict:
    return {
        "kind": "clip", "video_id": vid, "uri": f"/videos/{vid}.mp4", "input_fingerprint": f"fp-{vid}",
        "size_bytes": 100, "clip_index": index, "num_clips": num_clips, "start_seconds": float(index),
        "end_seconds": index + 1.0, "frame_indices": [index, index + 1], "duration_seconds": 9.5,
        "width": 320, "height": 240, "fps": 25.0, "codec": "h264", "stream_index": 0, "num_streams": 1,
        "decode_seconds": 0.5, "embed_seconds": 0.25, "model_call": call, "model_call_clips": call_clips,
        "embedding": embedding_of(vid, index), "logits": logits,
    }


def embedding_of(vid: str, index: int) -> list[float]:
    return [float(ord(vid[-1])), float(index), 1.0, -1.0]


def error(vid: str, error_type: str = "corrupt", stage: str = "decode") -> dict:
    return error_row({"video_id": vid, "uri": f"/videos/{vid}.mp4", "input_fingerprint": f"fp-{vid}"},
                     stage=stage, error_type=error_type, message="broken")


def batch(*rows: dict, with_logits: bool = False) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=embedded_schema(DIM, with_logits=with_logits))


def assembler(ids=("a", "b", "c"), **kwargs) -> ResultAssembler:
    inputs = {v: VideoInput(video_id=v, uri=f"/videos/{v}.mp4", passthrough={"split": f"s-{v}"}) for v in ids}
    return ResultAssembler(inputs, id2label=kwargs.get("id2label"), top_k=2, run_id="run1",
                           settings_fingerprint="settings1")


def test_clips_out_of_order_finish_the_video_once_all_arrived():
    a = assembler()
    first = a.add(batch(clip("a", 2, 3), clip("b", 0, 1)))
    assert [r["video_id"] for r in first.videos] == ["b"] and not a.is_finished("a")
    assert a.unfinished() == ["a"]
    second = a.add(batch(clip("a", 0, 3), clip("a", 1, 3)))
    (video,) = second.videos
    assert video["video_id"] == "a" and video["num_clips"] == 3
    assert [c["clip_index"] for c in second.clips] == [0, 1, 2]
    np.testing.assert_allclose(video["embedding"], np.mean([embedding_of("a", i) for i in range(3)], axis=0))
    assert (video["duration_seconds"], video["width"], video["codec"], video["size_bytes"]) == (9.5, 320, "h264", 100)
    assert video["split"] == "s-a" and video["run_id"] == "run1" and video["settings_fingerprint"] == "settings1"
    assert second.clips[1]["frame_indices"] == [1, 2] and second.clips[1]["split"] == "s-a"
    assert (a.num_videos, a.num_clips, a.num_errors, a.unfinished()) == (2, 4, 0, [])


def test_retried_duplicates_count_once():
    a = assembler()
    out = [a.add(batch(clip("a", 0, 2, call="x:1"))),
           a.add(batch(clip("a", 0, 2, call="y:1"))),  # a retried decode task sends clip 0 again
           a.add(batch(clip("a", 1, 2, call="y:2")))]
    assert sum(len(o.videos) for o in out) == 1 and sum(len(o.clips) for o in out) == 2
    late = a.add(batch(clip("a", 1, 2, call="z:1"), error("a")))  # after the video finished
    assert not late.videos and not late.clips and not late.errors
    assert (a.num_videos, a.num_clips, a.num_errors) == (1, 2, 0)


def test_error_after_some_clips_drops_them():
    a = assembler()
    assert not a.add(batch(clip("a", 0, 3))).clips
    out = a.add(batch(error("a", "timeout")))
    assert not out.clips and not out.videos
    (row,) = out.errors
    assert (row["video_id"], row["stage"], row["error_type"], row["message"]) == ("a", "decode", "timeout", "broken")
    assert row["split"] == "s-a" and row["input_fingerprint"] == "fp-a"
    assert not a.add(batch(clip("a", 1, 3), clip("a", 2, 3))).videos  # the rest of it is ignored
    assert a.errors_by_type == {"timeout": 1} and a.is_finished("a")


def test_video_level_labels_from_mean_logits():
    a = assembler(id2label={0: "x", 1: "y", 2: "z"})
    out = a.add(batch(clip("a", 0, 2, logits=[3.0, 0.0, 0.0]), clip("a", 1, 2, logits=[0.0, 2.0, 0.0]),
                      with_logits=True))
    assert [c["top_labels"] for c in out.clips] == [["x", "y"], ["y", "x"]]
    mean = np.array([1.5, 1.0, 0.0])
    probs = np.exp(mean) / np.exp(mean).sum()
    (video,) = out.videos
    assert video["top_labels"] == ["x", "y"]
    np.testing.assert_allclose(video["top_scores"], probs[:2], rtol=1e-9)


def test_stage_times_and_model_calls():
    a = assembler()
    a.add(batch(clip("a", 0, 2, call="q:1", call_clips=2), clip("a", 1, 2, call="q:1", call_clips=2),
                clip("b", 0, 1, call="q:2", call_clips=1), error("c")))
    assert a.times.clips == 3
    assert a.times.model_call_sizes() == {1: 1, 2: 1}
    assert a.times.decode_seconds == pytest.approx(3 * 0.5)  # the error row's own seconds are 0
    assert a.times.embed_seconds == pytest.approx(3 * 0.25)


def test_contract_violations_raise():
    a = assembler()
    bad_kind = clip("a", 0, 1)
    bad_kind["kind"] = "done"
    with pytest.raises(ValueError, match="unknown kind 'done'"):
        a.add(batch(bad_kind))
    no_embedding = clip("b", 0, 1)
    no_embedding["embedding"] = None
    no_embedding["model_call"] = None
    with pytest.raises(ValueError, match="without an embedding"):
        a.add(batch(no_embedding))
    unknown_code = error("c")
    unknown_code["error_type"] = "weird"
    with pytest.raises(ValueError, match="unknown error_type 'weird'"):
        a.add(batch(unknown_code))
