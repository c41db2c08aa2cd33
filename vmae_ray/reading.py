"""Reading committed outputs: the one way every command reads tables (`_SUCCESS` first).

A reader follows `_SUCCESS` and reads exactly the files it lists, never a folder listing, so
it never sees half a run (see `vmae_ray.writing`). Local paths and any fsspec URI (s3://...)
work alike. Embeddings come out as one C-contiguous float32 matrix (N, D) built from the
Arrow buffers, not a Python object per row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vmae_ray.schema import SUCCESS_FILE
from vmae_ray.storage import StorageOptions, join, url_to_fs
from vmae_ray.writing import FORMAT


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

