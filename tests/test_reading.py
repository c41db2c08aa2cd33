"""Reading committed outputs: `_SUCCESS` decides, local and S3 alike; embeddings as one matrix."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vmae_ray.reading import CommittedOutput, NotCommittedError, embedding_matrix
from vmae_ray.storage import StorageOptions
from vmae_ray.writing import write_committed

DIM = 5


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def table_of(ids: list[str], matrix: np.ndarray) -> pa.Table:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), DIM)
    return pa.table({"video_id": ids, "uri": [f"/v/{i}.mp4" for i in ids], "embedding": emb})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip_through_success(where, tmp_path, request):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        out, storage = f"s3://{bucket}/out", StorageOptions(server.storage_options)
    else:
        out, storage = str(tmp_path / "out"), StorageOptions()
    first = vectors(7, seed=1)
    # Three shards, so the matrix is assembled from several Arrow chunks.
    success = write_committed(out, storage, {"items": table_of([f"a{i}" for i in range(7)], first)},
                              {"note": "one"}, rows_per_shard=3)
    assert len(success["files"]["items"]) == 3
    committed = CommittedOutput.open(out, storage)
    assert committed.tables == ["items"] and committed.manifest["note"] == "one"
    matrix, rest = committed.embeddings("items")
    assert matrix.dtype == np.float32 and matrix.flags.c_contiguous and matrix.shape == (7, DIM)
    np.testing.assert_array_equal(matrix, first)
    assert rest.column("video_id").to_pylist() == [f"a{i}" for i in range(7)]
    assert committed.read("items", ["uri"]).column_names == ["uri"]
    # A second write replaces the first as a whole.
    second = vectors(2, seed=2)
    write_committed(out, storage, {"items": table_of(["b0", "b1"], second)}, {"note": "two"})
    matrix, rest = CommittedOutput.open(out, storage).embeddings("items")
    np.testing.assert_array_equal(matrix, second)
    assert rest.column("video_id").to_pylist() == ["b0", "b1"]


def test_reader_ignores_files_success_does_not_list(tmp_path):
    out = str(tmp_path / "out")
    write_committed(out, StorageOptions(), {"items": table_of(["a"], vectors(1))}, {})
    # A stray shard (a crashed writer's leftover) is in the folder but not in _SUCCESS.
    pq.write_table(table_of(["stray"], vectors(1, seed=9)), os.path.join(out, "items", "part-stray.parquet"))
    assert CommittedOutput.open(out).read("items").column("video_id").to_pylist() == ["a"]


def test_errors(tmp_path):
    with pytest.raises(NotCommittedError, match="_SUCCESS"):
        CommittedOutput.open(str(tmp_path))
    (tmp_path / "_SUCCESS").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a vmae-ray manifest"):
        CommittedOutput.open(str(tmp_path))
    out = str(tmp_path / "out")
    write_committed(out, StorageOptions(), {"items": table_of(["a"], vectors(1))}, {})
    with pytest.raises(KeyError, match="no column 'nope'"):
        CommittedOutput.open(out).read("items", ["nope"])
    with pytest.raises(ValueError, match="no committed rows"):
        CommittedOutput.open(out).embeddings("other")
    # A run writing there now has staged shards: refusing the folder must not touch them.
    staged = os.path.join(out, "_staging", "run-now", "items", "part.parquet")
    os.makedirs(os.path.dirname(staged))
    pq.write_table(table_of(["b"], vectors(1)), staged)
    with pytest.raises(ValueError, match="another committed output"):
        write_committed(out, StorageOptions(), {"labels": pa.table({"video_id": ["a"]})}, {})
    assert os.path.exists(staged)


def test_embedding_matrix_of_sliced_chunks():
    full = vectors(6, seed=3)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), DIM)
    chunked = pa.chunked_array([arr.slice(1, 2), arr.slice(4, 2)])
    np.testing.assert_array_equal(embedding_matrix(chunked), full[[1, 2, 4, 5]])


def test_schema_from_footers_and_projected_read(tmp_path):
    out = str(tmp_path / "out")
    write_committed(out, StorageOptions(), {"items": table_of([f"a{i}" for i in range(5)], vectors(5))}, {},
                    rows_per_shard=2)
    committed = CommittedOutput.open(out)
    schema = committed.schema("items")
    assert schema.names == ["video_id", "uri", "embedding"] and schema.field("embedding").type.list_size == DIM
    assert committed.schema("other").names == []
    # Columns come back in the order asked for, from every shard.
    assert committed.read("items", ["uri", "video_id"]).to_pydict() == {
        "uri": [f"/v/a{i}.mp4" for i in range(5)], "video_id": [f"a{i}" for i in range(5)]}


def test_object_store_folder_markers_are_not_foreign(s3_server, s3_bucket):
    """A zero-byte "items/" key (an S3 console's "Create folder", rclone): neither refused as a
    file vmae-ray did not write nor deleted; a real foreign object beside it is refused."""
    from vmae_ray.storage import url_to_fs
    from vmae_ray.writing import ForeignFilesError, OutputStore

    out, storage = f"s3://{s3_bucket}/marked", StorageOptions(s3_server.storage_options)
    fs, root = url_to_fs(out, storage)
    fs.pipe(f"{root}/items/", b"")
    write_committed(out, storage, {"items": table_of(["a", "b"], vectors(2))}, {})
    store = OutputStore(out, storage, tables=("items",))
    assert store.foreign_files() == []
    write_committed(out, storage, {"items": table_of(["c"], vectors(1))}, {})  # recovery and replacement
    assert CommittedOutput.open(out, storage).read("items", ["video_id"]).column("video_id").to_pylist() == ["c"]
    fs.pipe(f"{root}/items/notes.txt", b"mine")
    with pytest.raises(ForeignFilesError, match="items/notes.txt"):
        write_committed(out, storage, {"items": table_of(["d"], vectors(1))}, {})
    assert fs.cat(f"{root}/items/notes.txt") == b"mine"


# ------------------------------------------------------------------------------------------
# Only embed outputs are --tables: every command that reads one refuses anything else, saying
# what it is. The other outputs are made here by the real commands from a small embed output.


@pytest.fixture(scope="module")
def other_outputs(tmp_path_factory) -> dict[str, str]:
    from vmae_ray.cli import main

    root = tmp_path_factory.mktemp("kinds")
    tables = str(root / "tables")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, DIM)).astype(np.float32)
    ids = [f"v{i}" for i in range(8)]
    matrix = (centres[np.arange(8) % 2] + 0.1 * rng.standard_normal((8, DIM))).astype(np.float32)
    clips = table_of(ids, matrix).append_column("clip_index", pa.array([0] * 8, pa.int32()))
    # As the job's _SUCCESS: no `command`, the fingerprints a head is tied to.
    write_committed(tables, StorageOptions(), {"videos": table_of(ids, matrix), "clips": clips},
                    {"settings_fingerprint": "s", "embedding_fingerprint": "e",
                     "model": {"fingerprint": "m", "embedding_dim": DIM}})
    labels = root / "labels.csv"
    labels.write_text("video_id,label\n" + "".join(f"{v},{'ab'[i % 2]}\n" for i, v in enumerate(ids[:6])))
    paths = {"tables": tables, "labels": str(labels), "head": str(root / "head"), "dups": str(root / "dups"),
             "labels_out": str(root / "labels_out"), "root": str(root)}
    assert main(["dedup", "--tables", tables, "--threshold", "0.9", "--output", paths["dups"]]) == 0
    assert main(["probe", "fit", "--tables", tables, "--labels", paths["labels"], "--head", paths["head"]]) == 0
    assert main(["probe", "apply", "--tables", tables, "--head", paths["head"], "--output", paths["labels_out"]]) == 0
    assert main(["index", "--tables", tables]) == 0
    return paths


COMMANDS = {
    "search": lambda p, t: ["search", "--tables", t, "--query", "v0"],
    "index": lambda p, t: ["index", "--tables", t],
    "dedup": lambda p, t: ["dedup", "--tables", t, "--threshold", "0.9", "--output", f"{p['root']}/new_dups"],
    "probe fit": lambda p, t: ["probe", "fit", "--tables", t, "--labels", p["labels"], "--head", f"{p['root']}/new_head"],
    "probe apply": lambda p, t: ["probe", "apply", "--tables", t, "--head", p["head"],
                                 "--output", f"{p['root']}/new_labels"],
    "report": lambda p, t: ["report", "--tables", t, "--output", f"{p['root']}/new_report.html"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_what_is_not_an_embed_output_naming_it(other_outputs, command, capsys):
    import re

    from vmae_ray.cli import main

    p = other_outputs
    tables = p["tables"]
    cases = {
        p["dups"]: f"a `vmae-ray dedup` output (duplicate groups), made from the embed output {tables}",
        p["labels_out"]: f"a `vmae-ray probe apply` output (labels), made from the embed output {tables}",
        p["head"]: "a `vmae-ray probe fit` head (head.json)",
        f"{tables}/_index/video": "a `vmae-ray index` index (INDEX.json)",
        f"{tables}/_index": "the folder of `vmae-ray index` indexes",
        p["labels"]: "a file, not an output folder",
    }
    # What the other commands wrote says what each is (the reference the messages follow).
    assert json.loads(open(f"{p['dups']}/_SUCCESS").read())["command"] == "dedup"
    assert json.loads(open(f"{p['labels_out']}/_SUCCESS").read())["command"] == "probe apply"
    for folder, what in cases.items():
        with pytest.raises(SystemExit) as info:
            main(COMMANDS[command](p, folder))
        err = capsys.readouterr().err
        assert info.value.code == 2, (command, folder, err)
        assert f"--tables: {folder} is {what}" in err and "not a `vmae-ray embed` output" in err, (command, err)
        assert "rerun" not in err  # the advice for an embed output written by an older vmae-ray
    assert not [n for n in os.listdir(p["root"]) if n.startswith("new_")], "refused before writing anything"
    # The embed output itself is accepted (the fixture's commands ran on it; this one too).
    if command in ("search", "index"):
        assert main(COMMANDS[command](p, tables)) == 0
        assert re.search(r"\S", capsys.readouterr().out)


def test_probe_fit_advice_on_an_embed_output_of_an_older_vmae_ray(tmp_path, capsys):
    from vmae_ray.cli import main

    out = str(tmp_path / "old")
    write_committed(out, StorageOptions(), {"videos": table_of(["a", "b"], vectors(2))}, {"model": {}})
    (tmp_path / "l.csv").write_text("video_id,label\na,x\nb,y\n")
    with pytest.raises(SystemExit):
        main(["probe", "fit", "--tables", out, "--labels", str(tmp_path / "l.csv"), "--head", str(tmp_path / "h")])
    err = capsys.readouterr().err
    assert "has no model.fingerprint or embedding_fingerprint (written by an older vmae-ray); rerun the same " \
           "`vmae-ray embed` command" in err


def test_output_kind_from_success():
    from vmae_ray.reading import describe_output, output_kind

    assert output_kind({"files": {"clips": [], "videos": ["videos/p.parquet"], "errors": []}}) == "embed"
    assert output_kind({"files": {"errors": ["errors/p.parquet"]}}) == "embed"  # every input failed
    assert output_kind({"command": "dedup", "files": {"duplicates": []}}) == "dedup"
    assert output_kind({"files": {"items": []}}) == "unknown"
    assert describe_output({"files": {"items": [], "more": []}}) == "an output of another command (tables items, more)"
