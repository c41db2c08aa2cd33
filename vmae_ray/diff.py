"""The incremental diff and the removal of superseded rows, as Ray Data work.

What a run must do is decided by a join on ``video_id`` (and the input fingerprint) of the
listing (`vmae_ray.listing`) with the committed output's ``videos/`` and ``errors/`` rows:
both go into one dataset, hash-partitioned by ``video_id`` (Ray Data's keyed repartition, the
shuffle its own ``join`` and ``map_groups`` use, so a video's rows meet in one block), and
each partition is decided by `decide` (pure) in a task that writes its to-do rows into the
run's staging folder (``_staging/<run>/todo/``) and returns counts. The driver holds counts
and file names, never an input.

An input is *new* (not committed), *changed* (committed under another fingerprint: its old
rows are replaced), *retried* (in errors/, with ``--retry-failed``), *done*, or *gone*
(committed but no longer listed: counted, and removed with ``--prune``). Two listed rows with
one video_id and different URIs are a listing error; the same URI twice counts once.

Rows to remove (changed, retried, pruned) are removed by rewriting only the shard groups
that hold them (`writing.rewrite_group`), in Ray tasks, before the run's first commit.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vmae_ray.listing import LISTING_FIELDS, ListingPlan, input_fingerprint, list_part, stat_rows
from vmae_ray.schema import CLIPS, ERRORS, TABLES
from vmae_ray.storage import StorageOptions, url_to_fs
from vmae_ray.writing import OutputStore, rewrite_group

SIDE_LISTED = 0
SIDE_COMMITTED = 1

# Rows per diff partition: more partitions above this (a partition is one task's block).
ROWS_PER_PARTITION = 250_000
# Examples of each kind of problem kept for the summary (per partition, then overall).
MAX_EXAMPLES = 5

TODO = "todo"
REMOVALS = "removals"

DIFF_FIELDS = (
    *LISTING_FIELDS,
    pa.field("side", pa.int8()),  # SIDE_LISTED or SIDE_COMMITTED
    pa.field("table", pa.string()),  # committed rows: videos or errors
    pa.field("file", pa.string()),  # committed rows: the committed shard that holds it
)

# The columns of the to-do table (plus the listing's passthrough columns).
TODO_COLUMNS = ("video_id", "uri", "size_bytes", "input_fingerprint")


def diff_schema(passthrough: pa.Schema) -> pa.Schema:
    return pa.schema(list(DIFF_FIELDS) + list(passthrough))


@dataclass
class DiffCounts:
    """What the diff found: plain integers (and a few examples) for the summary and --dry-run."""

    listed: int = 0  # distinct inputs listed (listing errors and conflicts excluded)
    new: int = 0
    changed: int = 0
    retried: int = 0
    done: int = 0
    unverified: int = 0  # done, committed from a manifest that gave no size or ETag (identity by URI)
    gone: int = 0  # committed, no longer listed
    pruned: int = 0  # gone, and removed (--prune)
    duplicates: int = 0  # listed rows naming an input listed already
    conflicts: int = 0  # video_ids given to two different URIs
    listing_errors: int = 0
    prune_held_back: int = 0  # 1 when --prune was asked for and listing errors held it back
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def to_process(self) -> int:
        return self.new + self.changed + self.retried

    @property
    def superseded(self) -> int:
        return self.changed + self.retried

    def example(self, kind: str, text: str) -> None:
        found = self.examples.setdefault(kind, [])
        if len(found) < MAX_EXAMPLES:
            found.append(text)

    def add(self, other: DiffCounts) -> None:
        for name, value in asdict(other).items():
            if name == "examples":
                for kind, texts in value.items():
                    for text in texts:
                        self.example(kind, text)
            else:
                setattr(self, name, getattr(self, name) + value)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DiffCounts:
        return cls(**json.loads(text))


def decide(table: pa.Table, *, replace_all: bool, retry_failed: bool, prune: bool,
           passthrough: tuple[str, ...] = ()) -> tuple[pa.Table, pa.Table, DiffCounts]:
    """Decide one partition (every row of each video_id in it): (to-do rows: `TODO_COLUMNS` and
    the passthrough columns; removals: video_id, file, superseded (its input is redone by this
    run: changed or retried) or not (pruned); counts).

    ``replace_all`` (--overwrite): every listed input is to do and nothing is removed here (the
    first commit drops every committed file). ``prune``: gone inputs' rows are removed.
    """
    counts = DiffCounts()
    errors = pc.is_valid(table.column("listing_error"))
    failed = table.filter(errors)
    for message in failed.column("listing_error").to_pylist():
        counts.listing_errors += 1
        counts.example("listing_errors", message)
    # Inputs listed whose row failed (a metadata request that did not answer): neither to do
    # nor gone. A part that failed whole names no input (video_id "").
    unsure = {v for v in failed.column("video_id").to_pylist() if v}
    table = table.filter(pc.invert(errors))
    table = table.sort_by([("video_id", "ascending"), ("side", "ascending"), ("order", "ascending")])
    ids = table.column("video_id").to_numpy(zero_copy_only=False)
    side = table.column("side").to_numpy(zero_copy_only=False)
    uris = table.column("uri").to_pylist()
    fingerprints = table.column("input_fingerprint").to_pylist()
    tables = table.column("table").to_pylist()
    files = table.column("file").to_pylist()
    todo: list[int] = []
    removals: list[tuple[str, str, bool]] = []  # (video_id, file, superseded: redone here, else pruned)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(ids)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        listed = [i for i in range(s, e) if side[i] == SIDE_LISTED]
        committed = [i for i in range(s, e) if side[i] == SIDE_COMMITTED]
        vid = ids[s]
        if not listed:
            if vid in unsure:
                continue
            counts.gone += 1
            counts.example("gone", uris[committed[0]] or vid)
            if prune:
                counts.pruned += 1
                removals += [(vid, files[c], False) for c in committed]
            continue
        given = {uris[i] for i in listed}
        if len(given) > 1:
            counts.conflicts += 1
            shown = sorted(given)[:2]
            counts.example("conflicts", f"video_id {vid!r} is given to two inputs ({shown[0]} and {shown[1]})")
            continue
        counts.duplicates += len(listed) - 1
        first = listed[0]
        counts.listed += 1
        if replace_all or not committed:
            counts.new += 1
            todo.append(first)
            continue
        c = committed[0]
        if fingerprints[c] == fingerprints[first]:
            if tables[c] == ERRORS and retry_failed:
                counts.retried += 1
                todo.append(first)
                removals += [(vid, files[k], True) for k in committed]
            else:
                counts.done += 1
        elif fingerprints[c] == input_fingerprint(uris[first], None, None):
            # Committed from a manifest that said nothing of size or version: as done as it was.
            counts.done += 1
            counts.unverified += 1
        else:
            counts.changed += 1
            todo.append(first)
            removals += [(vid, files[k], True) for k in committed]
    columns = list(TODO_COLUMNS) + list(passthrough)
    todo_table = table.select(columns).take(pa.array(todo, pa.int64()))
    removal_table = pa.table({"video_id": pa.array([r[0] for r in removals], pa.string()),
                              "file": pa.array([r[1] for r in removals], pa.string()),
                              "superseded": pa.array([r[2] for r in removals], pa.bool_())})
    return todo_table, removal_table, counts


DIFF_RECEIPT = pa.schema([
    pa.field("todo_file", pa.string()), pa.field("todo_rows", pa.int64()),
    pa.field("removals_file", pa.string()), pa.field("removals_rows", pa.int64()),
    pa.field("counts", pa.string()),
])


def diff_task(table: pa.Table, *, output: str, storage: StorageOptions, run_id: str | None, replace_all: bool,
              retry_failed: bool, prune: bool, passthrough: tuple[str, ...]) -> pa.Table:
    """Ray Data UDF: decide one partition and stage its to-do and removal rows (none with
    ``run_id`` None: a dry run writes nothing); returns one receipt row (`DIFF_RECEIPT`)."""
    todo, removals, counts = decide(table, replace_all=replace_all, retry_failed=retry_failed, prune=prune,
                                    passthrough=passthrough)
    names = {TODO: None, REMOVALS: None}
    if run_id is not None:
        store = OutputStore(output, storage)
        stem = uuid.uuid4().hex[:12]
        for kind, rows in ((TODO, todo), (REMOVALS, removals)):
            if rows.num_rows:
                names[kind] = posixpath.join(kind, f"part-{stem}.parquet")
                store.write_table(run_id, names[kind], rows)
    return pa.Table.from_pylist([{"todo_file": names[TODO], "todo_rows": todo.num_rows,
                                  "removals_file": names[REMOVALS], "removals_rows": removals.num_rows,
                                  "counts": counts.to_json()}], schema=DIFF_RECEIPT)


# ---------------------------------------------------------------------------------------------
# The Ray Data graph of the diff


def _listing_task(batch: pa.Table, *, plan: ListingPlan, storage: StorageOptions):
    """Ray Data UDF: the listing rows of the parts in ``batch`` (one pickled part per row)."""
    import pickle

    for blob in batch.column("part").to_pylist():
        yield from list_part(pickle.loads(blob), plan, storage)


def _as_diff_rows(table: pa.Table, *, schema: pa.Schema, side: int) -> pa.Table:
    """Listing or committed rows in the diff schema (absent columns null)."""
    n = table.num_rows
    arrays = []
    for f in schema:
        if f.name == "side":
            arrays.append(pa.array(np.full(n, side, dtype=np.int8)))
        elif f.name in table.column_names:
            column = table.column(f.name)
            arrays.append(column if column.type.equals(f.type) else column.cast(f.type))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _committed_task(batch: pa.Table, *, output: str, storage: StorageOptions, schema: pa.Schema):
    """Ray Data UDF: the (video_id, uri, input_fingerprint) of committed videos/errors files,
    with the file they are in (only those columns are read from each file)."""
    fs, root = url_to_fs(output.rstrip("/"), storage)
    for rel in batch.column("file").to_pylist():
        with fs.open(posixpath.join(root.rstrip("/"), rel), "rb") as f:
            data = pq.ParquetFile(f).read(columns=["video_id", "uri", "input_fingerprint"])
        n = data.num_rows
        data = data.append_column("table", pa.array([rel.split("/", 1)[0]] * n, pa.string()))
        data = data.append_column("file", pa.array([rel] * n, pa.string()))
        yield _as_diff_rows(data, schema=schema, side=SIDE_COMMITTED)


def listing_dataset(plan: ListingPlan, storage: StorageOptions):
    """The listing as a Ray dataset of listing rows (`ListingPlan.listing_schema`)."""
    import pickle

    import ray

    parts = [{"part": pickle.dumps(p)} for p in plan.parts]
    ds = ray.data.from_items(parts, override_num_blocks=len(parts))
    ds = ds.map_batches(_listing_task, fn_kwargs={"plan": plan, "storage": storage}, batch_size=1,
                        batch_format="pyarrow", num_cpus=0.5)
    if plan.needs_stat:
        ds = ds.map_batches(stat_rows, fn_kwargs={"storage": storage}, batch_size=4096, batch_format="pyarrow",
                            num_cpus=0.25)
    return ds


def diff_dataset(listing, *, committed_files: list[str], output: str, storage: StorageOptions, schema: pa.Schema,
                 num_partitions: int, run_id: str | None, replace_all: bool, retry_failed: bool, prune: bool,
                 passthrough: tuple[str, ...]):
    """The Ray Data graph of the diff: listing ∪ committed ids -> partitions by video_id ->
    `diff_task`; yields one `DIFF_RECEIPT` row per partition."""
    import ray

    ds = listing.map_batches(_as_diff_rows, fn_kwargs={"schema": schema, "side": SIDE_LISTED},
                             batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    if committed_files and not replace_all:
        files = ray.data.from_items([{"file": f} for f in committed_files],
                                    override_num_blocks=max(1, min(len(committed_files), 1024)))
        committed = files.map_batches(_committed_task, fn_kwargs={"output": output, "storage": storage,
                                                                  "schema": schema},
                                      batch_size=16, batch_format="pyarrow", num_cpus=0.5)
        ds = ds.union(committed)
    if num_partitions <= 1:
        ds = ds.repartition(1)  # one block: a video's rows meet without a shuffle
    else:
        ds = ds.repartition(num_partitions, keys=["video_id"])
    return ds.map_batches(diff_task, fn_kwargs={"output": output, "storage": storage, "run_id": run_id,
                                                "replace_all": replace_all, "retry_failed": retry_failed,
                                                "prune": prune, "passthrough": passthrough},
                          batch_size=None, batch_format="pyarrow", num_cpus=0.5)


def num_partitions(rows: int) -> int:
    """Partitions of the diff for this many rows (listing plus committed): one up to
    `ROWS_PER_PARTITION`, then one per that many (a partition is one task's block)."""
    return max(1, -(-rows // ROWS_PER_PARTITION))


# ---------------------------------------------------------------------------------------------
# Removals


def _removal_groups(batch: pa.Table, *, ungrouped: frozenset[str]) -> pa.Table:
    """Ray Data UDF: the rewrite group of each removal: a grouped shard's name (shared by its
    tables' files), or the file itself for a file of an older layout."""
    files = batch.column("file").to_pylist()
    groups = [f if f in ungrouped else posixpath.basename(f) for f in files]
    return batch.append_column("group", pa.array(groups, pa.string()))


def _scan_task(batch: pa.Table, *, output: str, storage: StorageOptions, removal_items: list[dict[str, Any]],
               ungrouped: frozenset[str]) -> pa.Table:
    """Ray Data UDF: (video_id, file, group) of the videos removed from older-layout files
    (``ungrouped``) found in the older-layout clips files of ``batch``."""
    fs, root = url_to_fs(output.rstrip("/"), storage)
    wanted = set()
    for item in removal_items:
        removals = read_removals(fs, item)
        wanted.update(v for v, rel in zip(removals.column("video_id").to_pylist(), removals.column("file").to_pylist())
                      if rel in ungrouped)
    ids = pa.array(sorted(wanted), pa.string())
    out = []
    for rel in batch.column("file").to_pylist():
        with fs.open(posixpath.join(root.rstrip("/"), rel), "rb") as f:
            found = pq.ParquetFile(f).read(columns=["video_id"]).column("video_id")
        hits = pc.unique(found.filter(pc.is_in(found, value_set=ids))).to_pylist() if len(ids) else []
        out += [{"video_id": v, "file": rel, "group": rel} for v in hits]
    return pa.Table.from_pylist(out, schema=pa.schema([("video_id", pa.string()), ("file", pa.string()),
                                                       ("group", pa.string())]))


def _rewrite_task(batch: pa.Table, *, store: OutputStore, run_id: str, committed: frozenset[str]) -> pa.Table:
    """Ray Data UDF: rewrite each group of this block without its removed videos; one row per
    file replaced ({old: new or null})."""
    groups: dict[str, set[str]] = {}
    for vid, group in zip(batch.column("video_id").to_pylist(), batch.column("group").to_pylist()):
        groups.setdefault(group, set()).add(vid)
    old, new = [], []
    for group, ids in sorted(groups.items()):
        if "/" in group:  # an older-layout file: rewritten alone
            rels = [group]
        else:
            rels = [posixpath.join(t, group) for t in TABLES if posixpath.join(t, group) in committed]
        for k, v in rewrite_group(store, run_id, rels, ids).items():
            old.append(k)
            new.append(v)
    return pa.table({"old": pa.array(old, pa.string()), "new": pa.array(new, pa.string())})


def read_removals(fs, item: dict[str, Any]) -> pa.Table:
    """The removals (video_id, file) of one staged removals file: ``item`` = {path, todo (its
    partition's to-do file), take (rows of it this run takes; -1: all)}. With a take, only the
    superseded inputs among those taken are removed now (and every pruned one)."""
    with fs.open(item["path"], "rb") as f:
        table = pq.read_table(f)
    if item["take"] >= 0:
        ids = pa.array([], pa.string())
        if item["todo"] and item["take"]:
            with fs.open(item["todo"], "rb") as f:
                ids = pq.read_table(f, columns=["video_id"]).column("video_id").slice(0, item["take"])
        table = table.filter(pc.or_(pc.invert(table.column("superseded")),
                                    pc.is_in(table.column("video_id"), value_set=ids)))
    return table.select(["video_id", "file"])


def rewrite_removals(removal_files: list[tuple[str, str | None]], *, store: OutputStore, run_id: str,
                     committed: set[str], ungrouped: set[str], removals: int,
                     taken: dict[str, int] | None = None) -> dict[str, str | None]:
    """Rewrite, in Ray tasks, the committed shard groups that hold removed videos; returns
    {committed file: rewritten staged file or None}. Files of an older layout (``ungrouped``:
    clips not stored beside their videos row) are found by reading the video_id column of
    those clips files only.

    ``removal_files``: (removals file, its partition's to-do file). ``taken`` ({to-do file:
    rows this run takes}, when --limit leaves a backlog): a superseded input's old rows are
    removed only when this run redoes it; the others keep theirs until a later run takes them.
    """
    import ray

    def staged(rel: str | None) -> str | None:
        return None if rel is None else posixpath.join(store.path("_staging", run_id), rel)

    def take(todo: str | None) -> int:  # -1: every superseded removal stands
        if taken is None:
            return -1
        return taken.get(todo, 0) if todo else 0

    items = [{"path": staged(rel), "todo": staged(todo), "take": take(todo)} for rel, todo in removal_files]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))

    def read(batch: pa.Table) -> pa.Table:
        return pa.concat_tables([read_removals(store.fs, item) for item in batch.to_pylist()])

    ds = ds.map_batches(read, batch_size=1, batch_format="pyarrow", num_cpus=0.25)
    ds = ds.map_batches(_removal_groups, fn_kwargs={"ungrouped": frozenset(ungrouped)}, batch_format="pyarrow",
                        batch_size=None, num_cpus=0.25)
    old_clips = sorted(f for f in ungrouped if f.startswith(CLIPS + "/"))
    if old_clips:
        scan = ray.data.from_items([{"file": f} for f in old_clips],
                                   override_num_blocks=max(1, min(len(old_clips), 1024)))
        scan = scan.map_batches(_scan_task, fn_kwargs={"output": store.output, "storage": store.storage,
                                                       "removal_items": items, "ungrouped": frozenset(ungrouped)},
                                batch_size=8, batch_format="pyarrow", num_cpus=0.5)
        ds = ds.union(scan)
    parts = num_partitions(removals)
    ds = ds.repartition(1) if parts <= 1 else ds.repartition(parts, keys=["group"])
    ds = ds.map_batches(_rewrite_task, fn_kwargs={"store": store, "run_id": run_id, "committed": frozenset(committed)},
                        batch_size=None, batch_format="pyarrow", num_cpus=0.5)
    replaced: dict[str, str | None] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for old, new in zip(batch.column("old").to_pylist(), batch.column("new").to_pylist()):
            replaced[old] = new
    return replaced


def read_diff_receipts(batches) -> tuple[list[tuple[str, int]], list[tuple[str, str | None]], int, DiffCounts]:
    """(to-do files with their rows, removal files with their partition's to-do file, removals,
    counts) from `diff_dataset`'s rows."""
    todo: list[tuple[str, int]] = []
    removal_files: list[tuple[str, str | None]] = []
    removals = 0
    counts = DiffCounts()
    for batch in batches:
        for row in batch.to_pylist():
            if row["todo_file"]:
                todo.append((row["todo_file"], int(row["todo_rows"])))
            if row["removals_file"]:
                removal_files.append((row["removals_file"], row["todo_file"]))
            removals += int(row["removals_rows"])
            counts.add(DiffCounts.from_json(row["counts"]))
    return sorted(todo), sorted(removal_files), removals, counts


def todo_reader(batch: pa.Table, *, store: OutputStore, run_id: str, done_ref=None) -> pa.Table:
    """Ray Data UDF: the to-do rows of the files in ``batch`` (file, first input number, rows to
    take), numbered: ``input_number`` = the file's first number + the row's place in it.
    ``done_ref`` (a packed bitmap, `commit.Bitmap.bits`) leaves out inputs already done."""
    tables = []
    done = None
    if done_ref is not None:
        import ray

        done = ray.get(done_ref)
    for rel, first, take in zip(batch.column("file").to_pylist(), batch.column("first").to_pylist(),
                                batch.column("take").to_pylist()):
        with store.fs.open(store.path("_staging", run_id, rel), "rb") as f:
            table = pq.read_table(f).slice(0, take)
        numbers = np.arange(first, first + table.num_rows, dtype=np.int64)
        table = table.add_column(0, "input_number", pa.array(numbers))
        if done is not None:
            is_done = ((done[numbers >> 3] >> (numbers & 7).astype(np.uint8)) & 1).astype(bool)
            table = table.filter(pa.array(~is_done))
        tables.append(table)
    return pa.concat_tables(tables) if tables else pa.table({})


def plan_todo(todo_files: list[tuple[str, int]], limit: int | None) -> tuple[list[dict[str, Any]], int]:
    """(one item per to-do file: file, first input number, rows to take; the run's inputs),
    taking at most ``limit`` inputs (the first files' rows first)."""
    items, total = [], 0
    for rel, rows in todo_files:
        take = rows if limit is None else min(rows, limit - total)
        if take <= 0:
            break
        items.append({"file": rel, "first": total, "take": take})
        total += take
    return items, total

