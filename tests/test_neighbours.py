"""Vector search and near-duplicate links (vmae_ray.neighbours) against brute force.

References are computed here independently: float64 cosines of every pair with numpy, Python
sorting, and scipy's connected components over the full link graph.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from vmae_ray import neighbours as nb
from vmae_ray.synthetic import clustered_unit_vectors


def cosines64(matrix: np.ndarray) -> np.ndarray:
    x = matrix.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def brute_top_k(matrix, query, k, exclude=(), rank=None):
    x = matrix.astype(np.float64)
    q = np.asarray(query, np.float64)
    scores = (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    rank = np.arange(len(x)) if rank is None else rank
    order = sorted((i for i in range(len(x)) if i not in set(exclude)), key=lambda i: (-scores[i], rank[i]))
    return order[:k], scores


def brute_components(matrix, threshold):
    s = cosines64(matrix)
    i, j = np.nonzero(np.triu(s >= threshold, 1))
    _, labels = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(len(s), len(s))), directed=False)
    degree = np.bincount(i, minlength=len(s)) + np.bincount(j, minlength=len(s))
    return labels, degree, len(i), s


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def corpus(n=2000, dim=32, seed=3):
    x, source = clustered_unit_vectors(n, dim, num_clusters=25, cluster_cosine=0.5, duplicate_fraction=0.08,
                                       duplicate_cosine=0.95, seed=seed)
    # Norms like real embeddings' (not unit): cosine must not depend on them.
    return x * np.random.default_rng(seed).uniform(0.5, 3.0, (n, 1)).astype(np.float32), source


# ------------------------------------------------------------------------------------ exact


def test_cosine_top_k_equals_brute_force_with_ties_and_exclusion():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    x[10] = x[20] * 2.0  # the same direction: an exact tie, broken by tie rank
    x[30] = x[20]
    rank = rng.permutation(500)
    for q_row in (20, 7):
        for k in (1, 5, 499, 600):
            exclude = np.zeros(500, bool)
            exclude[q_row] = True
            got = nb.cosine_top_k(x, x[q_row], k, exclude=exclude, tie_rank=rank)
            want, scores = brute_top_k(x, x[q_row], k, exclude=[q_row], rank=rank)
            assert got.rows.tolist() == want
            np.testing.assert_allclose(got.scores, scores[want], rtol=0, atol=1e-12)
    got = nb.cosine_top_k(x, x[20], 3, exclude=np.arange(500) == 20, tie_rank=rank)
    assert sorted(got.rows[:2].tolist(), key=lambda i: rank[i]) == got.rows[:2].tolist() and set(got.rows[:2]) == {10, 30}
    with pytest.raises(ValueError, match="k must be"):
        nb.cosine_top_k(x, x[0], 0)
    with pytest.raises(ValueError, match="zero"):
        nb.cosine_top_k(x, np.zeros(24), 3)


def test_cosine_top_k_orders_float32_near_ties_by_float64():
    # Rows a few float32 ulps apart: float32 scores tie or misorder, float64 decides.
    rng = np.random.default_rng(1)
    base = rng.standard_normal(768).astype(np.float32)
    x = np.repeat(base[None], 64, axis=0)
    for i in range(64):
        j = rng.integers(0, 768, 3)
        x[i, j] = np.nextafter(x[i, j], np.float32(np.inf) if i % 2 else np.float32(-np.inf))
    q = base + rng.standard_normal(768).astype(np.float32) * 0.01
    want, scores = brute_top_k(x, q, 10)
    got = nb.cosine_top_k(x, q, 10)
    assert got.rows.tolist() == want
    # The float32 ranking alone would not do (the test would pass without the rescoring otherwise).
    s32 = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    assert np.argsort(-s32, kind="stable")[:10].tolist() != want


# ------------------------------------------------------------------------------------ index


def test_plan_index_by_row_count():
    assert nb.plan_index(49_999).kind == "flat"
    plan = nb.plan_index(1_000_000)
    assert plan.kind == "ivf_flat" and plan.nlist == round(nb.NLIST_PER_SQRT_ROWS * 1000)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat"])
def test_index_recall_removal_and_additions(kind):
    x, _ = clustered_unit_vectors(8000, 32, num_clusters=40, cluster_cosine=0.6, seed=5)
    first, later = x[:7000], x[7000:]
    index = nb.new_index(nb.IndexPlan(kind, 64 if kind == "ivf_flat" else 0), 32)
    nb.train_index(index, first)
    nb.add_rows(index, first, np.arange(7000))
    sample, sample_ids = nb.sample_indexed(index, 200, seed=1)
    np.testing.assert_array_equal(sample, first[sample_ids])  # read back from the index's own storage
    choice = nb.tune_nprobe(index, sample, sample_ids, target=0.95)
    assert choice.recall >= 0.95
    if kind == "ivf_flat":
        assert 1 <= choice.nprobe < 64 and choice.tried[-1][0] == choice.nprobe

    # Recall on other rows than the tuning sample, against brute force.
    queries = np.setdiff1d(np.random.default_rng(2).choice(7000, 300, replace=False), sample_ids)[:200]
    _, found = nb.search_index(index, first[queries], 11, choice.nprobe)
    exact = np.array([nb.cosine_top_k(first, first[q], 10, exclude=np.arange(7000) == q).rows for q in queries])
    recall = nb.recall_at_k(found, exact, queries)
    assert recall >= (0.9 if kind == "ivf_flat" else 1.0)

    # A nightly run: 500 rows superseded, 1000 new ones; lists kept.
    gone = np.arange(1000, 1500)
    assert nb.remove_rows(index, gone) == 500
    nb.add_rows(index, later, np.arange(7000, 8000))
    live = np.setdiff1d(np.arange(8000), gone)
    nlist = 64 if kind == "ivf_flat" else 0
    _, found = nb.search_index(index, x[gone[:50]], 50, nlist)  # exhaustive: every list
    assert not np.isin(found, gone).any()
    queries = np.random.default_rng(3).choice(live, 50, replace=False)
    _, found = nb.search_index(index, x[queries], 10, nlist)
    for q, row in zip(queries, found):
        want = live[nb.cosine_top_k(x[live], x[q], 10).rows]
        assert set(row.tolist()) == set(want.tolist())


# ------------------------------------------------------------------------------ near duplicates


@pytest.mark.parametrize("threshold", [0.45, 0.85, 0.97])
def test_near_duplicate_links_equal_brute_force_components(threshold):
    x, source = corpus()
    labels, degree, num_links, s = brute_components(x, threshold)
    off = s[np.triu_indices(len(s), 1)]
    # Pairs within float32 error of T exist (so the float64 rescoring is exercised), none so
    # close that two float64 formulas could disagree.
    assert np.min(np.abs(off - threshold)) > 1e-12
    assert num_links > 0 and len(set(labels.tolist())) < len(x)
    for how in (dict(exact=True), dict(exact=False, nlist=30, nprobe=30)):
        got = nb.near_duplicate_links(x, threshold, **how)
        assert same_partition(got.labels, labels), how
        assert got.num_links == num_links and (got.degree == degree).all(), how
        # Labels are each component's smallest row.
        assert all(got.labels[i] == min(np.nonzero(got.labels == got.labels[i])[0]) for i in range(0, len(x), 97))
    # Few lists searched: no link is invented, and the recall it reports is the true one.
    got = nb.near_duplicate_links(x, threshold, exact=False, nlist=30, nprobe=2, recall_sample=400)
    assert got.stats["method"] == "partitioned" and got.stats["share_compared"] < 0.5
    assert got.num_links <= num_links
    for root in set(got.labels.tolist()):
        members = np.nonzero(got.labels == root)[0]
        assert len(set(labels[members].tolist())) == 1  # every found group lies inside a true one
    assert got.stats["link_recall"] is not None and 0.5 < got.stats["link_recall"] <= 1.0


def test_planted_duplicates_are_linked():
    x, source = corpus(2000, 64, seed=8)
    copies = np.nonzero(source >= 0)[0]
    got = nb.near_duplicate_links(x, 0.9, exact=False, nlist=20, nprobe=2)
    assert (got.labels[copies] == got.labels[source[copies]]).all()


def test_components_across_buffer_flushes(monkeypatch):
    monkeypatch.setattr(nb, "_FLUSH_LINKS", 7)
    rng = np.random.default_rng(4)
    n = 400
    a, b = rng.integers(0, n, 300), rng.integers(0, n, 300)
    comps = nb._Components(n)
    for start in range(0, 300, 13):
        comps.add(a[start:start + 13], b[start:start + 13])
    labels = comps.flush()
    _, want = connected_components(coo_matrix((np.ones(300), (a, b)), shape=(n, n)), directed=False)
    assert same_partition(labels, want)
    assert all(labels[i] == np.nonzero(labels == labels[i])[0].min() for i in range(n))


def test_duplicate_groups_representative_and_similarity():
    x, _ = corpus(1500, 32, seed=11)
    links = nb.near_duplicate_links(x, 0.9)
    rank = np.random.default_rng(0).permutation(len(x))
    groups = nb.duplicate_groups(links, x, tie_rank=rank)
    s = cosines64(x)
    sizes = []
    for g in range(groups.num_groups):
        members = groups.rows[groups.group == g]
        reps = set(groups.representative[groups.group == g].tolist())
        assert len(members) >= 2 and len(reps) == 1
        rep = reps.pop()
        best = max(members, key=lambda i: (links.degree[i], -rank[i]))
        assert rep == best and len(set(links.labels[members].tolist())) == 1
        np.testing.assert_allclose(groups.similarity[groups.group == g], s[members, rep], atol=1e-12)
        sizes.append(len(members))
    assert sizes == sorted(sizes, reverse=True)
    singletons = np.bincount(links.labels, minlength=len(x))[links.labels] == 1
    assert len(groups.rows) == int((~singletons).sum())
    with pytest.raises(ValueError, match="threshold"):
        nb.near_duplicate_links(x, 0.0)
