"""Running it every night: one writer per output, --dry-run, --prune, --limit over the backlog,
exit statuses, paths resolved where typed, inputs that change, S3 Inventory reports.

Drivers run as their own processes (`jobs/embed_videos.py`) on the session's Ray where the
test needs two at once or another working directory; otherwise in-process through the same
command line (`vmae_ray.cli.main`). Tables are read back with plain pyarrow.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import time

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from tests.test_robustness import (
    CRASH_ARGS,
    assert_same_results,
    check_consistent,
    check_final,
    committed_tables,
    launch_driver,
    load_success,
    log_tail,
)
from vmae_ray.cli import main
from vmae_ray.listing import video_id_for_uri
from vmae_ray.progress import EXIT_ALL_FAILED, EXIT_LISTING_ERRORS, EXIT_LOCKED, EXIT_OK

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> dict:
    """Six short videos and one broken file."""
    from vmae_ray.synthetic import make_video

    folder = tmp_path_factory.mktemp("nightly_corpus")
    for i in range(6):
        make_video(str(folder / f"v{i}.mp4"), codec="h264", width=64, height=48, fps=10, num_frames=20 + 2 * i,
                   gop_size=10, seed=200 + i)
    (folder / "broken.mp4").write_bytes(b"not a video at all\n" * 20)
    return {"dir": str(folder), "ids": {video_id_for_uri(str(p)) for p in folder.iterdir()}}


def embed(*args) -> int:
    return main(["embed", *map(str, args)])


def copy_corpus(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def ids_of(folder: str) -> set[str]:
    return {video_id_for_uri(os.path.join(folder, name)) for name in os.listdir(folder)}


def ids_in(out: str, table: str) -> set[str]:
    t = committed_tables(out)[table]
    return set(t.column("video_id").to_pylist()) if t is not None else set()


# ---------------------------------------------------------------------------------------------
# --dry-run, --prune, --limit, exit statuses


def test_dry_run_says_what_a_run_would_do_and_writes_nothing(ray_session, small_corpus, tiny_classifier, tmp_path,
                                                             capsys):
    corpus = copy_corpus(small_corpus["dir"], tmp_path / "corpus")
    out = tmp_path / "out"
    assert embed("--input", corpus, "--output", out, "--model", tiny_classifier, "--dry-run") == EXIT_OK
    text = capsys.readouterr().out
    assert "inputs: 7 listed, 0 already done, 7 would process (7 new, 0 changed" in text, text
    assert "nothing was decoded or written" in text
    assert not out.exists()  # not even the folder
    assert embed("--input", corpus, "--output", out, "--model", tiny_classifier) == EXIT_OK
    capsys.readouterr()
    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(out) for p in fs}
    os.remove(os.path.join(corpus, "v0.mp4"))
    shutil.copy(os.path.join(corpus, "v1.mp4"), os.path.join(corpus, "v9.mp4"))  # new
    with open(os.path.join(corpus, "v2.mp4"), "ab") as f:  # changed: one byte more
        f.write(b"\0")
    assert embed("--input", corpus, "--output", out, "--model", tiny_classifier, "--dry-run") == EXIT_OK
    text = capsys.readouterr().out
    assert "inputs: 7 listed, 5 already done, 2 would process (1 new, 1 changed" in text, text
    assert "no longer listed: 1" in text and "v0.mp4" in text
    assert {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(out) for p in fs} == before


def test_inputs_no_longer_listed_are_counted_then_pruned_exactly(ray_session, small_corpus, tiny_classifier,
                                                                 tmp_path):
    corpus = copy_corpus(small_corpus["dir"], tmp_path / "corpus")
    out = str(tmp_path / "out")
    args = ["--input", corpus, "--output", out, "--model", tiny_classifier, "--sampling", "stride",
            "--clips-per-video", "2", "--frame-stride", "2", "--videos-per-task", "1"]
    assert embed(*args) == EXIT_OK
    gone_video, gone_error = os.path.join(corpus, "v3.mp4"), os.path.join(corpus, "broken.mp4")
    gone = {video_id_for_uri(gone_video), video_id_for_uri(gone_error)}
    before = committed_tables(out)
    os.remove(gone_video)
    os.remove(gone_error)
    assert embed(*args) == EXIT_OK  # counted, kept
    manifest = load_success(out)
    assert manifest["counts"]["no_longer_listed"] == 2 and manifest["counts"]["pruned"] == 0
    assert gone <= ids_in(out, "videos") | ids_in(out, "errors")
    assert embed(*args, "--prune") == EXIT_OK
    after = committed_tables(out)
    assert load_success(out)["counts"]["pruned"] == 2
    for table in ("clips", "videos", "errors"):
        want = before[table].filter(pa.compute.invert(pa.compute.is_in(before[table].column("video_id"),
                                                                         value_set=pa.array(sorted(gone)))))
        key = ["video_id", "clip_index"] if table == "clips" else ["video_id"]
        assert after[table].select(key).sort_by([(k, "ascending") for k in key]).to_pylist() == \
            want.select(key).sort_by([(k, "ascending") for k in key]).to_pylist(), table
    check_final(out, ids_of(corpus))


def test_limit_works_through_the_backlog_across_runs(ray_session, small_corpus, tiny_classifier, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["--input", small_corpus["dir"], "--output", out, "--model", tiny_classifier, "--limit", "3"]
    done, before = [], set()
    for expected_done in (3, 6, 7):
        code = embed(*args)
        if expected_done == 3:
            assert "3 processed of 7 that need work (7 new, 0 changed, 0 failed before and retried), 4 left for " \
                   "later (--limit)" in capsys.readouterr().out
        state = check_consistent(out)
        now = state["videos"] | state["errors"]
        # Which inputs a run takes depends on their video_ids (hashes of this session's paths):
        # the broken file alone in the last run is a run in which every input failed.
        assert code == (EXIT_ALL_FAILED if (now - before) <= state["errors"] else EXIT_OK)
        before = now
        done.append(len(now))
        manifest = load_success(out)
        assert manifest["complete"] is (expected_done == 7)
        assert manifest["counts"]["backlog"] == 7 - expected_done
    assert done == [3, 6, 7]
    check_final(out, small_corpus["ids"])


def test_limit_supersedes_only_the_inputs_it_takes(ray_session, small_corpus, tiny_classifier, tmp_path):
    """Three committed inputs change; --limit 1 redoes one: the other two keep their rows (in
    videos/, once) until a later run takes them."""
    corpus = copy_corpus(small_corpus["dir"], tmp_path / "corpus")
    os.remove(os.path.join(corpus, "broken.mp4"))
    out = str(tmp_path / "out")
    args = ["--input", corpus, "--output", out, "--model", tiny_classifier]

    def fingerprints() -> dict[str, str]:
        t = committed_tables(out)["videos"]
        return dict(zip(t.column("uri").to_pylist(), t.column("input_fingerprint").to_pylist()))

    assert embed(*args) == EXIT_OK
    first = fingerprints()
    assert len(first) == 6
    changed = [os.path.join(corpus, f"v{i}.mp4") for i in range(3)]
    for i, path in enumerate(changed):  # other bytes (other lengths) under the same names
        shutil.copy(os.path.join(corpus, f"v{i + 3}.mp4"), path)
    assert embed(*args, "--limit", "1") == EXIT_OK
    check_consistent(out)
    second = fingerprints()
    assert set(second) == set(first)  # every input still has its row, once
    redone = {u for u in first if second[u] != first[u]}
    assert len(redone) == 1 and redone <= set(changed)
    assert load_success(out)["counts"]["backlog"] == 2
    assert embed(*args, "--limit", "5") == EXIT_OK
    check_consistent(out)
    third = fingerprints()
    assert {u for u in first if third[u] != first[u]} == set(changed)


def test_exit_status_when_every_input_fails_and_on_listing_errors(ray_session, small_corpus, tiny_classifier,
                                                                   tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(2):
        (broken / f"b{i}.mp4").write_bytes(b"garbage" * (i + 3))
    out = str(tmp_path / "out")
    assert embed("--input", broken, "--output", out, "--model", tiny_classifier) == EXIT_ALL_FAILED
    assert len(ids_in(out, "errors")) == 2  # committed before exiting
    assert embed("--input", broken, "--output", out, "--model", tiny_classifier) == EXIT_OK  # nothing to do
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a video")
    with pytest.raises(SystemExit) as info:  # a mistake, not a night off: exit 2 naming --input
        embed("--input", empty, "--output", tmp_path / "out3", "--model", tiny_classifier)
    assert info.value.code == 2 and "--input: no video files under" in capsys.readouterr().err
    manifest = tmp_path / "list.csv"
    good = os.path.join(small_corpus["dir"], "v1.mp4")
    manifest.write_text(f"uri\n{good}\n\n\"\"\n")  # one row without a uri
    out2 = str(tmp_path / "out2")
    capsys.readouterr()
    assert embed("--input", manifest, "--output", out2, "--model", tiny_classifier) == EXIT_LISTING_ERRORS
    text = capsys.readouterr().out
    assert "listing errors: 1" in text and "has an empty uri" in text
    assert ids_in(out2, "videos") == {video_id_for_uri(good)}
    assert (tmp_path / "out2" / "errors").is_dir()  # every table folder, even without rows
    assert pq.read_table(tmp_path / "out2" / "errors").num_rows == 0


# ---------------------------------------------------------------------------------------------
# One writer per output


def _lock_holder(out: str) -> dict | None:
    try:
        with open(os.path.join(out, "_LOCK")) as f:
            return json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None


def test_two_runs_on_one_local_output_never_commit_twice(ray_address, crash_corpus, tiny_classifier, tmp_path):
    out = str(tmp_path / "out")
    args = ["--input", crash_corpus["dir"], "--output", out, "--model", tiny_classifier, *CRASH_ARGS]
    first = launch_driver(ray_address, [*args, "--run-id", "first"], str(tmp_path / "first.log"))
    deadline = time.monotonic() + 120
    while (_lock_holder(out) or {}).get("run_id") != "first":
        assert first.poll() is None and time.monotonic() < deadline, log_tail(str(tmp_path / "first.log"))
        time.sleep(0.05)
    second = launch_driver(ray_address, [*args, "--run-id", "second"], str(tmp_path / "second.log"))
    assert second.wait(120) == EXIT_LOCKED, log_tail(str(tmp_path / "second.log"))
    text = log_tail(str(tmp_path / "second.log"))
    assert "--output: " in text and "being written by run first" in text and f"pid {first.pid}" in text, text
    waiter = launch_driver(ray_address, [*args, "--run-id", "third", "--wait-for-lock"], str(tmp_path / "third.log"))
    assert first.wait(240) == 0, log_tail(str(tmp_path / "first.log"))
    assert waiter.wait(240) == 0, log_tail(str(tmp_path / "third.log"))
    assert "waiting for run first" in log_tail(str(tmp_path / "third.log"))
    check_final(out, crash_corpus["ids"])
    runs = [r["run_id"] for r in load_success(out)["runs"]]
    assert runs == ["first", "third"] and load_success(out)["counts"]["inputs_processed"] == 0
    assert not os.path.exists(os.path.join(out, "_LOCK"))


def test_two_runs_on_one_s3_output_never_commit_twice(ray_address, crash_corpus, tiny_classifier, s3_server,
                                                      s3_bucket, tmp_path):
    from tests.test_robustness import mirror_s3

    out = f"s3://{s3_bucket}/nightly/out"
    args = ["--input", crash_corpus["dir"], "--output", out, "--model", tiny_classifier, *CRASH_ARGS]
    first = launch_driver(ray_address, [*args, "--run-id", "first"], str(tmp_path / "first.log"), **s3_server.env)

    def holder():
        try:
            body = s3_server.client.get_object(Bucket=s3_bucket, Key="nightly/out/_LOCK")["Body"].read()
            return json.loads(body)
        except Exception:  # noqa: BLE001 - not there yet
            return None

    deadline = time.monotonic() + 120
    while (holder() or {}).get("run_id") != "first":
        assert first.poll() is None and time.monotonic() < deadline, log_tail(str(tmp_path / "first.log"))
        time.sleep(0.05)
    second = launch_driver(ray_address, [*args, "--run-id", "second"], str(tmp_path / "second.log"), **s3_server.env)
    assert second.wait(120) == EXIT_LOCKED, log_tail(str(tmp_path / "second.log"))
    assert "being written by run first" in log_tail(str(tmp_path / "second.log"))
    assert first.wait(240) == 0, log_tail(str(tmp_path / "first.log"))
    local = mirror_s3(s3_server, s3_bucket, "nightly/out", str(tmp_path / "mirror"))
    check_final(local, crash_corpus["ids"])
    assert [r["run_id"] for r in load_success(local)["runs"]] == ["first"]
    assert not os.path.exists(os.path.join(local, "_LOCK"))


def test_s3_lease_stale_takeover_and_compare_and_swap(s3_server, s3_bucket):
    """A lease not renewed in time is taken over by exactly one run; a live one is refused; a
    run whose view of _SUCCESS is stale cannot commit over another's."""
    import s3fs

    from vmae_ray.lease import LeaseHeldError, OutputLease
    from vmae_ray.storage import StorageOptions
    from vmae_ray.writing import CommittedState, ConcurrentCommitError, OutputStore

    s3fs.S3FileSystem.clear_instance_cache()
    storage = StorageOptions(s3_server.storage_options)
    out = f"s3://{s3_bucket}/lease/out"
    stale = {"run_id": "dead", "host": "h", "pid": 1, "since": time.time() - 600, "expires": time.time() - 60}
    s3_server.client.put_object(Bucket=s3_bucket, Key="lease/out/_LOCK", Body=json.dumps(stale).encode())
    a = OutputLease(OutputStore(out, storage), "a", lease_seconds=30)
    a.acquire()  # took over the dead run's lease
    b = OutputLease(OutputStore(out, storage), "b", lease_seconds=30)
    with pytest.raises(LeaseHeldError, match="being written by run a"):
        b.acquire()
    a.check()
    # A renewal that succeeded but whose response was lost: botocore's retry of it fails its
    # own condition. The lock is still a's: a adopts its ETag and renews on.
    from vmae_ray.writing import s3_put

    s3_put(a.store.fs, a.path, json.dumps(a._holder(time.time() + 30)).encode(), IfMatch=a._etag)
    assert not a._put_s3(IfMatch=a._etag)
    assert a._adopt_own_renewal() and a._put_s3(IfMatch=a._etag)
    a.release()
    b.acquire()  # released: free again
    assert not a._adopt_own_renewal()  # b's lock is not a's
    b.release()
    # Two stores read the same (empty) state; the first commit wins, the second is refused.
    one, two = OutputStore(out, storage), OutputStore(out, storage)
    s1, s2 = one.read_state(), two.read_state()
    one.commit("r1", {}, {"run_id": "r1"}, s1)
    with pytest.raises(ConcurrentCommitError):
        two.commit("r2", {}, {"run_id": "r2"}, s2)
    assert OutputStore(out, storage).read_state().manifest["run_id"] == "r1"
    assert isinstance(s1, CommittedState)


