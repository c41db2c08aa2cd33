"""The commit protocol without Ray: shard names, commits, and recovery from every failpoint.

A crash is simulated by making `failpoint` raise at the named point (the job's own crash
tests kill a real driver there; this covers the same protocol in milliseconds). After each
crash, `recover` must leave exactly the previous or the new committed state: every file
_SUCCESS lists exists, no table folder holds a file it does not list, and the rows read back
are those of one state.
"""

from __future__ import annotations

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vmae_ray import schema, writing
from vmae_ray.storage import StorageOptions
from vmae_ray.writing import COMMIT_FAILPOINTS, CommittedState, OutputStore, rewrite_group

DIM = 3
SCHEMAS = {
    schema.CLIPS: schema.clips_schema(DIM, with_labels=False),
    schema.VIDEOS: schema.videos_schema(DIM, with_labels=False),
    schema.ERRORS: schema.errors_schema(),
}


class Crash(Exception):
    pass


def video(vid: str, run_id: str) -> dict:
    return {"video_id": vid, "uri": f"/v/{vid}.mp4", "num_clips": 1, "embedding": [1.0, 2.0, float(len(vid))],
            "run_id": run_id}


def clip(vid: str, run_id: str) -> dict:
    return {"video_id": vid, "uri": f"/v/{vid}.mp4", "clip_index": 0, "embedding": [0.5, 0.5, 0.5], "run_id": run_id}


def stage_receipt(store: OutputStore, run_id: str, attempt: str, vids: list[str]) -> dict[str, list[str]]:
    """What a model actor call stages: clips and videos shards sharing one name."""
    staged = {}
    for table, make in ((schema.VIDEOS, video), (schema.CLIPS, clip)):
        rel = f"{table}/part-{run_id}-{attempt}-00001.parquet"
        store.write_table(run_id, rel, pa.Table.from_pylist([make(v, run_id) for v in vids], schema=SCHEMAS[table]))
        staged[table] = [rel]
    return staged


def commit_run(store: OutputStore, state: CommittedState, run_id: str, vids: list[str], *,
               superseded: set[str] = frozenset()) -> dict:
    """A run that stages two receipts (the videos in halves) and commits them; ``superseded``
    videos' rows are first rewritten out of the committed groups that hold them."""
    staged: dict[str, list[str]] = {t: [] for t in schema.TABLES}
    half = (len(vids) + 1) // 2
    for i, part in enumerate((vids[:half], vids[half:])):
        if part:
            for table, rels in stage_receipt(store, run_id, f"w{i}", part).items():
                staged[table] += rels
    replaced = {}
    if superseded:
        stems = {os.path.basename(f) for f in state.files_of(schema.VIDEOS)}
        for stem in sorted(stems):
            rels = [f"{t}/{stem}" for t in schema.TABLES if f"{t}/{stem}" in state.files_of(t)]
            replaced.update(rewrite_group(store, run_id, rels, set(superseded)))
    return store.commit(run_id, staged, {"run_id": run_id}, state, replaced=replaced)


def read_state(out: str) -> dict[str, list[tuple[str, str]]]:
    """(video_id, run_id) of every committed row per table, as a reader following _SUCCESS sees it."""
    with open(os.path.join(out, "_SUCCESS")) as f:
        success = json.load(f)
    rows = {}
    for table in schema.TABLES:
        found = []
        for rel in success["files"].get(table, []):
            t = pq.read_table(os.path.join(out, rel), columns=["video_id", "run_id"])
            found += list(zip(t.column("video_id").to_pylist(), t.column("run_id").to_pylist()))
        rows[table] = sorted(found)
    return rows


def folder_files(out: str) -> set[str]:
    return {f"{t}/{n}" for t in schema.TABLES if os.path.isdir(os.path.join(out, t)) for n in os.listdir(os.path.join(out, t))}


