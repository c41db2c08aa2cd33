"""vmae_ray.storage against a real S3 endpoint (moto server from tests/s3_server.py), no mocks.

Request counts come from the server's access log (``s3_server.requests``), so "one GET for a
small video" and "the checkpoint is downloaded once" are checked on the wire.
"""

from __future__ import annotations

import errno
import hashlib
import io
import multiprocessing
import os
import pickle

import pytest

from vmae_ray.storage import (
    StorageOptions,
    classify_storage_error,
    download_dir,
    join,
    open_input,
    url_to_fs,
)

MB = 2**20


@pytest.fixture
def storage(s3_server) -> StorageOptions:
    return StorageOptions(s3_server.storage_options)


def _gets(requests, bucket: str, key: str = ""):
    prefix = f"/{bucket}/{key}"
    return [r for r in requests if r.method == "GET" and r.path.startswith(prefix) and r.path != f"/{bucket}"]


# --------------------------------------------------------------------------------------
# StorageOptions


SECRET_OPTIONS = {
    "key": "AKIA-TOP-SECRET-1",
    "secret": "TOP-SECRET-2",
    "token": "TOP-SECRET-3",
    "profile": "research",
    "client_kwargs": {
        "endpoint_url": "http://minio.internal:9000",
        "region_name": "eu-west-1",
        "aws_secret_access_key": "TOP-SECRET-4",
        "aws_session_token": "TOP-SECRET-5",
        "proxies": {"https": "http://user:TOP-SECRET-6@proxy.internal:3128"},
    },
    "s3_additional_kwargs": {"SSECustomerKey": "TOP-SECRET-7", "ServerSideEncryption": "AES256"},
    "config_kwargs": {"Password": "TOP-SECRET-8", "connect_timeout": 5},
    "token_unset": None,
}


def test_storage_options_never_show_secrets():
    opts = StorageOptions(SECRET_OPTIONS)
    red = opts.redacted()
    for text in (repr(opts), str(opts), repr(red), f"{opts}", str([opts])):
        assert "TOP-SECRET" not in text, text
        assert "minio.internal:9000" in text  # endpoints are not secret
    assert red["key"] == red["secret"] == red["token"] == "<redacted>"
    assert red["profile"] == "research"
    ck = red["client_kwargs"]
    assert ck["endpoint_url"] == "http://minio.internal:9000" and ck["region_name"] == "eu-west-1"
    assert ck["aws_secret_access_key"] == ck["aws_session_token"] == "<redacted>"
    assert ck["proxies"]["https"] == "http://user:<redacted>@proxy.internal:3128"
    assert red["s3_additional_kwargs"] == {"SSECustomerKey": "<redacted>", "ServerSideEncryption": "AES256"}
    assert red["config_kwargs"] == {"Password": "<redacted>", "connect_timeout": 5}
    assert red["token_unset"] is None  # "no token configured" is not a secret
    # The real values stay available for fsspec, and redaction did not touch them.
    assert opts.to_fsspec() == SECRET_OPTIONS
    # to_fsspec hands out copies: a caller mutating them cannot change the options.
    opts.to_fsspec()["client_kwargs"]["endpoint_url"] = "http://elsewhere"
    assert opts.to_fsspec()["client_kwargs"]["endpoint_url"] == "http://minio.internal:9000"


def test_storage_options_pickle_keeps_real_values():
    opts = StorageOptions(SECRET_OPTIONS)
    clone = pickle.loads(pickle.dumps(opts))
    assert isinstance(clone, StorageOptions)
    assert clone.to_fsspec() == SECRET_OPTIONS
    assert clone == opts
    assert "TOP-SECRET" not in repr(clone)


def test_storage_options_flag_parsing():
    from vmae_ray.config import ConfigError, parse_storage_options

    assert parse_storage_options(None) == {}
    assert parse_storage_options("") == {}
    assert parse_storage_options('{"anon": true}') == {"anon": True}
    assert parse_storage_options({"anon": True}) == {"anon": True}
    with pytest.raises(ConfigError, match="--storage-options") as bad:
        parse_storage_options('{"secret": "TOP-SECRET-9",')
    assert "TOP-SECRET" not in str(bad.value)  # the message never echoes the text
    with pytest.raises(ConfigError, match="--storage-options"):
        parse_storage_options("[1, 2]")