# ---------------------------------------------------------------------------------------------
# Paths resolved where typed; inputs that change; S3 Inventory


def test_relative_paths_are_resolved_where_the_command_was_typed(ray_address, small_corpus, tiny_classifier,
                                                                 tmp_path):
    """The driver runs in one folder, the Ray cluster (this session's) was started in another:
    relative --input, --output, --model and manifest entries are the driver's folder's."""
    here = tmp_path / "here"
    (here / "media").mkdir(parents=True)
    for name in ("v1.mp4", "v2.mp4"):
        shutil.copy(os.path.join(small_corpus["dir"], name), here / "media" / name)
    shutil.copytree(tiny_classifier, here / "ckpt")
    (here / "list.csv").write_text("uri\nmedia/v1.mp4\nmedia/v2.mp4\n")
    import subprocess
    import sys

    env = {**os.environ, "RAY_ADDRESS": ray_address}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "embed_videos.py"), "--input", "list.csv",
                             "--output", "out", "--model", "ckpt", "--progress-seconds", "0.2"], cwd=here, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Output a person can read: our progress line with an ETA; no Ray Data progress bars and no
    # error-looking line from a normal run (the actor pool's constructor arguments notice).
    assert re.search(r"progress: \d+/2 inputs .* clips/s, ETA (\d+:\d\d:\d\d|unknown)", result.stderr), result.stderr
    for noise in ("core_worker.cc", "constructor arguments in the object store", "Progress bars disabled",
                  "Running Dataset", "Operator "):
        assert noise not in result.stderr + result.stdout, noise
    out = str(here / "out")
    videos = committed_tables(out)["videos"]
    assert sorted(videos.column("uri").to_pylist()) == [str(here / "media" / "v1.mp4"), str(here / "media" / "v2.mp4")]
    config = load_success(out)["config"]
    assert (config["input"], config["output"], config["model"]) == (str(here / "list.csv"), out, str(here / "ckpt"))
    # From any other folder, a new query video is embedded with the run's --model (stored absolute).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(here / "media" / "v2.mp4", elsewhere / "copy.mp4")
    found = subprocess.run([sys.executable, "-m", "vmae_ray.cli", "search", "--tables", out, "--query", "copy.mp4",
                            "-k", "1", "--json"], cwd=elsewhere, capture_output=True, text=True, timeout=240)
    assert found.returncode == 0, found.stderr[-3000:]
    (top,) = [json.loads(line) for line in found.stdout.splitlines() if line.startswith("{")]
    assert top["uri"] == str(here / "media" / "v2.mp4") and top["score"] > 0.9999  # the same pixels
    mistyped = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "embed_videos.py"), "--input", "list.csv",
                               "--output", "out2", "--model", "ckpt/nope"], cwd=here, env=env, capture_output=True,
                              text=True, timeout=120)
    assert mistyped.returncode == 2
    assert f"--model: 'ckpt/nope': no such local directory (looked for {here / 'ckpt' / 'nope'}" in mistyped.stderr


