"""Nearest neighbours and near-duplicate links over embedding matrices: pure logic, no I/O.

What "cosine" means everywhere in vmae-ray: for two stored float32 embeddings a and b,
(a . b) / (|a| |b|) computed in float64 (a zero vector has cosine 0 with everything). Exact
answers are defined by that number. The fast paths compute float32 scores with BLAS or FAISS
first and rescore in float64 whatever lies within `score_margin(dim)` of a decision (the k-th
best score, the threshold), a bound on the float32 error, so what they return is the float64
answer. Ties are broken by a rank the caller gives (vmae-ray passes the (video_id,
clip_index) order), so results never depend on how rows happen to be sharded.

Three tools:
- `cosine_top_k`: exact k nearest by brute force (one pass over the matrix, O(N D)).
- `plan_index` .. `tune_nprobe`: an approximate FAISS index (flat below `FLAT_MAX_ROWS` rows,
  IVF-Flat above), with nprobe chosen by measuring recall@10 against an exhaustive scan.
- `near_duplicate_links`: every pair with cosine >= T, joined into connected components,
  without comparing all pairs when the vectors are clustered (k-means partition pruned by the
  triangle inequality; exact, see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

# Rows per block when a matrix is converted or scanned piecewise (bounds temporary memory:
# 65536 x 768 float64 is 400 MB).
BLOCK_ROWS = 65536


def score_margin(dim: int) -> float:
    """Bound on |float32 cosine - float64 cosine| for unit-normalised vectors of ``dim`` floats.

    Standard floating-point error analysis (Higham, "Accuracy and Stability of Numerical
    Algorithms", eq. 3.5): a dot product of n terms in any summation order is off by at most
    gamma_n * sum|x_i y_i| <= n u / (1 - n u) for unit vectors (Cauchy-Schwarz), u = 2^-24; the
    rounding of both vectors to unit float32 and the final divide add a few u more. Doubled
    for safety: 9.2e-5 for D = 768.
    """
    return 2.0 * (dim + 8) * 2.0**-24 / (1.0 - dim * 2.0**-24)


def row_norms(matrix: np.ndarray) -> np.ndarray:
    """Euclidean norm of every row of a (N, D) float32 matrix, computed in float64: (N,) float64."""
    out = np.empty(len(matrix), dtype=np.float64)
    for start in range(0, len(matrix), BLOCK_ROWS):
        block = matrix[start:start + BLOCK_ROWS].astype(np.float64)
        out[start:start + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


def unit_rows(matrix: np.ndarray, norms: np.ndarray, rows: np.ndarray | slice | None = None) -> np.ndarray:
    """The rows (all, a slice or an index array) scaled to unit length: a new float32 array.

    Zero rows stay zero (cosine 0 with everything).
    """
    block = matrix if rows is None else matrix[rows]
    scale = norms if rows is None else norms[rows]
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, 1.0 / scale, 0.0).astype(np.float32)
    return np.multiply(block, inv[:, None], dtype=np.float32)


def normalize_rows(matrix: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Scale the rows of a float32 matrix to unit length (zero rows stay zero), in place when it is
    writable (a zero-copy view of Arrow buffers is not: then a copy); returns the result."""
    if not matrix.flags.writeable:
        matrix = matrix.copy()
    for block in iter_blocks(len(matrix)):
        matrix[block] = unit_rows(matrix, norms, block)
    return matrix


def pair_cosines(matrix: np.ndarray, norms: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """float64 cosine of rows_a[i] and rows_b[i] for every i: (P,) float64."""
    out = np.empty(len(rows_a), dtype=np.float64)
    for start in range(0, len(rows_a), BLOCK_ROWS // 4):
        a, b = rows_a[start:start + BLOCK_ROWS // 4], rows_b[start:start + BLOCK_ROWS // 4]
        dots = np.einsum("ij,ij->i", matrix[a].astype(np.float64), matrix[b].astype(np.float64))
        denom = norms[a] * norms[b]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start:start + len(a)] = np.where(denom > 0, dots / denom, 0.0)
    return out


# ------------------------------------------------------------------------------------ exact k-NN


@dataclass(frozen=True)
class Neighbours:
    """Result of a k-nearest search: row numbers into the searched matrix, best first, and their
    float64 cosines (both (k,), fewer when fewer rows were eligible)."""

    rows: np.ndarray
    scores: np.ndarray


def cosine_top_k(matrix: np.ndarray, query: np.ndarray, k: int, *, norms: np.ndarray | None = None,
                 exclude: np.ndarray | None = None, tie_rank: np.ndarray | None = None) -> Neighbours:
    """Exact k nearest rows of ``matrix`` (N, D) float32 to ``query`` (D,) by cosine.

    Equal to sorting all N float64 cosines (descending; equal scores by ``tie_rank``, lower
    first, default the row number) and taking the first k. ``exclude`` (bool (N,)) marks rows
    that are never returned (the query's own rows). One float32 pass (BLAS), then float64
    rescoring of every row within `score_margin` of the k-th best float32 score. Raises
    ValueError for k < 1 or a zero query.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q64 = np.asarray(query, dtype=np.float64).reshape(-1)
    q_norm = float(np.linalg.norm(q64))
    if q_norm == 0:
        raise ValueError("the query embedding is zero: no cosine is defined")
    norms = row_norms(matrix) if norms is None else norms
    n = len(matrix)
    scores = np.empty(n, dtype=np.float32)
    q32 = (q64 / q_norm).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, n, BLOCK_ROWS * 4):
            block = slice(start, start + BLOCK_ROWS * 4)
            scores[block] = np.where(norms[block] > 0, (matrix[block] @ q32) / norms[block].astype(np.float32), 0.0)
    if exclude is not None:
        scores[exclude] = -np.inf
    eligible = n - (int(np.count_nonzero(exclude)) if exclude is not None else 0)
    k = min(k, eligible)
    if k == 0:
        return Neighbours(np.empty(0, np.int64), np.empty(0, np.float64))
    kth = np.partition(scores, n - k)[n - k]
    candidates = np.nonzero(scores >= kth - score_margin(matrix.shape[1]))[0]
    exact = np.empty(len(candidates), dtype=np.float64)
    for start in range(0, len(candidates), BLOCK_ROWS):
        rows = candidates[start:start + BLOCK_ROWS]
        denom = norms[rows] * q_norm
        with np.errstate(divide="ignore", invalid="ignore"):
            exact[start:start + len(rows)] = np.where(denom > 0, (matrix[rows].astype(np.float64) @ q64) / denom, 0.0)
    rank = candidates if tie_rank is None else tie_rank[candidates]
    order = np.lexsort((rank, -exact))[:k]
    return Neighbours(candidates[order].astype(np.int64), exact[order])


# ------------------------------------------------------------------------- approximate index

# Below this many rows the index is flat (exact, float32 scores): a scan of 50k x 768 floats
# takes about 10 ms, and IVF's k-means would have too few rows per list to be worth it.
FLAT_MAX_ROWS = 50_000
# nlist = NLIST_PER_SQRT_ROWS * sqrt(N). FAISS's guideline is 4 to 16 sqrt(N) lists (wiki
# "Guidelines to choose an index"), for search speed on many cores; on a few CPU cores k-means
# and assigning every row to a list (N x nlist x D each) dominate, and sqrt(N) lists build 4x
# faster while a query still scans only nprobe * sqrt(N) rows (BENCHMARKS.md: both measured).
NLIST_PER_SQRT_ROWS = 1.0
# k-means trains on at most this many rows per list (FAISS warns below 39) for KMEANS_NITER
# iterations: enough for lists that partition well, at a fraction of training on every row.
TRAIN_ROWS_PER_LIST = 64
KMEANS_NITER = 10
KMEANS_SEED = 1234
RECALL_K = 10
DEFAULT_TARGET_RECALL = 0.95
TUNE_QUERIES = 200


@dataclass(frozen=True)
class IndexPlan:
    """The index for a row count: "flat" (exact scan) or "ivf_flat" with ``nlist`` lists."""

    kind: str
    nlist: int = 0

    def describe(self) -> str:
        return "flat (exact scan)" if self.kind == "flat" else f"IVF-Flat, nlist {self.nlist}"

    @property
    def train_rows(self) -> int:
        return TRAIN_ROWS_PER_LIST * self.nlist


def plan_index(num_rows: int) -> IndexPlan:
    """Flat below `FLAT_MAX_ROWS` rows, else IVF-Flat with `NLIST_PER_SQRT_ROWS` * sqrt(N) lists."""
    if num_rows < FLAT_MAX_ROWS:
        return IndexPlan("flat")
    return IndexPlan("ivf_flat", int(round(NLIST_PER_SQRT_ROWS * math.sqrt(num_rows))))


def new_index(plan: IndexPlan, dim: int):
    """An empty FAISS index on inner product (= cosine on unit vectors) that takes int64 ids."""
    import faiss

    if plan.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if plan.kind != "ivf_flat":
        raise ValueError(f"unknown index kind {plan.kind!r}")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True  # unit centroids: lists are cones around directions
    index.cp.niter = KMEANS_NITER
    index.cp.seed = KMEANS_SEED
    index.cp.max_points_per_centroid = TRAIN_ROWS_PER_LIST
    return index


def index_kind(index) -> str:
    """"flat" or "ivf_flat" for an index made by `new_index` (also after a save and load)."""
    import faiss

    return "ivf_flat" if isinstance(faiss.downcast_index(index), faiss.IndexIVF) else "flat"


def _ivf(index):
    import faiss

    return faiss.extract_index_ivf(index)


def train_index(index, unit_sample: np.ndarray) -> None:
    """k-means for an IVF index on unit vectors (n, D) float32 (`IndexPlan.train_rows` is enough)."""
    if index_kind(index) == "ivf_flat":
        index.train(np.ascontiguousarray(unit_sample, dtype=np.float32))


def add_rows(index, unit_vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add unit vectors (n, D) float32 under int64 ``ids``; an IVF index puts each in its
    nearest list without retraining."""
    for start in range(0, len(ids), BLOCK_ROWS):
        index.add_with_ids(np.ascontiguousarray(unit_vectors[start:start + BLOCK_ROWS], dtype=np.float32),
                           np.ascontiguousarray(ids[start:start + BLOCK_ROWS], dtype=np.int64))


def remove_rows(index, ids: np.ndarray) -> int:
    """Remove the rows with these ids (FAISS remove_ids: one pass over the lists); returns how many."""
    if len(ids) == 0:
        return 0
    return int(index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))


def search_index(index, unit_queries: np.ndarray, k: int, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 (Q, k), ids int64 (Q, k)) of the k best rows per query; -1 ids pad a
    short answer. ``nprobe`` lists are scanned in an IVF index (ignored by a flat one)."""
    import faiss

    queries = np.ascontiguousarray(unit_queries, dtype=np.float32).reshape(-1, index.d)
    if index_kind(index) == "ivf_flat":
        nprobe = max(1, min(int(nprobe) or 1, _ivf(index).nlist))
        return index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
    return index.search(queries, k)


def sample_indexed(index, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` rows drawn at random from the index itself: (unit vectors (m, D), ids (m,)).

    Read from the index's own storage (IVF-Flat lists hold the raw float32 vectors), so an
    incremental update can measure recall without reading the tables again.
    """
    import faiss

    rng = np.random.default_rng(seed)
    total = index.ntotal
    take = np.sort(rng.choice(total, size=min(n, total), replace=False)) if total else np.empty(0, np.int64)
    if index_kind(index) == "flat":
        ids = faiss.vector_to_array(index.id_map)[take]
        flat = faiss.downcast_index(index.index)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), total * index.d).reshape(total, index.d)[take].copy()
        return vectors, ids.astype(np.int64)
    ivf = _ivf(index)
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    ends = np.cumsum(sizes)
    vectors = np.empty((len(take), index.d), dtype=np.float32)
    ids = np.empty(len(take), dtype=np.int64)
    for out_i, pos in enumerate(take):
        list_no = int(np.searchsorted(ends, pos, side="right"))
        offset = int(pos - (ends[list_no] - sizes[list_no]))
        codes = faiss.rev_swig_ptr(invlists.get_single_code(list_no, offset), ivf.code_size)
        vectors[out_i] = np.frombuffer(bytes(codes), dtype=np.float32)
        ids[out_i] = invlists.get_single_id(list_no, offset)
    return vectors, ids


