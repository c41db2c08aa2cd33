"""List step: turn ``--input`` into one row per video, in Ray tasks.

``--input`` is a directory or prefix (every file with a video extension below it), a glob
(every match, whatever its extension: the user named them), a single file, a manifest
(``.parquet``, ``.csv``, ``.jsonl``/``.json``) with a ``uri`` column (or S3 Inventory's
``Bucket`` and ``Key``), or an S3 Inventory report's ``manifest.json``.

The driver only plans (`plan_listing`): it checks that the input exists, reads a manifest's
schema, and splits the work into `ListingPart`s; the parts are listed in Ray tasks
(`list_part`), so no input passes through the driver:
- an S3 prefix is split into key ranges (`plan_key_ranges`): a range whose first page of
  keys is full is split again by the next character, so a flat prefix of 100M keys becomes
  hundreds of ranges listed in parallel (`ListObjectsV2` with ``StartAfter``; s3fs's listing
  cache, which would hold every entry, is not used);
- a local or other fsspec directory is split by its sub-directories (one part each) plus one
  part for the files at its top level;
- a manifest is read by one task per file (per row group range for Parquet).

A name that exists is that file (or directory), whatever characters it holds (``[ ] * ?``
included); only a name that does not exist is read as a glob. Manifest URIs are always taken
as they are, never as globs; relative local paths in a manifest are resolved against the
driver's working directory (where the command was typed), given to the tasks as ``base_dir``.

Each row carries the input's identity for incremental runs: size and version (ETag on S3,
mtime locally) from the listing, or from a manifest's ``size``/``etag``/``last_modified``
columns (S3 Inventory's ``Size``, ``ETag``, ``LastModifiedDate`` too). A manifest that has
neither a version nor a modification time gets them from one metadata request per input,
made in Ray tasks (`stat_rows`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vmae_ray.schema import RESERVED_COLUMNS
from vmae_ray.storage import StorageOptions, url_to_fs

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json", ".ndjson")
VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".flv", ".wmv", ".3gp", ".ogv", ".mxf", ".gif",
    # Raw elementary streams (camera, drone and broadcast dumps): no container, no clock.
    ".h264", ".264", ".hevc", ".265",
)
_GLOB_CHARS = set("*?[")

# Listing rows: the input's identity, its place in the listing (``order``: the first of two
# rows naming one video wins), and why a row could not be read (``listing_error``).
LISTING_FIELDS = (
    pa.field("video_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("size_bytes", pa.int64()),
    pa.field("version", pa.string()),
    pa.field("input_fingerprint", pa.string()),
    pa.field("order", pa.int64()),
    pa.field("listing_error", pa.string()),
)
LISTING_NAMES = tuple(f.name for f in LISTING_FIELDS)

# Manifest columns that say what an input is rather than pass through (lower-case names).
_URI_NAMES = ("uri",)
_ID_NAMES = ("video_id",)
_SIZE_NAMES = ("size", "size_bytes")
_ETAG_NAMES = ("etag", "e_tag")
_MODIFIED_NAMES = ("last_modified", "lastmodifieddate", "last_modified_date")
_BUCKET_NAMES = ("bucket",)
_KEY_NAMES = ("key",)
# S3 Inventory's other fields: consumed (never passed through) in an inventory report.
_INVENTORY_NAMES = ("versionid", "version_id", "islatest", "is_latest", "isdeletemarker", "is_delete_marker",
                    "storageclass", "storage_class", "ismultipartuploaded", "is_multipart_uploaded",
                    "replicationstatus", "replication_status", "encryptionstatus", "encryption_status",
                    "objectlockretainuntildate", "objectlockmode", "objectlocklegalholdstatus",
                    "intelligenttieringaccesstier", "bucketkeystatus", "checksumalgorithm", "objectaccesscontrollist",
                    "objectowner")

# S3 key-range planning: a range whose first page holds this many keys is split again.
S3_PAGE_KEYS = 1000
MAX_KEY_RANGES = 1024
MAX_SPLIT_DEPTH = 3
# The characters a key range is split at, in UTF-8 byte order (S3 lists keys in that order).
SPLIT_CHARS = "-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
# Metadata requests (`stat_rows`) in flight per task: they wait on the network.
STAT_THREADS = 32


def video_id_for_uri(uri: str) -> str:
    """A stable id derived from the URI alone, so reruns and other runs agree on it."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:24]


