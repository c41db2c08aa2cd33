"""Assembly without Ray: per-clip rows in any order, retried duplicates, split videos, labels.

Tables are built in the embedded-row contract (`schema.embedded_schema`) by hand, with
embeddings whose values say which video and clip they came from, so every assembled row can
be checked against what was sent (brute force: numpy over the same numbers).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vmae_ray.assembly import Labeler, OutputSchemas, assemble, dedupe_clips, error_rows, split_complete
from vmae_ray.schema import clips_schema, embedded_schema, error_row, errors_schema, videos_schema

DIM = 4
PASSTHROUGH = pa.schema([("split", pa.string())])


def embedding_of(number: int, index: int, copy: int = 0) -> list[float]:
    return [float(number), float(index), float(copy), -1.0]


def clip(number: int, index: int, num_clips: int, *, copy: int = 0, logits=None) -> dict:
    vid = f"v{number}"
    return {
        "input_number": number, "video_id": vid, "uri": f"/videos/{vid}.mp4", "input_fingerprint": f"fp-{vid}",
        "size_bytes": 100 + number, "num_clips": num_clips, "clip_index": index, "start_seconds": float(index),
        "end_seconds": index + 1.0, "frame_indices": [index, index + 1], "duration_seconds": 9.5,
        "width": 320, "height": 240, "fps": 25.0, "codec": "h264", "stream_index": 0, "num_streams": 1,
        "display_rotation_degrees": 0, "display_hflip": False, "sample_aspect_ratio": 1.0,
        "embedding": embedding_of(number, index, copy), "logits": logits, "split": f"s-{vid}",
    }


def table(*rows: dict, with_logits: bool = False) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=embedded_schema(DIM, with_logits=with_logits,
                                                                   passthrough=PASSTHROUGH))


def schemas(with_labels: bool = False) -> OutputSchemas:
    return OutputSchemas(clips=clips_schema(DIM, with_labels=with_labels, passthrough=PASSTHROUGH),
                         videos=videos_schema(DIM, with_labels=with_labels, passthrough=PASSTHROUGH),
                         errors=errors_schema(passthrough=PASSTHROUGH))


COMMON = {"run_id": "run1", "settings_fingerprint": "settings1"}


def test_out_of_order_clips_make_a_complete_video_whose_embedding_is_the_mean():
    rows = dedupe_clips(table(clip(1, 2, 3), clip(2, 0, 1), clip(1, 0, 3), clip(1, 1, 3)))
    complete, partial = split_complete(rows)
    assert partial.num_rows == 0
    clips, videos = assemble(complete, schemas=schemas(), common=COMMON, labeler=None, with_reconstruction=False)
    assert clips.schema == schemas().clips and videos.schema == schemas().videos
    assert clips.column("clip_index").to_pylist() == [0, 1, 2, 0]  # by video, then clip
    v1 = videos.to_pylist()[0]
    assert (v1["video_id"], v1["num_clips"], v1["duration_seconds"], v1["codec"], v1["size_bytes"]) == (
        "v1", 3, 9.5, "h264", 101)
    np.testing.assert_array_equal(v1["embedding"], np.mean([embedding_of(1, i) for i in range(3)], axis=0)
                                  .astype(np.float32))
    assert v1["split"] == "s-v1" and v1["run_id"] == "run1" and v1["settings_fingerprint"] == "settings1"
    assert clips.to_pylist()[1]["frame_indices"] == [1, 2] and clips.to_pylist()[1]["split"] == "s-v1"


def test_a_retried_clip_counts_once_and_the_last_copy_wins():
    rows = dedupe_clips(table(clip(1, 0, 2, copy=0), clip(1, 0, 2, copy=1), clip(1, 1, 2)))
    assert rows.num_rows == 2
    assert [e[2] for e in rows.column("embedding").to_pylist()] == [1.0, 0.0]  # copy 1 of clip 0 won


def test_incomplete_videos_are_kept_apart():
    rows = dedupe_clips(table(clip(1, 0, 3), clip(1, 2, 3), clip(2, 0, 1)))
    complete, partial = split_complete(rows)
    assert complete.column("video_id").to_pylist() == ["v2"]
    assert partial.column("clip_index").to_pylist() == [0, 2]
    with pytest.raises(ValueError, match="v1 has 2 of its 3 clips"):
        assemble(rows, schemas=schemas(), common=COMMON, labeler=None, with_reconstruction=False)


def test_labels_of_clips_and_of_videos_from_mean_logits():
    labeler = Labeler(id2label={0: "x", 1: "y", 2: "z"}, top_k=2)
    rows = dedupe_clips(table(clip(1, 0, 2, logits=[3.0, 0.0, 0.0]), clip(1, 1, 2, logits=[0.0, 2.0, 0.0]),
                              with_logits=True))
    clips, videos = assemble(rows, schemas=schemas(True), common=COMMON, labeler=labeler, with_reconstruction=False)
    assert clips.column("top_labels").to_pylist() == [["x", "y"], ["y", "x"]]
    mean = np.array([1.5, 1.0, 0.0])
    probs = np.exp(mean) / np.exp(mean).sum()
    (video,) = videos.to_pylist()
    assert video["top_labels"] == ["x", "y"]
    np.testing.assert_allclose(video["top_scores"], probs[:2], rtol=1e-6)


def test_error_rows_check_their_codes_and_carry_passthrough():
    decoded = pa.Table.from_pylist([{**error_row({"input_number": 3, "video_id": "v3", "uri": "/v3.mp4",
                                                  "input_fingerprint": "fp3"}, stage="decode", error_type="timeout",
                                                 message="stuck"), "split": "s3"}])
    (row,) = error_rows(decoded, schema=schemas().errors, common=COMMON).to_pylist()
    assert (row["video_id"], row["stage"], row["error_type"], row["message"], row["split"], row["run_id"]) == (
        "v3", "decode", "timeout", "stuck", "s3", "run1")
    bad = decoded.set_column(decoded.schema.get_field_index("error_type"), "error_type", pa.array(["weird"]))
    with pytest.raises(ValueError, match="unknown error_type 'weird'"):
        error_rows(bad, schema=schemas().errors, common=COMMON)