def recall_at_k(found: np.ndarray, exact: np.ndarray, query_ids: np.ndarray | None, k: int = RECALL_K) -> float:
    """Mean over queries of |found top-k & exact top-k| / |exact top-k|, ids (Q, >= k) best first.

    A query's own id (``query_ids``) and -1 padding are dropped from both lists first: a row
    present in the index is not its own neighbour.
    """
    total = 0.0
    for i in range(len(exact)):
        own = -1 if query_ids is None else query_ids[i]
        truth = [x for x in exact[i] if x != -1 and x != own][:k]
        got = [x for x in found[i] if x != -1 and x != own][:k]
        total += len(set(truth) & set(got)) / max(len(truth), 1)
    return total / max(len(exact), 1)


@dataclass(frozen=True)
class NprobeChoice:
    """The nprobe chosen, the recall@10 it measured, and every (nprobe, recall) tried."""

    nprobe: int
    recall: float
    tried: tuple[tuple[int, float], ...] = ()
    queries: int = 0


def tune_nprobe(index, sample: np.ndarray, sample_ids: np.ndarray, *, target: float = DEFAULT_TARGET_RECALL,
                k: int = RECALL_K) -> NprobeChoice:
    """The smallest nprobe (1, 2, 4, ...) whose recall@k on ``sample`` (unit rows of the index,
    with their ids, excluded from their own answers) reaches ``target``.

    The reference is the same index scanning every list (nprobe = nlist), which is an exact
    search on IVF-Flat. A flat index is exact: nprobe 0, recall 1.
    """
    if index_kind(index) == "flat" or len(sample) == 0:
        return NprobeChoice(0, 1.0, (), len(sample))
    nlist = _ivf(index).nlist
    _, exact = search_index(index, sample, k + 1, nprobe=nlist)
    tried = []
    nprobe = 1
    while True:
        _, found = search_index(index, sample, k + 1, nprobe=nprobe)
        recall = recall_at_k(found, exact, sample_ids, k)
        tried.append((nprobe, round(recall, 4)))
        if recall >= target or nprobe >= nlist:
            return NprobeChoice(nprobe, recall, tuple(tried), len(sample))
        nprobe = min(nlist, nprobe * 2)


