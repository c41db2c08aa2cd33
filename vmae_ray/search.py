"""`vmae-ray search` and `vmae-ray index`: nearest neighbours over committed tables.

`search` answers "which videos (or clips) are most like this one?" for a video already in the
tables (by video_id or URI) or any other video (decoded and embedded here with the model and
settings its `_SUCCESS` records, without Ray). It searches exactly by default: one pass over
the embedding matrix, results equal to a brute-force float64 cosine ranking
(`neighbours.cosine_top_k`). When `vmae-ray index` has built an index for the committed state
the tables are in now, `search` uses it instead (approximate, much faster on large tables);
an index of an older state is reported stale and ignored.

The index lives under OUT/_index/<level>/ (a leading underscore: the job and every reader
skip it), written so that a crash never leaves one that search would trust: the FAISS file
and the id map get fresh names, then INDEX.json (which names them and the committed files
they cover) replaces the old one atomically, and only then are unreferenced files removed.
After a nightly run, `index` removes the rows of shards that are no longer committed
(superseded videos; FAISS remove_ids) and adds the rows of new shards to the trained lists,
without retraining; it rebuilds from scratch only when the settings changed or the table
outgrew the index (see `decide_update`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vmae_ray import neighbours as nb
from vmae_ray.config import CommandParser, ConfigError, storage_errors_of
from vmae_ray.listing import uri_spellings
from vmae_ray.reading import CommittedOutput, add_tables_arguments, open_tables
from vmae_ray.storage import StorageOptions, is_local_fs, join, url_to_fs

LEVELS = {"video": "videos", "clip": "clips"}
INDEX_DIR = "_index"
INDEX_MANIFEST = "INDEX.json"
INDEX_FORMAT = "vmae-ray-index/1"
# An IVF index is rebuilt (k-means again) once the table holds this many times the rows its
# lists were trained on: its nlist (sqrt(N) at training) is then half what the size asks for.
REBUILD_GROWTH = 4.0


def _level_table(committed: CommittedOutput, level: str) -> str:
    table = LEVELS[level]
    if not committed.committed_files(table):
        raise ConfigError("--tables", f"{committed.uri} has no committed {table}/ rows (no input of its runs produced a clip)")
    return table


# ------------------------------------------------------------------------------ rows


def meta_columns(level: str) -> list[str]:
    """The columns a search result shows, per level."""
    return ["video_id", "uri"] + (["clip_index", "start_seconds", "end_seconds"] if level == "clip" else [])


@dataclass
class Rows:
    """Rows of one table: embeddings (N, D) float32, their norms (N,) float64, the result
    columns, and each row's tie rank ((video_id, clip_index) order)."""

    matrix: np.ndarray
    norms: np.ndarray
    meta: pa.Table

    @property
    def tie_rank(self) -> np.ndarray:
        return tie_rank(self.meta)


def tie_rank(meta: pa.Table) -> np.ndarray:
    """Rank of every row when sorted by video_id, then clip_index: how equal scores are ordered."""
    keys = [("video_id", "ascending")] + ([("clip_index", "ascending")] if "clip_index" in meta.column_names else [])
    order = pc.sort_indices(meta, sort_keys=keys).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def read_rows(committed: CommittedOutput, level: str, files: list[str] | None = None) -> Rows:
    table = LEVELS[level]
    matrix, meta = committed.embeddings(table, meta_columns(level), files=files)
    return Rows(matrix, nb.row_norms(matrix), meta)


# ------------------------------------------------------------------------------ the query


@dataclass
class Query:
    """What is searched for: a float64 vector (D,), and where it came from (``video_id`` when it is
    a video of the tables, whose rows are then left out of the answer)."""

    vector: np.ndarray
    video_id: str | None
    uri: str
    in_tables: bool
    description: str

    def __post_init__(self) -> None:
        # Cosine similarity to a zero (or non-finite) vector is undefined: refused here, for
        # the exact search and the index alike.
        if not np.all(np.isfinite(self.vector)) or not np.any(self.vector):
            raise ConfigError("--query", f"{self.description}: its embedding is zero or not finite, so it has no "
                              "cosine similarity to anything")


