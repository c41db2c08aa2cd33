"""search, index and dedup on a real job's tables (one module-scoped run on local Ray).

The corpus holds planted near-duplicates: a clip re-encoded at another size and quality, and a
trimmed copy (`synthetic.transcode_video`). A tiny randomly initialised VideoMAE gives nearly
the same embedding to very different videos, so "the planted pairs end up grouped at some
threshold" would prove nothing; what is checked instead is exact: every answer equals a
brute-force computation on the job's own vectors, read here with plain pyarrow; a copy of a
corpus video outside the tables, embedded by `search` itself, gets the job's embedding back.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from vmae_ray.cli import config_from_args, main
from vmae_ray.pipeline import run
from vmae_ray.reading import CommittedOutput
from vmae_ray.search import embed_outside_video
from vmae_ray.storage import StorageOptions
from vmae_ray.synthetic import make_video, transcode_video


@pytest.fixture(scope="module")
def job(ray_session, tiny_classifier, tmp_path_factory):
    root = tmp_path_factory.mktemp("dups")
    corpus = root / "corpus"
    originals = {name: make_video(str(corpus / name), seed=seed, **kw) for seed, (name, kw) in enumerate({
        "a.mp4": dict(width=160, height=120, num_frames=48),
        "b.mp4": dict(width=160, height=120, num_frames=48),
        "c.mp4": dict(width=128, height=96, num_frames=40),
        "d.webm": dict(codec="libvpx-vp9", width=128, height=96, fps=12, num_frames=30, gop_size=12),
    }.items(), start=20)}
    # The same clip at another size and quality, and a trimmed copy.
    transcode_video(originals["a.mp4"], corpus / "a_small_crf40.mp4", width=96, height=72, crf=40)
    transcode_video(originals["b.mp4"], corpus / "b_trimmed.mp4", width=160, height=120, crf=23, start_frame=8,
                    end_frame=40)
    outside = root / "elsewhere" / "c_copy.mp4"
    outside.parent.mkdir()
    shutil.copyfile(originals["c.mp4"], outside)
    out = str(root / "tables")
    run(config_from_args(["--input", str(corpus), "--output", out, "--model", tiny_classifier, "--sampling", "stride",
                          "--frame-stride", "2", "--clips-per-video", "2", "--batch-size", "3"]))
    return {"out": out, "corpus": str(corpus), "outside": str(outside), "originals": originals}


def job_vectors(out: str, table: str):
    """The committed rows as a consumer reads them: the files _SUCCESS lists, with pyarrow."""
    with open(os.path.join(out, "_SUCCESS")) as f:
        files = json.load(f)["files"][table]
    rows = [r for rel in files for r in pq.read_table(os.path.join(out, rel)).to_pylist()]
    return np.array([r["embedding"] for r in rows], dtype=np.float64), rows


def reference(out: str, level: str, query: np.ndarray, exclude: str | None, k: int):
    x, rows = job_vectors(out, "videos" if level == "video" else "clips")
    query = np.asarray(query, dtype=np.float64)
    scores = x @ query / (np.linalg.norm(x, axis=1) * np.linalg.norm(query))
    key = (lambda r: (r["video_id"],)) if level == "video" else (lambda r: (r["video_id"], r["clip_index"]))
    order = sorted((i for i, r in enumerate(rows) if r["video_id"] != exclude), key=lambda i: (-scores[i], key(rows[i])))
    return [key(rows[i]) for i in order[:k]], scores[order[:k]]


def search_json(capsys, *argv):
    capsys.readouterr()
    assert main(["search", "--json", *argv]) == 0
    out = capsys.readouterr()
    return [json.loads(line) for line in out.out.splitlines()], out.err


def test_search_equals_brute_force_on_job_tables(job, capsys):
    out = job["out"]
    videos, rows = job_vectors(out, "videos")
    assert len(rows) == 6
    for i, row in enumerate(rows):
        for level in ("video", "clip"):
            got, err = search_json(capsys, "--tables", out, "--query", row["uri"] if i % 2 else row["video_id"],
                                   "--level", level, "-k", "4")
            # Clip level: the mean of the video's clip embeddings, as float32 like videos/ holds it.
            clips, clip_rows = job_vectors(out, "clips")
            query = videos[i] if level == "video" else clips[
                [j for j, c in enumerate(clip_rows) if c["video_id"] == row["video_id"]]].mean(0).astype(np.float32)
            want, scores = reference(out, level, query, row["video_id"], 4)
            key = (lambda r: (r["video_id"],)) if level == "video" else (lambda r: (r["video_id"], r["clip_index"]))
            assert [key(r) for r in got] == want, (row["uri"], level)
            np.testing.assert_allclose([r["score"] for r in got], scores, rtol=0, atol=1e-9)
    # With an index (flat at this size: exact), the same answers, at both levels.
    assert main(["index", "--tables", out]) == 0 and main(["index", "--tables", out, "--level", "clip"]) == 0
    got, err = search_json(capsys, "--tables", out, "--query", rows[0]["video_id"], "-k", "5")
    assert "with the index" in err
    assert [(r["video_id"],) for r in got] == reference(out, "video", videos[0], rows[0]["video_id"], 5)[0]
    clips, clip_rows = job_vectors(out, "clips")
    own = [j for j, c in enumerate(clip_rows) if c["video_id"] == rows[1]["video_id"]]
    got, err = search_json(capsys, "--tables", out, "--query", rows[1]["video_id"], "--level", "clip", "-k", "5",
                           "--clip-index", str(clip_rows[own[1]]["clip_index"]))
    assert "with the index" in err
    assert [(r["video_id"], r["clip_index"]) for r in got] == reference(out, "clip", clips[own[1]], rows[1]["video_id"], 5)[0]


def test_outside_video_is_embedded_like_the_job(job, capsys):
    """A byte copy of c.mp4 at another path: decoded and embedded here with the run's settings,
    it must get c's own clip embeddings back (same decoder, same model, same sampling)."""
    out = job["out"]
    committed = CommittedOutput.open(out, StorageOptions())
    clips, facts = embed_outside_video(job["outside"], committed, StorageOptions())
    x, rows = job_vectors(out, "clips")
    mine = sorted((r["clip_index"], i) for i, r in enumerate(rows) if r["uri"] == job["originals"]["c.mp4"])
    assert [f["clip_index"] for f in facts] == [c for c, _ in mine] == [0, 1]
    assert [(f["start_seconds"], f["end_seconds"]) for f in facts] == [
        (rows[i]["start_seconds"], rows[i]["end_seconds"]) for _, i in mine]
    np.testing.assert_allclose(clips, x[[i for _, i in mine]], rtol=0, atol=2e-5)
    got, err = search_json(capsys, "--tables", out, "--query", job["outside"], "-k", "6", "--exact")
    assert "not in the tables: embedded here" in err
    assert got[0]["uri"] == job["originals"]["c.mp4"] and got[0]["score"] > 0.999999
    query = clips.astype(np.float64).mean(0).astype(np.float32)
    assert [(r["video_id"],) for r in got] == reference(out, "video", query, None, 6)[0]
    # Not a video: exit 2 with the decoder's reason.
    bad = os.path.join(os.path.dirname(job["outside"]), "notes.mp4")
    with open(bad, "wb") as f:
        f.write(b"not a video at all" * 100)
    with pytest.raises(SystemExit) as exc:
        main(["search", "--tables", out, "--query", bad])
    assert exc.value.code == 2 and "not a readable video" in capsys.readouterr().err