def test_a_manifest_with_etags_keys_the_incremental_run(ray_session, small_corpus, tiny_classifier, tmp_path):
    """size/ETag columns (S3 Inventory's names too) say when an object changed; a manifest
    without them gets them from the files (one stat each), so a rewritten file is re-embedded."""
    uris = [os.path.join(small_corpus["dir"], f"v{i}.mp4") for i in range(3)]
    out = str(tmp_path / "out")
    inventory = tmp_path / "inventory.csv"
    pacsv.write_csv(pa.table({"uri": uris, "Size": [1, 2, 3], "ETag": ['"a"', '"b"', '"c"']}), inventory)
    args = ["--input", inventory, "--output", out, "--model", tiny_classifier]
    assert embed(*args) == EXIT_OK and load_success(out)["counts"]["new"] == 3
    pacsv.write_csv(pa.table({"uri": uris, "Size": [1, 2, 3], "ETag": ['"a"', '"B"', '"c"']}), inventory)
    assert embed(*args) == EXIT_OK
    counts = load_success(out)["counts"]
    assert (counts["changed"], counts["inputs_skipped"]) == (1, 2)
    check_final(out, {video_id_for_uri(u) for u in uris})
    # Without identity columns: the run stats the files itself.
    corpus = copy_corpus(small_corpus["dir"], tmp_path / "corpus")
    plain = tmp_path / "plain.csv"
    plain.write_text("uri\n" + "\n".join(os.path.join(corpus, f"v{i}.mp4") for i in range(3)) + "\n")
    out2 = str(tmp_path / "out2")
    assert embed("--input", plain, "--output", out2, "--model", tiny_classifier) == EXIT_OK
    assert embed("--input", plain, "--output", out2, "--model", tiny_classifier) == EXIT_OK
    assert load_success(out2)["counts"]["inputs_skipped"] == 3
    shutil.copy(os.path.join(corpus, "v2.mp4"), os.path.join(corpus, "v0.mp4"))  # replaced under the same name
    assert embed("--input", plain, "--output", out2, "--model", tiny_classifier) == EXIT_OK
    assert load_success(out2)["counts"]["changed"] == 1
    videos = committed_tables(out2)["videos"].to_pylist()
    by_uri = {v["uri"]: v for v in videos}
    assert by_uri[os.path.join(corpus, "v0.mp4")]["duration_seconds"] == by_uri[os.path.join(corpus, "v2.mp4")][
        "duration_seconds"]