def test_canary_secret_of_test_server_is_redacted(s3_server):
    opts = StorageOptions(s3_server.storage_options)
    assert s3_server.secret_key.startswith("CANARY-SECRET-")
    assert s3_server.secret_key not in repr(opts)
    assert s3_server.secret_key not in repr(opts.redacted())
    assert s3_server.endpoint_url in repr(opts)


# --------------------------------------------------------------------------------------
# Paths and filesystems


@pytest.mark.parametrize("base, parts, expected", [
    ("s3://b/p", ("x",), "s3://b/p/x"),
    ("s3://b/p/", ("x/", "/y.parquet"), "s3://b/p/x/y.parquet"),
    ("s3://b", ("clips", "a.parquet"), "s3://b/clips/a.parquet"),
    ("gs://b/p", ("", "x"), "gs://b/p/x"),
    ("/data/out", ("clips", "a.parquet"), "/data/out/clips/a.parquet"),
    ("/data/out/", ("/_SUCCESS",), "/data/out/_SUCCESS"),
    ("rel/out", ("x",), "rel/out/x"),
    ("file:///data/out", ("x",), "file:///data/out/x"),
    ("file:///", ("x",), "file:///x"),
    ("s3://", ("b", "k"), "s3://b/k"),
])
def test_join(base, parts, expected):
    assert join(base, *parts) == expected


def test_url_to_fs_local(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"local")
    for uri in (str(tmp_path / "a.txt"), f"file://{tmp_path}/a.txt"):
        fs, path = url_to_fs(uri, StorageOptions({"key": "ignored-for-local"}))
        assert "file" in fs.protocol
        assert path == str(tmp_path / "a.txt")
        assert fs.cat_file(path) == b"local"


def test_url_to_fs_s3_endpoint_from_env_only(s3_server, s3_bucket, monkeypatch):
    s3_server.client.put_object(Bucket=s3_bucket, Key="dir/x.bin", Body=b"from-env")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs, path = url_to_fs(f"s3://{s3_bucket}/dir/x.bin", StorageOptions())
    assert path == f"{s3_bucket}/dir/x.bin"
    assert fs.client_kwargs["endpoint_url"] == s3_server.endpoint_url
    assert fs.cat_file(path) == b"from-env"

    # The service-specific variable wins, as in botocore...
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    fs, _ = url_to_fs(f"s3://{s3_bucket}/dir/x.bin", StorageOptions())
    assert fs.client_kwargs["endpoint_url"] == s3_server.endpoint_url
    # ...and an explicit endpoint in the options wins over both.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    fs, path = url_to_fs(f"s3://{s3_bucket}/dir/x.bin", StorageOptions(s3_server.storage_options))
    assert fs.cat_file(path) == b"from-env"


# --------------------------------------------------------------------------------------
# open_input


def test_open_input_small_object_is_one_get(s3_server, s3_bucket, storage):
    data = os.urandom(300_000)
    s3_server.client.put_object(Bucket=s3_bucket, Key="v/small.mp4", Body=data)
    uri = f"s3://{s3_bucket}/v/small.mp4"

    mark = len(s3_server.requests)
    with open_input(uri, storage, size=len(data)) as f:
        assert isinstance(f, io.BytesIO)
        assert f.read(10) == data[:10]
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]
        f.seek(0)
        assert f.read() == data
    calls = s3_server.requests_for(s3_bucket, "v/small.mp4", since=mark)
    assert [r.method for r in calls] == ["GET"], calls

    # Without a size from the listing: one HEAD to learn it, then the same single GET.
    mark = len(s3_server.requests)
    with open_input(uri, storage) as f:
        assert isinstance(f, io.BytesIO) and f.getvalue() == data
    calls = s3_server.requests_for(s3_bucket, "v/small.mp4", since=mark)
    assert sorted(r.method for r in calls) == ["GET", "HEAD"], calls