def test_commits_of_one_run_add_up_and_rewrites_keep_groups_together(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageOptions())
    first = store.commit("r1", stage_receipt(store, "r1", "a", ["v0", "v1"]), {"run_id": "r1"}, CommittedState(),
                         final=False)
    second = store.commit("r1", stage_receipt(store, "r1", "b", ["v2"]), {"run_id": "r1"}, CommittedState(first))
    assert len(second["files"]["videos"]) == len(set(second["files"]["videos"])) == 2
    assert sorted(r[0] for r in read_state(store.output)["videos"]) == ["v0", "v1", "v2"]
    assert second["layout"] == writing.LAYOUT
    # Rewriting one group without v1: its clips and videos files get one new shared name.
    group = [f"{t}/part-r1-a-00001.parquet" for t in (schema.CLIPS, schema.VIDEOS)]
    replaced = rewrite_group(store, "r2", group, {"v1"})
    assert set(replaced) == set(group)
    assert len({os.path.basename(new) for new in replaced.values()}) == 1
    third = store.commit("r2", {}, {"run_id": "r2"}, CommittedState(second), replaced=replaced)
    assert sorted(r[0] for r in read_state(store.output)["clips"]) == ["v0", "v2"]
    assert not set(group) & {f for fs in third["files"].values() for f in fs}
    assert rewrite_group(store, "r3", [third["files"]["videos"][0]], {"nobody"}) == {}  # nothing to remove


@pytest.mark.parametrize("point", COMMIT_FAILPOINTS)
def test_crash_at_each_failpoint_recovers_to_one_state(tmp_path, monkeypatch, point):
    out = str(tmp_path / "out")
    store = OutputStore(out, StorageOptions())
    first = commit_run(store, CommittedState(), "r1", ["a", "b", "c"])
    before = read_state(out)

    def crash_here(name):
        if name == point:
            raise Crash(name)

    monkeypatch.setattr(writing, "failpoint", crash_here)
    # The second run supersedes "b" (a changed input: its shards are rewritten without it)
    # and adds "d" and "b" again.
    with pytest.raises(Crash):
        commit_run(store, CommittedState(first), "r2", ["b", "d"], superseded={"b"})
    monkeypatch.setattr(writing, "failpoint", lambda name: None)

    recovered = OutputStore(out, StorageOptions()).recover()
    after = read_state(out)
    new = {"clips": [("a", "r1"), ("b", "r2"), ("c", "r1"), ("d", "r2")],
           "videos": [("a", "r1"), ("b", "r2"), ("c", "r1"), ("d", "r2")], "errors": []}
    # A journaled commit is rolled forward; one that never wrote its journal is dropped.
    expected = before if point == "before_journal" else new
    assert after == expected
    assert folder_files(out) == {rel for rels in recovered.files.values() for rel in rels}
    assert not os.path.exists(os.path.join(out, writing.STAGING))
    # And the next commit starts from there.
    commit_run(store, recovered, "r3", ["e"])
    assert ("e", "r3") in read_state(out)["videos"]


def test_a_journal_older_than_the_committed_state_is_dropped(tmp_path, monkeypatch):
    """Run A journals a commit and stalls; run B (which took over A's expired lease, after its
    own recovery) commits; A dies. Rolling A's journal forward would put A's state back over
    B's and delete B's files: recovery drops it, and B's state stands."""
    out = str(tmp_path / "out")
    first = commit_run(OutputStore(out, StorageOptions()), CommittedState(), "r1", ["a", "b"])

    def crash_after_journal(name):
        if name == "after_journal":
            raise Crash(name)

    monkeypatch.setattr(writing, "failpoint", crash_after_journal)
    with pytest.raises(Crash):
        commit_run(OutputStore(out, StorageOptions()), CommittedState(first), "ra", ["c"])
    monkeypatch.setattr(writing, "failpoint", lambda name: None)
    assert os.path.exists(os.path.join(out, writing.STAGING, "ra", writing.JOURNAL))
    commit_run(OutputStore(out, StorageOptions()), CommittedState(first), "rb", ["d"])
    b_state = read_state(out)
    recovered = OutputStore(out, StorageOptions()).recover()
    assert read_state(out) == b_state
    assert [v for v, _ in b_state["videos"]] == ["a", "b", "d"]
    assert folder_files(out) == {rel for rels in recovered.files.values() for rel in rels}
    assert not os.path.exists(os.path.join(out, writing.STAGING))


