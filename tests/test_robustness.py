"""Robustness of the whole job (issue 4): hostile inputs, a driver killed at random points and
at each commit failpoint then resumed, a model actor and decode workers killed mid-run,
fuzzed real media, incremental reruns, and checkpoints that cannot load.

Outputs are read back as a consumer would: with plain pyarrow, following the file list of
``_SUCCESS`` (and, to catch leftovers, the folders themselves). Killed drivers run as
subprocesses (``python jobs/embed_videos.py``) connected to the session's Ray through
``RAY_ADDRESS``, so killing one never leaks a cluster; reruns run in-process (the same
command: `run(config_from_args(argv))`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from glob import glob

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, SHARED_FILES, SHARED_MEDIA
from vmae_ray.cli import config_from_args
from vmae_ray.pipeline import run
from vmae_ray.writing import FAILPOINTS

JOB = os.path.join(ROOT, "jobs", "embed_videos.py")
TABLES = ("clips", "videos", "errors")
EXIT_FAILPOINT = 86

# The settings every crash/kill run shares with its undisturbed baseline: stride sampling
# (three clips a video), small model batches, one input per decode task (many tasks and
# receipts), and a commit every 50 ms so that kills land before, inside and between commits.
CRASH_ARGS = ("--sampling", "stride", "--clips-per-video", "3", "--frame-stride", "2", "--batch-size", "2",
              "--commit-every-seconds", "0.05", "--progress-seconds", "60",
              "--decode-timeout-seconds", "60", "--videos-per-task", "1")


# ---------------------------------------------------------------------------------------------
# Reading an output the way a consumer does
# ---------------------------------------------------------------------------------------------


def load_success(out: str) -> dict | None:
    p = os.path.join(out, "_SUCCESS")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def committed_tables(out: str) -> dict[str, pa.Table | None]:
    """The tables as a reader that follows _SUCCESS's file list sees them (None: no rows)."""
    manifest = load_success(out)
    tables: dict[str, pa.Table | None] = {t: None for t in TABLES}
    if manifest is None:
        return tables
    for table in TABLES:
        files = manifest["files"].get(table, [])
        missing = [rel for rel in files if not os.path.exists(os.path.join(out, rel))]
        assert not missing, f"_SUCCESS lists {table} files that do not exist: {missing}"
        if files:
            tables[table] = pa.concat_tables([pq.read_table(os.path.join(out, rel)) for rel in files],
                                             promote_options="permissive")
    return tables


def visible_files(out: str) -> dict[str, set[str]]:
    """Parquet files a reader globbing the table folders would take."""
    return {t: {f"{t}/{os.path.basename(p)}" for p in glob(os.path.join(out, t, "*.parquet"))} for t in TABLES}


def listed_files(out: str) -> dict[str, set[str]]:
    """Parquet files _SUCCESS names (empty without a _SUCCESS)."""
    manifest = load_success(out)
    return {t: set(manifest["files"].get(t, [])) if manifest else set() for t in TABLES}


def unlisted_files(out: str) -> set[str]:
    """Parquet files in the table folders that _SUCCESS does not name."""
    visible, listed = visible_files(out), listed_files(out)
    return {rel for t in TABLES for rel in visible[t] - listed[t]}


def check_consistent(out: str) -> dict:
    """Assert that the state _SUCCESS names is consistent; return a summary of it.

    All listed files exist; each input is in videos/ or errors/ once; no clip twice; every
    clip's video is in videos/ with num_clips equal to its clip rows.
    """
    t = committed_tables(out)
    col = lambda table, name: t[table].column(name).to_pylist() if t[table] is not None else []  # noqa: E731
    video_ids, error_ids = col("videos", "video_id"), col("errors", "video_id")
    assert len(video_ids) == len(set(video_ids)), "a video appears twice in videos/"
    assert len(error_ids) == len(set(error_ids)), "an input appears twice in errors/"
    assert not set(video_ids) & set(error_ids), "an input is in both videos/ and errors/"
    clip_keys = list(zip(col("clips", "video_id"), col("clips", "clip_index")))
    assert len(clip_keys) == len(set(clip_keys)), "duplicate (video_id, clip_index) rows in clips/"
    per_video: dict[str, int] = {}
    for vid, _ in clip_keys:
        per_video[vid] = per_video.get(vid, 0) + 1
    assert set(per_video) <= set(video_ids), f"clips of videos missing from videos/: {set(per_video) - set(video_ids)}"
    num_clips = dict(zip(video_ids, col("videos", "num_clips")))
    assert all(per_video.get(v, 0) == n for v, n in num_clips.items()), "videos.num_clips != clip rows"
    manifest = load_success(out)
    return {"run_id": manifest["run_id"] if manifest else None, "complete": bool(manifest and manifest["complete"]),
            "videos": set(video_ids), "errors": set(error_ids), "clips": len(clip_keys)}


