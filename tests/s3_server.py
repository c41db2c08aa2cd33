"""pytest plugin: a real S3 endpoint (moto in server mode) on 127.0.0.1.

Load with ``pytest_plugins = ["tests.s3_server"]`` (or ``-p tests.s3_server``).

The job reads and writes from other processes (Ray workers, `ray job submit`,
subprocesses), so moto's in-process mock decorators would not reach it: this is a real HTTP
server that any process can talk to, the way s3fs's own test suite runs moto. The secret key
is a random canary ("CANARY-SECRET-<hex>") so tests can grep logs, outputs and _SUCCESS for
leaked credentials.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest


class Request(NamedTuple):
    """One HTTP request the server answered (from its access log)."""

    method: str
    path: str  # URL path without the query, e.g. "/bucket/key"
    status: int


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some status lines
_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


class _AccessLog(logging.Handler):
    """Collects werkzeug's access log lines: moto has no request counter of its own."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.requests: list[Request] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            m = _ACCESS_LINE.search(_ANSI.sub("", record.getMessage()))
        except Exception:  # noqa: BLE001 - a logging handler must never raise
            return
        if m:
            # list.append is atomic under the GIL; the server answers on several threads.
            self.requests.append(Request(m["method"], m["target"].split("?", 1)[0], int(m["status"])))


@dataclass
class S3Server:
    """Connection facts of the running moto server, and helpers for tests."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    _client: Any = field(default=None, repr=False)
    _log: Any = field(default=None, repr=False)

    @property
    def requests(self) -> list[Request]:
        """Every request answered so far, in order (this process's server only).

        Take ``n = len(s3_server.requests)`` before an operation and look at
        ``s3_server.requests[n:]`` after it to see what the operation cost.
        """
        return list(self._log.requests) if self._log is not None else []

    def requests_for(self, bucket: str, key: str = "", since: int = 0) -> list[Request]:
        """Requests since index `since` whose path is the bucket, or the object `key` in it."""
        target = f"/{bucket}/{key}" if key else f"/{bucket}"
        return [r for r in self.requests[since:] if r.path == target or (not key and r.path.startswith(target + "/"))]

    @property
    def storage_options(self) -> dict:
        """s3fs options (for StorageOptions / --storage-options) that reach this server."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a subprocess that should use this server by default."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            # Never route 127.0.0.1 through a proxy a CI machine may have configured.
            "NO_PROXY": _no_proxy_with_localhost(os.environ.get("NO_PROXY", "")),
            "no_proxy": _no_proxy_with_localhost(os.environ.get("no_proxy", "")),
        }

    @property
    def client(self):
        """A boto3 S3 client for test setup and inspection (independent of the code under test)."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region,
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            )
        return self._client

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when none is given) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=name)  # us-east-1: no LocationConstraint
        return name


def _no_proxy_with_localhost(value: str) -> str:
    hosts = [h for h in value.split(",") if h.strip()]
    for h in ("127.0.0.1", "localhost"):
        if h not in hosts:
            hosts.append(h)
    return ",".join(hosts)


def clear_s3fs_instances() -> None:
    # fsspec caches filesystem instances by their options; an instance keeps its listing
    # cache (dircache) between tests. Clearing makes each test see the bucket as it is.
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 and a free port, for the whole test session."""
    from moto.server import ThreadedMotoServer

    # The fixture's own boto3/s3fs clients in this process must not go through a proxy.
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = _no_proxy_with_localhost(os.environ.get(var, ""))
    # werkzeug writes one access-log line per request to the "werkzeug" logger; collect them.
    # Having a handler there also stops werkzeug from adding its own stderr handler; the
    # lines still propagate to pytest's log capture, handy in failure reports.
    access_log = _AccessLog()
    wlogger = logging.getLogger("werkzeug")
    saved_level = wlogger.level
    wlogger.setLevel(logging.INFO)
    wlogger.addHandler(access_log)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    info = S3Server(
        endpoint_url=f"http://{host}:{port}",
        access_key="testing-access-key",
        secret_key=f"CANARY-SECRET-{secrets.token_hex(8)}",
        _log=access_log,
    )
    try:
        yield info
    finally:
        clear_s3fs_instances()
        server.stop()
        wlogger.removeHandler(access_log)
        wlogger.setLevel(saved_level)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, uniquely named, empty bucket for one test."""
    clear_s3fs_instances()
    name = s3_server.make_bucket()
    yield name
    clear_s3fs_instances()
