"""The row contract: error rows are built one way, with codes from the stable lists."""

from __future__ import annotations

import pyarrow as pa
import pytest

from vmae_ray import schema
from vmae_ray.schema import DECODED_SCHEMA, ERROR_TYPES, STAGES, embedded_schema, error_row

ITEM = {"input_number": 3, "video_id": "v1", "uri": "s3://b/v1.mp4", "input_fingerprint": "fp", "size_bytes": 7}


def test_error_row_fields_and_truncation():
    row = error_row(ITEM, stage="probe", error_type="too_large", message="x" * 5000, decode_seconds=1.5)
    assert row["kind"] == schema.KIND_ERROR
    assert (row["input_number"], row["video_id"], row["uri"], row["input_fingerprint"], row["size_bytes"]) == (
        3, "v1", "s3://b/v1.mp4", "fp", 7)
    assert (row["stage"], row["error_type"], row["decode_seconds"]) == ("probe", "too_large", 1.5)
    assert row["message"] == "x" * schema.MAX_MESSAGE_CHARS
    # It fits the decoded rows' schema (the embedded rows hold clips only).
    assert pa.Table.from_pylist([row], schema=DECODED_SCHEMA).num_rows == 1


@pytest.mark.parametrize("stage, error_type", [("decoding", "corrupt"), ("decode", "broken"), ("", "corrupt")])
def test_unknown_codes_are_refused(stage, error_type):
    with pytest.raises(ValueError, match="unknown"):
        error_row(ITEM, stage=stage, error_type=error_type, message="m")


def test_every_code_the_code_base_writes_is_known():
    """Every error_type/stage literal passed to error_row, error_table or DecodeError in the
    package is in the stable lists (a typo fails here, not in a user's query)."""
    import ast
    import pathlib

    import vmae_ray

    found = set()
    for path in pathlib.Path(vmae_ray.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name == "DecodeError" and len(node.args) >= 2:
                values = [("error_type", node.args[0]), ("stage", node.args[1])]
            elif name == "error_table" and len(node.args) >= 3:
                values = [("stage", node.args[1]), ("error_type", node.args[2])]
            else:
                values = [(k.arg, k.value) for k in node.keywords if k.arg in ("stage", "error_type")]
            for key, value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    found.add((key, value.value, path.name))
    assert found, "the scan found no codes"
    for key, value, where in found:
        assert value in (STAGES if key == "stage" else ERROR_TYPES), f"{key}={value!r} in {where}"


def test_embedded_schema_is_per_clip_with_model_outputs():
    s = embedded_schema(16, with_logits=False, passthrough=pa.schema([("split", pa.string())]))
    assert "pixels" not in s.names and s.field("embedding").type == pa.list_(pa.float32(), 16)
    assert s.field("clip_index").type == pa.int32() and s.field("input_number").type == pa.int64()
    assert "logits" not in s.names and s.names[-1] == "split"
    assert embedded_schema(16, with_logits=True).field("logits").type == pa.list_(pa.float32())
    # Decoded rows hold a video's clips: one value per clip in the list columns.
    assert DECODED_SCHEMA.field("clip_index").type == pa.list_(pa.int32())
    assert DECODED_SCHEMA.field("frame_indices").type == pa.list_(pa.list_(pa.int32()))