def input_fingerprint(uri: str, size_bytes: int | None, version: str | None) -> str:
    """Identity of the input's content as far as listing can tell (URI, size, version)."""
    raw = f"{uri}\0{size_bytes}\0{version}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def uri_spellings(text: str) -> list[str]:
    """The ways ``text`` may be spelled as a ``uri`` in the tables: as given; for a local path
    also as the absolute path (relative paths from the current folder) and as a ``file://``
    URI; for a ``file://`` URI also as the plain path."""
    if text.startswith("file://"):
        return [text, text[len("file://"):]]
    if "://" in text:
        return [text]
    absolute = os.path.abspath(text)
    return list(dict.fromkeys([text, absolute, "file://" + absolute]))


def resolve_uri(uri: str, base_dir: str) -> str:
    """A local relative path made absolute against ``base_dir``; URIs and absolute paths as they are."""
    if "://" in uri or os.path.isabs(uri) or uri.startswith("~"):
        return os.path.expanduser(uri) if uri.startswith("~") else uri
    return os.path.normpath(os.path.join(base_dir, uri))


def _full_uri(path: str, original: str) -> str:
    """A listed path back as a URI of the same scheme as the input (plain paths stay plain)."""
    if "://" not in original:
        return path
    scheme = original.split("://", 1)[0] + "://"
    return path if path.startswith(scheme) else scheme + (path if scheme == "file://" else path.lstrip("/"))


def _version_of(info: dict) -> str | None:
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class ManifestFormat:
    """How to read a manifest's files: their format, the columns that say what an input is
    (actual names), the passthrough columns, and an explicit schema so every task agrees."""

    kind: str  # "parquet" | "csv" | "json"
    schema: pa.Schema  # of the file as read (CSV/JSON: explicit types)
    uri_column: str | None
    id_column: str | None
    size_column: str | None
    etag_column: str | None
    modified_column: str | None
    bucket_column: str | None
    key_column: str | None
    passthrough: tuple[str, ...]
    header: bool = True  # CSV: a header row (an S3 Inventory CSV has none)
    compression: str | None = None  # "gzip" for S3 Inventory CSV files
    inventory: bool = False  # an S3 Inventory report: skip delete markers and old versions
    url_encoded_keys: bool = False  # S3 Inventory CSV keys are URL-encoded


@dataclass(frozen=True)
class ListingPart:
    """One listing task's work.

    ``kind``: ``manifest`` (a manifest file, or ``row_groups`` of a Parquet one), ``keys`` (S3
    keys of ``uri``'s prefix in (``start_after``, ``end_at``]), ``tree`` (every file below a
    folder), ``top`` (the files directly in a folder), ``glob`` or ``file``.
    """

    kind: str
    uri: str
    index: int = 0  # orders parts: a manifest row's order is (index, row)
    start_after: str | None = None
    end_at: str | None = None
    row_groups: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ListingPlan:
    """What `list_part` tasks need, planned on the driver by `plan_listing`."""

    uri: str
    kind: str  # "manifest" | "inventory" | "directory" | "glob" | "file"
    parts: tuple[ListingPart, ...]
    extensions: tuple[str, ...]
    base_dir: str
    manifest: ManifestFormat | None = None
    passthrough_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))

    @property
    def needs_stat(self) -> bool:
        """Whether rows lack a version (a manifest with no ETag nor modification time)."""
        m = self.manifest
        return m is not None and m.etag_column is None and m.modified_column is None

    @property
    def listing_schema(self) -> pa.Schema:
        return pa.schema(list(LISTING_FIELDS) + list(self.passthrough_schema))