def check_final(out: str, expected_ids: set[str]) -> dict:
    """A finished run: consistent, complete, every input once, nothing unlisted, no staging."""
    state = check_consistent(out)
    assert state["complete"], "the last _SUCCESS does not describe a complete run"
    assert state["videos"] | state["errors"] == expected_ids
    assert not unlisted_files(out), f"parquet files that _SUCCESS does not list: {unlisted_files(out)}"
    assert not os.path.exists(os.path.join(out, "_staging")), os.listdir(os.path.join(out, "_staging"))
    return state


def results(out: str) -> dict:
    t = committed_tables(out)
    videos = {r["video_id"]: r for r in t["videos"].to_pylist()} if t["videos"] is not None else {}
    errors = {r["video_id"]: r["error_type"] for r in t["errors"].to_pylist()} if t["errors"] is not None else {}
    clips = ({(r["video_id"], r["clip_index"]): r["embedding"] for r in t["clips"].to_pylist()}
             if t["clips"] is not None else {})
    return {"videos": videos, "errors": errors, "clips": clips}


def assert_same_results(out: str, baseline: str, *, ignore: set[str] = frozenset()) -> None:
    """Same inputs in videos/errors, same clips per video, embeddings equal (rtol 1e-4)."""
    got, want = results(out), results(baseline)
    for r in (got, want):
        for key in ("videos", "errors"):
            r[key] = {k: v for k, v in r[key].items() if k not in ignore}
        r["clips"] = {k: v for k, v in r["clips"].items() if k[0] not in ignore}
    assert set(got["videos"]) == set(want["videos"])
    assert got["errors"] == want["errors"]
    num_clips = lambda r: {v: row["num_clips"] for v, row in r["videos"].items()}  # noqa: E731
    assert num_clips(got) == num_clips(want)
    assert set(got["clips"]) == set(want["clips"])
    keys = sorted(want["clips"])
    np.testing.assert_allclose(np.array([got["clips"][k] for k in keys]), np.array([want["clips"][k] for k in keys]),
                               rtol=1e-4, atol=1e-5)
    vids = sorted(want["videos"])
    np.testing.assert_allclose(np.array([got["videos"][v]["embedding"] for v in vids]),
                               np.array([want["videos"][v]["embedding"] for v in vids]), rtol=1e-4, atol=1e-5)


