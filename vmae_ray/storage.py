"""All object-storage I/O of the job: options, filesystems, reads, checkpoint downloads.

Pure fsspec (no Ray imports), so every piece is testable against a local moto S3 server
and usable from the driver, Ray tasks and Ray actors alike.

- `StorageOptions` carries fsspec options (credentials included) to workers without ever
  printing them: its repr/str and `redacted()` hide secret-looking values.
- `url_to_fs` / `join` turn URIs into (filesystem, path) and build child URIs.
- `open_input` gives PyAV a seekable file: small objects in one GET, large ones through
  ranged reads with a read-ahead cache so memory stays bounded.
- `download_dir` copies a remote checkpoint to a per-node cache once, safely when several
  actors of one node ask at the same time.
- `classify_storage_error` maps I/O exceptions to the stable `error_type` codes of the
  errors table; `credential_sources` says, for an access-denied message, which credential
  sources the failing process had (names and botocore's verdict, never a value).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
import fsspec.core
import fsspec.utils

__all__ = [
    "StorageOptions",
    "url_to_fs",
    "join",
    "open_input",
    "download_dir",
    "classify_storage_error",
    "credential_sources",
    "default_cache_root",
]

REDACTED = "<redacted>"

# Exact names first (the common credentials of s3fs, gcsfs, adlfs, boto), then the
# substring rule catches the rest (sse_customer_key, account_key, sas_token, ...). Being
# too eager costs a hidden non-secret value in a log; being too lax leaks a credential.
_SECRET_NAMES = frozenset({
    "key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token",
})
_SECRET_SUBSTRINGS = ("secret", "token", "password", "key")

# user:password@ inside URL-looking strings (e.g. an endpoint or proxy with basic auth):
# the URL itself is not secret, its password part is.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")

_S3_PROTOCOLS = ("s3", "s3a")
_LOCAL_PROTOCOLS = ("file", "local")


def _is_secret_key(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    lowered = name.lower()
    return lowered in _SECRET_NAMES or any(s in lowered for s in _SECRET_SUBSTRINGS)


def _redact(value: Any) -> Any:
    """Deep copy of `value` with secret-looking entries replaced by REDACTED."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            # None/empty says "no secret configured", which is useful and reveals nothing.
            if _is_secret_key(k) and v not in (None, ""):
                out[k] = REDACTED
            else:
                out[k] = _redact(v)
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    if isinstance(value, str) and "@" in value:
        return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
    return value