# --------------------------------------------------------------------------- near duplicates

# Up to this many rows dedup compares all pairs (N^2 D / 2 multiply-adds in BLAS tiles: 10k x
# 768 is about 1.5e11, seconds); above, it range-searches an IVF partition.
DEDUP_ALL_PAIRS_MAX_ROWS = 10_000
# Lists each row searches in the IVF partition (its own and the next nearest). Measured link
# recall in BENCHMARKS.md.
DEDUP_NPROBE = 4
# Rows whose links are also found by an exhaustive scan, to measure the IVF pass's link recall.
DEDUP_RECALL_SAMPLE = 500
_TILE_ROWS_A = 2048
_TILE_ROWS_B = 16384
_FLUSH_LINKS = 2_000_000


@dataclass
class DuplicateLinks:
    """Links (pairs with cosine >= threshold) reduced to what groups need.

    ``labels`` (N,) int64: the smallest row number of each row's connected component;
    ``degree`` (N,) int64: links per row; ``num_links``: distinct pairs found; ``stats``: how
    the search went (method, lists, pairs compared, measured link recall when approximate).
    """

    labels: np.ndarray
    degree: np.ndarray
    num_links: int
    stats: dict = field(default_factory=dict)


class _Components:
    """Connected components of a graph whose edges arrive in batches (union-find by batches).

    Edges are buffered as pairs of current component roots (so, once a group has merged,
    further links inside it cost nothing) and merged with scipy's connected_components when the
    buffer fills: memory stays O(N + buffer) however many links there are.
    """

    def __init__(self, n: int):
        self.n = n
        self.labels = np.arange(n, dtype=np.int64)
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self._buffered = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        ra, rb = self.labels[a], self.labels[b]
        keep = ra != rb
        if not keep.any():
            return
        self._a.append(ra[keep])
        self._b.append(rb[keep])
        self._buffered += int(keep.sum())
        if self._buffered >= _FLUSH_LINKS:
            self.flush()

    def flush(self) -> np.ndarray:
        if self._buffered:
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            a, b = np.concatenate(self._a), np.concatenate(self._b)
            graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(self.n, self.n)).tocsr()
            count, comp = connected_components(graph, directed=False)
            root = np.full(count, self.n, dtype=np.int64)
            np.minimum.at(root, comp, np.arange(self.n, dtype=np.int64))
            # Edges join roots only, so every merged component consists of roots and its
            # smallest member is the smallest row of the union.
            self.labels = root[comp[self.labels]]
            self._a, self._b, self._buffered = [], [], 0
        return self.labels