def plan_listing(uri: str, storage: StorageOptions, *, extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
                 base_dir: str | None = None) -> ListingPlan:
    """Plan the listing of ``uri`` on the driver: cheap checks and splitting, no input held.

    Raises FileNotFoundError or ValueError (with a message for the user) when the input does
    not exist, a manifest lacks a ``uri`` column or clashes with output columns, or a glob
    matches nothing.
    """
    base_dir = base_dir or os.getcwd()
    fs, path = url_to_fs(uri, storage)
    if posixpath.basename(path.rstrip("/")) == "manifest.json" and _is_inventory_manifest(fs, path):
        return _plan_inventory(uri, fs, path, storage, extensions, base_dir)
    if is_manifest(uri):
        return _plan_manifest(uri, fs, path, extensions, base_dir)
    info = _info_or_none(fs, path) if _GLOB_CHARS & set(path) else None
    if info is not None and info.get("type", "file") == "file":
        return ListingPlan(uri, "file", (ListingPart("file", uri),), extensions, base_dir)
    if _GLOB_CHARS & set(path) and info is None:
        return ListingPlan(uri, "glob", (ListingPart("glob", uri),), extensions, base_dir)
    if fs.isdir(path):
        if _is_s3(fs):
            parts = plan_key_ranges(fs, uri, path)
        else:
            parts = _plan_folders(fs, uri, path)
        return ListingPlan(uri, "directory", tuple(parts), extensions, base_dir)
    if fs.exists(path):
        return ListingPlan(uri, "file", (ListingPart("file", uri),), extensions, base_dir)
    raise FileNotFoundError(f"{uri!r} does not exist")


def _is_s3(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in ("s3", "s3a") for p in protocols)


def _plan_folders(fs, uri: str, path: str) -> list[ListingPart]:
    """A part per sub-folder of ``path`` plus one for its top-level files (only folder names
    are held here: a flat folder of a million files costs the driver nothing)."""
    from vmae_ray.storage import is_local_fs

    if is_local_fs(fs):
        with os.scandir(path) as entries:
            folders = sorted(posixpath.join(path, e.name) for e in entries if e.is_dir())
    else:
        folders = sorted(child["name"] for child in fs.ls(path, detail=True)
                         if child.get("type") == "directory" and child["name"].rstrip("/") != path.rstrip("/"))
    parts = [ListingPart("top", uri)]
    for folder in folders:
        parts.append(ListingPart("tree", _full_uri(folder, uri), index=len(parts)))
    return parts


def _s3_bucket_prefix(path: str) -> tuple[str, str]:
    bucket, _, prefix = path.partition("/")
    return bucket, prefix


def _list_page(fs, bucket: str, prefix: str, start_after: str | None, max_keys: int,
               token: str | None = None) -> dict:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": max_keys}
    if token:
        kwargs["ContinuationToken"] = token
    elif start_after:
        kwargs["StartAfter"] = start_after
    return fs.call_s3("list_objects_v2", **kwargs)


