"""`vmae-ray search`, `index` and `dedup` on committed tables, local and on the S3 server.

The tables are written with the job's own commit protocol (`OutputStore.commit`: staged
shards, superseded videos rewritten out of their shards, `_SUCCESS` last) from vectors this
test made, so every answer is checked against a brute-force computation on those vectors.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from vmae_ray import neighbours as nb
from vmae_ray.cli import main
from vmae_ray.reading import CommittedOutput
from vmae_ray.search import IndexFiles, UpdatePlan, decide_update
from vmae_ray.storage import StorageOptions, url_to_fs
from vmae_ray.synthetic import clustered_unit_vectors
from vmae_ray.writing import OutputStore, rewrite_group

DIM = 32
CLIPS = 3


class World:
    """Committed tables made here: the vectors of every committed video and clip."""

    def __init__(self, out: str, storage: StorageOptions, argv: list[str]):
        self.out, self.storage, self.argv = out, storage, argv
        self.videos: dict[str, np.ndarray] = {}  # video_id -> (CLIPS, D) clip embeddings
        self.runs = 0

    def commit(self, clips: dict[str, np.ndarray], *, shards: int = 1, superseded=()) -> str:
        """One run: these videos (new, or replacing ``superseded`` ones), committed as the job does."""
        self.runs += 1
        run_id = f"run{self.runs}"
        store = OutputStore(self.out, self.storage)
        previous = store.recover()
        ids = sorted(clips)
        staged = {"videos": [], "clips": []}
        for s, part in enumerate(np.array_split(np.array(ids, dtype=object), shards)):
            part = list(part)
            for table, data in (("videos", video_table(part, clips)), ("clips", clip_table(part, clips))):
                rel = f"{table}/part-{run_id}-{s:05d}.parquet"
                store.write_table(run_id, rel, data)
                staged[table].append(rel)
        manifest = {"run_id": run_id, "settings_fingerprint": "fp", "config": {}, "model": {}}
        replaced = {}
        if superseded:  # as the job does: the shard groups holding them are rewritten without them
            for stem in sorted({os.path.basename(f) for f in previous.files_of("videos")}):
                group = [f"{t}/{stem}" for t in ("clips", "videos") if f"{t}/{stem}" in previous.files_of(t)]
                replaced.update(rewrite_group(store, run_id, group, set(superseded)))
        store.commit(run_id, staged, manifest, previous, replaced=replaced)
        self.videos.update(clips)
        return run_id

    def matrix(self, level: str) -> tuple[np.ndarray, list[tuple]]:
        """All committed vectors and their keys ((video_id,) or (video_id, clip_index)), by key."""
        keys, rows = [], []
        for vid in sorted(self.videos):
            if level == "video":
                keys.append((vid,))
                rows.append(mean_embedding(self.videos[vid]))
            else:
                for c in range(CLIPS):
                    keys.append((vid, c))
                    rows.append(self.videos[vid][c])
        return np.stack(rows), keys

    def run(self, *args: str) -> int:
        return main([args[0], "--tables", self.out, *self.argv, *args[1:]])


def mean_embedding(clips: np.ndarray) -> np.ndarray:
    return clips.astype(np.float64).mean(axis=0).astype(np.float32)


def uri_of(vid: str) -> str:
    return f"/corpus/{vid}.mp4"


def embedding_column(matrix: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix, np.float32).reshape(-1)), DIM)


def video_table(ids, clips) -> pa.Table:
    return pa.table({"video_id": ids, "uri": [uri_of(v) for v in ids], "num_clips": pa.array([CLIPS] * len(ids), pa.int32()),
                     "embedding": embedding_column(np.stack([mean_embedding(clips[v]) for v in ids]))})


def clip_table(ids, clips) -> pa.Table:
    vids = [v for v in ids for _ in range(CLIPS)]
    return pa.table({
        "video_id": vids, "uri": [uri_of(v) for v in vids], "clip_index": pa.array(list(range(CLIPS)) * len(ids), pa.int32()),
        "start_seconds": [2.0 * c for _ in ids for c in range(CLIPS)],
        "end_seconds": [2.0 * c + 2 for _ in ids for c in range(CLIPS)],
        "embedding": embedding_column(np.concatenate([clips[v] for v in ids])),
    })


def make_clips(n: int, seed: int, prefix: str = "v") -> dict[str, np.ndarray]:
    # Clustered videos, with clips near their video's direction; norms not 1 (like the model's).
    x, _ = clustered_unit_vectors(n, DIM, num_clusters=12, cluster_cosine=0.5, duplicate_fraction=0.05,
                                  duplicate_cosine=0.97, seed=seed)
    rng = np.random.default_rng(seed)
    clips = x[:, None, :] + 0.05 * rng.standard_normal((n, CLIPS, DIM)).astype(np.float32)
    clips *= rng.uniform(1.0, 4.0, (n, 1, 1)).astype(np.float32)
    return {f"{prefix}{seed:02d}-{i:05d}": clips[i] for i in range(n)}


@pytest.fixture(params=["local", "s3"])
def world(request, tmp_path) -> World:
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        return World(f"s3://{bucket}/tables", StorageOptions(server.storage_options),
                     ["--storage-options", json.dumps(server.storage_options)])
    return World(str(tmp_path / "tables"), StorageOptions(), [])


def brute_force(world: World, level: str, query: np.ndarray, exclude_video: str | None, k: int):
    """(keys, float64 cosines) best first, equal scores by key: the reference ranking."""
    matrix, keys = world.matrix(level)
    x = matrix.astype(np.float64)
    q = query.astype(np.float64)
    scores = x @ q / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    order = sorted((i for i in range(len(keys)) if keys[i][0] != exclude_video), key=lambda i: (-scores[i], keys[i]))
    return [keys[i] for i in order[:k]], scores[order[:k]]


def search_json(world: World, capsys, *args: str) -> tuple[list[dict], str]:
    capsys.readouterr()
    assert world.run("search", "--json", *args) == 0
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines()], out.err


def keys_of(results: list[dict], level: str) -> list[tuple]:
    return [(r["video_id"],) if level == "video" else (r["video_id"], r["clip_index"]) for r in results]


# ------------------------------------------------------------------------------------ search


def test_exact_search_equals_brute_force(world, capsys):
    clips = make_clips(400, seed=1)
    world.commit(clips, shards=3)
    ids = sorted(clips)
    for vid, as_uri in ((ids[5], False), (ids[250], True)):
        query = uri_of(vid) if as_uri else vid
        got, err = search_json(world, capsys, "--query", query, "-k", "7")
        want, scores = brute_force(world, "video", mean_embedding(clips[vid]), vid, 7)
        assert keys_of(got, "video") == want and "exact search" in err and "own rows excluded" in err
        np.testing.assert_allclose([r["score"] for r in got], scores, rtol=0, atol=1e-12)
        assert [r["rank"] for r in got] == list(range(1, 8)) and got[0]["uri"] == uri_of(got[0]["video_id"])
        # Clip level: the video's mean clip embedding, none of its clips returned.
        got, _ = search_json(world, capsys, "--query", query, "-k", "9", "--level", "clip")
        want, scores = brute_force(world, "clip", mean_embedding(clips[vid]), vid, 9)
        assert keys_of(got, "clip") == want
        np.testing.assert_allclose([r["score"] for r in got], scores, rtol=0, atol=1e-12)
        assert all(r["end_seconds"] == 2.0 * r["clip_index"] + 2 for r in got)
    got, _ = search_json(world, capsys, "--query", ids[9], "--level", "clip", "--clip-index", "2", "-k", "5")
    assert keys_of(got, "clip") == brute_force(world, "clip", clips[ids[9]][2], ids[9], 5)[0]
    got, _ = search_json(world, capsys, "--query", ids[0], "-k", "1000")
    assert len(got) == 399
    # The text table: a header and one line per result.
    assert world.run("search", "--query", ids[5], "-k", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "video_id", "uri"] and len(lines) == 4


# ------------------------------------------------------------------------------------ index


def load_index(world: World, level: str = "video"):
    files = IndexFiles(CommittedOutput.open(world.out, world.storage), level)
    manifest = files.manifest()
    index, ids = files.load(manifest)
    return manifest, index, ids


def test_index_lifecycle(world, capsys, monkeypatch):
    monkeypatch.setattr(nb, "FLAT_MAX_ROWS", 500)  # an IVF index at test size
    first = make_clips(1600, seed=2)
    world.commit(first, shards=4)
    assert world.run("index") == 0
    out = capsys.readouterr().out
    assert "IVF-Flat, nlist 40" in out and "built from scratch" in out and "1600 rows of videos/" in out
    manifest, index, ids = load_index(world)
    assert manifest["kind"] == "ivf_flat" and manifest["recall_at_10"] >= nb.DEFAULT_TARGET_RECALL
    assert index.ntotal == 1600 and ids.num_rows == 1600

    # Search goes through the index and finds most true neighbours.
    id_list = sorted(first)
    hits = total = 0
    for vid in id_list[::160]:
        got, err = search_json(world, capsys, "--query", vid, "-k", "10")
        assert "approximate search with the index" in err
        want, _ = brute_force(world, "video", mean_embedding(first[vid]), vid, 10)
        hits += len(set(keys_of(got, "video")) & set(want))
        total += 10
        assert vid not in {r["video_id"] for r in got}
    assert hits / total >= 0.8

    # A nightly run: 300 new videos, and 40 videos of the first shard changed (superseded).
    changed = id_list[:40]
    old = {v: first[v] for v in changed}
    second = make_clips(300, seed=3, prefix="w")
    second.update({v: -first[v] + 0.5 for v in changed})
    world.commit(second, superseded=changed)
    got, err = search_json(world, capsys, "--query", id_list[1000], "-k", "10")
    assert "stale" in err and "exact search" in err
    assert keys_of(got, "video") == brute_force(world, "video", mean_embedding(first[id_list[1000]]), id_list[1000], 10)[0]

    assert world.run("index") == 0
    out = capsys.readouterr().out
    # The first shard (400 rows) was rewritten without the 40: its 360 rows come back with the 340 new.
    assert "updated: +700 rows from 2 new files, -400 rows of 1 files no longer committed" in out
    manifest, index, ids = load_index(world)
    committed = CommittedOutput.open(world.out, world.storage)
    assert manifest["files"] == committed.committed_files("videos") and manifest["trained_rows"] == 1600
    assert index.ntotal == ids.num_rows == 1900 and set(ids.column("file").to_pylist()) <= set(manifest["files"])
    assert sorted(ids.column("video_id").to_pylist()) == sorted(world.videos)
    # Scanning every list is exact again: equal to brute force over what is committed now.
    matrix, keys = world.matrix("video")
    ids_by_key = dict(zip(ids.column("video_id").to_pylist(), ids.column("id").to_pylist()))
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    for i in range(0, len(keys), 190):
        _, found = nb.search_index(index, unit[i], 10, manifest["nlist"])
        want = [ids_by_key[k[0]] for k in brute_force(world, "video", matrix[i], None, 10)[0]]
        assert set(found[0].tolist()) == set(want)
    # The superseded rows are gone: their old vectors' exact copies are not in the index.
    for v in changed[:10]:
        best, _ = nb.search_index(index, mean_embedding(old[v]) / np.linalg.norm(mean_embedding(old[v])), 1,
                                  manifest["nlist"])
        assert best[0, 0] < 0.9999
    got, err = search_json(world, capsys, "--query", changed[0], "-k", "5")
    assert "with the index" in err

    # What a killed `index` leaves (files under new names, INDEX.json not yet replaced) is
    # never read: search still follows INDEX.json; the next build removes the leftovers.
    fs, root = url_to_fs(IndexFiles(committed, "video").root, world.storage)
    with fs.open(f"{root}/index-killed.faiss", "wb") as f:
        f.write(b"\x00" * 100)
    got, err = search_json(world, capsys, "--query", changed[0], "-k", "5")
    assert "with the index" in err and len(got) == 5
    assert world.run("index", "--rebuild") == 0
    assert "built from scratch" in capsys.readouterr().out
    assert not fs.exists(f"{root}/index-killed.faiss") and len(fs.ls(root)) == 3


def test_decide_update():
    base = {"settings_fingerprint": "fp", "files": ["a", "b"], "rows": 100_000, "kind": "ivf_flat",
            "trained_rows": 100_000}
    assert decide_update(None, ["a"], "fp", 0).action == "rebuild"
    assert decide_update(base, ["a", "b"], "fp", 0).action == "current"
    assert decide_update(base, ["a", "b"], "other", 0).reason == "the tables were made with other settings"
    assert decide_update(base, ["c"], "fp", 0).reason == "every indexed file was replaced"
    assert decide_update(base, ["a", "b", "c"], "fp", 0, 50_000) == UpdatePlan(
        "update", "1 new and 0 removed files", (), ("c",))
    assert decide_update(base, ["a", "b", "c"], "fp", 0, 400_000).action == "rebuild"  # outgrew its lists
    small = {**base, "kind": "flat", "rows": 40_000}
    assert "IVF-Flat" in decide_update(small, ["a", "b", "c"], "fp", 0, 20_000).reason  # past FLAT_MAX_ROWS


# ------------------------------------------------------------------------------------ dedup


def brute_groups(world: World, threshold: float) -> tuple[set[frozenset], np.ndarray, list[str]]:
    matrix, keys = world.matrix("video")
    x = matrix.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    i, j = np.nonzero(np.triu(s >= threshold, 1))
    _, labels = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=s.shape), directed=False)
    ids = [k[0] for k in keys]
    groups = {}
    for row, label in enumerate(labels):
        groups.setdefault(label, set()).add(ids[row])
    return {frozenset(g) for g in groups.values() if len(g) >= 2}, s, ids


def test_dedup_groups_equal_brute_force_components(world, tmp_path, capsys):
    clips = make_clips(500, seed=4)
    world.commit(clips, shards=2)
    dup_out = world.out.rstrip("/") + "-dups"
    for threshold in (0.75, 0.94):
        assert world.run("dedup", "--threshold", str(threshold), "--output", dup_out) == 0
        out = capsys.readouterr().out
        assert "all pairs compared (exact)" in out
        result = CommittedOutput.open(dup_out, world.storage)
        table = result.read("duplicates")
        want, s, ids = brute_groups(world, threshold)
        assert len(want) > 0
        got: dict[int, set] = {}
        for row in table.to_pylist():
            got.setdefault(row["group_id"], set()).add(row["video_id"])
        assert {frozenset(g) for g in got.values()} == want
        position = {v: i for i, v in enumerate(ids)}
        for row in table.to_pylist():
            assert row["uri"] == uri_of(row["video_id"]) and row["representative"] in got[row["group_id"]]
            assert row["similarity"] == pytest.approx(s[position[row["video_id"]], position[row["representative"]]],
                                                      abs=1e-12)
        assert len({(r["group_id"], r["representative"]) for r in table.to_pylist()}) == len(got)
        m = result.manifest
        assert m["threshold"] == threshold and m["tables"]["run_id"] == "run1"
        assert m["counts"]["groups"] == len(want) and m["counts"]["videos_in_groups"] == table.num_rows


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_exits_2(tmp_path, capsys):
    empty = str(tmp_path / "nothing")
    os.makedirs(empty)
    cases = [
        (["search", "--tables", empty, "--query", "x"], "--tables: .* has no _SUCCESS"),
        (["index", "--tables", empty], "--tables: .* has no _SUCCESS"),
        (["dedup", "--tables", empty, "--threshold", "0.9", "--output", str(tmp_path / "d")], "has no _SUCCESS"),
        (["search", "--tables", empty, "--query", "x", "-k", "0"], "-k: must be at least 1"),
        (["dedup", "--tables", empty, "--threshold", "0", "--output", "d"], r"--threshold: must be in \(0, 1\]"),
        (["dedup", "--tables", empty, "--threshold", "1.5", "--output", "d"], r"--threshold: must be in \(0, 1\]"),
        (["search", "--tables", empty, "--query", "x", "--clip-index", "1"], "--clip-index: only with --level clip"),
    ]
    world = World(str(tmp_path / "tables"), StorageOptions(), [])
    world.commit(make_clips(30, seed=5))
    other = World(str(tmp_path / "other"), StorageOptions(), [])
    other.commit(make_clips(5, seed=6))
    cases += [
        (["search", "--tables", world.out, "--query", "no-such-video"],
         "--query: no-such-video is neither a video_id nor a uri in .*, and no such file exists"),
        (["dedup", "--tables", world.out, "--threshold", "0.9", "--output", world.out], "--output: must be a folder of its own"),
        (["dedup", "--tables", world.out, "--threshold", "0.9", "--output", other.out],
         "--output: .* holds another committed output"),
    ]
    import re

    for argv, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2, argv
        assert re.search(message, err), (argv, err)
    assert not os.path.exists(os.path.join(other.out, "duplicates"))
    assert pq.read_table(os.path.join(world.out, "videos")).num_rows == 30


def test_a_query_names_a_video_of_the_tables_however_its_local_path_is_spelled(tmp_path, monkeypatch):
    """As given, relative (from the current folder), absolute or file:// : the same video, which
    is then never its own hit; a URI that names nothing is None."""
    import pyarrow as pa

    from vmae_ray.search import match_query

    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "videos" / "a.mp4")
    meta = pa.table({"video_id": ["id-a", "id-b"], "uri": [absolute, "s3://bucket/b.mp4"]})
    for spelling in (absolute, "videos/a.mp4", "./videos/a.mp4", "file://" + absolute, "id-a"):
        assert match_query(spelling, meta) == "id-a", spelling
    assert match_query("s3://bucket/b.mp4", meta) == "id-b"
    assert match_query("file://" + str(tmp_path / "videos" / "z.mp4"), meta) is None
    file_meta = pa.table({"video_id": ["id-f"], "uri": ["file://" + absolute]})  # a file:// --input
    assert match_query("videos/a.mp4", file_meta) == match_query(absolute, file_meta) == "id-f"


def test_a_retried_decode_counts_each_clip_once_and_a_zero_query_is_refused():
    import numpy as np

    from vmae_ray.config import ConfigError
    from vmae_ray.search import Query
    from vmae_ray.stages import clips_row, video_clips

    class Clip:
        def __init__(self, k, value):
            self.clip_index, self.start_seconds, self.end_seconds, self.frame_indices = k, 0.0, 1.0, [k]
            self.pixels = np.full((1, 2, 2, 3), value, np.uint8)

    # A retried read re-sent clips 0 and 1 (values 10 and 11 the second time): each counts once, the last wins.
    rows = [clips_row({"video_id": "v", "uri": "u", "num_clips": 3}, [Clip(0, 0), Clip(1, 1)], decode_seconds=0),
            clips_row({"video_id": "v", "uri": "u", "num_clips": 3}, [Clip(0, 10), Clip(1, 11), Clip(2, 2)],
                      decode_seconds=0)]
    facts, pixels = video_clips(rows)
    assert [f["clip_index"] for f in facts] == [0, 1, 2] and pixels[:, 0, 0, 0, 0].tolist() == [10, 11, 2]
    for bad in (np.zeros(4), np.array([1.0, np.nan, 0.0, 0.0])):
        with pytest.raises(ConfigError, match="^--query: .*zero or not finite"):
            Query(bad, None, "x.mp4", False, "x.mp4, not in the tables")
    assert Query(np.ones(4), None, "x.mp4", False, "x").vector.sum() == 4
