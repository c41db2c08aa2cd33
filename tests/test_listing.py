"""File names as given: an --input that names an existing file is that file, whatever its characters.

Downloaders name files ``Title [id].mp4``; read as a glob, ``[1]`` matches the neighbour
``Title 1.mp4`` (or nothing). A name is read as a glob only when no file has that exact name.
The same holds on S3 (a real server) and for manifests.
"""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from vmae_ray.config import EmbedConfig
from vmae_ray.listing import list_inputs
from vmae_ray.storage import StorageOptions

# Name -> the neighbour a glob reading of it matches.
TRICKY = {"talk [1].mp4": "talk 1.mp4", "clip*.mp4": "clipA.mp4", "take?.mp4": "take2.mp4"}


def _uris(uri: str, storage: StorageOptions | None = None) -> list[str]:
    return list_inputs(uri, storage or StorageOptions()).column("uri").to_pylist()


@pytest.fixture
def tricky_dir(tmp_path):
    for name, neighbour in TRICKY.items():
        for n in (name, neighbour):
            (tmp_path / n).write_bytes(n.encode())  # listing only: no need for real video
    return tmp_path


def test_existing_names_are_taken_as_given(tricky_dir):
    for name in TRICKY:
        assert _uris(str(tricky_dir / name)) == [str(tricky_dir / name)], name
        assert _uris("file://" + str(tricky_dir / name)) == ["file://" + str(tricky_dir / name)], name


def test_a_name_that_does_not_exist_is_a_glob(tricky_dir):
    assert _uris(str(tricky_dir / "talk [12].mp4")) == [str(tricky_dir / "talk 1.mp4")]
    assert sorted(_uris(str(tricky_dir / "take?.mp4".replace("?", "[0-9]")))) == [str(tricky_dir / "take2.mp4")]
    everything = sorted(str(tricky_dir / n) for pair in TRICKY.items() for n in pair)
    assert sorted(_uris(str(tricky_dir / "*.mp4"))) == everything
    with pytest.raises(ValueError, match="matches no file"):
        _uris(str(tricky_dir / "nothing[0-9].mp4"))


def test_a_directory_with_brackets_is_listed(tmp_path):
    folder = tmp_path / "season [2024]"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(b"x")
    (tmp_path / "season 2.mp4").write_bytes(b"x")  # what a glob reading would match
    assert _uris(str(folder)) == [str(folder / "a.mp4")]


def test_manifest_names_and_rows_are_taken_as_given(tricky_dir):
    manifest = tricky_dir / "list [1].csv"
    pacsv.write_csv(pa.table({"uri": [str(tricky_dir / n) for n in TRICKY]}), manifest)
    (tricky_dir / "list 1.csv").write_bytes(b"uri\n/nowhere.mp4\n")  # the glob reading's match
    assert sorted(_uris(str(manifest))) == sorted(str(tricky_dir / n) for n in TRICKY)


def test_names_on_s3_are_taken_as_given(s3_server, s3_bucket):
    storage = StorageOptions(s3_server.storage_options)
    for name, neighbour in TRICKY.items():
        for n in (name, neighbour):
            s3_server.client.put_object(Bucket=s3_bucket, Key=f"in/{n}", Body=n.encode())
    for name in TRICKY:
        assert _uris(f"s3://{s3_bucket}/in/{name}", storage) == [f"s3://{s3_bucket}/in/{name}"], name
    assert _uris(f"s3://{s3_bucket}/in/talk [12].mp4", storage) == [f"s3://{s3_bucket}/in/talk 1.mp4"]


def test_bracketed_input_through_prepare(shared_media, tiny_classifier, tmp_path):
    """What `--input ".../brackets/talk [1].mp4"` makes the job read (checked before Ray starts)."""
    from vmae_ray.planning import prepare

    talk = os.path.join(shared_media, "cases", "brackets", "talk [1].mp4")
    if not os.path.exists(talk):
        pytest.skip(f"{talk} not found")
    plan = prepare(EmbedConfig(input=talk, output=str(tmp_path / "out"), model=tiny_classifier).validate())
    assert [(p.kind, p.uri) for p in plan.listing.parts] == [("file", talk)]
    # A copy of the folder without the bracketed file: the same name is now a glob, which
    # reads the neighbour (as before this fix every time), and says so by its listing.
    copy = tmp_path / "brackets"
    shutil.copytree(os.path.dirname(talk), copy)
    os.remove(copy / "talk [1].mp4")
    plan = prepare(EmbedConfig(input=str(copy / "talk [1].mp4"), output=str(tmp_path / "out2"),
                               model=tiny_classifier).validate())
    assert [p.kind for p in plan.listing.parts] == ["glob"]
    assert _uris(str(copy / "talk [1].mp4")) == [str(copy / "talk 1.mp4")]
    with pytest.raises(ValueError, match="matches no file"):  # a listing error of the run
        _uris(str(copy / "talk [2].mp4"))