def test_open_input_large_object_reads_ranges(s3_server, s3_bucket, storage):
    size = 20 * MB
    data = os.urandom(size)
    s3_server.client.put_object(Bucket=s3_bucket, Key="v/large.mp4", Body=data)
    uri = f"s3://{s3_bucket}/v/large.mp4"

    mark = len(s3_server.requests)
    with open_input(uri, storage, whole_object_max_bytes=1 * MB, block_size=1 * MB, size=size) as f:
        assert not isinstance(f, io.BytesIO)
        assert f.cache.name == "readahead" and f.blocksize == 1 * MB
        fetched = []
        inner = f.cache.fetcher

        def counting_fetcher(start, end):
            out = inner(start, end)
            fetched.append(len(out))
            return out

        f.cache.fetcher = counting_fetcher
        assert f.seekable()
        assert f.read(100) == data[:100]
        f.seek(-100, os.SEEK_END)  # like PyAV looking for an MP4 'moov' at the end
        assert f.read(100) == data[-100:]
    assert sum(fetched) < 2 * MB + 1000, fetched  # far less than the 20 MB object
    calls = s3_server.requests_for(s3_bucket, "v/large.mp4", since=mark)
    # One HEAD (s3fs fetches the object's details, ETag included, before its first range
    # read, size given or not), then one ranged GET (206 Partial Content) per cache miss.
    assert [r.method for r in calls] == ["HEAD"] + ["GET"] * len(fetched), calls
    assert all(r.status == 206 for r in calls[1:]), calls
    assert len(fetched) == 2


def test_open_input_large_object_replaced_mid_read_fails_cleanly(s3_server, s3_bucket, storage):
    s3_server.client.put_object(Bucket=s3_bucket, Key="v/replaced.mp4", Body=os.urandom(3 * MB))
    with open_input(f"s3://{s3_bucket}/v/replaced.mp4", storage, whole_object_max_bytes=1 * MB,
                    block_size=1 * MB, size=3 * MB) as f:
        f.read(100)
        s3_server.client.put_object(Bucket=s3_bucket, Key="v/replaced.mp4", Body=os.urandom(3 * MB))
        f.seek(2 * MB)
        exc = _raised(lambda: f.read(100))
    # Reads are pinned to the ETag seen at open: no bytes of the new version are mixed in.
    assert isinstance(exc, OSError), repr(exc)
    assert classify_storage_error(exc) == "transient"  # a retry reads the new version


def test_open_input_object_grown_since_listing(s3_server, s3_bucket, storage):
    data = os.urandom(3 * MB)
    s3_server.client.put_object(Bucket=s3_bucket, Key="v/grown.mp4", Body=data)
    # The listing said 10 bytes; the object is now larger than the whole-object limit.
    with open_input(f"s3://{s3_bucket}/v/grown.mp4", storage, whole_object_max_bytes=1 * MB,
                    block_size=1 * MB, size=10) as f:
        assert not isinstance(f, io.BytesIO)
        assert f.size == len(data)
        f.seek(2 * MB)
        assert f.read(1000) == data[2 * MB: 2 * MB + 1000]


def test_open_input_local_file_is_opened_directly(tmp_path):
    p = tmp_path / "clip.mp4"
    p.write_bytes(b"0123456789")
    for uri in (str(p), f"file://{p}"):
        with open_input(uri, StorageOptions()) as f:
            assert isinstance(f, io.BufferedReader) and f.name == str(p)
            f.seek(5)
            assert f.read() == b"56789"


def test_open_input_empty_object(s3_server, s3_bucket, storage):
    s3_server.client.put_object(Bucket=s3_bucket, Key="v/empty.mp4", Body=b"")
    with open_input(f"s3://{s3_bucket}/v/empty.mp4", storage, size=0) as f:
        assert f.read() == b""


# --------------------------------------------------------------------------------------
# classify_storage_error


def _raised(fn):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("expected an exception")


