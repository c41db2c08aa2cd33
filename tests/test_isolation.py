"""Decoder isolation: a crash or a hang in the decoder costs one video, not the task."""

import os
import signal
import time

import pyarrow as pa

from vmae_ray.isolation import IsolatedDecoder
from vmae_ray.schema import DECODED_SCHEMA
from vmae_ray.stages import DecodeParams, clips_row, decode_video, decoded_table, error_table


def fake_decode(item, behaviour):
    """Stands in for a decoder: two clips, or crashing/hanging between them on marked inputs."""
    kind = behaviour.get(item["uri"], "ok")
    row = {"kind": "clip", "video_id": item["video_id"], "uri": item["uri"], "num_clips": 2}
    yield decoded_table([{**row, "clip_index": [0]}])
    if kind == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "abort":
        os.abort()
    if kind == "hang":
        time.sleep(3600)
    yield decoded_table([{**row, "clip_index": [1]}])


def items(*uris):
    return [{"video_id": u, "uri": u} for u in uris]


def kinds(tables):
    return [(r["uri"], r["kind"], r["error_type"]) for t in tables for r in t.to_pylist()]


def test_crash_and_hang_cost_one_video_each():
    behaviour = {"b": "segfault", "d": "hang", "e": "abort"}
    decoder = IsolatedDecoder(fake_decode, (behaviour,), timeout_seconds=3, error_table=error_table)
    try:
        out = [t for item in items("a", "b", "c", "d", "e", "f") for t in decoder.decode(item)]
    finally:
        decoder.close()
    rows = kinds(out)
    for good in "acf":
        assert rows.count((good, "clip", None)) == 2
    assert ("b", "error", "crashed") in rows
    assert ("d", "error", "timeout") in rows
    assert ("e", "error", "crashed") in rows
    crashed = [r for t in out for r in t.to_pylist() if r["uri"] == "b" and r["kind"] == "error"][0]
    assert "SIGSEGV" in crashed["message"]
    assert decoder.restarts == 3


def test_real_decoder_in_child(synthetic_corpus, tmp_path):
    from vmae_ray.decoding import DecodeLimits, FrameGeometry
    from vmae_ray.storage import StorageOptions

    params = DecodeParams(sampling="uniform", num_frames=4, frame_stride=1, clips_per_video=1,
                          geometry=FrameGeometry(40, 32, 32), limits=DecodeLimits())
    missing = str(tmp_path / "missing.mp4")
    decoder = IsolatedDecoder(decode_video, (params, StorageOptions()), timeout_seconds=60, error_table=error_table)
    try:
        out = [t for item in items(synthetic_corpus["a_h264.mp4"], missing) for t in decoder.decode(item)]
    finally:
        decoder.close()
    table = pa.concat_tables(out)
    assert table.schema == DECODED_SCHEMA
    rows = table.to_pylist()
    assert [r["kind"] for r in rows if r["uri"].endswith("a_h264.mp4")] == ["clip"]
    (err,) = [r for r in rows if r["uri"] == missing]
    assert err["error_type"] == "not_found"


class _Clip:
    def __init__(self, index, pixels):
        self.clip_index, self.start_seconds, self.end_seconds, self.frame_indices = index, 0.0, 1.0, [0]
        self.pixels = pixels


def sized_tables(item, sizes):
    """Decoded rows whose pixels are `size` bytes of a pattern derived from the size."""
    import numpy as np

    for i, size in enumerate(sizes):
        pixels = (np.arange(size, dtype=np.int64) * 7 + size).astype(np.uint8)
        yield clips_row({"video_id": item["video_id"], "uri": item["uri"]}, [_Clip(i, pixels)], decode_seconds=0.0)


def test_tables_cross_the_pipe_intact():
    """Sizes around the socket buffer and the 16 KiB framing threshold, and a large clip, come
    back byte for byte, in order, with the schema the stages use."""
    import numpy as np

    sizes = [0, 1, 16_383, 16_384, 200_000, 5 * 2**20]
    decoder = IsolatedDecoder(sized_tables, (sizes,), timeout_seconds=60, error_table=error_table)
    try:
        for round_ in range(2):  # the same child serves the next item
            tables = list(decoder.decode({"video_id": f"v{round_}", "uri": "u"}))
            assert [t.num_rows for t in tables] == [1] * len(sizes)
            for size, table in zip(sizes, tables):
                assert table.schema == DECODED_SCHEMA
                got = np.frombuffer(table.column("pixels")[0].as_buffer(), dtype=np.uint8)
                expected = (np.arange(size, dtype=np.int64) * 7 + size).astype(np.uint8)
                assert np.array_equal(got, expected)
                assert table.column("video_id")[0].as_py() == f"v{round_}"
        assert decoder.restarts == 0
    finally:
        decoder.close()