class _LinkCollector:
    """Turns candidate pairs with float32 scores into exact links: sure above T + margin,
    rescored in float64 within the margin (`score_margin`), dropped below T - margin."""

    def __init__(self, matrix: np.ndarray, norms: np.ndarray, threshold: float, watch: np.ndarray | None = None):
        self.matrix, self.norms, self.threshold = matrix, norms, threshold
        self.margin = score_margin(matrix.shape[1])
        self.components = _Components(len(matrix))
        self.degree = np.zeros(len(matrix), dtype=np.int64)
        self.num_links = 0
        self.pairs_compared = 0
        self.rescored = 0
        self._watch = watch  # bool (N,): keep the links of these rows (recall measurement)
        self.watched: list[np.ndarray] = []

    def pairs(self, a: np.ndarray, b: np.ndarray, scores: np.ndarray) -> None:
        """Candidate pairs (each unordered pair once) with their float32 scores."""
        keep = scores >= self.threshold - self.margin
        a, b, scores = a[keep], b[keep], scores[keep]
        unsure = scores < self.threshold + self.margin
        if unsure.any():
            self.rescored += int(unsure.sum())
            exact = pair_cosines(self.matrix, self.norms, a[unsure], b[unsure]) >= self.threshold
            keep = ~unsure
            keep[np.nonzero(unsure)[0][exact]] = True
            a, b = a[keep], b[keep]
        if not len(a):
            return
        self.num_links += len(a)
        np.add.at(self.degree, a, 1)
        np.add.at(self.degree, b, 1)
        self.components.add(a, b)
        if self._watch is not None:
            seen = self._watch[a] | self._watch[b]
            if seen.any():
                self.watched.append(np.stack([np.minimum(a[seen], b[seen]), np.maximum(a[seen], b[seen])], 1))

    def all_pairs(self, unit: np.ndarray) -> None:
        """Every pair of rows of a unit matrix, in BLAS tiles of the upper triangle."""
        n = len(unit)
        for sa in range(0, n, _TILE_ROWS_A):
            ua = unit[sa:sa + _TILE_ROWS_A]
            for sb in range(sa, n, _TILE_ROWS_B):
                scores = ua @ unit[sb:sb + _TILE_ROWS_B].T
                ia, ib = np.nonzero(scores >= self.threshold - self.margin)
                na, nb = scores.shape
                if sb == sa:  # the tile holding the diagonal: pairs j > i only
                    keep = ib > ia
                    ia, ib = ia[keep], ib[keep]
                    self.pairs_compared += na * nb - na * (na + 1) // 2
                else:
                    self.pairs_compared += na * nb
                self.pairs(ia + sa, ib + sb, scores[ia, ib])