def match_query(text: str, meta: pa.Table) -> str | None:
    """The video_id that ``text`` names in ``meta`` (a video_id, or a URI, also as an absolute
    local path), or None. Raises ConfigError when a URI names several videos."""
    ids = meta.column("video_id")
    if pc.any(pc.equal(ids, text)).as_py():
        return text
    names = uri_spellings(text)
    hits = pc.unique(pc.filter(ids, pc.is_in(meta.column("uri"), value_set=pa.array(sorted(names))))).to_pylist()
    if len(hits) > 1:
        raise ConfigError("--query", f"{text} is the uri of several videos ({', '.join(sorted(hits))}); give a video_id")
    return hits[0] if hits else None


def query_from_rows(video_id: str, matrix: np.ndarray, meta: pa.Table, level: str, clip_index: int | None) -> Query:
    """The query vector of a video in the tables, from its rows (``matrix``/``meta`` may hold
    other rows too): its video embedding; at clip level the mean of its clip embeddings
    (`assembly.video_embedding`, what videos/ holds), or one clip's with ``clip_index``."""
    from vmae_ray.assembly import video_embedding

    mask = pc.equal(meta.column("video_id"), video_id).to_numpy(zero_copy_only=False)
    rows = np.nonzero(mask)[0]
    uri = meta.column("uri")[int(rows[0])].as_py()
    if level == "video":
        return Query(matrix[rows[0]].astype(np.float64), video_id, uri, True, f"video {video_id} ({uri}), in the tables")
    if clip_index is None:
        return Query(video_embedding(matrix[rows]).astype(np.float64), video_id, uri, True,
                     f"video {video_id} ({uri}), in the tables: the mean of its {_clips(len(rows))}")
    clip_indices = meta.column("clip_index").to_numpy()[rows]
    chosen = rows[clip_indices == clip_index]
    if not len(chosen):
        raise ConfigError("--clip-index", f"video {video_id} has clips {sorted(clip_indices.tolist())}, not {clip_index}")
    return Query(matrix[chosen[0]].astype(np.float64), video_id, uri, True,
                 f"clip {clip_index} of video {video_id} ({uri}), in the tables")


def embed_outside_video(uri: str, committed: CommittedOutput, storage: StorageOptions) -> tuple[np.ndarray, list[dict]]:
    """Decode and embed a video that is not in the tables the way their run did, here, without Ray.

    The settings come from `_SUCCESS` (`EmbedConfig.from_dict` of its `config`, the model's
    ModelSpec, `pipeline.decode_params`), decoding runs in this process (`stages.decode_video`)
    and the model is `VideoMAEEmbedder`. Returns (clip embeddings (C, D) float32 in clip order,
    clip facts [{clip_index, start_seconds, end_seconds}]). Raises ConfigError when the video
    cannot be read or decoded, or the checkpoint is not the one that made the tables.
    """
    from vmae_ray.checkpoint import CheckpointError, load_model_spec
    from vmae_ray.config import DEFAULT_BATCH_SIZE_CPU, EmbedConfig
    from vmae_ray.listing import video_id_for_uri
    from vmae_ray.planning import decode_params
    from vmae_ray.stages import decode_video, video_clips

    manifest = committed.manifest
    config = EmbedConfig.from_dict(manifest.get("config") or {})
    model = manifest.get("model") or {}
    with storage_errors_of("--query", config.model, storage):  # credentials, endpoint of the tables' model
        try:
            spec = load_model_spec(config.model, storage, config.model_cache_dir)
        except CheckpointError as exc:
            raise ConfigError("--query", f"{uri} is not in the tables, and the model that made them ({config.model}) "
                               f"cannot be loaded here to embed it: {exc}") from None
    if model.get("fingerprint") and spec.fingerprint != model["fingerprint"]:
        raise ConfigError("--query", f"{uri} is not in the tables, and the checkpoint now at {config.model} is not the "
                           "one that made them (its fingerprint differs): embeddings would not be comparable")
    params = dataclasses.replace(decode_params(config, spec, model.get("num_frames") or spec.num_frames), isolate=False)
    item = {"video_id": video_id_for_uri(uri), "uri": uri}
    found = video_clips(list(decode_video(item, params, storage)))
    if isinstance(found, dict) or not found[0]:
        bad = found if isinstance(found, dict) else {}
        raise ConfigError("--query", f"{uri} is neither a video_id nor a uri in {committed.uri}, and not a readable video "
                           f"({bad.get('error_type', 'no clips')}: {bad.get('message', '')})")
    facts, clips = found
    from vmae_ray.embedder import VideoMAEEmbedder

    embedder = VideoMAEEmbedder(spec.model_dir, storage=storage, cache_root=config.model_cache_dir, device="auto",
                                dtype=config.dtype)
    size = config.batch_size or DEFAULT_BATCH_SIZE_CPU
    parts = [embedder.embed(clips[s:s + size])[0] for s in range(0, len(clips), size)]
    facts = [{k: f[k] for k in ("clip_index", "start_seconds", "end_seconds")} for f in facts]
    return np.concatenate(parts).astype(np.float32), facts


