"""End to end against a real S3 endpoint (moto server, tests/s3_server.py): object storage everywhere.

Input videos, the checkpoint, a manifest and the output all live in buckets; the job runs
on the session's local Ray (in-process, or as `python jobs/embed_videos.py` with
RAY_ADDRESS pointing at that Ray). Tables are read back through s3fs + pyarrow, as a
consumer would; request counts come from the server's access log.

Three job runs are shared by the tests (module-scoped fixtures):
- `prefix_run`: s3:// prefix input, --model s3://, --output s3://, credentials in
  --storage-options, in-process.
- `subprocess_run`: an S3 manifest with a passthrough column, as a subprocess whose
  --storage-options carry the server's canary secret (credential hygiene).
- the env-only variant: credentials and endpoint only in AWS_* environment variables.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, SHARED_FILES, SHARED_MEDIA, MediaFile
from tests.s3_server import clear_s3fs_instances
from vmae_ray.cli import config_from_args
from vmae_ray.pipeline import run

JOB = os.path.join(ROOT, "jobs", "embed_videos.py")
# The listing takes only video extensions by default; the audio-only .mp3 is a bad input
# the job must report, so the prefix run names its extensions explicitly.
EXTENSIONS = "mp4,webm,mkv,mp3"
DIM = 64  # hidden size of the tiny checkpoint
SUBPROCESS_TIMEOUT = 240


@dataclass
class S3World:
    """The buckets and objects of this module's runs."""

    data: str  # input videos (+ manifests)
    models: str  # the checkpoint
    out: str  # outputs, one prefix per run
    ckpt_prefix: str = "ckpt/tiny"
    ckpt_files: list[str] = field(default_factory=list)  # relative keys under ckpt_prefix
    videos: dict[str, MediaFile | None] = field(default_factory=dict)  # s3 uri -> shared media or None
    sizes: dict[str, int] = field(default_factory=dict)  # s3 uri -> bytes

    @property
    def ckpt_uri(self) -> str:
        return f"s3://{self.models}/{self.ckpt_prefix}/"


def _key(uri: str) -> tuple[str, str]:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return bucket, key


@pytest.fixture(scope="module")
def s3_world(s3_server, tiny_classifier, synthetic_corpus) -> S3World:
    clear_s3fs_instances()
    client = s3_server.client
    world = S3World(data=s3_server.make_bucket(), models=s3_server.make_bucket(), out=s3_server.make_bucket())
    local = {f"videos/{name}": (path, None) for name, path in synthetic_corpus.items()}
    if os.path.isdir(SHARED_MEDIA):
        local.update({f"videos/shared/{m.name}": (m.path, m) for m in SHARED_FILES})
    for key, (path, media) in local.items():
        client.upload_file(path, world.data, key)
        uri = f"s3://{world.data}/{key}"
        world.videos[uri] = media
        world.sizes[uri] = os.path.getsize(path)
    # Not a video: the prefix listing must skip it.
    client.put_object(Bucket=world.data, Key="videos/notes.txt", Body=b"not a video")
    for dirpath, _, names in os.walk(tiny_classifier):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), tiny_classifier).replace(os.sep, "/")
            client.upload_file(os.path.join(dirpath, name), world.models, f"{world.ckpt_prefix}/{rel}")
            world.ckpt_files.append(rel)
    assert {"config.json", "preprocessor_config.json"} <= set(world.ckpt_files)
    assert any(f.endswith(".safetensors") for f in world.ckpt_files)
    return world


def _fs(s3_server):
    """A fresh s3fs filesystem (no listing cache shared with the code under test)."""
    import s3fs

    opts = s3_server.storage_options
    return s3fs.S3FileSystem(key=opts["key"], secret=opts["secret"], client_kwargs=opts["client_kwargs"],
                             skip_instance_cache=True)


def read_table(s3_server, output: str, table: str) -> pa.Table | None:
    """All committed shards of one table, read through s3fs with plain pyarrow."""
    fs = _fs(s3_server)
    folder = f"{output.removeprefix('s3://').rstrip('/')}/{table}"
    if not fs.exists(folder):
        return None
    return pq.read_table(folder, filesystem=fs)


def read_success(s3_server, output: str) -> dict:
    bucket, key = _key(output.rstrip("/") + "/_SUCCESS")
    return json.loads(s3_server.client.get_object(Bucket=bucket, Key=key)["Body"].read())