def test_commands_on_the_job_tables_in_s3(job, s3_server, s3_bucket, capsys):
    """The same tables (and the outside video) in a bucket: the same answers as on local disk."""
    out = job["out"]
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            if "/_index/" not in path:
                s3_server.client.upload_file(path, s3_bucket, "tables/" + os.path.relpath(path, out))
    s3_server.client.upload_file(job["outside"], s3_bucket, "queries/c_copy.mp4")
    remote, options = f"s3://{s3_bucket}/tables", ["--storage-options", json.dumps(s3_server.storage_options)]
    _, rows = job_vectors(out, "videos")
    for query in (rows[2]["video_id"], f"s3://{s3_bucket}/queries/c_copy.mp4"):
        for level in ("video", "clip"):
            here, _ = search_json(capsys, "--tables", out, "--query", query if "s3://" not in query else job["outside"],
                                  "--level", level, "-k", "5", "--exact")
            there, err = search_json(capsys, "--tables", remote, *options, "--query", query, "--level", level, "-k", "5")
            assert [(r["video_id"], r.get("clip_index"), round(r["score"], 5)) for r in there] == [
                (r["video_id"], r.get("clip_index"), round(r["score"], 5)) for r in here]
    assert main(["index", "--tables", remote, *options]) == 0
    there, err = search_json(capsys, "--tables", remote, *options, "--query", rows[2]["video_id"], "-k", "5")
    assert "with the index" in err and [r["video_id"] for r in there] == [r["video_id"] for r in search_json(
        capsys, "--tables", out, "--query", rows[2]["video_id"], "-k", "5", "--exact")[0]]
    assert main(["dedup", "--tables", remote, *options, "--threshold", "0.9", "--output", f"s3://{s3_bucket}/dups"]) == 0
    dups = CommittedOutput.open(f"s3://{s3_bucket}/dups", StorageOptions(s3_server.storage_options))
    assert dups.manifest["tables"]["uri"] == remote and dups.manifest["threshold"] == 0.9
    capsys.readouterr()


def test_dedup_on_job_tables_equals_brute_force(job, tmp_path, capsys):
    out = job["out"]
    x, rows = job_vectors(out, "videos")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = unit @ unit.T
    names = [os.path.basename(r["uri"]) for r in rows]
    print("video cosine similarities (tiny random checkpoint):\n" + "\n".join(
        f"{names[a]:>20} " + " ".join(f"{s[a, b]:.4f}" for b in range(len(rows))) for a in range(len(rows))))
    pairs = np.sort(s[np.triu_indices(len(s), 1)])
    # Thresholds between consecutive pair similarities: each gives another grouping.
    for threshold in {float((pairs[i] + pairs[i + 1]) / 2) for i in (0, len(pairs) // 2, len(pairs) - 2)}:
        dup = str(tmp_path / f"dup-{threshold}")
        assert main(["dedup", "--tables", out, "--threshold", repr(threshold), "--output", dup]) == 0
        i, j = np.nonzero(np.triu(s >= threshold, 1))
        _, labels = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=s.shape), directed=False)
        want = {frozenset(rows[r]["video_id"] for r in np.nonzero(labels == lab)[0])
                for lab in set(labels.tolist()) if (labels == lab).sum() >= 2}
        table = CommittedOutput.open(dup, StorageOptions()).read("duplicates").to_pylist()
        got: dict[int, set] = {}
        for r in table:
            got.setdefault(r["group_id"], set()).add(r["video_id"])
        assert {frozenset(g) for g in got.values()} == want
    capsys.readouterr()
