"""`vmae-ray dedup`: near-duplicate groups of videos, written as a committed table.

Two videos are linked when the cosine similarity of their video embeddings is at least
--threshold; a group is a connected component of links (so two members of a group may be
less similar than the threshold, through a chain of links). How links are found, and how
exact that is, is `neighbours.near_duplicate_links`: all pairs up to
`neighbours.DEDUP_ALL_PAIRS_MAX_ROWS` videos (exact), a k-means partition range-searched in
BLAS tiles above (every reported link is exact; the share of links found is measured on a
sample and written to `_SUCCESS`). `--exact` forces all pairs at any size.

Output (`writing.write_committed`, `_SUCCESS` last): DUP_OUT/duplicates/*.parquet with one
row per video in a group of two or more: group_id (0 = the largest group), video_id, uri,
representative (the group's member with the most links, ties to the smallest video_id; the
same for every member), similarity (float64 cosine to the representative, 1 for itself).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from vmae_ray import neighbours as nb
from vmae_ray.config import CommandParser, ConfigError, check_output_option
from vmae_ray.reading import add_tables_arguments, open_tables
from vmae_ray.search import tie_rank
from vmae_ray.storage import StorageOptions

DUPLICATES = "duplicates"
DUPLICATES_SCHEMA = pa.schema([
    pa.field("group_id", pa.int64()),
    pa.field("video_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("representative", pa.string()),
    pa.field("similarity", pa.float64()),
])


def duplicates_table(groups: nb.DuplicateGroups, meta: pa.Table) -> pa.Table:
    """The duplicates/ rows of ``groups`` over videos whose ``meta`` has video_id and uri."""
    ids, uris = meta.column("video_id"), meta.column("uri")
    rows = pa.array(groups.rows)
    return pa.Table.from_arrays([
        pa.array(groups.group, pa.int64()), ids.take(rows), uris.take(rows),
        ids.take(pa.array(groups.representative)), pa.array(groups.similarity, pa.float64()),
    ], schema=DUPLICATES_SCHEMA)


def find_duplicates(matrix: np.ndarray, meta: pa.Table, threshold: float, *, exact: bool | None = None,
                    nprobe: int = nb.DEDUP_NPROBE) -> tuple[pa.Table, dict[str, Any]]:
    """(duplicates table, counts and method) for videos (N, D) float32 with their ``meta``."""
    norms = nb.row_norms(matrix)
    links = nb.near_duplicate_links(matrix, threshold, norms=norms, exact=exact, nprobe=nprobe)
    groups = nb.duplicate_groups(links, matrix, norms=norms, tie_rank=tie_rank(meta))
    table = duplicates_table(groups, meta)
    counts = {"videos": len(matrix), "links": links.num_links, "groups": groups.num_groups,
              "videos_in_groups": int(len(groups.rows)),
              "largest_group": int(np.bincount(groups.group).max()) if len(groups.group) else 0}
    return table, {"counts": counts, "method": links.stats}


def run_dedup(argv: Sequence[str], prog: str = "vmae-ray dedup") -> int:
    """`vmae-ray dedup`; exit status 0, or 2 for bad input."""
    parser = CommandParser(prog=prog, description="Near-duplicate groups of the videos in the tables: "
                                     "videos are linked when their embeddings' cosine similarity is at least "
                                     "--threshold, and a group is a connected component of links.")
    add_tables_arguments(parser)
    parser.add_argument("--threshold", type=float, required=True, help="cosine similarity in (0, 1] that links two videos")
    parser.add_argument("--output", required=True, help="folder for duplicates/*.parquet and _SUCCESS (not --tables)")
    parser.add_argument("--exact", action="store_true", help="compare all pairs whatever the size (N^2 work)")
    parser.add_argument("--nprobe", type=int, default=nb.DEDUP_NPROBE,
                        help=f"above {nb.DEDUP_ALL_PAIRS_MAX_ROWS} videos: k-means lists each video searches "
                        f"(default {nb.DEDUP_NPROBE}; more finds more links, slower)")
    args = parser.parse_args(argv)
    if not 0 < args.threshold <= 1:
        parser.error(f"--threshold: must be in (0, 1], got {args.threshold}")
    if args.nprobe < 1:
        parser.error(f"--nprobe: must be at least 1, got {args.nprobe}")
    started = time.perf_counter()
    try:
        committed, storage = open_tables(args, [args.output])
        _check_output(args.output, args.tables, storage)
        try:
            matrix, meta = committed.embeddings("videos", ["video_id", "uri"])
        except ValueError as exc:
            raise ConfigError("--tables", str(exc)) from None
    except ConfigError as exc:
        parser.error(str(exc))
    table, facts = find_duplicates(matrix, meta, args.threshold, exact=True if args.exact else None, nprobe=args.nprobe)
    from vmae_ray.writing import write_committed

    manifest = {
        "command": "dedup", "threshold": args.threshold, **facts,
        "tables": {"uri": committed.uri, "run_id": committed.run_id,
                   "settings_fingerprint": committed.settings_fingerprint},
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    try:  # checked before the work; this is what changed since (another job writing there, say)
        success = write_committed(args.output, storage, {DUPLICATES: table}, manifest)
    except ValueError as exc:
        parser.error(f"--output: {exc}")
    c, m = facts["counts"], facts["method"]
    how = ("all pairs compared (exact)" if m["method"] == "all_pairs" else
           f"k-means partition, nlist {m['nlist']}, nprobe {m['nprobe']}: {100 * m['share_compared']:.2f}% of pairs "
           "compared; link recall "
           + (f"{m['link_recall']:.3f} on the {m['recall_sample_links']} links of {m['recall_sample_rows']} sampled videos"
              if m.get("link_recall") is not None else f"not measured (no link among {m['recall_sample_rows']} sampled videos)"))
    print(f"{prog}: {c['videos']} videos, threshold {args.threshold}: {c['links']} links, {c['groups']} groups "
          f"holding {c['videos_in_groups']} videos (largest {c['largest_group']}); {how}; "
          f"{time.perf_counter() - started:.1f}s\n{prog}: committed run {success['run_id']} to {args.output} "
          f"({DUPLICATES}/, _SUCCESS)", file=sys.stdout)
    return 0


def _check_output(output: str, tables: str, storage: StorageOptions) -> None:
    """Refuse, before any work, an --output that is the tables' folder or holds another output."""
    if output.rstrip("/") == tables.rstrip("/"):
        raise ConfigError("--output", "must be a folder of its own, not --tables")
    check_output_option(output, storage, (DUPLICATES,))