def test_s3_inventory_report_lists_the_bucket(ray_session, small_corpus, tiny_classifier, s3_server, s3_bucket,
                                              tmp_path, monkeypatch):
    """--input names an S3 Inventory report's manifest.json: its gzip CSV files (no header,
    URL-encoded keys, fileSchema's columns) list the bucket; delete markers and old versions
    are skipped; the keys' sizes and ETags key the next run."""
    import s3fs

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    keys = {"videos/a b.mp4": "v1.mp4", "videos/c+d.mp4": "v2.mp4", "videos/notes.txt": "v3.mp4"}
    rows = []
    for key, name in keys.items():
        data = open(os.path.join(small_corpus["dir"], name), "rb").read()
        response = s3_server.client.put_object(Bucket=s3_bucket, Key=key, Body=data)
        from urllib.parse import quote_plus

        rows.append(f'"{s3_bucket}","{quote_plus(key)}","{len(data)}","{response["ETag"].strip(chr(34))}","true","false"')
    rows.append(f'"{s3_bucket}","{quote_plus("videos/old.mp4")}","5","x","false","false"')  # an old version
    rows.append(f'"{s3_bucket}","{quote_plus("videos/gone.mp4")}","","","true","true"')  # a delete marker
    data = gzip.compress(("\n".join(rows) + "\n").encode())
    s3_server.client.put_object(Bucket=s3_bucket, Key="inv/data/part-0.csv.gz", Body=data)
    report = {"sourceBucket": s3_bucket, "destinationBucket": f"arn:aws:s3:::{s3_bucket}", "fileFormat": "CSV",
              "fileSchema": "Bucket, Key, Size, ETag, IsLatest, IsDeleteMarker",
              "files": [{"key": "inv/data/part-0.csv.gz", "size": len(data), "MD5checksum": "x"}]}
    s3_server.client.put_object(Bucket=s3_bucket, Key="inv/manifest.json", Body=json.dumps(report).encode())
    out = str(tmp_path / "out")
    args = ["--input", f"s3://{s3_bucket}/inv/manifest.json", "--output", out, "--model", tiny_classifier]
    assert embed(*args) == EXIT_OK
    videos = committed_tables(out)["videos"]
    assert sorted(videos.column("uri").to_pylist()) == [f"s3://{s3_bucket}/videos/a b.mp4",
                                                        f"s3://{s3_bucket}/videos/c+d.mp4"]
    assert embed(*args) == EXIT_OK and load_success(out)["counts"]["inputs_skipped"] == 2


