"""The row contract: error rows are built one way, with codes from the stable lists."""

from __future__ import annotations

import pyarrow as pa
import pytest

from vmae_ray import schema
from vmae_ray.schema import DECODED_SCHEMA, ERROR_TYPES, STAGES, embedded_schema, error_row

ITEM = {"video_id": "v1", "uri": "s3://b/v1.mp4", "input_fingerprint": "fp", "size_bytes": 7}


def test_error_row_fields_and_truncation():
    row = error_row(ITEM, stage="probe", error_type="too_large", message="x" * 5000, decode_seconds=1.5)
    assert row["kind"] == schema.KIND_ERROR
    assert (row["video_id"], row["uri"], row["input_fingerprint"], row["size_bytes"]) == ("v1", "s3://b/v1.mp4", "fp", 7)
    assert (row["stage"], row["error_type"], row["decode_seconds"]) == ("probe", "too_large", 1.5)
    assert row["message"] == "x" * schema.MAX_MESSAGE_CHARS
    # It fits both row schemas between the steps.
    assert pa.Table.from_pylist([row], schema=DECODED_SCHEMA).num_rows == 1
    assert pa.Table.from_pylist([row], schema=embedded_schema(8, with_logits=True)).num_rows == 1


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


def test_embedded_schema_drops_pixels_and_adds_model_outputs():
    s = embedded_schema(16, with_logits=False)
    assert "pixels" not in s.names and s.field("embedding").type == pa.list_(pa.float32(), 16)
    assert {"embed_seconds", "model_call", "model_call_clips"} <= set(s.names) and "logits" not in s.names
    assert embedded_schema(16, with_logits=True).field("logits").type == pa.list_(pa.float32())
