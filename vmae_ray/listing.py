"""List step: turn ``--input`` into one record per video, on the driver.

``--input`` is a directory or prefix (every file with a video extension below it), a glob
(every match, whatever its extension: the user named them), a single file, or a manifest
(``.parquet``, ``.csv``, ``.jsonl``/``.json``) with a ``uri`` column, an optional
``video_id`` and other columns that pass through to the output tables.

A name that exists is that file (or directory), whatever characters it holds (``[ ] * ?``
included); only a name that does not exist is read as a glob. Manifest URIs, and the
``uri`` of every manifest row, are always taken as they are, never as globs.

Directory and glob listings come from one recursive listing call (``fs.find``/``fs.glob``
with details), so a prefix of many objects costs the listing requests only, and each record
carries size and ETag/mtime: the input's identity for resume.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
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


@dataclass
class VideoInput:
    """One input video: what the job knows about it before opening it."""

    video_id: str
    uri: str
    size_bytes: int | None = None
    version: str | None = None  # ETag, generation or mtime: changes when the object does
    passthrough: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Identity of the input's content as far as listing can tell (URI, size, version)."""
        raw = f"{self.uri}\0{self.size_bytes}\0{self.version}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]


@dataclass
class InputListing:
    inputs: list[VideoInput]
    passthrough_schema: pa.Schema  # types of manifest columns that pass through


def video_id_for_uri(uri: str) -> str:
    """A stable id derived from the URI alone, so reruns and other runs agree on it."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:24]


def uri_spellings(text: str) -> list[str]:
    """The ways ``text`` may be spelled as a ``uri`` in the tables: as given; for a local path
    also as the absolute path (relative paths from the current folder: a directory listing of an
    absolute --input stores absolute paths, so ``demo_out/a.mp4`` should find them) and as a
    ``file://`` URI; for a ``file://`` URI also as the plain path."""
    if text.startswith("file://"):
        return [text, text[len("file://"):]]
    if "://" in text:
        return [text]
    absolute = os.path.abspath(text)
    return list(dict.fromkeys([text, absolute, "file://" + absolute]))


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


def list_inputs(
    uri: str,
    storage: StorageOptions,
    *,
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
    limit: int | None = None,
) -> InputListing:
    """List the videos of ``uri``; raises ValueError with a clear message when none exist."""
    if is_manifest(uri):
        listing = read_manifest(uri, storage)
    else:
        listing = InputListing(_list_files(uri, storage, extensions), pa.schema([]))
    seen: dict[str, str] = {}
    for item in listing.inputs:
        if item.video_id in seen and seen[item.video_id] != item.uri:
            raise ValueError(
                f"video_id {item.video_id!r} is given to two inputs ({seen[item.video_id]} and {item.uri})"
            )
        seen[item.video_id] = item.uri
    # Duplicate rows for the same video would be processed twice: keep the first.
    unique: dict[str, VideoInput] = {}
    for item in listing.inputs:
        unique.setdefault(item.video_id, item)
    inputs = sorted(unique.values(), key=lambda v: v.uri)
    if limit is not None:
        inputs = inputs[:limit]
    return InputListing(inputs, listing.passthrough_schema)


def _list_files(uri: str, storage: StorageOptions, extensions: tuple[str, ...]) -> list[VideoInput]:
    fs, path = url_to_fs(uri, storage)
    # A name that exists is that file or directory, whatever characters it holds: downloaders
    # name files "Title [id].mp4", and a glob reading of that name matches other files (here
    # "Title i.mp4") or none. Only a name that does not exist is read as a glob.
    info = _info_or_none(fs, path) if _GLOB_CHARS & set(path) else None
    if info is not None and info.get("type", "file") == "file":
        entries = {path: info}
    elif _GLOB_CHARS & set(path) and info is None:
        found = fs.glob(path, detail=True)
        entries = {p: info for p, info in found.items() if info.get("type", "file") == "file"}
        if not entries:
            raise ValueError(f"the glob {uri!r} matches no file (and no file has that exact name)")
    elif fs.isdir(path):
        found = fs.find(path, detail=True)
        lower_ext = tuple(e.lower() for e in extensions)
        entries = {
            p: info
            for p, info in found.items()
            if p.lower().endswith(lower_ext) and not posixpath.basename(p).startswith((".", "_"))
        }
        if not entries:
            raise ValueError(
                f"no video files under {uri!r} (looked for {', '.join(extensions)}; "
                "use a glob or a manifest for other names)"
            )
    elif fs.exists(path):
        entries = {path: fs.info(path)}
    else:
        raise ValueError(f"{uri!r} does not exist")
    inputs = []
    for p, info in entries.items():
        full = _full_uri(p, uri)
        inputs.append(
            VideoInput(
                video_id=video_id_for_uri(full),
                uri=full,
                size_bytes=info.get("size"),
                version=_version_of(info),
            )
        )
    return inputs


def _info_or_none(fs, path: str) -> dict | None:
    """The listing details of the file or directory named exactly ``path``, or None if none."""
    try:
        return fs.info(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


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


def read_manifest(uri: str, storage: StorageOptions) -> InputListing:
    """Read a Parquet/CSV/JSON Lines manifest with a ``uri`` column."""
    table = read_table_file(uri, storage)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {uri!r} has no 'uri' column (columns: {', '.join(table.column_names)})")
    clashes = [c for c in table.column_names if c in RESERVED_COLUMNS and c not in ("uri", "video_id")]
    if clashes:
        raise ValueError(
            f"manifest columns {clashes} clash with output columns; rename them to pass them through"
        )
    passthrough_names = [c for c in table.column_names if c not in ("uri", "video_id")]
    passthrough_schema = pa.schema([table.schema.field(c) for c in passthrough_names])
    rows = table.to_pylist()
    inputs = []
    for i, row in enumerate(rows):
        video_uri = row.get("uri")
        if not video_uri:
            raise ValueError(f"manifest {uri!r} row {i} has an empty uri")
        video_uri = str(video_uri)
        given = row.get("video_id")
        inputs.append(
            VideoInput(
                video_id=str(given) if given not in (None, "") else video_id_for_uri(video_uri),
                uri=video_uri,
                passthrough={c: row[c] for c in passthrough_names},
            )
        )
    return InputListing(inputs, passthrough_schema)