def test_prune_is_held_back_while_part_of_the_input_cannot_be_listed(ray_session, small_corpus, tiny_classifier,
                                                                     s3_server, s3_bucket, tmp_path, monkeypatch,
                                                                     capsys):
    """An Inventory report of two data files, one of which turns unreadable: its inputs are not
    listed, yet they exist, so --prune removes nothing while the listing has errors (exit 4);
    once the report really lists one input fewer, --prune removes exactly that one."""
    import s3fs

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    parts = {}
    for i, name in enumerate(("v1.mp4", "v2.mp4")):
        data = open(os.path.join(small_corpus["dir"], name), "rb").read()
        key = f"held/{name}"
        etag = s3_server.client.put_object(Bucket=s3_bucket, Key=key, Body=data)["ETag"].strip('"')
        parts[f"inv2/data/part-{i}.csv.gz"] = gzip.compress(f'"{s3_bucket}","{key}","{len(data)}","{etag}"\n'.encode())

    def report(files: dict[str, bytes]) -> None:
        for key, body in files.items():
            s3_server.client.put_object(Bucket=s3_bucket, Key=key, Body=body)
        manifest = {"sourceBucket": s3_bucket, "destinationBucket": f"arn:aws:s3:::{s3_bucket}", "fileFormat": "CSV",
                    "fileSchema": "Bucket, Key, Size, ETag",
                    "files": [{"key": k, "size": len(b), "MD5checksum": "x"} for k, b in files.items()]}
        s3_server.client.put_object(Bucket=s3_bucket, Key="inv2/manifest.json", Body=json.dumps(manifest).encode())

    out = str(tmp_path / "out")
    args = ["--input", f"s3://{s3_bucket}/inv2/manifest.json", "--output", out, "--model", tiny_classifier, "--prune"]
    report(parts)
    assert embed(*args) == EXIT_OK
    both = ids_in(out, "videos")
    assert len(both) == 2
    capsys.readouterr()
    report({**parts, "inv2/data/part-1.csv.gz": b"not gzip at all"})  # an unreadable data file
    assert embed(*args) == EXIT_LISTING_ERRORS
    printed = capsys.readouterr().out
    assert "no longer listed: 1 (their rows stay: --prune is held back" in printed, printed
    assert ids_in(out, "videos") == both
    report({"inv2/data/part-0.csv.gz": parts["inv2/data/part-0.csv.gz"]})  # the report now lists one input
    assert embed(*args) == EXIT_OK
    assert "no longer listed: 1 (rows removed: 1, --prune)" in capsys.readouterr().out
    assert ids_in(out, "videos") == both - {video_id_for_uri(f"s3://{s3_bucket}/held/v2.mp4")}