class StorageOptions:
    """fsspec storage options (e.g. s3fs key/secret/token/client_kwargs/endpoint_url/profile) that
    never reveal secrets: __repr__/__str__ redact secret-looking values; picklable (Ray ships it to
    workers); .to_fsspec() -> dict for fsspec; .redacted() -> dict safe to log or write to _SUCCESS.

    Keys considered secret: key, secret, token, password, aws_access_key_id, aws_secret_access_key,
    aws_session_token, and any key containing 'secret', 'token', 'password' or 'key' (case-insens.),
    recursively inside nested dicts such as client_kwargs. Endpoint URLs are not secret (a
    password embedded in a URL as ``scheme://user:password@host`` is redacted, though).

    Pickling keeps the real values: workers need them to authenticate. Anything that must be
    shown to a person goes through `redacted()` or `repr()`.
    """

    __slots__ = ("_options",)

    def __init__(self, options: dict | None = None):
        if isinstance(options, StorageOptions):
            options = options._options
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(f"storage options must be a dict, got {type(options).__name__}")
        # Deep copy: callers may mutate their dict later, and nested client_kwargs must not
        # be shared with fsspec, which stores what it is given.
        self._options: dict = copy.deepcopy(dict(options))

    def with_driver_environment(self, uris: list[str]) -> StorageOptions:
        """Fold the driver's S3 settings from the environment into the options.

        Workers of an existing cluster (``ray job submit``, RAY_ADDRESS) run with their
        node's environment, not the driver's: key, secret, session token, endpoint and
        region that the driver has only as AWS_* variables would not reach them. They
        travel instead inside these options (pickled into task arguments, never printed,
        never put in a runtime_env that Ray displays). Explicit options win; profiles and
        instance roles are resolved by each node itself and are left alone.
        """
        if not any(_protocol(u) in _S3_PROTOCOLS for u in uris if u):
            return self
        options = self.to_fsspec()
        env = os.environ
        explicit_key = any(k in options for k in ("key", "secret", "token", "profile", "anon"))
        if not explicit_key and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            options["key"] = env["AWS_ACCESS_KEY_ID"]
            options["secret"] = env["AWS_SECRET_ACCESS_KEY"]
            if env.get("AWS_SESSION_TOKEN"):
                options["token"] = env["AWS_SESSION_TOKEN"]
        client_kwargs = dict(options.get("client_kwargs") or {})
        endpoint = _env_s3_endpoint()
        if endpoint and not options.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
            client_kwargs["endpoint_url"] = endpoint
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region and not client_kwargs.get("region_name"):
            client_kwargs["region_name"] = region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return StorageOptions(options)

    def to_fsspec(self) -> dict:
        """The real options (secrets included) as a fresh dict for fsspec constructors."""
        return copy.deepcopy(self._options)

    def redacted(self) -> dict:
        """The options with secret-looking values replaced by '<redacted>': safe to log."""
        return _redact(self._options)

    def __bool__(self) -> bool:
        return bool(self._options)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StorageOptions):
            return self._options == other._options
        return NotImplemented

    def __hash__(self) -> int:
        # Hash of the canonical JSON; fine for the small dicts options are.
        return hash(json.dumps(self._options, sort_keys=True, default=repr))

    def __repr__(self) -> str:
        return f"StorageOptions({self.redacted()!r})"

    __str__ = __repr__

    # Explicit pickle protocol: __slots__ classes pickle by default too, but spelling it out
    # keeps the format independent of the attribute layout.
    def __getstate__(self) -> dict:
        return {"options": self._options}

    def __setstate__(self, state: dict) -> None:
        self._options = state["options"]


def _coerce(storage: StorageOptions | Mapping | None) -> StorageOptions:
    # Callers (model loading, tests) may pass None or a plain dict.
    if isinstance(storage, StorageOptions):
        return storage
    return StorageOptions(dict(storage) if storage else None)


def _protocol(uri: str) -> str:
    return fsspec.utils.get_protocol(uri)


def _is_local(uri: str) -> bool:
    return _protocol(uri) in _LOCAL_PROTOCOLS


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether an fsspec filesystem is the local disk (its protocol is ``file`` or ``local``)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in _LOCAL_PROTOCOLS for p in protocols)


def _local_path(uri: str) -> str:
    """A local path for a plain path or a file:// URI."""
    if _protocol(uri) in _LOCAL_PROTOCOLS and "://" in uri:
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem._strip_protocol(uri)
    return os.path.expanduser(uri)