def test_crash_inside_recovery_changes_nothing(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    store = OutputStore(out, StorageOptions())
    first = commit_run(store, CommittedState(), "r1", ["a"])

    def crash_before_success(name):
        if name == "before_success":
            raise Crash(name)

    monkeypatch.setattr(writing, "failpoint", crash_before_success)
    with pytest.raises(Crash):
        commit_run(store, CommittedState(first), "r2", ["b"])
    with pytest.raises(Crash):  # the roll-forward itself dies at the same point
        OutputStore(out, StorageOptions()).recover()
    monkeypatch.setattr(writing, "failpoint", lambda name: None)
    OutputStore(out, StorageOptions()).recover()
    assert read_state(out)["videos"] == [("a", "r1"), ("b", "r2")]


def test_other_tables_use_the_same_protocol(tmp_path):
    """A store owning other folders (as other commands' outputs) commits and recovers them."""
    out = str(tmp_path / "labels_out")
    store = OutputStore(out, StorageOptions(), tables=("labels",))
    store.write_table("r1", "labels/part-r1-00000.parquet", pa.table({"video_id": ["a"], "run_id": ["r1"]}))
    success = store.commit("r1", {"labels": ["labels/part-r1-00000.parquet"]}, {"run_id": "r1"}, CommittedState())
    assert success["files"] == {"labels": ["labels/part-r1-00000.parquet"]}
    os.makedirs(os.path.join(out, "labels"), exist_ok=True)
    with open(os.path.join(out, "labels", "part-r2-00000.parquet"), "wb") as f:
        f.write(b"not committed: a killed run's shard")
    state = store.recover()
    assert os.listdir(os.path.join(out, "labels")) == ["part-r1-00000.parquet"]
    assert state.files_of("labels") == ["labels/part-r1-00000.parquet"] and state.files_of("clips") == []


def _tree(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


@pytest.mark.parametrize("foreign", ["videos/pan.mp4", "clips/my.parquet", "errors/sub/x.txt",
                                     "videos/part-00000-1b2c-c000.snappy.parquet"])
def test_files_vmae_ray_did_not_write_are_never_removed(tmp_path, foreign):
    """A folder of the user's (a corpus with a videos/ folder, a Spark table): recovery and
    --overwrite refuse before removing anything; with or without a committed state."""
    for committed in (False, True):
        out = tmp_path / f"out-{committed}"
        store = OutputStore(str(out), StorageOptions())
        if committed:
            commit_run(store, store.recover(), "r1", ["a", "b", "c"])
        (out / foreign).parent.mkdir(parents=True, exist_ok=True)
        (out / foreign).write_bytes(b"the user's")
        (out / "notes.txt").write_bytes(b"beside the tables: never touched anyway")
        before = _tree(out)
        for action in (store.recover, store.check_owned):
            named = "errors/sub" if foreign.startswith("errors/sub/") else foreign  # a sub-folder is named itself
            with pytest.raises(writing.ForeignFilesError, match=re.escape(f"({named})")):
                action()
            assert _tree(out) == before, action.__name__


@pytest.mark.parametrize("stray", ["part-r2-00000.parquet", "part-r2-100000.parquet", "part-r2-rw00001.parquet"])
def test_a_stray_shard_of_ours_is_still_removed(tmp_path, stray):
    """Shards of a killed run (numbers go past 5 digits in a long run): ours, so removed."""
    store = OutputStore(str(tmp_path / "out"), StorageOptions())
    commit_run(store, store.recover(), "r1", ["a", "b", "c"])
    committed = folder_files(store.output)
    (tmp_path / "out" / "videos" / stray).write_bytes(b"")
    assert store.foreign_files() == []
    store.recover()
    assert folder_files(store.output) == committed


def test_another_tools_success_file_is_named_in_the_error(tmp_path):
    out = tmp_path / "spark"
    out.mkdir()
    (out / "_SUCCESS").write_bytes(b"")  # Spark writes an empty one
    with pytest.raises(ValueError, match="_SUCCESS is not a vmae-ray manifest"):
        OutputStore(str(out), StorageOptions()).read_state()


def test_an_output_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "afile"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        OutputStore(str(path), StorageOptions()).recover()
    assert path.read_bytes() == b"x"