def near_duplicate_links(matrix: np.ndarray, threshold: float, *, norms: np.ndarray | None = None,
                         exact: bool | None = None, nlist: int | None = None, nprobe: int = DEDUP_NPROBE,
                         recall_sample: int = DEDUP_RECALL_SAMPLE, seed: int = KMEANS_SEED) -> DuplicateLinks:
    """Every pair of rows with cosine >= ``threshold``, joined into connected components.

    ``exact`` (default: up to `DEDUP_ALL_PAIRS_MAX_ROWS` rows): all pairs, in BLAS tiles of the
    upper triangle (N^2 D / 2 multiply-adds, memory O(N D) plus one tile): every link is found.

    Otherwise a range search over an IVF partition (FAISS spherical k-means into ``nlist``
    lists, default sqrt(N); each row searches its ``nprobe`` nearest lists, in BLAS tiles),
    which is NeMo Curator's semantic dedup (k-means, then pairs within clusters) with
    neighbouring clusters searched too. Every link it reports is exact (float64 cosine >= T); a link is missed only
    when neither row's nprobe nearest lists hold the other, which near-duplicates (cosine
    near 1, so almost the same direction) rarely escape. The share found is measured on
    ``recall_sample`` rows against an exhaustive scan and reported in ``stats``
    (link_recall). Raises ValueError for a threshold outside (0, 1].
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    n, dim = matrix.shape
    norms = row_norms(matrix) if norms is None else norms
    if exact is None:
        exact = n <= DEDUP_ALL_PAIRS_MAX_ROWS
    if exact or n < 2:
        collector = _LinkCollector(matrix, norms, threshold)
        collector.all_pairs(unit_rows(matrix, norms))
        stats = {"method": "all_pairs", "exact": True}
    else:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, recall_sample), replace=False))
        watch = np.zeros(n, dtype=bool)
        watch[sample] = True
        collector = _LinkCollector(matrix, norms, threshold, watch=watch)
        stats = _partitioned(matrix, norms, threshold, collector, nlist or max(1, int(round(math.sqrt(n)))),
                             nprobe, seed)
        stats.update(_link_recall(matrix, norms, threshold, sample, collector))
    total_pairs = n * (n - 1) // 2
    stats.update(pairs_compared=collector.pairs_compared, total_pairs=total_pairs,
                 share_compared=round(collector.pairs_compared / total_pairs, 6) if total_pairs else 0.0,
                 rescored_in_float64=collector.rescored)
    return DuplicateLinks(collector.components.flush(), collector.degree, collector.num_links, stats)


def _partitioned(matrix, norms, threshold, collector: _LinkCollector, nlist: int, nprobe: int, seed: int) -> dict:
    import faiss

    n, dim = matrix.shape
    nlist = min(nlist, n)
    nprobe = max(1, min(nprobe, nlist))
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(n, size=min(n, TRAIN_ROWS_PER_LIST * nlist), replace=False))
    kmeans = faiss.Kmeans(dim, nlist, niter=KMEANS_NITER, spherical=True, seed=seed,
                          max_points_per_centroid=TRAIN_ROWS_PER_LIST)
    kmeans.train(unit_rows(matrix, norms, train))
    centroids = faiss.IndexFlatIP(dim)
    centroids.add(np.ascontiguousarray(kmeans.centroids, dtype=np.float32))
    # Each row's nprobe nearest lists: the first is the list it belongs to, all are the lists
    # it searches.
    probes = np.empty((n, nprobe), dtype=np.int64)
    for block in iter_blocks(n):
        _, probes[block] = centroids.search(unit_rows(matrix, norms, block), nprobe)
    assign = np.ascontiguousarray(probes[:, 0])
    members = np.argsort(assign, kind="stable")
    member_starts = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=nlist))])
    flat = probes.ravel()
    by_list = np.argsort(flat, kind="stable")
    searchers = (by_list // nprobe).astype(np.int64)
    searcher_starts = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=nlist))])
    margin = collector.margin
    comparisons = 0
    # List by list, the rows that search it against its members: one BLAS product per tile
    # (a FAISS IVF range search scans row by row, about 10x slower here).
    for b in range(nlist):
        rows_m = members[member_starts[b]:member_starts[b + 1]]
        if not len(rows_m):
            continue
        unit_m = unit_rows(matrix, norms, rows_m)
        rows_s = searchers[searcher_starts[b]:searcher_starts[b + 1]]
        for sa in range(0, len(rows_s), _TILE_ROWS_A):
            q_rows = rows_s[sa:sa + _TILE_ROWS_A]
            unit_q = unit_rows(matrix, norms, q_rows)
            for sb in range(0, len(rows_m), _TILE_ROWS_B):
                scores = unit_q @ unit_m[sb:sb + _TILE_ROWS_B].T
                comparisons += scores.size
                iq, im = np.nonzero(scores >= threshold - margin)
                q, m = q_rows[iq], rows_m[sb:sb + _TILE_ROWS_B][im]
                keep = q != m
                # A pair can be found from both rows' searches: count it from the smaller row,
                # or from the larger one when the smaller does not search the larger's list.
                back = np.nonzero(keep & (q > m))[0]
                if len(back):
                    keep[back[(probes[m[back]] == assign[q[back]][:, None]).any(1)]] = False
                collector.pairs(np.minimum(q[keep], m[keep]), np.maximum(q[keep], m[keep]), scores[iq, im][keep])
    collector.pairs_compared += comparisons // 2  # most pairs are compared from both sides
    sizes = np.diff(member_starts)
    return {"method": "partitioned", "exact": False, "nlist": nlist, "nprobe": nprobe,
            "largest_list": int(sizes.max()), "kmeans_train_rows": int(len(train)), "kmeans_niter": KMEANS_NITER}


def _link_recall(matrix, norms, threshold, sample: np.ndarray, collector: _LinkCollector) -> dict:
    """Links of the sampled rows found by an exhaustive scan (float64-exact like the rest), and
    the share of them the IVF pass found."""
    margin = collector.margin
    unit_sample = unit_rows(matrix, norms, sample)
    truth = []
    for block in iter_blocks(len(matrix)):
        scores = unit_sample @ unit_rows(matrix, norms, block).T
        ia, ib = np.nonzero(scores >= threshold - margin)
        a, b = sample[ia], ib + block.start
        keep = a != b
        a, b, s = a[keep], b[keep], scores[ia, ib][keep]
        unsure = s < threshold + margin
        ok = ~unsure
        ok[np.nonzero(unsure)[0][pair_cosines(matrix, norms, a[unsure], b[unsure]) >= threshold]] = True
        truth.append(np.stack([np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])], 1))
    truth_set = {tuple(p) for p in np.concatenate(truth)} if truth else set()
    found = {tuple(p) for p in np.concatenate(collector.watched)} if collector.watched else set()
    return {"recall_sample_rows": int(len(sample)), "recall_sample_links": len(truth_set),
            "link_recall": round(len(truth_set & found) / len(truth_set), 4) if truth_set else None}


@dataclass(frozen=True)
class DuplicateGroups:
    """Groups of two or more rows. Per grouped row: ``rows`` (row numbers, grouped by group,
    best linked first), ``group`` (0.. by size desc, then representative's tie rank),
    ``representative`` (row number), ``similarity`` (float64 cosine to the representative)."""

    rows: np.ndarray
    group: np.ndarray
    representative: np.ndarray
    similarity: np.ndarray

    @property
    def num_groups(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0


def duplicate_groups(links: DuplicateLinks, matrix: np.ndarray, *, norms: np.ndarray | None = None,
                     tie_rank: np.ndarray | None = None) -> DuplicateGroups:
    """Components of two or more rows, each with a representative: its member with the most
    links (ties: lowest ``tie_rank``), and every member's cosine to it."""
    n = len(links.labels)
    norms = row_norms(matrix) if norms is None else norms
    tie_rank = np.arange(n) if tie_rank is None else np.asarray(tie_rank)
    sizes = np.bincount(links.labels, minlength=n)
    grouped = np.nonzero(sizes[links.labels] >= 2)[0]
    if not len(grouped):
        empty = np.empty(0, np.int64)
        return DuplicateGroups(empty, empty, empty, np.empty(0, np.float64))
    labels = links.labels[grouped]
    # Within each component: most links first, then tie rank; the first is the representative.
    order = np.lexsort((tie_rank[grouped], -links.degree[grouped], labels))
    rows, labels = grouped[order], labels[order]
    first = np.concatenate([[True], labels[1:] != labels[:-1]])
    group_start = np.nonzero(first)[0]
    group_size = np.diff(np.concatenate([group_start, [len(rows)]]))
    reps = rows[group_start]
    # Groups numbered by size (largest first), then by their representative's tie rank.
    group_order = np.lexsort((tie_rank[reps], -group_size))
    group_number = np.empty(len(reps), dtype=np.int64)
    group_number[group_order] = np.arange(len(reps))
    member_group = np.repeat(group_number, group_size)
    member_rep = np.repeat(reps, group_size)
    similarity = pair_cosines(matrix, norms, rows, member_rep)
    final = np.lexsort((np.arange(len(rows)), member_group))
    return DuplicateGroups(rows[final], member_group[final], member_rep[final], similarity[final])


def iter_blocks(n: int, size: int = BLOCK_ROWS) -> Iterator[slice]:
    """Slices of ``size`` rows covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