# ---------------------------------------------------------------------------------------------
# Superseded inputs cost their shard groups only


def test_a_changed_input_rewrites_only_the_group_that_holds_it(ray_session, small_corpus, tiny_classifier, tmp_path):
    corpus = copy_corpus(small_corpus["dir"], tmp_path / "corpus")
    out = str(tmp_path / "out")
    args = ["--input", corpus, "--output", out, "--model", tiny_classifier, "--batch-size", "1",
            "--videos-per-task", "1"]
    assert embed(*args) == EXIT_OK
    before = load_success(out)["files"]
    assert len(before["videos"]) >= 3  # several receipts, several groups
    with open(os.path.join(corpus, "v4.mp4"), "ab") as f:
        f.write(b"\0")
    assert embed(*args) == EXIT_OK
    after = load_success(out)["files"]
    changed_id = video_id_for_uri(os.path.join(corpus, "v4.mp4"))
    gone = {t: set(before[t]) - set(after[t]) for t in before}
    stems = {os.path.basename(f) for fs in gone.values() for f in fs}
    assert len(stems) == 1, gone  # one group replaced (its clips and videos files), nothing else
    assert all(f in after[t] for t in before for f in before[t] if os.path.basename(f) not in stems)
    check_final(out, ids_of(corpus))
    v = committed_tables(out)["videos"].to_pylist()
    assert sum(r["video_id"] == changed_id for r in v) == 1