def test_classify_missing_s3_key_and_bucket(s3_server, s3_bucket, storage):
    def read(uri, **kw):
        with open_input(uri, storage, **kw) as f:
            f.read()

    # HEAD of a missing key (size unknown), GET of a missing key (size from a stale listing),
    # and a bucket that does not exist.
    for uri, kw in ((f"s3://{s3_bucket}/nope.mp4", {}), (f"s3://{s3_bucket}/nope.mp4", {"size": 100}),
                    ("s3://no-such-bucket-vmae-test/x.mp4", {"size": 100})):
        exc = _raised(lambda uri=uri, kw=kw: read(uri, **kw))
        assert classify_storage_error(exc) == "not_found", repr(exc)


def test_classify_synthetic_errors():
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    cases = [
        (FileNotFoundError("x"), "not_found"),
        (client_error("NoSuchKey", 404), "not_found"),
        (PermissionError("x"), "access_denied"),
        (client_error("AccessDenied", 403), "access_denied"),
        (client_error("SomethingNew", 403), "access_denied"),
        (client_error("SlowDown", 503), "transient"),
        (client_error("InternalError", 500), "transient"),
        (client_error("SomethingNew", 502), "transient"),
        (ConnectionResetError("reset by peer"), "transient"),
        (TimeoutError(), "transient"),
        (OSError(errno.EBUSY, "s3fs's SlowDown"), "transient"),
        (EndpointConnectionError(endpoint_url="http://x"), "transient"),
        (ReadTimeoutError(endpoint_url="http://x"), "transient"),
        (ConnectTimeoutError(endpoint_url="http://x"), "transient"),
        (ValueError("bad"), None),
        (OSError(errno.EIO, "generic"), None),
        (client_error("InvalidArgument", 400), None),
    ]
    for exc, expected in cases:
        assert classify_storage_error(exc) == expected, repr(exc)

    # Wrapped errors are classified by their cause (s3fs raises OSError from ClientError).
    wrapped = OSError(errno.EIO, "wrapped")
    wrapped.__cause__ = client_error("NoSuchKey", 404)
    assert classify_storage_error(wrapped) == "not_found"
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as inner:
            raise RuntimeError("decoder failed reading") from inner
    except RuntimeError as outer:
        assert classify_storage_error(outer) == "transient"


# --------------------------------------------------------------------------------------
# download_dir

CHECKPOINT = {
    "config.json": b'{"model_type": "videomae"}',
    "preprocessor_config.json": b'{"size": {"shortest_edge": 32}}',
    "model.safetensors": os.urandom(2 * MB),
    "nested/extra.json": b"{}",
}


def _put_checkpoint(s3_server, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for rel, body in files.items():
        s3_server.client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=body)
    # A "directory marker" object, as consoles and some tools create: must be skipped.
    s3_server.client.put_object(Bucket=bucket, Key=f"{prefix}/", Body=b"")


def _tree(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root).replace(os.sep, "/")] = open(p, "rb").read()
    return out


def test_download_dir_once_and_again_when_changed(s3_server, s3_bucket, storage, tmp_path):
    _put_checkpoint(s3_server, s3_bucket, "ckpts/tiny", CHECKPOINT)
    uri = f"s3://{s3_bucket}/ckpts/tiny"
    cache = str(tmp_path / "cache")

    mark = len(s3_server.requests)
    local = download_dir(uri, storage, cache)
    assert os.path.dirname(local) == cache and os.path.basename(local).startswith("tiny-")
    assert _tree(local) == CHECKPOINT
    assert len(_gets(s3_server.requests[mark:], s3_bucket, "ckpts/tiny/")) >= len(CHECKPOINT)
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]  # temp dir renamed into place
    inode = os.stat(os.path.join(local, "model.safetensors")).st_ino

    # Second call: the listing only, no object is fetched again, same files on disk.
    mark = len(s3_server.requests)
    assert download_dir(uri + "/", storage, cache) == local  # trailing slash: same prefix
    assert download_dir(uri, storage, cache) == local
    calls = s3_server.requests[mark:]
    assert not [r for r in calls if r.method in ("GET", "HEAD") and r.path.startswith(f"/{s3_bucket}/ckpts/")], calls
    assert os.stat(os.path.join(local, "model.safetensors")).st_ino == inode

    # A changed checkpoint (new ETag/size) gets a new cache entry with the new content.
    changed = {**CHECKPOINT, "config.json": b'{"model_type": "videomae", "v": 2}'}
    s3_server.client.put_object(Bucket=s3_bucket, Key="ckpts/tiny/config.json", Body=changed["config.json"])
    local2 = download_dir(uri, storage, cache)
    assert local2 != local and _tree(local2) == changed
    assert _tree(local) == CHECKPOINT  # the old entry is left alone for readers still using it


