"""vmae-ray: VideoMAE embeddings of video corpora on Ray Data, written as Parquet tables.

The job's data flow, one module per step: `listing` -> `decoding` (+ `sampling`) ->
`embedder` (+ `reconstruction`) -> `assembly` -> `writing`, wired on Ray by `stages` and
`pipeline`; `schema` holds the row contracts. The other commands work on committed tables
through `reading`: `show`, `probe` (+ `heads`), `search` and `dedup` (+ `neighbours`),
`report`. `cli` is the command line.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