def test_an_output_of_the_older_layout_is_rewritten_correctly(ray_session, small_corpus, tiny_classifier, tmp_path):
    """Outputs written before layout 2 do not keep a video's clips beside its videos row: a
    change there finds the clips by reading the older clips files' video_id column."""
    corpus = copy_corpus(small_corpus["dir"], tmp_path / "corpus")
    out = tmp_path / "out"
    args = ["--input", corpus, "--output", out, "--model", tiny_classifier, "--sampling", "stride",
            "--clips-per-video", "2"]
    assert embed(*args) == EXIT_OK
    # Re-lay the output as an older version wrote it: one file per table, numbered per table.
    manifest = load_success(str(out))
    for table in ("clips", "videos", "errors"):
        merged = pa.concat_tables([pq.read_table(out / f) for f in manifest["files"][table]])
        for f in manifest["files"][table]:
            os.remove(out / f)
        pq.write_table(merged, out / table / "part-old-00000.parquet")
        manifest["files"][table] = [f"{table}/part-old-00000.parquet"]
    manifest.pop("layout", None)
    manifest.pop("ungrouped", None)
    (out / "_SUCCESS").write_text(json.dumps(manifest))
    with open(os.path.join(corpus, "v1.mp4"), "ab") as f:
        f.write(b"\0")
    assert embed(*args) == EXIT_OK
    check_final(str(out), ids_of(corpus))
    changed = video_id_for_uri(os.path.join(corpus, "v1.mp4"))
    clips = committed_tables(str(out))["clips"]
    mine = clips.filter(pa.compute.equal(clips.column("video_id"), changed))
    assert mine.num_rows >= 1 and set(mine.column("run_id").to_pylist()) == {load_success(str(out))["run_id"]}
    assert "clips/part-old-00000.parquet" not in load_success(str(out))["files"]["clips"]


# ---------------------------------------------------------------------------------------------
# Failpoints in the workers


@pytest.mark.parametrize("point", ["worker_after_write", "worker_duplicate_receipt"])
def test_worker_failpoints_leave_output_exactly_once(ray_address, baseline, crash_corpus, tiny_classifier, tmp_path,
                                                     point):
    """A model actor killed after writing its shards and before its receipt arrived (Ray
    restarts it and retries the call: new files, the old ones never committed), and a retried
    call whose duplicate receipt arrives (dropped whole, its other inputs redone): the output
    is the undisturbed run's, exactly once."""
    out = str(tmp_path / "out")
    once = str(tmp_path / "fired")
    log = str(tmp_path / "driver.log")
    proc = launch_driver(ray_address, ["--input", crash_corpus["dir"], "--output", out, "--model", tiny_classifier,
                                       *CRASH_ARGS], log, VMAE_RAY_FAILPOINT=point, VMAE_RAY_FAILPOINT_ONCE=once)
    assert proc.wait(300) == 0, log_tail(log)
    assert os.path.exists(once), "the failpoint did not fire"
    check_final(out, crash_corpus["ids"])
    assert_same_results(out, baseline)
    if point == "worker_duplicate_receipt":
        assert "dropped a duplicate receipt" in log_tail(log, 20000)
