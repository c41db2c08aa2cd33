"""Reading committed outputs: the one way every command reads tables (`_SUCCESS` first).

A reader follows `_SUCCESS` and reads exactly the files it lists, never a folder listing, so
it never sees half a run (see `vmae_ray.writing`). Local paths and any fsspec URI (s3://...)
work alike. Embeddings come out as one C-contiguous float32 matrix (N, D) built from the
Arrow buffers, not a Python object per row.

Every command that reads an embed output (search, index, dedup, probe, report) takes it as
``--tables`` and opens it with `open_tables` / `open_committed`, which refuse, naming what the
folder is, anything else: another command's output (`output_kind` reads it from `_SUCCESS`),
a probe head, an index, a checkpoint, a file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vmae_ray.config import ConfigError, storage_errors_of, storage_for
from vmae_ray.schema import SUCCESS_FILE, TABLES
from vmae_ray.storage import StorageOptions, join, url_to_fs
from vmae_ray.writing import FORMAT

# What `output_kind` calls the output of each command that commits tables, and how a message
# names it. The embed job's manifest names no command (it holds clips/, videos/, errors/);
# every other command's manifest records its `command`.
EMBED = "embed"
OUTPUT_KINDS = {
    EMBED: "a `vmae-ray embed` output",
    "dedup": "a `vmae-ray dedup` output (duplicate groups)",
    "probe apply": "a `vmae-ray probe apply` output (labels)",
}
# Folders that are not committed outputs but that a user may take for one, told apart by the
# file each is known by (`heads.HEAD_FILE`, `search.INDEX_MANIFEST`, a checkpoint's config).
_UNCOMMITTED_KINDS = (
    ("head.json", "a `vmae-ray probe fit` head (head.json)"),
    ("INDEX.json", "a `vmae-ray index` index (INDEX.json), kept inside the embed output it indexes"),
    ("config.json", "a model checkpoint (config.json)"),
)


class NotCommittedError(FileNotFoundError):
    """The folder has no `_SUCCESS`: nothing was committed there (or it is not a vmae-ray output)."""


@dataclass(frozen=True)
class CommittedOutput:
    """A committed output folder: its `_SUCCESS` manifest and the tables it lists.

    Open with `CommittedOutput.open(uri, storage)`. `read(table)` reads the committed files of
    one table; `embeddings(table)` also returns the `embedding` column as a float32 matrix.
    """

    uri: str
    manifest: dict[str, Any]
    storage: StorageOptions

    @classmethod
    def open(cls, uri: str, storage: StorageOptions | dict | None = None) -> CommittedOutput:
        """Read `uri/_SUCCESS`. Raises NotCommittedError when it is absent, ValueError when it is
        not a vmae-ray manifest."""
        storage = storage if isinstance(storage, StorageOptions) else StorageOptions(storage)
        uri = uri.rstrip("/")
        fs, path = url_to_fs(join(uri, SUCCESS_FILE), storage)
        if not fs.exists(path):
            raise NotCommittedError(f"{uri} has no {SUCCESS_FILE}: nothing committed there (run the job first, "
                                    "or wait for it to finish its first commit)")
        with fs.open(path, "rb") as f:
            try:
                manifest = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{uri}/{SUCCESS_FILE} is not JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{uri}/{SUCCESS_FILE} is not a vmae-ray manifest")
        return cls(uri, manifest, storage)

    # -- what _SUCCESS says -----------------------------------------------------------------
    @property
    def kind(self) -> str:
        """Which command committed this output (`output_kind`)."""
        return output_kind(self.manifest)

    @property
    def run_id(self) -> str | None:
        return self.manifest.get("run_id")

    @property
    def settings_fingerprint(self) -> str | None:
        return self.manifest.get("settings_fingerprint")

    @property
    def model(self) -> dict[str, Any]:
        """The `model` entry: ref, architecture, fingerprint, num_frames, embedding_dim, labels."""
        return dict(self.manifest.get("model") or {})

    @property
    def tables(self) -> list[str]:
        return sorted(self.manifest.get("files", {}))

    def files(self, table: str) -> list[str]:
        """URIs of the committed files of ``table`` (empty when it has none)."""
        return [join(self.uri, rel) for rel in self.committed_files(table)]

    def committed_files(self, table: str) -> list[str]:
        """The committed files of ``table`` as `_SUCCESS` lists them (relative to the output)."""
        return list(self.manifest.get("files", {}).get(table, []))

    def schema(self, table: str) -> pa.Schema:
        """The columns of ``table``'s committed files, from their Parquet footers only (the union
        when files differ); an empty schema when the table has no committed file."""
        schemas = []
        for file_uri in self.files(table):
            fs, path = url_to_fs(file_uri, self.storage)
            with fs.open(path, "rb") as f:
                schemas.append(pq.read_schema(f))
        return pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])

    # -- reading ----------------------------------------------------------------------------
    def read(self, table: str, columns: list[str] | None = None, files: list[str] | None = None) -> pa.Table:
        """The committed rows of ``table`` (all columns, or ``columns``), as one Arrow table.

        ``files`` (names as `committed_files` gives them) reads only those committed files, in
        that order; a name `_SUCCESS` does not list raises ValueError. Only the requested
        columns are read from each file. A table with no committed file reads as an empty table
        with no columns (or the requested ones, typed null). Raises KeyError for a requested
        column that a file lacks.
        """
        committed = self.committed_files(table)
        if files is not None:
            unknown = sorted(set(files) - set(committed))
            if unknown:
                raise ValueError(f"{self.uri}: {unknown[0]} is not a committed file of {table}/")
            committed = list(files)
        parts = []
        for rel in committed:
            fs, path = url_to_fs(join(self.uri, rel), self.storage)
            with fs.open(path, "rb") as f:
                # Only the requested columns are read: a report wants a few small columns of a
                # clips/ table whose embeddings may be gigabytes.
                parquet = pq.ParquetFile(f)
                if columns is not None:
                    names = parquet.schema_arrow.names
                    missing = [c for c in columns if c not in names]
                    if missing:
                        raise KeyError(f"{table}/ has no column {missing[0]!r} (columns: {', '.join(names)})")
                parts.append(parquet.read(columns=columns))
        if not parts:
            return pa.table({c: pa.nulls(0) for c in columns or []})
        return pa.concat_tables(parts, promote_options="permissive")

    def embeddings(self, table: str, columns: list[str] | None = None,
                   files: list[str] | None = None) -> tuple[np.ndarray, pa.Table]:
        """(float32 array (N, D), C-contiguous; the table's other columns, or ``columns``).

        ``files`` as in `read`. Rows whose embedding is null (none are written by the job) are
        dropped from both. Raises ValueError when the table (or ``files``) has no committed row.
        """
        wanted = None if columns is None else [c for c in columns if c != "embedding"] + ["embedding"]
        data = self.read(table, wanted, files)
        if data.num_rows == 0:
            raise ValueError(f"{self.uri}: {table}/ has no committed rows")
        emb = data.column("embedding")
        if emb.null_count:
            data = data.filter(emb.is_valid())
            emb = data.column("embedding")
        return embedding_matrix(emb), data.drop_columns(["embedding"])


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list<float32, D> column (no nulls) as a C-contiguous float32 array (N, D).

    One conversion per Arrow chunk (zero-copy for a single float32 chunk), never per row.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if not pa.types.is_fixed_size_list(column.type):
        raise TypeError(f"expected a fixed_size_list embedding column, got {column.type}")
    dim = column.type.list_size
    parts = []
    for chunk in chunks:
        values = chunk.values.slice(chunk.offset * dim, len(chunk) * dim)
        parts.append(np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(chunk), dim))
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    matrix = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return np.ascontiguousarray(matrix)



# ------------------------------------------------------------------------------------------
# The --tables of a command


def output_kind(manifest: dict[str, Any]) -> str:
    """Which command committed the output a `_SUCCESS` manifest describes: its ``command``
    ('dedup', 'probe apply', ...), else 'embed' when every table it lists is one the job writes
    (clips, videos, errors), else 'unknown'."""
    command = manifest.get("command")
    if isinstance(command, str) and command:
        return command
    tables = set(manifest.get("files") or {})
    return EMBED if tables <= set(TABLES) else "unknown"


def describe_output(manifest: dict[str, Any]) -> str:
    """A committed output in words, for a message: what it is and, for one made from an embed
    output, which."""
    kind = output_kind(manifest)
    if kind in OUTPUT_KINDS:
        text = OUTPUT_KINDS[kind]
    elif kind == "unknown":
        text = f"an output of another command (tables {', '.join(sorted(manifest.get('files') or {})) or 'none'})"
    else:
        text = f"a `vmae-ray {kind}` output"
    source = manifest.get("tables")
    if kind != EMBED and isinstance(source, dict) and source.get("uri"):
        text += f", made from the embed output {source['uri']}"
    return text


def _describe_uncommitted(uri: str, storage: StorageOptions) -> str | None:
    """What a folder without `_SUCCESS` is, when it is something a user may take for tables."""
    fs, path = url_to_fs(uri, storage)
    if fs.isfile(path):
        return "a file, not an output folder"
    for name, text in _UNCOMMITTED_KINDS:
        if fs.exists(join(path, name)):
            return text
    if uri.rstrip("/").rsplit("/", 1)[-1] == "_index":
        return "the folder of `vmae-ray index` indexes, kept inside the embed output they index"
    return None


def open_committed(uri: str, storage: StorageOptions, *, option: str = "--tables") -> CommittedOutput:
    """The committed embed output at ``uri``, given as ``option``: every command that reads an
    embed output opens it here. Raises ConfigError naming ``option`` when there is none: no
    `_SUCCESS` (saying what the folder is, when it is a head, an index, a checkpoint or a
    file), not a vmae-ray manifest, another command's output (named from its `_SUCCESS`), or
    the storage refused (credentials, access, endpoint)."""
    with storage_errors_of(option, uri, storage):  # credentials, access, endpoint
        try:
            committed = CommittedOutput.open(uri, storage)
        except NotCommittedError as exc:
            what = _describe_uncommitted(uri.rstrip("/"), storage)
            if what is None:
                raise ConfigError(option, str(exc)) from None
            raise ConfigError(option, f"{uri} is {what}, not a `vmae-ray embed` output; give the folder "
                              "`vmae-ray embed` wrote as its --output") from None
        except ValueError as exc:
            raise ConfigError(option, str(exc)) from None
    if committed.kind != EMBED:
        raise ConfigError(option, f"{committed.uri} is {describe_output(committed.manifest)}, not a "
                          "`vmae-ray embed` output; give the folder `vmae-ray embed` wrote as its --output")
    return committed


def add_tables_arguments(parser) -> None:
    """``--tables`` and ``--storage-options``, as every command that reads an embed output has them."""
    parser.add_argument("--tables", required=True, help="output folder of `vmae-ray embed` (local or any fsspec URI)")
    parser.add_argument("--storage-options", help="fsspec options as a JSON object, or @FILE with one; "
                        "default: $VMAE_RAY_STORAGE_OPTIONS")


def open_tables(args, uris: Sequence[str] = ()) -> tuple[CommittedOutput, StorageOptions]:
    """The committed embed output of ``args.tables`` (`open_committed`) and the storage options
    (``args.storage_options`` and the driver's environment, for ``--tables`` and ``uris``).
    Raises ConfigError."""
    storage = storage_for(args.storage_options, [args.tables, *uris])
    return open_committed(args.tables, storage), storage
