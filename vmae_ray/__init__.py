"""vmae-ray: VideoMAE embeddings of video corpora on Ray Data, written as Parquet tables.

The data flow, one module per step: `listing` -> `decoding` (+ `sampling`) -> `model` ->
`tables`/`writing`, wired on Ray by `stages` and `pipeline`. `cli` is the command line.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