def _env_s3_endpoint() -> str | None:
    # Same precedence as botocore: the service-specific variable wins, and the opt-out
    # variable disables both.
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true":
        return None
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def url_to_fs(uri: str, storage: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for `uri` built with the storage options.

    For ``s3://`` with no explicit endpoint (neither ``endpoint_url`` nor
    ``client_kwargs.endpoint_url``), ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` from the
    environment become ``client_kwargs.endpoint_url``: recent botocore reads them itself, older
    releases do not, and putting the endpoint in the options also makes fsspec's instance
    cache tell apart filesystems for different endpoints. Local paths and ``file://`` URIs
    get a LocalFileSystem without the (remote) options.
    """
    storage = _coerce(storage)
    protocol = _protocol(uri)
    if protocol in _LOCAL_PROTOCOLS:
        # s3 credentials mean nothing to the local filesystem; keeping them out also keeps
        # them out of its instance-cache token.
        return fsspec.core.url_to_fs(uri)
    options = storage.to_fsspec()
    if protocol in _S3_PROTOCOLS:
        client_kwargs = options.get("client_kwargs") or {}
        if not options.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
            endpoint = _env_s3_endpoint()
            if endpoint:
                options["client_kwargs"] = {**client_kwargs, "endpoint_url": endpoint}
    return fsspec.core.url_to_fs(uri, **options)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI or local path: ``join("s3://b/p", "x") == "s3://b/p/x"``.

    Parts are relative: leading and trailing slashes of each part are dropped, so a part
    never replaces the base (unlike ``os.path.join``). Empty parts are skipped.
    """
    if "://" in base:
        scheme, rest = base.split("://", 1)
        # file:///abs keeps its root slash; bucket URIs have none.
        lead = "/" if rest.startswith("/") else ""
        out = rest.strip("/")
        for part in parts:
            part = part.strip("/")
            if part:
                out = f"{out}/{part}" if out else part
        return f"{scheme}://{lead}{out}"
    out = base
    for part in parts:
        part = part.strip("/")
        if part:
            out = posixpath.join(out, part) if out else part
    return out


@contextlib.contextmanager
def open_input(uri: str, storage: StorageOptions, *, whole_object_max_bytes: int = 64 * 2**20,
               block_size: int = 8 * 2**20, size: int | None = None) -> Iterator[Any]:
    """Context manager yielding a seekable binary file-like for PyAV. Objects up to whole_object_max_bytes
    are fetched in ONE request into memory (io.BytesIO) — one GET for small videos; larger ones are opened
    with ranged reads and a read-ahead cache (fs.open(path, 'rb', block_size=block_size, cache_type='readahead'))
    so memory stays bounded for multi-GB files. Local files are opened directly (no copy).

    `size` is the object's size when the caller already knows it (from the listing); it
    saves the HEAD request that would otherwise decide between the two paths.
    """
    if _is_local(uri):
        with open(_local_path(uri), "rb") as f:
            yield f
        return
    fs, path = url_to_fs(uri, storage)
    if size is None:
        size = fs.size(path)  # one HEAD; listings normally pass the size and skip it
    if size is not None and size <= whole_object_max_bytes:
        if size == 0:
            # Nothing to fetch (and S3 answers a ranged GET of an empty object with 416).
            data = b""
        else:
            # One ranged GET from 0: unlike a plain cat_file, s3fs does no HEAD first and no
            # concurrent split. The range is capped, so an object that grew since it was
            # listed cannot balloon memory: it is detected by its length and read ranged.
            data = fs.cat_file(path, start=0, end=whole_object_max_bytes + 1)
        if len(data) <= whole_object_max_bytes:
            buf = io.BytesIO(data)
            try:
                yield buf
            finally:
                buf.close()
            return
        del data
        # Stale listing size: let the file find the real one, past s3fs's listing cache.
        size = None
        fs.invalidate_cache(path)
    # Large object: ranged reads of block_size through a read-ahead cache; memory is about
    # one block however large the file is.
    open_kwargs: dict[str, Any] = {}
    if _protocol(uri) not in _S3_PROTOCOLS:
        open_kwargs["size"] = size  # saves the file's own metadata request
    # s3fs is the exception: its ranged reads fetch the object's details (one HEAD) even
    # when the size is given, and only without a size does it pin every range to that ETag
    # (If-Match). Leaving the size out costs no extra request and turns an object replaced
    # mid-read into a clean error (s3fs FileExpired) instead of bytes of two versions.
    f = fs.open(path, "rb", block_size=block_size, cache_type="readahead", **open_kwargs)
    try:
        yield f
    finally:
        f.close()


# --------------------------------------------------------------------------------------
# Checkpoint download


def default_cache_root() -> str:
    """Where remote checkpoints are cached when no cache root is given: per user, per node.

    ``$VMAE_RAY_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/vmae-ray`` or ``~/.cache/vmae-ray``
    (``checkpoints`` below it).
    """
    root = os.environ.get("VMAE_RAY_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "vmae-ray")
    return os.path.join(root, "checkpoints")


def _object_version(info: Mapping) -> str | None:
    # Whatever the backend offers as a content version; ETag on S3.
    for name in ("ETag", "etag", "generation", "md5Hash", "VersionId", "mtime", "LastModified",
                 "last_modified", "created"):
        if info.get(name) is not None:
            return str(info[name]).strip('"')
    return None


def _list_remote_dir(fs: fsspec.AbstractFileSystem, root: str, uri: str) -> list[tuple[str, str, dict]]:
    """(relative posix path, remote path, info) of every file below `root`, sorted."""
    # s3fs keeps listings in the instance (fsspec reuses instances across calls): without
    # this, a checkpoint replaced since the last listing would hash to the old cache entry.
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    root_s = root.rstrip("/")
    files = []
    for rpath, info in sorted(found.items()):
        if info.get("type") == "directory" or rpath.endswith("/"):
            continue  # directory placeholder objects ("prefix/")
        if rpath.rstrip("/") == root_s:
            raise NotADirectoryError(f"{uri} is a file; expected a directory (checkpoint prefix)")
        if not rpath.startswith(root_s + "/"):
            continue
        rel = rpath[len(root_s) + 1:]
        parts = rel.split("/")
        # Object keys may contain "..": never let one write outside the cache directory.
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{uri}: refusing to download object with unsafe key {rel!r}")
        files.append((rel, rpath, info))
    if not files:
        raise FileNotFoundError(f"{uri}: no files found (expected a checkpoint directory)")
    return files


def _cache_key(uri: str, files: list[tuple[str, str, dict]]) -> str:
    h = hashlib.sha256()
    h.update(uri.rstrip("/").encode("utf-8"))
    for rel, _, info in files:
        h.update(b"\0" + json.dumps([rel, info.get("size"), _object_version(info)]).encode("utf-8"))
    return h.hexdigest()[:24]


def download_dir(uri: str, storage: StorageOptions, cache_root: str) -> str:
    """Copy a remote directory (e.g. an s3:// checkpoint prefix) to a local cache once per node and return the
    local path. Cache key = hash of the URI (+ the listing's ETags/sizes so a changed checkpoint is re-downloaded).
    Safe when several processes (Ray actors on one node) call it at once: a filelock.FileLock serialises them; the
    download goes to a temp dir then os.replace()/rename into place, so a reader never sees a half-downloaded
    checkpoint; later callers find it and return immediately without downloading. Local paths are returned as-is.

    Every call lists the prefix (one LIST request) to compute the key; only the first call
    for a given content downloads. `cache_root` None means `default_cache_root()`. Older
    cache entries of a changed checkpoint are left in place (another actor may still use
    them). The cache root must be on a local disk: file locks are unreliable on NFS.
    """
    if _is_local(uri):
        return _local_path(uri)
    from filelock import FileLock  # lazy: only remote checkpoints need it

    storage = _coerce(storage)
    fs, root = url_to_fs(uri, storage)
    files = _list_remote_dir(fs, root, uri)
    key = _cache_key(uri, files)
    # A readable name helps whoever looks into the cache; the hash makes it unique.
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", posixpath.basename(root.rstrip("/")) or "checkpoint")[:64]
    cache_root = os.path.abspath(os.path.expanduser(cache_root or default_cache_root()))
    os.makedirs(cache_root, exist_ok=True)
    final = os.path.join(cache_root, f"{label}-{key}")
    if os.path.isdir(final):
        return final  # complete by construction: only a finished download is renamed here
    with FileLock(final + ".lock"):
        if os.path.isdir(final):
            return final  # another process finished it while we waited
        # Temp dirs of this key left by a killed process: we hold the lock, so nobody is
        # writing them now.
        for stale in _glob_prefix(cache_root, os.path.basename(final) + ".tmp-"):
            shutil.rmtree(stale, ignore_errors=True)
        # Same directory as the target, so the final rename stays on one filesystem (atomic).
        tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=cache_root)
        try:
            lpaths = [os.path.join(tmp, *rel.split("/")) for rel, _, _ in files]
            for lp in lpaths:
                os.makedirs(os.path.dirname(lp), exist_ok=True)
            # One call with explicit lists: async filesystems (s3fs, gcsfs) fetch concurrently.
            fs.get([rpath for _, rpath, _ in files], lpaths)
            for (rel, _, info), lp in zip(files, lpaths):
                expected = info.get("size")
                if expected is not None and os.path.getsize(lp) != expected:
                    raise OSError(errno.EIO, f"{uri}: downloaded {rel} has {os.path.getsize(lp)} bytes, "
                                             f"expected {expected}")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _glob_prefix(folder: str, prefix: str) -> list[str]:
    try:
        return [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(prefix)]
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------------------
# Error classification

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound", "404"})
_ACCESS_CODES = frozenset({
    "AccessDenied", "Forbidden", "403", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId",
    "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "NotSignedUp",
    "401", "Unauthorized",
})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "ServiceUnavailableException",
    "InternalServerError", "OperationAborted", "429", "500", "502", "503", "504",
})
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in
    ("EBUSY", "EAGAIN", "ETIMEDOUT", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "EPIPE",
     "ENETUNREACH", "ENETDOWN", "EHOSTUNREACH", "EREMOTEIO")
    if hasattr(errno, name)
)
# Exception class names (anywhere in the MRO) of network failures in botocore, urllib3,
# aiohttp, requests and google-auth; matched by name so this module imports none of them.
_TRANSIENT_CLASS_MARKERS = (
    "Timeout", "ConnectionError", "ConnectionClosed", "ServerDisconnected", "ClientPayloadError",
    "ResponseStreamingError", "IncompleteRead", "ProtocolError", "ChunkedEncodingError",
    "ClientOSError", "ServerTimeout", "TransportError",
)


# botocore's errors for credentials it cannot find or use (matched by name, as above): they
# are access problems, raised before any request is made.
_CREDENTIALS_CLASS_MARKERS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                              "NoAuthTokenError", "UnauthorizedSSOTokenError", "TokenRetrievalError",
                              "ProfileNotFound", "SSOTokenLoadError", "InvalidConfigError")


def _from_response(exc: BaseException) -> str | None:
    """botocore ClientError (``.response``) or an HTTP error with a numeric status."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        code = str((response.get("Error") or {}).get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in _NOT_FOUND_CODES:
            return "not_found"
        if code in _ACCESS_CODES:
            return "access_denied"
        if code in _TRANSIENT_CODES:
            return "transient"
        kind = _from_status(status)
        if kind:
            return kind
    for attr in ("status", "status_code", "code"):
        kind = _from_status(getattr(exc, attr, None))
        if kind:
            return kind
    return None


def _from_status(status: Any) -> str | None:
    # Only integers in the HTTP error range: `.code` means other things on other exceptions.
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        return None
    if status == 404:
        return "not_found"
    if status in (401, 403):
        return "access_denied"
    if status in (408, 429) or status >= 500:
        return "transient"
    return None


def _classify_one(exc: BaseException) -> str | None:
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, PermissionError):
        return "access_denied"
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return "transient"
    kind = _from_response(exc)
    if kind:
        return kind
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno == errno.ENOENT:
            return "not_found"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "access_denied"
        if exc.errno in _TRANSIENT_ERRNOS:
            return "transient"
    names = [cls.__name__ for cls in type(exc).__mro__]
    if any(name in _CREDENTIALS_CLASS_MARKERS for name in names):
        return "access_denied"
    if any(marker in name for name in names for marker in _TRANSIENT_CLASS_MARKERS):
        return "transient"
    text = str(exc)
    # Some layers flatten the S3 error into text (e.g. s3fs's generic OSError for codes it
    # does not map); the code names are distinctive enough to match.
    if "NoSuchKey" in text or "NoSuchBucket" in text:
        return "not_found"
    if "AccessDenied" in text:
        return "access_denied"
    if "SlowDown" in text or "Throttl" in text:
        return "transient"
    return None


def classify_storage_error(exc: BaseException) -> str | None:
    """Map an I/O exception to a stable error_type: FileNotFoundError/NoSuchKey -> 'not_found';
    PermissionError / AccessDenied / 403 -> 'access_denied'; throttling/5xx/connection reset/timeout ->
    'transient'; otherwise None.

    The exception's cause chain is followed (s3fs and PyAV wrap the original error), so the
    first classifiable error from the outside in decides.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        kind = _classify_one(current)
        if kind:
            return kind
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return None


# --------------------------------------------------------------------------------------
# Where credentials could come from, for access-denied messages

_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Ray sets this in the driver of every `ray job submit` job (ray._private.runtime_env.constants).
RAY_JOB_ENV_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# botocore's Credentials.method -> where that is, in words.
_BOTOCORE_METHODS = {
    "env": "AWS_* environment variables",
    "shared-credentials-file": "the shared credentials file (~/.aws/credentials)",
    "config-file": "the AWS config file (~/.aws/config)",
    "iam-role": "the instance profile (this node's IAM role, from instance metadata)",
    "container-role": "the container's role (ECS/EKS credentials endpoint)",
    "assume-role": "an assume-role profile",
    "assume-role-with-web-identity": "a web identity token (EKS service account)",
    "sso": "AWS IAM Identity Center (SSO)",
    "custom-process": "a credential_process",
    "boto-config": "a boto2 config file",
}


def in_ray_job() -> bool:
    """Whether this process is the driver of a `ray job submit` job (its environment is the
    cluster's, not the submitting shell's)."""
    return RAY_JOB_ENV_VARIABLE in os.environ


def credential_sources(storage: StorageOptions | Mapping | None = None) -> str:
    """Which S3 credential sources this process has, in words for an error message: the AWS_*
    variables (set or unset), AWS_PROFILE, what the storage options hold (``None``: not known
    here), and what botocore's own credential chain finds (environment, profile files,
    container and instance-profile credentials). Names only: never a key, secret or token.

    botocore's answer is cached per process for the same AWS_* environment: a failing run asks
    once, not once per input (the instance-metadata lookup can take a second).
    """
    env = os.environ
    seen = [f"{name} {'set' if env.get(name) else 'unset'}" for name in _CREDENTIAL_VARIABLES]
    seen.append(f"AWS_PROFILE={env['AWS_PROFILE']}" if env.get("AWS_PROFILE") else "AWS_PROFILE unset")
    profile = None
    if storage is not None:
        options = _coerce(storage).to_fsspec()
        profile = options.get("profile") or None
        if options.get("anon"):
            seen.append("anon in the storage options (unsigned requests)")
        elif options.get("key") or options.get("secret"):
            from_env = bool(env.get("AWS_ACCESS_KEY_ID")) and options.get("key") == env.get("AWS_ACCESS_KEY_ID")
            seen.append("key/secret in the storage options (" + ("this driver's AWS_* variables)" if from_env else
                        "from --storage-options or $VMAE_RAY_STORAGE_OPTIONS)"))
        elif profile:
            seen.append(f"profile {profile!r} in the storage options")
        else:
            seen.append("no key in --storage-options or $VMAE_RAY_STORAGE_OPTIONS")
    aws = tuple(sorted((k, v) for k, v in env.items() if k.startswith("AWS_")))
    seen.append(_botocore_finds(profile, aws))
    where = f"host {socket.gethostname()}, pid {os.getpid()}" + (", a `ray job submit` job" if in_ray_job() else "")
    return f"seen on this process ({where}): " + ", ".join(seen)


@functools.lru_cache(maxsize=16)
def _botocore_finds(profile: str | None, aws_environment: tuple) -> str:
    """botocore's credential chain, as s3fs would run it here (``aws_environment`` keys the cache)."""
    try:
        import botocore.session
    except ImportError:
        return "botocore not installed"
    try:
        credentials = botocore.session.Session(profile=profile).get_credentials()
    except Exception as exc:  # noqa: BLE001 - a missing profile, a broken config file: that is the answer
        return f"botocore's credential chain fails ({type(exc).__name__})"
    if credentials is None:
        return "botocore finds no credentials (no AWS_* keys, profile files, container or instance-profile credentials)"
    method = getattr(credentials, "method", None) or "an unnamed provider"
    return f"botocore finds credentials in {_BOTOCORE_METHODS.get(method, method)}"