def list_keys(s3_server, output: str) -> list[str]:
    """Every object key under the output prefix (relative to it), straight from S3."""
    bucket, prefix = _key(output.rstrip("/") + "/")
    keys = []
    for page in s3_server.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
    return sorted(keys)


def assert_each_input_once(s3_server, output: str, expected_uris: set[str]) -> tuple[pa.Table, pa.Table | None]:
    videos, errors = read_table(s3_server, output, "videos"), read_table(s3_server, output, "errors")
    ok = videos.column("uri").to_pylist() if videos is not None else []
    failed = errors.column("uri").to_pylist() if errors is not None else []
    assert len(ok) == len(set(ok)), "an input appears twice in videos/"
    assert len(failed) == len(set(failed)), "an input appears twice in errors/"
    assert not set(ok) & set(failed), "an input is in both videos/ and errors/"
    assert set(ok) | set(failed) == expected_uris
    return videos, errors


def _subprocess_env(ray_session, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1",
               # Where the code under test would find a botocore config or credentials
               # file, nothing: the only credentials are the ones each test passes.
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


def _run_job_subprocess(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, JOB, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)


# --------------------------------------------------------------------------------------
# Run 1: prefix input, model and output on S3, credentials in --storage-options


@pytest.fixture(scope="module")
def prefix_run(ray_session, s3_server, s3_world, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("model-cache"))
    output = f"s3://{s3_world.out}/prefix-run/"
    mark = len(s3_server.requests)
    summary = run(config_from_args([
        "--input", f"s3://{s3_world.data}/videos/", "--extensions", EXTENSIONS,
        "--model", s3_world.ckpt_uri, "--model-cache-dir", cache, "--output", output,
        "--storage-options", json.dumps(s3_server.storage_options), "--top-k", "2",
    ]))
    time.sleep(0.2)  # the server logs a request just after answering it
    return {"output": output, "summary": summary, "cache": cache, "requests": s3_server.requests[mark:]}


def test_prefix_run_tables(prefix_run, s3_server, s3_world):
    output = prefix_run["output"]
    videos, errors = assert_each_input_once(s3_server, output, set(s3_world.videos))
    clips = read_table(s3_server, output, "clips")
    assert f"s3://{s3_world.data}/videos/notes.txt" not in videos.column("uri").to_pylist()
    for name, typ in [("video_id", pa.string()), ("uri", pa.string()), ("clip_index", pa.int32()),
                      ("start_seconds", pa.float64()), ("end_seconds", pa.float64()),
                      ("frame_indices", pa.list_(pa.int32())), ("embedding", pa.list_(pa.float32(), DIM)),
                      ("top_labels", pa.list_(pa.string())), ("top_scores", pa.list_(pa.float32()))]:
        assert clips.schema.field(name).type == typ, name
    assert videos.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert videos.schema.field("num_clips").type == pa.int32()
    if errors is not None:
        assert {"video_id", "uri", "stage", "error_type", "message"} <= set(errors.column_names)
    assert set(clips.column("video_id").to_pylist()) == set(videos.column("video_id").to_pylist())
    assert clips.num_rows == sum(videos.column("num_clips").to_pylist())
    assert not np.isnan(np.stack(clips.column("embedding").to_numpy(zero_copy_only=False))).any()

    # Shared media: the same outcomes as from local disk.
    by_uri_ok = {r["uri"]: r for r in videos.to_pylist()}
    by_uri_err = {r["uri"]: r for r in errors.to_pylist()} if errors is not None else {}
    for uri, media in s3_world.videos.items():
        if media is None or media.expect_error is None:
            assert uri in by_uri_ok, by_uri_err.get(uri)
            if media is not None and media.video_stream is not None:
                assert by_uri_ok[uri]["stream_index"] == media.video_stream
        else:
            assert by_uri_err[uri]["error_type"] == media.expect_error, by_uri_err[uri]
    if any(m is not None for m in s3_world.videos.values()):
        assert by_uri_err, "the audio-only mp3 must be an error row"

    counts = read_success(s3_server, output)["counts"]
    assert counts["inputs_listed"] == counts["inputs_processed"] == len(s3_world.videos)
    assert counts["videos_ok"] == videos.num_rows
    assert counts["videos_failed"] == (errors.num_rows if errors is not None else 0)
    assert counts["videos_ok"] + counts["videos_failed"] == len(s3_world.videos)
    assert counts["clips"] == clips.num_rows
    summary = prefix_run["summary"]
    assert (summary.videos_ok, summary.videos_failed, summary.clips) == (
        counts["videos_ok"], counts["videos_failed"], counts["clips"])


def test_model_from_s3_downloaded_once(prefix_run, s3_world):
    """The driver (config files) and the model actor (weights) both need the checkpoint:
    one node, one download: every checkpoint object is fetched exactly once."""
    requests = prefix_run["requests"]
    prefix = f"/{s3_world.models}/{s3_world.ckpt_prefix}/"
    gets = collections.Counter(r.path for r in requests if r.method == "GET" and r.path.startswith(prefix))
    expected = {prefix + rel: 1 for rel in s3_world.ckpt_files}
    assert dict(gets) == expected, gets
    assert not [r for r in requests if r.method == "HEAD" and r.path.startswith(prefix)]
    # Listing the prefix (it keys the cache): once per download_dir call, the driver's and
    # the one model actor's.
    lists = [r for r in requests if r.path == f"/{s3_world.models}"]
    assert 1 <= len(lists) <= 2, lists
    entries = [n for n in os.listdir(prefix_run["cache"]) if not n.endswith(".lock")]
    assert len(entries) == 1 and entries[0].startswith("tiny-"), entries
    assert not [n for n in entries if ".tmp-" in n]


def test_videos_read_with_one_get_each(prefix_run, s3_world):
    requests = prefix_run["requests"]
    per_key = collections.defaultdict(list)
    for r in requests:
        if r.path.startswith(f"/{s3_world.data}/videos/"):
            per_key[r.path].append(r.method)
    # Objects up to open_input's whole-object limit (64 MiB; all of these) are read whole
    # in one GET, and the listing gave their size, so no HEAD either.
    assert max(s3_world.sizes.values()) < 64 * 2**20
    for uri in s3_world.videos:
        path = "/" + uri.removeprefix("s3://")
        assert per_key.get(path) == ["GET"], (uri, per_key.get(path))
    assert f"/{s3_world.data}/videos/notes.txt" not in per_key
    # The whole prefix was listed with a constant number of LIST requests (is it a directory,
    # one probe of its key range, one listing task); test_listing_cost_* shows it stays so.
    lists = [r for r in requests if r.path == f"/{s3_world.data}"]
    assert 1 <= len(lists) <= 3, lists


def test_listing_cost_does_not_grow_with_objects(s3_server, s3_bucket):
    """O(1) LIST requests for a prefix, whatever the number of objects in it."""
    from vmae_ray.listing import list_inputs
    from vmae_ray.storage import StorageOptions

    storage = StorageOptions(s3_server.storage_options)
    for prefix, n in (("few", 3), ("many", 60)):
        for i in range(n):
            s3_server.client.put_object(Bucket=s3_bucket, Key=f"{prefix}/sub{i % 3}/v{i:03d}.mp4", Body=b"x" * (i + 1))
    costs = {}
    for prefix, n in (("few", 3), ("many", 60)):
        clear_s3fs_instances()
        mark = len(s3_server.requests)
        listing = list_inputs(f"s3://{s3_bucket}/{prefix}/", storage)
        time.sleep(0.1)
        calls = s3_server.requests[mark:]
        assert listing.num_rows == n
        assert all(s is not None for s in listing.column("size_bytes").to_pylist())
        assert all(listing.column("version").to_pylist())
        assert not [r for r in calls if r.path.startswith(f"/{s3_bucket}/{prefix}/")], calls  # no per-object request
        costs[prefix] = len(calls)
    assert costs["many"] == costs["few"] <= 3, costs


def test_a_flat_prefix_is_split_into_key_ranges_that_cover_every_key_once(s3_server, s3_bucket):
    """A prefix with more keys than a probe page is split at the next key character (again
    where a range is still full); the ranges' listings are the prefix's keys, each once, compared
    with a plain paginated ListObjectsV2 (boto3), whatever characters the keys hold."""
    import s3fs

    from vmae_ray.listing import ListingPlan, list_part, plan_key_ranges
    from vmae_ray.storage import StorageOptions, url_to_fs

    names = [f"{c}{i:02d}.mp4" for c in "0aAz_-" for i in range(9)] + ["a.mp4", "a", "~odd.mp4", "é.mp4", "a/b/c.mp4"]
    for name in names:
        s3_server.client.put_object(Bucket=s3_bucket, Key=f"flat/{name}", Body=b"x")
    s3fs.S3FileSystem.clear_instance_cache()
    uri = f"s3://{s3_bucket}/flat"
    fs, path = url_to_fs(uri, StorageOptions(s3_server.storage_options))
    parts = plan_key_ranges(fs, uri, path, page_keys=4, max_ranges=400)
    assert len(parts) > 20  # split twice where needed
    plan = ListingPlan(uri, "directory", tuple(parts), extensions=(".mp4",), base_dir="/")
    listed = [u for p in parts for t in list_part(p, plan, StorageOptions(s3_server.storage_options))
              for u in t.column("uri").to_pylist()]
    truth, token = [], None
    while True:
        page = s3_server.client.list_objects_v2(Bucket=s3_bucket, Prefix="flat/", **({"ContinuationToken": token}
                                                                                       if token else {}))
        truth += [f"s3://{s3_bucket}/{c['Key']}" for c in page.get("Contents", [])
                  if c["Key"].endswith(".mp4") and not c["Key"].rsplit("/", 1)[-1].startswith("_")]  # hidden
        if not page.get("IsTruncated"):
            break
        token = page["NextContinuationToken"]
    assert sorted(listed) == sorted(truth) and len(listed) == len(set(listed)) == len(names) - 1 - 9


def test_s3_output_commit(prefix_run, s3_server):
    output = prefix_run["output"]
    keys = list_keys(s3_server, output)
    assert not [k for k in keys if k.startswith("_staging") or "/_staging/" in k], keys
    committed = read_success(s3_server, output)["files"]
    listed = sorted(k for k in keys if k.split("/", 1)[0] in ("clips", "videos", "errors"))
    assert listed == sorted(f for files in committed.values() for f in files)
    assert set(keys) == set(listed) | {"_SUCCESS"}, keys
    assert all(k.endswith(".parquet") for k in listed)


# --------------------------------------------------------------------------------------
# Run 2: an S3 manifest, as a subprocess whose --storage-options carry the canary secret


@pytest.fixture(scope="module")
def subprocess_run(ray_session, s3_server, s3_world, tmp_path_factory):
    chosen = sorted(u for u, m in s3_world.videos.items() if m is None)[:2]
    chosen += sorted(u for u, m in s3_world.videos.items() if m is not None and m.expect_error)
    ids = [f"clip-{i:02d}" for i in range(len(chosen))]
    splits = [f"split-{i % 2}" for i in range(len(chosen))]
    manifest = pa.table({"uri": chosen, "video_id": ids, "split": splits})
    sink = pa.BufferOutputStream()
    pacsv.write_csv(manifest, sink)
    s3_server.client.put_object(Bucket=s3_world.data, Key="manifests/run.csv", Body=sink.getvalue().to_pybytes())
    output = f"s3://{s3_world.out}/manifest-run/"
    storage_options = json.dumps(s3_server.storage_options)
    cache = str(tmp_path_factory.mktemp("model-cache-sub"))
    # Secrets in a file (@FILE), not on the command line that Ray records as the entrypoint.
    options_file = tmp_path_factory.mktemp("options") / "storage.json"
    options_file.write_text(storage_options)
    proc = _run_job_subprocess(
        ["--input", f"s3://{s3_world.data}/manifests/run.csv", "--model", s3_world.ckpt_uri,
         "--model-cache-dir", cache, "--output", output, "--storage-options", f"@{options_file}", "--top-k", "2"],
        _subprocess_env(ray_session),
    )
    return {"proc": proc, "output": output, "ids": dict(zip(ids, chosen)), "splits": dict(zip(ids, splits)),
            "storage_options": storage_options}


def test_manifest_on_s3_passes_columns_through(subprocess_run, s3_server):
    proc = subprocess_run["proc"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    output, ids, splits = subprocess_run["output"], subprocess_run["ids"], subprocess_run["splits"]
    videos, errors = assert_each_input_once(s3_server, output, set(ids.values()))
    clips = read_table(s3_server, output, "clips")
    for table in (clips, videos) + ((errors,) if errors is not None else ()):
        assert table.schema.field("split").type == pa.string()
        for row in table.select(["video_id", "uri", "split"]).to_pylist():
            assert ids[row["video_id"]] == row["uri"] and row["split"] == splits[row["video_id"]], row
    assert videos.num_rows >= 2 and clips.num_rows >= 2
    counts = read_success(s3_server, output)["counts"]
    assert counts["videos_ok"] + counts["videos_failed"] == len(ids)


def _files_containing(root: str, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue  # sockets, pipes
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        hits.append(path)
            except OSError:
                pass
    return hits


def test_canary_secret_never_leaks(subprocess_run, s3_server, ray_session):
    canary = s3_server.secret_key
    assert canary.startswith("CANARY-SECRET-")
    # Live test: the secret really was handed to the job.
    assert canary in subprocess_run["storage_options"]
    proc = subprocess_run["proc"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert canary not in proc.stdout and canary not in proc.stderr

    output = subprocess_run["output"]
    keys = list_keys(s3_server, output)
    assert "_SUCCESS" in keys and any(k.endswith(".parquet") for k in keys)
    bucket, prefix = _key(output)
    for key in keys:
        body = s3_server.client.get_object(Bucket=bucket, Key=prefix + key)["Body"].read()
        assert canary.encode() not in body, key
        if key.endswith(".parquet"):
            # Column data is compressed: check the decoded values and metadata too.
            table = pq.read_table(pa.BufferReader(body))
            assert canary not in repr(table.schema.metadata) and canary not in str(table.schema)
            assert canary not in json.dumps(table.to_pylist(), default=repr), key
    success = read_success(s3_server, output)
    assert success["config"]["storage_options"]["secret"] == "<redacted>"

    time.sleep(1.0)  # let Ray flush the workers' and the job driver's log files
    session_dir = ray_session._private.worker._global_node.get_session_dir_path()
    assert os.path.isdir(os.path.join(session_dir, "logs"))
    assert _files_containing(session_dir, canary.encode()) == []


def test_canary_secret_not_in_ray_job_table(subprocess_run, s3_server, ray_session):
    canary = s3_server.secret_key
    assert canary in subprocess_run["storage_options"]
    jobs = [j for j in ray_session._private.state.jobs() if JOB in str(j.get("Entrypoint", ""))]
    assert jobs, "the subprocess run is not in the session's job table"
    assert [j["Entrypoint"] for j in jobs if canary in repr(j)] == []


# --------------------------------------------------------------------------------------
# Run 3: credentials and endpoint only in the environment


def _aws_vars_seen(env: dict[str, str]) -> str:
    """Which AWS variables a driver started with `env`, and a Ray task of its job, see."""
    code = (
        "import os, ray\n"
        "names = ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_ENDPOINT_URL')\n"
        "seen = lambda: sorted(n for n in names if n in os.environ)\n"
        "ray.init(address=os.environ['RAY_ADDRESS'], logging_level='ERROR', log_to_driver=False)\n"
        "print('driver sees', seen(), '- a task of its job sees', ray.get(ray.remote(num_cpus=0)(seen).remote()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return (proc.stdout.strip().splitlines() or [proc.stderr[-500:]])[-1]


def test_credentials_from_environment_only(ray_session, s3_server, s3_world, tmp_path):
    """No --storage-options: key, secret and endpoint only in AWS_* variables of the job's
    driver, which connects to the already running session Ray (as with `ray job submit`
    against a cluster whose nodes have no credentials of their own)."""
    uri = f"s3://{s3_world.data}/videos/a_h264.mp4"
    output = f"s3://{s3_world.out}/env-run/"
    env = _subprocess_env(ray_session, AWS_ACCESS_KEY_ID=s3_server.access_key,
                          AWS_SECRET_ACCESS_KEY=s3_server.secret_key, AWS_ENDPOINT_URL=s3_server.endpoint_url,
                          AWS_DEFAULT_REGION=s3_server.region)
    proc = _run_job_subprocess(["--input", uri, "--model", s3_world.ckpt_uri,
                                "--model-cache-dir", str(tmp_path / "cache"), "--output", output], env)
    assert proc.returncode == 0, f"job failed; {_aws_vars_seen(env)}\n{proc.stderr[-3000:]}"
    videos, _ = assert_each_input_once(s3_server, output, {uri})
    assert videos.num_rows == 1
    # However the variables come to reach the workers, the secret must not land in logs.
    assert s3_server.secret_key not in proc.stdout + proc.stderr
    time.sleep(1.0)
    session_dir = ray_session._private.worker._global_node.get_session_dir_path()
    assert _files_containing(session_dir, s3_server.secret_key.encode()) == []