def mirror_s3(s3_server, bucket: str, prefix: str, dest: str) -> str:
    """Copy everything under s3://bucket/prefix to dest with boto3 (independent of the job's s3fs)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    paginator = s3_server.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix.rstrip("/")) + 1:]
            target = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            s3_server.client.download_file(bucket, obj["Key"], target)
    return dest


# ---------------------------------------------------------------------------------------------
# Running the job
# ---------------------------------------------------------------------------------------------


def run_job(*args):
    return run(config_from_args([str(a) for a in args]))


def launch_driver(ray_address: str, args, log_path: str, **env) -> subprocess.Popen:
    """`python jobs/embed_videos.py ARGS` as its own process, on the session's Ray."""
    full_env = {**os.environ, "RAY_ADDRESS": ray_address, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    full_env.pop("VMAE_RAY_FAILPOINT", None)
    full_env.update(env)
    log = open(log_path, "wb")
    try:
        return subprocess.Popen([sys.executable, JOB, *map(str, args)], cwd=ROOT, env=full_env,
                                stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def log_tail(path: str, n: int = 4000) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")[-n:]


def descendants(marker: str) -> list[psutil.Process]:
    """Processes of this test session's Ray (our descendants) whose command line has marker."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


class JobThread(threading.Thread):
    """The job in-process, in a thread, so the test can disturb it while it runs."""

    def __init__(self, args):
        super().__init__(daemon=True)
        self.args, self.summary, self.error = args, None, None

    def run(self):
        try:
            self.summary = run_job(*self.args)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def finish(self, timeout: float = 240.0):
        self.join(timeout)
        assert not self.is_alive(), f"the job did not finish within {timeout:.0f}s"
        if self.error is not None:
            raise AssertionError(f"the job failed: {self.error!r}") from self.error
        return self.summary


# ---------------------------------------------------------------------------------------------
# Media
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# 1. Hostile inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_run(ray_session, tiny_classifier, s3_server, tmp_path_factory):
    """One job over hostile files, good videos, a missing file, an unreadable local file and
    an S3 object that answers 403 (an archived object: GetObject -> 403 InvalidObjectState)."""
    from vmae_ray.synthetic import make_hostile_corpus, make_video

    work = tmp_path_factory.mktemp("hostile")
    source = make_video(str(work / "source.mp4"), codec="h264", width=160, height=120, fps=30, num_frames=45,
                        gop_size=15, seed=7)
    expected: dict[str, str] = dict(make_hostile_corpus(str(work / "hostile"), source_video=source, seed=4))
    for i in range(3):
        expected[make_video(str(work / "good" / f"good{i}.mp4"), codec="h264", width=96, height=64, fps=15,
                            num_frames=20 + 5 * i, seed=i)] = "ok"
    expected[str(work / "good" / "vanished.mp4")] = "not_found"

    locked = work / "locked.mp4"
    shutil.copy(source, locked)
    os.chmod(locked, 0)
    try:
        with open(locked, "rb"):
            pass
        denied_reason = f"chmod 000 does not deny reads to this user (uid {os.geteuid()}: root or CAP_DAC_OVERRIDE)"
    except PermissionError:
        denied_reason = None
        expected[str(locked)] = "access_denied"

    bucket = s3_server.make_bucket()
    with open(source, "rb") as f:
        s3_server.client.put_object(Bucket=bucket, Key="cold/archived.mp4", Body=f.read(), StorageClass="GLACIER")
    expected[f"s3://{bucket}/cold/archived.mp4"] = "access_denied"
    expected[f"s3://{bucket}/cold/missing.mp4"] = "not_found"

    uris = sorted(expected)
    ids = [f"h{i:02d}" for i in range(len(uris))]
    manifest = work / "manifest.csv"
    pacsv.write_csv(pa.table({"uri": uris, "video_id": ids}), manifest)
    out = str(work / "out")
    started = time.perf_counter()
    try:
        summary = run_job("--input", manifest, "--output", out, "--model", tiny_classifier,
                          "--storage-options", json.dumps(s3_server.storage_options), "--decode-timeout-seconds", "60")
    finally:
        os.chmod(locked, 0o644)
    return {"out": out, "expected": dict(zip(ids, (expected[u] for u in uris))), "uris": dict(zip(ids, uris)),
            "summary": summary, "denied_reason": denied_reason, "seconds": time.perf_counter() - started}


def test_hostile_corpus_every_input_accounted_for(hostile_run):
    out, expected = hostile_run["out"], hostile_run["expected"]
    check_final(out, set(expected))
    r = results(out)
    for vid, want in expected.items():
        where = "videos" if vid in r["videos"] else f"errors ({r['errors'].get(vid)})"
        if want == "ok":
            assert vid in r["videos"], f"{hostile_run['uris'][vid]}: expected a result, got {where}"
        elif want == "ok_or_corrupt":
            assert vid in r["videos"] or r["errors"][vid] == "corrupt", f"{hostile_run['uris'][vid]}: {where}"
        else:
            assert r["errors"].get(vid) == want, f"{hostile_run['uris'][vid]}: expected {want}, got {where}"
    counts = load_success(out)["counts"]
    n = len(expected)
    assert counts["inputs_listed"] == n and counts["inputs_processed"] == n and counts["inputs_skipped"] == 0
    assert counts["videos_ok"] + counts["videos_failed"] == n
    assert counts["videos_ok"] == len(r["videos"]) and counts["videos_failed"] == len(r["errors"])
    by_type: dict[str, int] = {}
    for etype in r["errors"].values():
        by_type[etype] = by_type.get(etype, 0) + 1
    assert counts["errors_by_type"] == by_type
    s = hostile_run["summary"]
    assert (s.videos_ok, s.videos_failed) == (counts["videos_ok"], counts["videos_failed"])


def test_access_denied_local_file(hostile_run):
    if hostile_run["denied_reason"]:
        pytest.skip(hostile_run["denied_reason"] + "; access_denied is covered by the S3 403 input")
    r = results(hostile_run["out"])
    locked = [v for v, u in hostile_run["uris"].items() if u.endswith("locked.mp4")]
    assert [r["errors"].get(v) for v in locked] == ["access_denied"]


# ---------------------------------------------------------------------------------------------
# 2. Driver killed, then resumed: exactly once
# ---------------------------------------------------------------------------------------------


class LocalCommits:
    """Counts commits of a local output as they happen: journals seen, _SUCCESS rewrites."""

    def __init__(self, out: str):
        self.out = out
        self.journals = self.successes = 0
        # What an earlier (killed) run left is not a commit of this one.
        self._journals: set = set(self._journal_keys())
        self._success = self._success_key()

    def _journal_keys(self):
        for j in glob(os.path.join(self.out, "_staging", "*", "_COMMIT.json")):
            try:
                yield (j, os.stat(j).st_mtime_ns)
            except OSError:
                continue

    def _success_key(self):
        try:
            st = os.stat(os.path.join(self.out, "_SUCCESS"))
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def poll(self) -> None:
        for key in self._journal_keys():
            if key not in self._journals:
                self._journals.add(key)
                self.journals += 1
        key = self._success_key()
        if key is not None and key != self._success:
            self._success = key
            self.successes += 1
        # A journal lives a few ms on local disk; a commit whose journal the polling missed
        # still counts once its _SUCCESS is seen.
        self.journals = max(self.journals, self.successes)


class S3Commits:
    """Counts commits of an S3 output from the server's access log (no extra requests)."""

    def __init__(self, s3_server, bucket: str, prefix: str):
        self.server, self.start = s3_server, len(s3_server.requests)
        self.base = f"/{bucket}/{prefix}/"
        self.journals = self.successes = 0

    def poll(self) -> None:
        puts = [r.path for r in self.server.requests[self.start:] if r.method == "PUT" and r.path.startswith(self.base)]
        self.journals = sum(p.endswith("/_COMMIT.json") for p in puts)
        self.successes = sum(p == self.base + "_SUCCESS" for p in puts)


def kill_driver(proc: subprocess.Popen, commits, mode: str, rng: random.Random, timeout: float = 180.0) -> str:
    """SIGKILL the driver at a random point chosen by mode; returns what was done.

    early: after a random 1-4 s (start-up, listing, Ray connection or decoding);
    journal: as soon as the k-th commit journal is seen, plus 0-30 ms (inside a commit);
    after_commit: a random 0-300 ms after the k-th _SUCCESS rewrite (between commits).
    """
    k = rng.choice([1, 1, 2])
    if mode == "early":
        delay = rng.uniform(1.0, 4.0)
        deadline = time.monotonic() + delay
        trigger = lambda: time.monotonic() >= deadline  # noqa: E731
        what = f"{delay:.2f}s after launch"
    elif mode == "journal":
        delay = rng.choice([0.0, rng.uniform(0, 0.03)])
        trigger = lambda: commits.journals >= k  # noqa: E731
        what = f"{delay * 1000:.0f} ms after commit journal #{k}"
    else:
        delay = rng.uniform(0, 0.3)
        trigger = lambda: commits.successes >= k  # noqa: E731
        what = f"{delay * 1000:.0f} ms after _SUCCESS write #{k}"
    give_up = time.monotonic() + timeout
    fired = False
    while proc.poll() is None and time.monotonic() < give_up:
        commits.poll()
        if trigger():
            if mode != "early":
                time.sleep(delay)
            proc.kill()
            fired = True
            break
        time.sleep(0.001)
    if not fired:
        proc.kill()  # timed out, or already gone
    proc.wait(30)
    return what if fired else None


def _random_kill_chain(tmp_path, ray_address, baseline, crash_corpus, tiny_classifier, *, out, modes, seed,
                       driver_env=None, inspect=lambda: None, before_rerun=lambda: None, extra=()):
    args = ["--input", crash_corpus["dir"], "--output", out, "--model", tiny_classifier, *CRASH_ARGS, *extra]
    rng = random.Random(seed)
    report = []
    for i, (mode, commits) in enumerate(modes):
        log = str(tmp_path / f"driver{i}.log")
        proc = launch_driver(ray_address, args, log, **(driver_env or {}))
        what = kill_driver(proc, commits(), mode, rng)
        assert what and proc.returncode == -signal.SIGKILL, (
            f"kill #{i} ({mode}) did not happen: the driver exited {proc.returncode}\n{log_tail(log)}")
        local = inspect()
        state = check_consistent(local)  # a reader that follows _SUCCESS sees a consistent state
        staging = os.path.exists(os.path.join(local, "_staging"))
        report.append(f"kill {i} ({what}): committed {len(state['videos'])} videos + {len(state['errors'])} errors"
                      f"{' (complete)' if state['complete'] else ''}; staging left: {staging}; "
                      f"unlisted files: {len(unlisted_files(local))}")
    before_rerun()
    summary = run_job(*args)
    local = inspect()
    check_final(local, crash_corpus["ids"])
    assert_same_results(local, baseline)
    print("\n".join(report + [f"rerun: {summary.inputs_skipped} skipped, {summary.videos_ok} ok, "
                              f"{summary.videos_failed} failed"]))
    return report


def test_driver_killed_at_random_points_then_resumed_local(ray_address, baseline, crash_corpus, tiny_classifier,
                                                           tmp_path):
    """Three kills of the driver (three rng draws of seed 0), each rerun resuming the last."""
    out = str(tmp_path / "out")
    commits = lambda: LocalCommits(out)  # noqa: E731
    _random_kill_chain(tmp_path, ray_address, baseline, crash_corpus, tiny_classifier, out=out, seed=0,
                       modes=[("early", commits), ("journal", commits), ("after_commit", commits)],
                       inspect=lambda: out)


def test_driver_killed_at_random_points_then_resumed_s3(ray_address, baseline, crash_corpus, tiny_classifier,
                                                        s3_server, s3_bucket, tmp_path, monkeypatch):
    """Two kills of a driver writing to the S3 server (seed 1), then a rerun to completion.

    Credentials come from the environment, never the command line: a driver's command line
    is its Ray job's entrypoint, which the job table shows to anyone (test_s3_e2e checks
    that no job of the session shows the canary secret)."""
    import s3fs

    prefix = "runs/out"
    commits = lambda: S3Commits(s3_server, s3_bucket, prefix)  # noqa: E731
    mirror = str(tmp_path / "mirror")

    def before_rerun():
        # The rerun is in this process: the same environment as the drivers, and a cold
        # s3fs, as a new driver would have.
        for name, value in s3_server.env.items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()

    _random_kill_chain(
        tmp_path, ray_address, baseline, crash_corpus, tiny_classifier, out=f"s3://{s3_bucket}/{prefix}", seed=1,
        modes=[("journal", commits), ("after_commit", commits)], driver_env=s3_server.env,
        # A killed driver leaves its S3 lease until it expires: the next run waits and takes it over.
        extra=("--lease-seconds", "10", "--wait-for-lock"),
        inspect=lambda: mirror_s3(s3_server, s3_bucket, prefix, mirror), before_rerun=before_rerun)
    s3fs.S3FileSystem.clear_instance_cache()  # drop the instance made with these credentials


def _success_bytes(out: str) -> bytes | None:
    p = os.path.join(out, "_SUCCESS")
    return open(p, "rb").read() if os.path.exists(p) else None


def test_driver_killed_at_each_failpoint_then_resumed(ray_address, baseline, crash_corpus, tiny_classifier, tmp_path):
    """The driver dies at each named point of a commit (VMAE_RAY_FAILPOINT; exit 86). After
    each crash a reader following _SUCCESS sees exactly the previous committed state (the
    new one for after_success); the next run's recovery rolls a journaled commit forward
    and drops everything else; a crash inside that recovery changes nothing. A last run
    completes the job, exactly once."""
    from vmae_ray.storage import StorageOptions
    from vmae_ray.writing import OutputStore

    out = str(tmp_path / "out")
    args = ["--input", crash_corpus["dir"], "--output", out, "--model", tiny_classifier, *CRASH_ARGS]

    def crash(run_id: str, fp: str) -> None:
        log = str(tmp_path / f"{run_id}.log")
        proc = launch_driver(ray_address, [*args, "--run-id", run_id], log, VMAE_RAY_FAILPOINT=fp)
        try:
            rc = proc.wait(240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert rc == EXIT_FAILPOINT, f"{run_id}: exit {rc}, not the failpoint's {EXIT_FAILPOINT}\n{log_tail(log)}"

    def recover() -> None:
        """What the next run does first (in this process: no failpoint set here)."""
        OutputStore(out, StorageOptions()).recover()
        assert not unlisted_files(out)
        assert not os.path.exists(os.path.join(out, "_staging"))

    committed_runs = []
    for i, fp in enumerate(FAILPOINTS):
        run_id = f"fp{i}-{fp}"
        previous = _success_bytes(out)
        crash(run_id, fp)
        state = check_consistent(out)  # what a reader following _SUCCESS sees right after the crash
        if fp == "after_success":
            assert state["run_id"] == run_id and not state["complete"]
        else:
            assert _success_bytes(out) == previous, f"{fp}: _SUCCESS changed before the commit point"
        journal = glob(os.path.join(out, "_staging", run_id, "_COMMIT.json"))
        # after_accept: a receipt was accepted, its files staged, nothing journaled yet.
        assert bool(journal) == (fp not in ("after_accept", "before_journal")), (fp, journal)
        if fp == "after_first_move":
            # The moved shard sits in its folder uncommitted: readers following _SUCCESS do
            # not see it. Crash again inside the recovery that rolls this commit forward.
            assert unlisted_files(out)
            crash(f"{run_id}-recovery", "before_success")
            assert _success_bytes(out) == previous
            assert journal == glob(os.path.join(out, "_staging", run_id, "_COMMIT.json"))
            check_consistent(out)
        recover()
        state = check_consistent(out)
        if fp not in ("after_accept", "before_journal"):
            committed_runs.append(run_id)
            assert state["run_id"] == run_id, f"{fp}: the journaled commit was not rolled forward"
        else:
            assert _success_bytes(out) == previous
    summary = run_job(*args, "--run-id", "final")
    check_final(out, crash_corpus["ids"])
    assert_same_results(out, baseline)
    assert [r["run_id"] for r in load_success(out)["runs"]] == committed_runs + ["final"]
    assert summary.inputs_skipped + summary.videos_ok + summary.videos_failed == len(crash_corpus["ids"])


# ---------------------------------------------------------------------------------------------
# 3. Workers killed mid-run: Ray retries, the output equals an undisturbed run's
# ---------------------------------------------------------------------------------------------

ACTOR_TITLE = "ray::MapWorker(MapBatches(EmbedActor))"
DECODE_TITLE = "ray::MapBatches(decode_batch)"


class TaskEntries:
    """Counts tasks started in Ray workers whose title begins with `prefix` (our descendants),
    polling known workers' titles every millisecond and looking for new ones every 50 ms."""

    def __init__(self, prefix: str, exclude: set[int] = frozenset()):
        self.prefix, self.exclude = prefix, set(exclude)
        self.workers: dict[int, bool] = {}  # pid -> inside a task at the last look
        self.entries = 0
        self._next_scan = 0.0

    def poll(self) -> int | None:
        """Returns the pid of a worker that is inside a task now, if any."""
        if time.monotonic() >= self._next_scan:
            self._next_scan = time.monotonic() + 0.05
            for proc in descendants(self.prefix.split(".")[0].split("(")[0]):
                if proc.pid not in self.exclude:
                    self.workers.setdefault(proc.pid, False)
        busy = None
        for pid, was_busy in list(self.workers.items()):
            now = title(pid)
            is_busy = now.startswith(self.prefix)
            if is_busy and not was_busy:
                self.entries += 1
            self.workers[pid] = is_busy
            busy = pid if is_busy else busy
        return busy


def test_model_actor_killed_mid_run(ray_session, baseline, crash_corpus, tiny_classifier, tmp_path):
    """SIGKILL the model actor inside its third task: Ray restarts it and retries the task;
    the output equals the undisturbed run's."""
    out = str(tmp_path / "out")
    before = {p.pid for p in descendants(ACTOR_TITLE)}  # actors of earlier jobs, if still exiting
    tasks = TaskEntries(ACTOR_TITLE + ".submit", exclude=before)
    job = JobThread(["--input", crash_corpus["dir"], "--output", out, "--model", tiny_classifier, *CRASH_ARGS])
    job.start()
    actor = None
    deadline = time.monotonic() + 240
    while job.is_alive() and time.monotonic() < deadline:
        busy = tasks.poll()
        if busy is not None and tasks.entries >= 3:  # two batches embedded and sent on already
            os.kill(busy, signal.SIGKILL)
            actor = busy
            break
        time.sleep(0.001)
    assert actor is not None, f"the run ended before the model actor could be killed in a task ({tasks.entries} seen)"
    restarted = set()
    while job.is_alive():
        restarted |= {p.pid for p in descendants(ACTOR_TITLE) if p.pid not in before | {actor}}
        time.sleep(0.05)
    summary = job.finish()
    print(f"killed model actor pid {actor} inside task #{tasks.entries}; restarted as {sorted(restarted)}; "
          f"{summary.videos_ok} ok, {summary.videos_failed} failed")
    assert restarted, "no new model actor was started after the kill"
    check_final(out, crash_corpus["ids"])
    assert_same_results(out, baseline)


def test_decode_worker_and_decoder_child_killed_mid_run(ray_session, baseline, crash_corpus, tiny_classifier,
                                                        tmp_path):
    """SIGKILL the isolated decoder child during the third decode task (a good video; the
    two broken files sort first), then the Ray worker of the sixth: Ray retries that task,
    the killed worker's decoder child exits, and the output equals the undisturbed run's
    (a video whose decoder child died mid-decode is a 'crashed' error, which
    --retry-failed then repairs)."""
    out = str(tmp_path / "out")
    args = ["--input", crash_corpus["dir"], "--output", out, "--model", tiny_classifier, *CRASH_ARGS]
    tasks = TaskEntries(DECODE_TITLE)
    job = JobThread(args)
    job.start()
    killed_worker = killed_child = None
    orphans: list[psutil.Process] = []
    deadline = time.monotonic() + 240
    while job.is_alive() and time.monotonic() < deadline and killed_worker is None:
        busy = tasks.poll()
        if busy is not None:
            try:
                children = [c for c in psutil.Process(busy).children() if "spawn_main" in " ".join(c.cmdline())]
            except psutil.Error:
                children = []
            if killed_child is None and children and tasks.entries >= 3:
                children[0].kill()  # the decoder child, inside a video (or just before one)
                killed_child = children[0].pid
            elif killed_child is not None and tasks.entries >= 6:
                orphans = [c for c in children if c.pid != killed_child]
                os.kill(busy, signal.SIGKILL)
                killed_worker = busy
        time.sleep(0.001)
    summary = job.finish()
    print(f"killed decoder child {killed_child}, then decode worker {killed_worker} in task #{tasks.entries} "
          f"(its decoder children {[c.pid for c in orphans]}); {summary.videos_ok} ok, {summary.videos_failed} failed "
          f"{summary.errors_by_type}")
    assert killed_child is not None and killed_worker is not None, f"decode ended too soon ({tasks.entries} tasks seen)"
    for child in orphans:
        try:
            child.wait(10)
        except psutil.TimeoutExpired:
            pytest.fail(f"decoder child {child.pid} outlived its killed Ray worker")
    check_final(out, crash_corpus["ids"])
    r = results(out)
    # A decoder child killed in the middle of a video is indistinguishable from a decoder
    # crash: that one video becomes a 'crashed' error (documented); everything else is exact.
    crashed = {v for v, e in r["errors"].items() if e == "crashed"}
    assert len(crashed) <= 1, r["errors"]
    assert_same_results(out, baseline, ignore=crashed)
    if crashed:
        # A retry of the failed inputs restores exactly the undisturbed result.
        retry = run_job(*args, "--retry-failed")
        assert retry.inputs_skipped == len(crash_corpus["ids"]) - len(r["errors"])
        check_final(out, crash_corpus["ids"])
        assert_same_results(out, baseline)


# ---------------------------------------------------------------------------------------------
# 4. Fuzzed real media
# ---------------------------------------------------------------------------------------------

FUZZ_ERROR_TYPES = {"corrupt", "crashed", "timeout", "no_video_stream", "too_large"}


def make_mutants(folder: str, seed: int = 20240613, count: int = 20) -> list[tuple[str, str]]:
    """Truncations, bit flips and zeroed ranges of the real media; [(path, recipe)]."""
    sources = [m.path for m in SHARED_FILES if m.expect_error is None]
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    mutants = []
    for i in range(count):
        src = sources[i % len(sources)]
        with open(src, "rb") as f:
            data = bytearray(f.read())
        kind = ("truncate", "bitflip", "zero_range", "truncate+bitflip")[i % 4]
        recipe = [os.path.basename(src), kind]
        if "bitflip" in kind:
            n = int(rng.integers(1, 400))
            for off in rng.integers(0, len(data), size=n):
                data[int(off)] ^= 1 << int(rng.integers(0, 8))
            recipe.append(f"{n} flips")
        if kind == "zero_range":
            start = int(rng.integers(0, len(data)))
            length = int(rng.integers(16, max(17, len(data) // 8)))
            data[start:start + length] = bytes(len(data[start:start + length]))
            recipe.append(f"zeros at {start}+{length}")
        if "truncate" in kind:
            cut = int(len(data) * rng.uniform(0.02, 0.98))
            data = data[:cut]
            recipe.append(f"cut at {cut}")
        path = os.path.join(folder, f"mutant{i:02d}{os.path.splitext(src)[1]}")
        with open(path, "wb") as f:
            f.write(bytes(data))
        mutants.append((path, " ".join(recipe)))
    return mutants


def test_fuzzed_real_media(ray_session, tiny_classifier, tmp_path):
    if not os.path.isdir(SHARED_MEDIA):
        pytest.skip(f"shared media folder not found at {SHARED_MEDIA}")
    from vmae_ray.listing import video_id_for_uri

    mutants = make_mutants(str(tmp_path / "mutants"))
    out = str(tmp_path / "out")
    summary = run_job("--input", str(tmp_path / "mutants"), "--output", out, "--model", tiny_classifier,
                      "--decode-timeout-seconds", "30")
    ids = {video_id_for_uri(p): recipe for p, recipe in mutants}
    check_final(out, set(ids))
    r = results(out)
    odd = {ids[v]: e for v, e in r["errors"].items() if e not in FUZZ_ERROR_TYPES}
    assert not odd, f"fuzzed inputs with an unexpected error type: {odd}"
    assert summary.videos_ok + summary.videos_failed == len(mutants)
    print(f"{len(mutants)} mutants: {summary.videos_ok} ok, errors {summary.errors_by_type}")


# ---------------------------------------------------------------------------------------------
# 5. Incremental runs
# ---------------------------------------------------------------------------------------------


def test_incremental_new_changed_and_failed_inputs(ray_session, tiny_classifier, tmp_path):
    from vmae_ray.listing import video_id_for_uri
    from vmae_ray.synthetic import make_video

    folder = tmp_path / "videos"
    video = lambda name, seed, n=24: make_video(str(folder / name), codec="h264", width=80, height=60,  # noqa: E731
                                                fps=12, num_frames=n, gop_size=12, seed=seed)
    paths = [video(f"old{i}.mp4", i) for i in range(4)]
    (folder / "bad.mp4").write_bytes(b"\0" * 1000)
    paths.append(str(folder / "bad.mp4"))
    out = str(tmp_path / "out")
    args = ["--input", str(folder), "--output", out, "--model", tiny_classifier]
    vid = video_id_for_uri

    first = run_job(*args)
    assert (first.videos_ok, first.videos_failed, first.inputs_skipped) == (4, 1, 0)
    before = results(out)

    paths += [video("new0.mp4", 10), video("new1.mp4", 11)]
    second = run_job(*args)
    counts = load_success(out)["counts"]
    assert counts["inputs_processed"] == 2 and counts["inputs_skipped"] == 5 and second.inputs_skipped == 5
    assert (second.videos_ok, second.videos_failed) == (2, 0)
    check_final(out, {vid(p) for p in paths})
    after = results(out)
    for v in before["videos"]:  # untouched inputs keep their rows (same run)
        assert after["videos"][v]["run_id"] == before["videos"][v]["run_id"] == first.run_id

    changed = paths[1]
    video("old1.mp4", 99, n=36)  # new content in place: new size and mtime
    third = run_job(*args)
    counts = load_success(out)["counts"]
    assert counts["inputs_processed"] == 1 and counts["inputs_skipped"] == 6 and third.videos_ok == 1
    check_final(out, {vid(p) for p in paths})
    now = results(out)
    assert now["videos"][vid(changed)]["run_id"] == third.run_id
    assert now["videos"][vid(changed)]["size_bytes"] == os.path.getsize(changed)
    assert not np.allclose(now["videos"][vid(changed)]["embedding"], after["videos"][vid(changed)]["embedding"])
    for v, row in now["videos"].items():
        if v != vid(changed):
            assert row["run_id"] == after["videos"][v]["run_id"]

    fourth = run_job(*args, "--retry-failed")
    counts = load_success(out)["counts"]
    assert counts["inputs_processed"] == 1 and counts["inputs_skipped"] == 6
    assert (fourth.videos_ok, fourth.videos_failed) == (0, 1)
    check_final(out, {vid(p) for p in paths})
    final = results(out)
    assert final["errors"] == {vid(str(folder / "bad.mp4")): "corrupt"}
    t = committed_tables(out)
    assert t["errors"].column("run_id").to_pylist() == [fourth.run_id]
    assert [r["run_id"] for r in load_success(out)["runs"]] == [first.run_id, second.run_id, third.run_id,
                                                                fourth.run_id]


# ---------------------------------------------------------------------------------------------
# 6. Checkpoints that cannot load fail the job early, with the reason
# ---------------------------------------------------------------------------------------------


def test_unloadable_checkpoints_fail_fast(ray_session, tiny_classifier, crash_corpus, tmp_path):
    """A checkpoint without weights is refused before Ray (exit 2, --model named); garbage
    weights and a checkpoint missing an encoder weight fail the job at the first model
    actor's construction, quickly, with ModelLoadError and the reason (no restart loop)."""
    from safetensors.numpy import load_file, save_file

    from vmae_ray.cli import run_embed

    def broken(name):
        path = tmp_path / name
        shutil.copytree(tiny_classifier, path)
        return path

    def argv(ckpt, name):
        return ["--input", crash_corpus["dir"], "--output", str(tmp_path / f"out_{name}"), "--model", str(ckpt),
                "--batch-size", "2"]

    no_weights = broken("no_weights")
    os.remove(no_weights / "model.safetensors")
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        run_embed(argv(no_weights, "no_weights"), prog="jobs/embed_videos.py")
    assert exit_info.value.code == 2 and time.monotonic() - started < 10

    garbage = broken("garbage")
    (garbage / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    missing_key = broken("missing_key")
    weights = load_file(str(missing_key / "model.safetensors"))
    dropped = next(k for k in sorted(weights) if k.endswith("encoder.layer.1.attention.attention.q_bias"))
    del weights[dropped]
    save_file(weights, str(missing_key / "model.safetensors"), metadata={"format": "pt"})

    took = {}
    for name, ckpt, needles in [
        ("garbage", garbage, ["ModelLoadError", "cannot load", "deserializing header"]),
        # The file's q_bias is loaded as the model's query.bias: either name is fine.
        ("missing_key", missing_key, ["ModelLoadError", "missing", "layer.1.attention.attention.q"]),
    ]:
        started = time.monotonic()
        job = JobThread(argv(ckpt, name))
        job.start()
        job.join(60)
        took[name] = time.monotonic() - started
        assert not job.is_alive(), f"{name}: the job was still running after 60 s (an actor restart loop?)"
        assert job.error is not None, f"{name}: the job succeeded with a broken checkpoint"
        message = str(job.error)
        for needle in needles:
            assert needle in message, f"{name}: {needle!r} not in {message!r}"
        assert not os.path.exists(tmp_path / f"out_{name}" / "_SUCCESS")
    print("failed after " + ", ".join(f"{n}: {s:.1f}s" for n, s in took.items()))


def test_s3_access_denied_row_says_what_the_worker_had(hostile_run, s3_server):
    """The archived object's 403, on a Ray worker: its errors/ message says which credential
    sources that worker process had (the key came in the storage options), never the key."""
    from vmae_ray.reading import CommittedOutput

    errors = CommittedOutput.open(hostile_run["out"]).read("errors", ["uri", "error_type", "message"]).to_pylist()
    (row,) = [r for r in errors if r["uri"].endswith("cold/archived.mp4")]
    assert row["error_type"] == "access_denied"
    assert "; seen on this process (host " in row["message"]
    assert "key/secret in the storage options (from --storage-options or $VMAE_RAY_STORAGE_OPTIONS)" in row["message"]
    assert s3_server.secret_key not in row["message"] and s3_server.access_key not in row["message"]
