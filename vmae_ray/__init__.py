"""vmae-ray: VideoMAE embeddings of video corpora on Ray Data, written as Parquet tables.

The job's data flow, one module per step: `listing` (in Ray tasks) -> `diff` (a Ray Data
join against the committed output) -> `decoding` (+ `sampling`) -> `embedder` (+
`reconstruction`) -> `assembly` -> `staging` (the model actors write shards, send receipts)
-> `commit` (the driver accepts receipts exactly once) -> `writing` (the commit protocol).
`planning` checks everything before Ray starts, `graph` wires the embed phase on Ray, `stages`
adapts the steps to Ray Data, `lease` keeps one writer per output, `progress` is what a run
prints, and `pipeline` runs it all; `schema` holds the row contracts. The other commands work
on committed tables through `reading`: `show`, `probe` (+ `heads`), `search` and `dedup` (+
`neighbours`), `report`. `cli` is the command line.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