def _clips(n: int) -> str:
    return f"{n} clip embedding" + ("s" if n != 1 else "")


def query_outside(text: str, committed: CommittedOutput, storage: StorageOptions, clip_index: int | None) -> Query:
    """The query vector of a video that is not in the tables: embedded here (see `embed_outside_video`)."""
    from vmae_ray.assembly import video_embedding

    fs, path = url_to_fs(text, storage)
    with storage_errors_of("--query", text, storage):  # credentials, endpoint
        try:
            exists = fs.isfile(path)
        except (OSError, ValueError):
            exists = False
    if not exists:
        raise ConfigError("--query", f"{text} is neither a video_id nor a uri in {committed.uri}, and no such file exists")
    embeddings, facts = embed_outside_video(text, committed, storage)
    if clip_index is None:
        return Query(video_embedding(embeddings).astype(np.float64), None, text, False,
                     f"{text}, not in the tables: embedded here, the mean of its {_clips(len(facts))}")
    indices = [f["clip_index"] for f in facts]
    if clip_index not in indices:
        raise ConfigError("--clip-index", f"{text} has clips {indices}, not {clip_index}")
    return Query(embeddings[indices.index(clip_index)].astype(np.float64), None, text, False,
                 f"clip {clip_index} of {text}, not in the tables: embedded here")


# ------------------------------------------------------------------------------ the index