def test_download_dir_local_and_missing(s3_server, s3_bucket, storage, tmp_path):
    assert download_dir(str(tmp_path), storage, str(tmp_path / "cache")) == str(tmp_path)
    assert download_dir(f"file://{tmp_path}", None, None) == str(tmp_path)
    assert not (tmp_path / "cache").exists()
    exc = _raised(lambda: download_dir(f"s3://{s3_bucket}/no/such/ckpt", storage, str(tmp_path / "cache")))
    assert isinstance(exc, FileNotFoundError)
    assert classify_storage_error(exc) == "not_found"


def _download_in_child(uri, options, cache, barrier, queue):
    # Runs in a spawned process: everything it needs arrives pickled, as in a Ray actor.
    try:
        barrier.wait(timeout=60)
        local = download_dir(uri, options, cache)
        digests = {rel: hashlib.sha256(body).hexdigest() for rel, body in _tree(local).items()}
        queue.put((os.getpid(), local, digests, None))
    except BaseException as exc:  # noqa: BLE001 - report to the parent instead of dying silently
        queue.put((os.getpid(), None, None, repr(exc)))


def test_download_dir_concurrent_processes(s3_server, s3_bucket, storage, tmp_path):
    _put_checkpoint(s3_server, s3_bucket, "ckpts/shared", CHECKPOINT)
    uri = f"s3://{s3_bucket}/ckpts/shared"
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    mark = len(s3_server.requests)
    procs = [ctx.Process(target=_download_in_child, args=(uri, storage, cache, barrier, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    errors = [r[3] for r in results if r[3]]
    assert not errors, errors
    assert len({r[0] for r in results}) == 4
    paths = {r[1] for r in results}
    assert len(paths) == 1, paths
    expected = {rel: hashlib.sha256(body).hexdigest() for rel, body in CHECKPOINT.items()}
    assert all(r[2] == expected for r in results)
    # Downloaded by one process only: each object fetched once (the lock made the others wait).
    gets = _gets(s3_server.requests[mark:], s3_bucket, "ckpts/shared/")
    assert sorted(r.path for r in gets) == sorted(f"/{s3_bucket}/ckpts/shared/{rel}" for rel in CHECKPOINT), gets
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]


# --------------------------------------------------------------------------------------
# PyAV on both kinds of file open_input yields

SHARED_VIDEO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                            "media", "nasa_13013.mp4")


def _decode_summary(f) -> tuple[int, str]:
    import av

    with av.open(f) as container:
        stream = container.streams.video[0]
        digest = hashlib.sha256()
        count = 0
        for frame in container.decode(stream):
            if count < 3:
                digest.update(frame.to_ndarray(format="gray").tobytes())
            count += 1
    return count, digest.hexdigest()


def test_pyav_decodes_through_both_paths(s3_server, s3_bucket, storage):
    pytest.importorskip("av")
    if not os.path.exists(SHARED_VIDEO):
        pytest.skip(f"shared media not found at {SHARED_VIDEO}")
    data = open(SHARED_VIDEO, "rb").read()
    s3_server.client.put_object(Bucket=s3_bucket, Key="v/nasa.mp4", Body=data)
    uri = f"s3://{s3_bucket}/v/nasa.mp4"
    with open(SHARED_VIDEO, "rb") as f:
        expected = _decode_summary(f)
    assert expected[0] > 0
    with open_input(uri, storage, size=len(data)) as f:  # whole object in memory
        assert isinstance(f, io.BytesIO) and _decode_summary(f) == expected
    with open_input(uri, storage, whole_object_max_bytes=64 * 1024, block_size=64 * 1024,
                    size=len(data)) as f:  # ranged reads, small blocks: many seeks
        assert not isinstance(f, io.BytesIO) and _decode_summary(f) == expected


# --------------------------------------------------------------------------------------
# Access-denied messages say which credential sources the failing process had


@pytest.fixture
def bare_aws_environment(monkeypatch):
    """No AWS_* variable and no AWS config or credentials file: what a `ray job submit` job's
    driver has on a cluster without credentials of its own. Instance metadata is not asked (no
    EC2 here; botocore would only wait for its timeout)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("VMAE_RAY_STORAGE_OPTIONS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)


def _refusal(argv: list[str], capsys) -> str:
    from vmae_ray.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_no_credentials_says_what_this_process_has(s3_server, s3_bucket, bare_aws_environment, monkeypatch, capsys):
    import json

    import botocore.session

    assert botocore.session.Session().get_credentials() is None  # the reference: botocore finds none
    endpoint_only = json.dumps({"client_kwargs": {"endpoint_url": s3_server.endpoint_url}})
    err = _refusal(["search", "--tables", f"s3://{s3_bucket}/tables", "--query", "x",
                    "--storage-options", endpoint_only], capsys)
    assert f"--tables: s3://{s3_bucket}/tables: access denied or no credentials (NoCredentialsError" in err
    assert ("seen on this process (host " in err and "AWS_ACCESS_KEY_ID unset, AWS_SECRET_ACCESS_KEY unset, "
            "AWS_SESSION_TOKEN unset, AWS_PROFILE unset, no key in --storage-options or $VMAE_RAY_STORAGE_OPTIONS, "
            "botocore finds no credentials (no AWS_* keys, profile files, container or instance-profile credentials)"
            in err), err
    assert "ray job submit` job" not in err
    assert "under `ray job submit` the submitting shell's variables do not reach the job" in err
    # The same process inside a submitted job (Ray sets this variable in every job's driver).
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    err = _refusal(["index", "--tables", f"s3://{s3_bucket}/tables", "--storage-options", endpoint_only], capsys)
    assert ", a `ray job submit` job)" in err
    assert ("the AWS_* variables of the shell that submitted it do not reach it; give the cluster credentials with "
            "an instance profile (IAM role) on its nodes, `ray job submit --runtime-env-json '{\"env_vars\": {...}}'`, "
            "or --storage-options @FILE naming a file on the cluster outside --working-dir") in err


def test_access_denied_with_a_key_names_where_the_key_came_from_never_its_value(
        s3_server, s3_bucket, bare_aws_environment, monkeypatch, capsys):
    """A real 403 from the server (an archived object) for a key given two ways: in
    --storage-options, then only as AWS_* variables of this process."""
    import json

    s3_server.client.put_object(Bucket=s3_bucket, Key="cold/_SUCCESS", Body=b"{}", StorageClass="GLACIER")
    tables = f"s3://{s3_bucket}/cold"
    err = _refusal(["index", "--tables", tables, "--storage-options", json.dumps(s3_server.storage_options)], capsys)
    assert f"--tables: {tables}: access denied or no credentials" in err
    assert "AWS_ACCESS_KEY_ID unset" in err
    assert "key/secret in the storage options (from --storage-options or $VMAE_RAY_STORAGE_OPTIONS)" in err
    assert s3_server.secret_key not in err and s3_server.access_key not in err
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    endpoint_only = json.dumps({"client_kwargs": {"endpoint_url": s3_server.endpoint_url}})
    err = _refusal(["index", "--tables", tables, "--storage-options", endpoint_only], capsys)
    assert "AWS_ACCESS_KEY_ID set, AWS_SECRET_ACCESS_KEY set, AWS_SESSION_TOKEN unset" in err
    assert "key/secret in the storage options (this driver's AWS_* variables)" in err
    assert "botocore finds credentials in AWS_* environment variables" in err
    assert s3_server.secret_key not in err and s3_server.access_key not in err


def test_a_profile_botocore_cannot_find(s3_bucket, bare_aws_environment, monkeypatch):
    from vmae_ray.storage import credential_sources

    monkeypatch.setenv("AWS_PROFILE", "nightly")
    text = credential_sources(StorageOptions({"profile": "other"}))
    assert "AWS_PROFILE=nightly" in text and "profile 'other' in the storage options" in text
    assert "botocore's credential chain fails (ProfileNotFound)" in text