def plan_key_ranges(fs, uri: str, path: str, *, page_keys: int | None = None,
                    max_ranges: int | None = None) -> list[ListingPart]:
    """Split an S3 prefix into key ranges (``start_after``, ``end_at``] that tasks list apart.

    A range is probed with one LIST request of ``page_keys``; one whose page is full is split
    at the next key character (`SPLIT_CHARS`), up to `MAX_SPLIT_DEPTH` characters and
    ``max_ranges`` ranges. Ranges cover the whole key space, so no key is missed whatever its
    characters. The probes run on the driver, a few at a time; they return counts, not keys.
    """
    page_keys = page_keys or S3_PAGE_KEYS
    max_ranges = max_ranges or MAX_KEY_RANGES
    bucket, prefix = _s3_bucket_prefix(path.rstrip("/") + "/")

    def full(rng: tuple[str | None, str | None]) -> bool:
        start, end = rng
        page = _list_page(fs, bucket, prefix, start, page_keys)
        keys = [c["Key"] for c in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return False
        return end is None or (bool(keys) and keys[-1].encode() <= end.encode())

    # (start_after, end_at, stem): the keys of a range start with its stem, which it is split
    # at (stem + each of SPLIT_CHARS); None for a range that is not split further.
    ranges: list[tuple[str | None, str | None, str | None]] = [(None, None, prefix)]
    for _ in range(MAX_SPLIT_DEPTH):
        with ThreadPoolExecutor(16) as pool:
            verdicts = list(pool.map(lambda r: r[2] is not None and full((r[0], r[1])), ranges))
        if not any(verdicts):
            break
        out: list[tuple[str | None, str | None, str | None]] = []
        for k, ((start, end, stem), big) in enumerate(zip(ranges, verdicts)):
            if not big or len(out) + (len(ranges) - k) + len(SPLIT_CHARS) > max_ranges:
                out.append((start, end, stem))
                continue
            bounds = [stem + c for c in SPLIT_CHARS]
            edges = [start, *bounds, end]
            # (start, stem + c0] holds keys of stem followed by rarer characters: not split again.
            out += [(edges[i], edges[i + 1], bounds[i - 1] if i > 0 else None) for i in range(len(edges) - 1)]
        ranges = out
    return [ListingPart("keys", uri, index=i, start_after=s, end_at=e) for i, (s, e, _) in enumerate(ranges)]


def _is_inventory_manifest(fs, path: str) -> bool:
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read(4 * 2**20).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "fileFormat" in data and "files" in data


def _columns_by_role(names: list[str], *, inventory: bool) -> dict[str, str | None]:
    lower = {n.lower(): n for n in names}

    def pick(candidates: tuple[str, ...]) -> str | None:
        return next((lower[c] for c in candidates if c in lower), None)

    roles = {"uri": pick(_URI_NAMES), "id": pick(_ID_NAMES), "size": pick(_SIZE_NAMES), "etag": pick(_ETAG_NAMES),
             "modified": pick(_MODIFIED_NAMES), "bucket": pick(_BUCKET_NAMES), "key": pick(_KEY_NAMES)}
    if roles["uri"] is None and not (roles["bucket"] and roles["key"]):
        roles["bucket"] = roles["key"] = None
    return roles


def _manifest_format(kind: str, schema: pa.Schema, what: str, *, header: bool = True, compression: str | None = None,
                     inventory: bool = False, url_encoded_keys: bool = False) -> ManifestFormat:
    names = schema.names
    roles = _columns_by_role(names, inventory=inventory)
    if roles["uri"] is None and roles["key"] is None:
        raise ValueError(f"{what} has no 'uri' column (nor S3 Inventory's Bucket and Key; columns: {', '.join(names)})")
    consumed = {v for v in roles.values() if v}
    if inventory or roles["key"]:
        consumed |= {n for n in names if n.lower() in _INVENTORY_NAMES}
    passthrough = tuple(n for n in names if n not in consumed) if not inventory else ()
    clashes = [c for c in passthrough if c in RESERVED_COLUMNS]
    if clashes:
        raise ValueError(f"{what} columns {clashes} clash with output columns; rename them to pass them through")
    return ManifestFormat(kind, schema, roles["uri"], roles["id"], roles["size"], roles["etag"], roles["modified"],
                          roles["bucket"], roles["key"], passthrough, header=header, compression=compression,
                          inventory=inventory, url_encoded_keys=url_encoded_keys)


def _plan_manifest(uri: str, fs, path: str, extensions, base_dir: str) -> ListingPlan:
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest {uri!r} does not exist")
    lower = uri.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            try:
                meta = pq.ParquetFile(f).metadata
            except pa.ArrowInvalid as exc:
                raise ValueError(f"manifest {uri!r} does not parse: {exc}") from exc
            schema = meta.schema.to_arrow_schema()
            groups = meta.num_row_groups
        fmt = _manifest_format("parquet", schema, f"manifest {uri!r}")
        # Row groups in runs of about a million rows: one task each.
        parts, run, rows = [], [], 0
        for g in range(groups):
            run.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= 1_000_000:
                parts.append(ListingPart("manifest", uri, index=len(parts), row_groups=tuple(run)))
                run, rows = [], 0
        if run or not parts:
            parts.append(ListingPart("manifest", uri, index=len(parts), row_groups=tuple(run)))
    else:
        kind = "csv" if lower.endswith(".csv") else "json"
        schema = _sniff_schema(fs, path, kind, f"manifest {uri!r}")
        fmt = _manifest_format(kind, schema, f"manifest {uri!r}")
        parts = [ListingPart("manifest", uri)]
    passthrough = pa.schema([fmt.schema.field(n) for n in fmt.passthrough])
    return ListingPlan(uri, "manifest", tuple(parts), extensions, base_dir, fmt, passthrough)


def _sniff_schema(fs, path: str, kind: str, what: str) -> pa.Schema:
    """The column types of a CSV/JSON Lines file, from its first MiB (given to every task, so
    all read the same types; a later value that does not fit fails that part as a listing error)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    with fs.open(path, "rb") as f:
        head = f.read(2**20)
        more = bool(f.read(1))
    if more and b"\n" in head:
        head = head[: head.rindex(b"\n") + 1]  # whole lines only
    try:
        if kind == "csv":
            table = pacsv.read_csv(io.BytesIO(head))
        else:
            table = pajson.read_json(io.BytesIO(head))
    except pa.ArrowInvalid as exc:
        raise ValueError(f"{what} does not parse: {exc}") from exc
    # Identity columns as strings where they could read as numbers (ETags, ids, keys).
    fields = []
    for f in table.schema:
        if f.name.lower() in _ETAG_NAMES + _ID_NAMES + _URI_NAMES + _KEY_NAMES + _BUCKET_NAMES + _MODIFIED_NAMES:
            f = f.with_type(pa.string())
        elif pa.types.is_null(f.type):
            f = f.with_type(pa.string())
        fields.append(f)
    return pa.schema(fields)


def _plan_inventory(uri: str, fs, path: str, storage: StorageOptions, extensions, base_dir: str) -> ListingPlan:
    """An S3 Inventory report: its manifest.json names the data files (CSV, gzip, no header, the
    columns of ``fileSchema``; or Parquet/ORC with their own names) in the destination bucket."""
    with fs.open(path, "rb") as f:
        report = json.loads(f.read().decode("utf-8"))
    file_format = str(report.get("fileFormat", "")).upper()
    destination = str(report.get("destinationBucket", "")).split(":::")[-1]
    if not destination:
        raise ValueError(f"S3 Inventory manifest {uri!r} names no destinationBucket")
    files = [f"s3://{destination}/{entry['key']}" for entry in report.get("files", [])]
    if not files:
        raise ValueError(f"S3 Inventory manifest {uri!r} lists no data files")
    if file_format == "CSV":
        names = [n.strip() for n in str(report.get("fileSchema", "")).split(",") if n.strip()]
        schema = pa.schema([pa.field(n, pa.string()) for n in names])
        fmt = _manifest_format("csv", schema, f"S3 Inventory manifest {uri!r}", header=False, compression="gzip",
                               inventory=True, url_encoded_keys=True)
    elif file_format == "PARQUET":
        import pyarrow.parquet as pq

        data_fs, data_path = url_to_fs(files[0], storage)
        with data_fs.open(data_path, "rb") as f:
            schema = pq.read_schema(f)
        fmt = _manifest_format("parquet", schema, f"S3 Inventory manifest {uri!r}", inventory=True)
    else:
        raise ValueError(f"S3 Inventory manifest {uri!r}: file format {file_format or '?'} is not supported "
                         "(CSV or Parquet; configure the inventory with one of them)")
    parts = tuple(ListingPart("manifest", f, index=i) for i, f in enumerate(files))
    return ListingPlan(uri, "inventory", parts, extensions, base_dir, fmt, pa.schema([]))


def _info_or_none(fs, path: str) -> dict | None:
    """The listing details of the file or directory named exactly ``path``, or None if none."""
    try:
        return fs.info(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


# ---------------------------------------------------------------------------------------------
# Listing tasks


def list_part(part: ListingPart, plan: ListingPlan, storage: StorageOptions) -> Iterator[pa.Table]:
    """The rows of one part (`ListingPlan.listing_schema`), in tables of at most ~64k rows.

    A part that cannot be listed (access denied, a manifest file that does not parse) becomes
    one row with ``listing_error`` set, so the run goes on and reports it.
    """
    try:
        if part.kind == "manifest":
            yield from _read_manifest_part(part, plan, storage)
        else:
            yield from _chunks(_file_entries(part, plan, storage), plan)
    except Exception as exc:  # noqa: BLE001 - one part's failure is a listing error, not a failed job
        yield _error_rows([f"could not list {_describe(part)}: {type(exc).__name__}: {exc}"], plan)


def _describe(part: ListingPart) -> str:
    if part.kind == "keys":
        return f"{part.uri} (keys after {part.start_after!r} up to {part.end_at!r})"
    return part.uri


def _error_rows(messages: list[str], plan: ListingPlan, *, uris: list[str | None] | None = None) -> pa.Table:
    n = len(messages)
    columns = {name: pa.nulls(n, f.type) for name, f in zip(plan.listing_schema.names, plan.listing_schema)}
    columns["video_id"] = pa.array([""] * n, pa.string())
    columns["uri"] = pa.array(uris or [None] * n, pa.string())
    columns["listing_error"] = pa.array(messages, pa.string())
    return pa.table(columns, schema=plan.listing_schema)


def _keep(path: str, plan: ListingPlan) -> bool:
    lower = tuple(e.lower() for e in plan.extensions)
    name = posixpath.basename(path.rstrip("/"))
    return path.lower().endswith(lower) and not name.startswith((".", "_"))


def _file_entries(part: ListingPart, plan: ListingPlan, storage: StorageOptions) -> Iterator[tuple[str, dict]]:
    """(full uri, info) of the files of a non-manifest part."""
    fs, path = url_to_fs(part.uri, storage)
    if part.kind == "file":
        yield part.uri, fs.info(path)
    elif part.kind == "glob":
        found = fs.glob(path, detail=True)
        entries = {p: info for p, info in found.items() if info.get("type", "file") == "file"}
        if not entries:
            raise ValueError(f"the glob {part.uri!r} matches no file (and no file has that exact name)")
        for p in sorted(entries):
            yield _full_uri(p, plan.uri), entries[p]
    elif part.kind == "top":
        for info in sorted(fs.ls(path, detail=True), key=lambda i: i["name"]):
            if info.get("type", "file") == "file" and _keep(info["name"], plan):
                yield _full_uri(info["name"], plan.uri), info
    elif part.kind == "tree":
        from vmae_ray.storage import is_local_fs

        # fsspec's walk skips a sub-folder it cannot read (on_error="omit"): its inputs would
        # look deleted. Raised, it is this part's listing error instead.
        found = fs.find(path, detail=True, **({"on_error": "raise"} if is_local_fs(fs) else {}))
        for p in sorted(found):
            if found[p].get("type", "file") == "file" and _keep(p, plan):
                yield _full_uri(p, plan.uri), found[p]
    elif part.kind == "keys":
        yield from _s3_range_entries(fs, path, part, plan)
    else:
        raise ValueError(f"unknown listing part {part.kind!r}")


def _s3_range_entries(fs, path: str, part: ListingPart, plan: ListingPlan) -> Iterator[tuple[str, dict]]:
    bucket, prefix = _s3_bucket_prefix(path.rstrip("/") + "/")
    end = part.end_at.encode() if part.end_at is not None else None
    token = None
    while True:
        page = _list_page(fs, bucket, prefix, part.start_after, 1000, token)
        for c in page.get("Contents", []):
            key = c["Key"]
            if end is not None and key.encode() > end:
                return
            if key.endswith("/") or not _keep(key, plan):
                continue
            info = {"size": c.get("Size"), "ETag": c.get("ETag"), "type": "file"}
            yield _full_uri(f"{bucket}/{key}", plan.uri), info
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")


def _chunks(entries: Iterator[tuple[str, dict]], plan: ListingPlan, size: int = 65536) -> Iterator[pa.Table]:
    uris: list[str] = []
    sizes: list[int | None] = []
    versions: list[str | None] = []
    for uri, info in entries:
        uris.append(uri)
        sizes.append(info.get("size"))
        versions.append(_version_of(info))
        if len(uris) >= size:
            yield _rows(uris, sizes, versions, plan)
            uris, sizes, versions = [], [], []
    if uris:
        yield _rows(uris, sizes, versions, plan)


def _rows(uris: list[str], sizes: list, versions: list, plan: ListingPlan, *, ids: list | None = None,
          order: list[int] | None = None, passthrough: dict[str, Any] | None = None) -> pa.Table:
    n = len(uris)
    columns: dict[str, Any] = {
        "video_id": pa.array(ids if ids is not None else [video_id_for_uri(u) for u in uris], pa.string()),
        "uri": pa.array(uris, pa.string()),
        "size_bytes": pa.array(sizes, pa.int64()),
        "version": pa.array(versions, pa.string()),
        "input_fingerprint": pa.array([input_fingerprint(u, s, v) for u, s, v in zip(uris, sizes, versions)],
                                      pa.string()),
        "order": pa.array(order if order is not None else [0] * n, pa.int64()),
        "listing_error": pa.nulls(n, pa.string()),
    }
    for f in plan.passthrough_schema:
        columns[f.name] = (passthrough or {}).get(f.name, pa.nulls(n, f.type))
    return pa.table(columns, schema=plan.listing_schema)


def _read_manifest_part(part: ListingPart, plan: ListingPlan, storage: StorageOptions) -> Iterator[pa.Table]:
    fmt = plan.manifest
    fs, path = url_to_fs(part.uri, storage)
    offset = 0
    for batch in _manifest_batches(fs, path, fmt, part):
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        for start in range(0, table.num_rows, 65536):
            piece = table.slice(start, 65536)
            yield from _manifest_rows(piece, fmt, plan, base_order=(part.index << 32) + offset)
            offset += piece.num_rows


def _manifest_batches(fs, path: str, fmt: ManifestFormat, part: ListingPart) -> Iterator:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw) if fmt.compression == "gzip" else raw
        if fmt.kind == "parquet":
            parquet = pq.ParquetFile(f)
            groups = list(part.row_groups) if part.row_groups is not None else list(range(parquet.num_row_groups))
            if groups:
                yield from parquet.iter_batches(batch_size=65536, row_groups=groups)
        elif fmt.kind == "csv":
            read = pacsv.ReadOptions(block_size=8 * 2**20, column_names=None if fmt.header else fmt.schema.names)
            convert = pacsv.ConvertOptions(column_types={f.name: f.type for f in fmt.schema})
            yield from pacsv.open_csv(f, read_options=read, convert_options=convert)
        else:
            yield pajson.read_json(f, parse_options=pajson.ParseOptions(explicit_schema=fmt.schema,
                                                                        unexpected_field_behavior="ignore"))


def _manifest_rows(table: pa.Table, fmt: ManifestFormat, plan: ListingPlan, *, base_order: int) -> Iterator[pa.Table]:
    n = table.num_rows
    if n == 0:
        return
    order = [base_order + i for i in range(n)]
    keep = [True] * n
    if fmt.inventory:
        lower = {c.lower(): c for c in table.column_names}
        for name, bad in (("isdeletemarker", "true"), ("islatest", "false")):
            if name in lower:
                values = [str(v).lower() for v in table.column(lower[name]).to_pylist()]
                keep = [k and v != bad for k, v in zip(keep, values)]
    if fmt.key_column:
        buckets = table.column(fmt.bucket_column).to_pylist()
        keys = table.column(fmt.key_column).to_pylist()
        if fmt.url_encoded_keys:
            keys = [urllib.parse.unquote_plus(k) if k is not None else None for k in keys]
        uris = [f"s3://{b}/{k}" if b and k else None for b, k in zip(buckets, keys)]
    else:
        uris = [None if u is None else str(u) for u in table.column(fmt.uri_column).to_pylist()]
    if fmt.inventory:  # a bucket's listing: the extensions and hidden names apply as to a prefix
        keep = [k and u is not None and not u.endswith("/") and _keep(u, plan) for k, u in zip(keep, uris)]
    bad = [i for i in range(n) if keep[i] and not uris[i]]
    uris = [resolve_uri(u, plan.base_dir) if u else u for u in uris]
    ids_given = table.column(fmt.id_column).to_pylist() if fmt.id_column else [None] * n
    sizes = [_as_int(v) for v in table.column(fmt.size_column).to_pylist()] if fmt.size_column else [None] * n
    etags = table.column(fmt.etag_column).to_pylist() if fmt.etag_column else [None] * n
    modified = table.column(fmt.modified_column).cast(pa.string()).to_pylist() if fmt.modified_column else [None] * n
    versions = [str(e).strip('"') if e not in (None, "") else (str(m) if m not in (None, "") else None)
                for e, m in zip(etags, modified)]
    good = [i for i in range(n) if keep[i] and uris[i]]
    if bad:
        yield _error_rows([f"{plan.uri} row {order[i] & 0xFFFFFFFF} of part {order[i] >> 32} has an empty uri"
                           for i in bad], plan)
    if not good:
        return
    take = pa.array(good, pa.int64())
    ids = [str(ids_given[i]) if ids_given[i] not in (None, "") else video_id_for_uri(uris[i]) for i in good]
    passthrough = {name: table.column(name).take(take) for name in fmt.passthrough}
    yield _rows([uris[i] for i in good], [sizes[i] for i in good], [versions[i] for i in good], plan, ids=ids,
                order=[order[i] for i in good], passthrough=passthrough)


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def stat_rows(table: pa.Table, *, storage: StorageOptions) -> pa.Table:
    """Ray Data UDF: fill ``size_bytes`` and ``version`` (and the fingerprint) of listing rows
    that have no version, with one metadata request each (HEAD on S3, stat locally),
    `STAT_THREADS` at a time. An input that does not exist keeps no size and version: its read
    then reports it, as an error row. Any other failure (throttling, access denied, a timeout)
    makes the row a listing error: the input is neither redone nor taken for removed."""
    versions = table.column("version").to_pylist()
    errors = table.column("listing_error").to_pylist()
    todo = [i for i, (v, e) in enumerate(zip(versions, errors)) if v is None and e is None]
    if not todo:
        return table
    uris = table.column("uri").to_pylist()
    sizes = table.column("size_bytes").to_pylist()

    def info(i: int) -> tuple[int | None, str | None, str | None]:
        try:
            fs, path = url_to_fs(uris[i], storage)
            found = fs.info(path)
            return found.get("size"), _version_of(found), None
        except FileNotFoundError:  # the decode step reports it as a not_found error row
            return sizes[i], None, None
        except Exception as exc:  # noqa: BLE001 - one input's failed request is a listing error
            # Without its version the input would look changed and be embedded again.
            return sizes[i], None, f"could not read the size and version of {uris[i]}: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(min(STAT_THREADS, len(todo))) as pool:
        for i, (size, version, error) in zip(todo, pool.map(info, todo)):
            sizes[i], versions[i], errors[i] = size, version, error
    fingerprints = [input_fingerprint(u, s, v) if u else None for u, s, v in zip(uris, sizes, versions)]
    table = table.set_column(table.schema.get_field_index("listing_error"), "listing_error",
                             pa.array(errors, pa.string()))
    table = table.set_column(table.schema.get_field_index("size_bytes"), "size_bytes", pa.array(sizes, pa.int64()))
    table = table.set_column(table.schema.get_field_index("version"), "version", pa.array(versions, pa.string()))
    return table.set_column(table.schema.get_field_index("input_fingerprint"), "input_fingerprint",
                            pa.array(fingerprints, pa.string()))


def list_inputs(uri: str, storage: StorageOptions, *, extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
                base_dir: str | None = None) -> pa.Table:
    """The listing of ``uri`` in this process, sorted by uri: `plan_listing` and each part's
    `list_part` (with `stat_rows` where needed), as the job's tasks run them. For commands that
    name one video (``show``) and tests; raises ValueError on a listing error."""
    plan = plan_listing(uri, storage, extensions=extensions, base_dir=base_dir)
    tables = [t for part in plan.parts for t in list_part(part, plan, storage)]
    table = pa.concat_tables(tables) if tables else plan.listing_schema.empty_table()
    errors = [e for e in table.column("listing_error").to_pylist() if e]
    if errors:
        raise ValueError(errors[0])
    if plan.needs_stat:
        table = stat_rows(table, storage=storage)
    return table.sort_by("uri")


def read_table_file(uri: str, storage: StorageOptions, what: str = "manifest") -> pa.Table:
    """Read a ``.parquet``, ``.csv`` or JSON Lines (``.jsonl``/``.json``/``.ndjson``) file (any
    fsspec URI) as an Arrow table. Raises ValueError (naming it as ``what``) when it does not
    exist, has another extension, or does not parse."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    if not is_manifest(uri):
        raise ValueError(f"{what} {uri!r}: expected a {', '.join(MANIFEST_SUFFIXES)} file")
    fs, path = url_to_fs(uri, storage)
    if not fs.exists(path):
        raise ValueError(f"{what} {uri!r} does not exist")
    lower = uri.lower()
    with fs.open(path, "rb") as f:
        try:
            if lower.endswith(".parquet"):
                return pq.read_table(f)
            if lower.endswith(".csv"):
                return pacsv.read_csv(f)
            return pajson.read_json(f)
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{what} {uri!r} does not parse: {exc}") from exc