@dataclass
class IndexFiles:
    """The index of one level under OUT/_index/<level>/: INDEX.json and the files it names."""

    committed: CommittedOutput
    level: str

    @property
    def root(self) -> str:
        return join(self.committed.uri, f"{INDEX_DIR}/{self.level}")

    def _fs(self):
        return url_to_fs(self.root, self.committed.storage)

    def manifest(self) -> dict[str, Any] | None:
        """INDEX.json, or None when there is none (or it is unreadable: then it is rebuilt)."""
        fs, root = self._fs()
        path = posixpath.join(root, INDEX_MANIFEST)
        if not fs.exists(path):
            return None
        try:
            with fs.open(path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("format") == INDEX_FORMAT else None

    def staleness(self, manifest: dict[str, Any] | None) -> str | None:
        """None when ``manifest`` covers exactly the committed state the tables are in now,
        else why not. The committed files decide (their names carry their run's id and are
        never reused), with the settings fingerprint."""
        if manifest is None:
            return "no index"
        table = LEVELS[self.level]
        if manifest.get("settings_fingerprint") != self.committed.settings_fingerprint:
            return "the tables were made with other settings since"
        covered, now = set(manifest.get("files", [])), set(self.committed.committed_files(table))
        if covered != now:
            return (f"it covers run {manifest.get('tables_run_id')}; the tables are at run {self.committed.run_id} "
                    f"({len(now - covered)} new, {len(covered - now)} removed {table}/ files)")
        return None

    def load(self, manifest: dict[str, Any]):
        """(FAISS index, id map table) named by ``manifest``."""
        import faiss

        fs, root = self._fs()
        with fs.open(posixpath.join(root, manifest["ids_file"]), "rb") as f:
            ids = pq.read_table(f)
        index_path = posixpath.join(root, manifest["index_file"])
        if is_local_fs(fs):
            return faiss.read_index(index_path), ids
        with tempfile.TemporaryDirectory(prefix="vmae-ray-index-") as tmp:
            local = os.path.join(tmp, "index.faiss")
            fs.get_file(index_path, local)
            return faiss.read_index(local), ids

    def save(self, index, ids: pa.Table, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the index and id map under fresh names, then INDEX.json (atomic), then remove
        files no index names any more. Returns the manifest written."""
        import faiss

        from vmae_ray.writing import new_run_id, write_bytes_atomic

        token = new_run_id()
        manifest = {**manifest, "format": INDEX_FORMAT, "index_file": f"index-{token}.faiss",
                    "ids_file": f"ids-{token}.parquet"}
        fs, root = self._fs()
        fs.makedirs(root, exist_ok=True)
        with fs.open(posixpath.join(root, manifest["ids_file"]), "wb") as f:
            pq.write_table(ids, f, compression="zstd")
        target = posixpath.join(root, manifest["index_file"])
        if is_local_fs(fs):
            tmp = target + ".tmp"
            faiss.write_index(index, tmp)
            os.replace(tmp, target)
        else:
            with tempfile.TemporaryDirectory(prefix="vmae-ray-index-") as tmp:
                local = os.path.join(tmp, "index.faiss")
                faiss.write_index(index, local)
                fs.put_file(local, target)
        write_bytes_atomic(fs, posixpath.join(root, INDEX_MANIFEST), json.dumps(manifest, indent=1).encode())
        # What the manifest now in place names stays (another index command may have won).
        current = self.manifest() or manifest
        keep = {INDEX_MANIFEST, current.get("index_file"), current.get("ids_file")}
        for p in fs.ls(root, detail=False):
            if posixpath.basename(p.rstrip("/")) not in keep:
                fs.rm(p, recursive=True)
        return manifest


@dataclass(frozen=True)
class UpdatePlan:
    """What `index` does: "current", "rebuild" (and why) or "update" (files to drop and add)."""

    action: str
    reason: str
    removed_files: tuple[str, ...] = ()
    added_files: tuple[str, ...] = ()


def decide_update(manifest: dict[str, Any] | None, committed_files: list[str], settings_fingerprint: str | None,
                  removed_rows: int, added_rows_estimate: int | None = None) -> UpdatePlan:
    """Pure decision: keep, update incrementally, or rebuild.

    Rebuild when there is no index, the settings changed (old and new embeddings are not
    comparable), nothing of the old index would remain, the row count now asks for another
    kind of index (flat below `neighbours.FLAT_MAX_ROWS`), or an IVF index's lists were trained
    on fewer than 1/`REBUILD_GROWTH` of the rows. Otherwise remove the rows of files no longer
    committed and add those of new files.
    """
    if manifest is None:
        return UpdatePlan("rebuild", "no index yet")
    if manifest.get("settings_fingerprint") != settings_fingerprint:
        return UpdatePlan("rebuild", "the tables were made with other settings")
    covered, now = list(manifest.get("files", [])), list(committed_files)
    now_set, covered_set = set(now), set(covered)
    removed = tuple(f for f in covered if f not in now_set)
    added = tuple(f for f in now if f not in covered_set)
    if not removed and not added:
        return UpdatePlan("current", "the index covers the committed tables")
    if len(removed) == len(covered):
        return UpdatePlan("rebuild", "every indexed file was replaced")
    if added_rows_estimate is not None:
        total = manifest["rows"] - removed_rows + added_rows_estimate
        if nb.plan_index(total).kind != manifest["kind"]:
            return UpdatePlan("rebuild", f"{total} rows want a {nb.plan_index(total).describe()} index")
        if manifest["kind"] == "ivf_flat" and total > REBUILD_GROWTH * manifest["trained_rows"]:
            return UpdatePlan("rebuild", f"{total} rows, more than {REBUILD_GROWTH:g}x the "
                                         f"{manifest['trained_rows']} its lists were trained on")
    return UpdatePlan("update", f"{len(added)} new and {len(removed)} removed files", removed, added)


def _id_map(rows: Rows, files: list[str], counts: list[int], first_id: int) -> pa.Table:
    ids = np.arange(first_id, first_id + rows.meta.num_rows, dtype=np.int64)
    file_col = pa.array(np.repeat(np.array(files, dtype=object), counts).tolist(), pa.string())
    return rows.meta.add_column(0, "id", pa.array(ids)).add_column(1, "file", file_col)


def _read_files(committed: CommittedOutput, level: str, files: list[str]) -> tuple[Rows, list[int]]:
    """Rows of these files (in order) and each file's row count."""
    parts, counts = [], []
    for rel in files:
        matrix, meta = committed.embeddings(LEVELS[level], meta_columns(level), files=[rel])
        parts.append((matrix, meta))
        counts.append(meta.num_rows)
    matrix = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    meta = pa.concat_tables([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return Rows(matrix, nb.row_norms(matrix), meta), counts


def build_or_update(committed: CommittedOutput, level: str, *, rebuild: bool = False,
                    target_recall: float = nb.DEFAULT_TARGET_RECALL, log=print) -> dict[str, Any]:
    """`vmae-ray index`: bring OUT/_index/<level> up to the committed tables; returns INDEX.json."""
    table = _level_table(committed, level)
    store = IndexFiles(committed, level)
    started = time.perf_counter()
    existing = None if rebuild else store.manifest()
    files_now = committed.committed_files(table)
    plan = decide_update(existing, files_now, committed.settings_fingerprint, 0)
    if plan.action == "current":
        log(f"index {store.root} is up to date: {existing['rows']} rows of {table}/, {existing['description']}; "
            f"covers run {existing['tables_run_id']}")
        return existing
    built = _update(committed, level, store, existing, plan, files_now) if plan.action == "update" else plan
    if isinstance(built, UpdatePlan):
        built = _rebuild(committed, level, files_now, built.reason)
    index, ids, facts, change = built
    history = (list(existing.get("history", [])) if existing and facts["action"] == "update" else [])
    history.append({"at": _now(), "run_id": committed.run_id, **{k: facts[k] for k in ("action", "added", "removed")}})
    sample, sample_ids = nb.sample_indexed(index, nb.TUNE_QUERIES, seed=len(history))
    choice = nb.tune_nprobe(index, sample, sample_ids, target=target_recall)
    kind, nlist = facts["kind"], facts["nlist"]
    description = nb.IndexPlan(kind, nlist).describe() + (f", nprobe {choice.nprobe}" if kind == "ivf_flat" else "")
    manifest = {
        "level": level, "table": table, "kind": kind, "nlist": nlist, "nprobe": choice.nprobe,
        "description": description, "recall_at_10": round(choice.recall, 4), "recall_queries": choice.queries,
        "target_recall": target_recall, "nprobe_tried": [list(t) for t in choice.tried],
        "rows": int(index.ntotal), "dim": int(index.d), "next_id": int(facts["next_id"]),
        "trained_rows": int(facts["trained_rows"]), "tables_run_id": committed.run_id,
        "settings_fingerprint": committed.settings_fingerprint, "files": files_now, "updated_at": _now(),
        "history": history[-50:],
    }
    manifest = store.save(index, ids, manifest)
    recall = (f" (recall@10 {choice.recall:.3f} on {choice.queries} rows against a scan of every list)"
              if kind == "ivf_flat" else "")
    log(f"index {store.root}: {manifest['rows']} rows of {table}/, {description}{recall}; {change}; "
        f"covers run {committed.run_id}; {time.perf_counter() - started:.1f}s")
    return manifest


def _rebuild(committed: CommittedOutput, level: str, files: list[str], reason: str):
    """A new index of every committed row: k-means on a sample (IVF), then every row added."""
    rows, counts = _read_files(committed, level, files)
    plan = nb.plan_index(len(rows.matrix))
    index = nb.new_index(plan, rows.matrix.shape[1])
    unit = nb.normalize_rows(rows.matrix, rows.norms)  # in place: the index keeps its own copy
    if plan.kind == "ivf_flat":
        rng = np.random.default_rng(nb.KMEANS_SEED)
        nb.train_index(index, unit[np.sort(rng.choice(len(unit), size=min(len(unit), plan.train_rows), replace=False))])
    ids = _id_map(rows, files, counts, 0)
    nb.add_rows(index, unit, ids.column("id").to_numpy())
    facts = {"action": "rebuild", "added": index.ntotal, "removed": None, "kind": plan.kind, "nlist": plan.nlist,
             "next_id": index.ntotal, "trained_rows": index.ntotal}
    return index, ids, facts, f"built from scratch ({reason})"


def _update(committed: CommittedOutput, level: str, store: IndexFiles, existing: dict, plan: UpdatePlan,
            files: list[str]):
    """The existing index without the rows of files no longer committed (FAISS remove_ids) and
    with the rows of new files added to its trained lists; or an UpdatePlan saying why it must
    be rebuilt instead."""
    index, ids = store.load(existing)
    if existing.get("dim") != index.d or existing.get("rows") != index.ntotal:
        return UpdatePlan("rebuild", "the index files do not match INDEX.json")
    gone = pc.is_in(ids.column("file"), value_set=pa.array(list(plan.removed_files), pa.string()))
    removed_ids = ids.filter(gone).column("id").to_numpy()
    new_rows, counts = _read_files(committed, level, list(plan.added_files)) if plan.added_files else (None, [])
    added = sum(counts)
    again = decide_update(existing, files, committed.settings_fingerprint, len(removed_ids), added)
    if again.action != "update":
        return again
    removed = nb.remove_rows(index, removed_ids)
    ids = ids.filter(pc.invert(gone))
    next_id = existing["next_id"]
    if new_rows is not None:
        new_ids = _id_map(new_rows, list(plan.added_files), counts, next_id)
        nb.add_rows(index, nb.normalize_rows(new_rows.matrix, new_rows.norms), new_ids.column("id").to_numpy())
        ids = pa.concat_tables([ids, new_ids])
        next_id += added
    facts = {"action": "update", "added": added, "removed": removed, "kind": existing["kind"],
             "nlist": existing.get("nlist", 0), "next_id": next_id, "trained_rows": existing["trained_rows"]}
    change = (f"updated: +{added} rows from {len(plan.added_files)} new files, -{removed} rows of "
              f"{len(plan.removed_files)} files no longer committed (lists kept, trained on "
              f"{existing['trained_rows']} rows)")
    return index, ids, facts, change


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------------ search


@dataclass
class Result:
    rank: int
    score: float
    row: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, **self.row}


def search(committed: CommittedOutput, storage: StorageOptions, query_text: str, *, k: int, level: str,
           clip_index: int | None = None, exact: bool = False, log=print) -> tuple[Query, list[Result], str]:
    """Resolve the query and search; returns (query, results best first, how it searched)."""
    table = _level_table(committed, level)
    store = IndexFiles(committed, level)
    manifest = None if exact else store.manifest()
    stale = None if exact else store.staleness(manifest)
    if manifest is not None and stale is not None:
        log(f"the index under {store.root} is stale ({stale}): searching exactly. "
            f"Run `vmae-ray index --tables {committed.uri} --level {level}` to update it.")
    if manifest is not None and stale is None:
        return _search_index(committed, storage, store, manifest, query_text, k, level, clip_index)
    rows = read_rows(committed, level)
    video_id = match_query(query_text, rows.meta)
    if video_id is not None:
        query = query_from_rows(video_id, rows.matrix, rows.meta, level, clip_index)
        exclude = pc.equal(rows.meta.column("video_id"), video_id).to_numpy(zero_copy_only=False)
    else:
        query, exclude = query_outside(query_text, committed, storage, clip_index), None
    found = nb.cosine_top_k(rows.matrix, query.vector, k, norms=rows.norms, exclude=exclude, tie_rank=rows.tie_rank)
    picked = rows.meta.take(pa.array(found.rows)).to_pylist()
    results = [Result(i + 1, float(s), r) for i, (s, r) in enumerate(zip(found.scores, picked))]
    method = f"exact search over {len(rows.matrix)} rows of {table}/"
    return query, results, method


def _search_index(committed, storage, store: IndexFiles, manifest, query_text, k, level, clip_index):
    index, ids = store.load(manifest)
    video_id = match_query(query_text, ids)
    table = LEVELS[level]
    if video_id is not None:
        # The query's own rows, read from the file(s) the id map says hold them.
        own = ids.filter(pc.equal(ids.column("video_id"), video_id))
        files = sorted(set(own.column("file").to_pylist()))
        matrix, meta = committed.embeddings(table, meta_columns(level), files=files)
        query = query_from_rows(video_id, matrix, meta, level, clip_index)
        excluded = set(own.column("id").to_pylist())
    else:
        query, excluded = query_outside(query_text, committed, storage, clip_index), set()
    unit = (query.vector / np.linalg.norm(query.vector)).astype(np.float32)
    scores, found = nb.search_index(index, unit, k + len(excluded), manifest.get("nprobe", 0))
    hits = [(float(s), int(i)) for s, i in zip(scores[0], found[0]) if i != -1 and int(i) not in excluded]
    position = pc.index_in(pa.array([i for _, i in hits], pa.int64()), value_set=ids.column("id")).to_numpy()
    rows = ids.drop_columns(["id", "file"]).take(pa.array(position)).to_pylist()
    order = sorted(range(len(hits)), key=lambda j: (-hits[j][0], rows[j]["video_id"], rows[j].get("clip_index", 0)))[:k]
    results = [Result(n + 1, hits[j][0], rows[j]) for n, j in enumerate(order)]
    recall = f", recall@10 {manifest['recall_at_10']:.3f} when built" if manifest["kind"] == "ivf_flat" else ""
    method = (f"{'approximate' if manifest['kind'] == 'ivf_flat' else 'exact'} search with the index "
              f"({manifest['description']}{recall}) over {manifest['rows']} rows of {table}/")
    return query, results, method


def format_results(results: list[Result], level: str) -> str:
    """The text table `search` prints."""
    head = ["rank", "score", "video_id"] + (["clip_index", "start_seconds", "end_seconds"] if level == "clip" else []) + ["uri"]
    lines = []
    for r in results:
        cells = [str(r.rank), f"{r.score:.6f}", str(r.row["video_id"])]
        if level == "clip":
            cells += [str(r.row["clip_index"]), f"{r.row['start_seconds']:.3f}", f"{r.row['end_seconds']:.3f}"]
        lines.append(cells + [str(r.row["uri"])])
    widths = [max(len(head[i]), *(len(line[i]) for line in lines)) if lines else len(head[i]) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    out += ["  ".join(c.rjust(w) if i < 2 or head[i] in ("clip_index", "start_seconds", "end_seconds") else c.ljust(w)
                      for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in lines]
    return "\n".join(out)


# ------------------------------------------------------------------------------ commands


def _search_parser(prog: str) -> argparse.ArgumentParser:
    p = CommandParser(prog=prog, description="The k nearest videos or clips by cosine similarity of their "
                                "embeddings. Exact unless a current index exists (see `vmae-ray index`).")
    add_tables_arguments(p)
    p.add_argument("--query", required=True, help="a video_id or uri in the tables, or the path/URI of another video "
                   "(decoded and embedded here with the model and settings of the tables' run)")
    p.add_argument("-k", "--k", type=int, default=10, help="how many neighbours (default 10)")
    p.add_argument("--level", choices=sorted(LEVELS), default="video", help="search videos/ or clips/ (default video)")
    p.add_argument("--clip-index", type=int, help="clip level: search with this clip of the query video instead of "
                   "the mean of its clip embeddings")
    p.add_argument("--exact", action="store_true", help="search exactly even when a current index exists")
    p.add_argument("--json", action="store_true", help="one JSON object per result line")
    return p


def run_search(argv: Sequence[str], prog: str = "vmae-ray search") -> int:
    """`vmae-ray search`; exit status 0, or 2 for bad input."""
    parser = _search_parser(prog)
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"-k: must be at least 1, got {args.k}")
    if args.clip_index is not None and args.level != "clip":
        parser.error("--clip-index: only with --level clip")
    try:
        committed, storage = open_tables(args, [args.query])
        query, results, method = search(committed, storage, args.query, k=args.k, level=args.level,
                                        clip_index=args.clip_index, exact=args.exact,
                                        log=lambda m: print(f"{prog}: {m}", file=sys.stderr))
    except ConfigError as exc:
        parser.error(str(exc))
    print(f"{prog}: query: {query.description}; {method}"
          + ("; its own rows excluded" if query.in_tables else ""), file=sys.stderr)
    if args.json:
        for r in results:
            print(json.dumps(r.as_dict()))
    else:
        print(format_results(results, args.level))
    return 0


def run_index(argv: Sequence[str], prog: str = "vmae-ray index") -> int:
    """`vmae-ray index`; exit status 0, or 2 for bad input."""
    parser = CommandParser(prog=prog, description="Build or update the approximate nearest-neighbour index "
                                     "of the committed tables under TABLES/_index/LEVEL (FAISS; flat below "
                                     f"{nb.FLAT_MAX_ROWS} rows, IVF-Flat above), which `vmae-ray search` then uses.")
    add_tables_arguments(parser)
    parser.add_argument("--level", choices=sorted(LEVELS), default="video", help="index videos/ or clips/ (default video)")
    parser.add_argument("--target-recall", type=float, default=nb.DEFAULT_TARGET_RECALL,
                        help=f"recall@10 nprobe is chosen for (default {nb.DEFAULT_TARGET_RECALL})")
    parser.add_argument("--rebuild", action="store_true", help="build from scratch even when the index can be updated")
    args = parser.parse_args(argv)
    if not 0 < args.target_recall <= 1:
        parser.error(f"--target-recall: must be in (0, 1], got {args.target_recall}")
    try:
        committed, _ = open_tables(args)
        build_or_update(committed, args.level, rebuild=args.rebuild, target_recall=args.target_recall,
                        log=lambda m: print(f"{prog}: {m}"))
    except ConfigError as exc:
        parser.error(str(exc))
    return 0
