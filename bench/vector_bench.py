"""Vector search and dedup at corpus scale: synthetic embeddings, one fresh process per size.

    python -m bench.vector_bench --rows 1000000 [--dim 768] [--out result.json]

Measures, on `synthetic.clustered_unit_vectors` (D=768 spanning a 32-dimensional subspace, one
cluster per 1,000 rows, within-cluster cosine about 0.5, 2% planted near-duplicates at cosine
about 0.97):

* exact search (`neighbours.cosine_top_k`, what `vmae-ray search` does without an index):
  latency of one query, median over the queries;
* the index `vmae-ray index` builds for this row count (`neighbours.plan_index`): k-means
  training, adding every row and tuning nprobe, each timed, and the memory they take;
* approximate search with that index: latency of one query (median) and recall@10 against
  the exact answers of the same queries (other rows than the ones nprobe was tuned on);
* dedup (`neighbours.near_duplicate_links`, what `vmae-ray dedup` does) at threshold 0.9:
  wall time, memory, links and groups, and its link recall measured on a sample; with
  ``--dedup-exact`` also all pairs, and whether both give the same groups.

Memory per phase is the peak RSS during it (Linux VmHWM, reset before each phase through
/proc/self/clear_refs) minus RSS before it. Prints (and writes) JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
# The vectors span a 32-dimensional subspace of the 768 (see `clustered_unit_vectors`):
# embeddings of real corpora have an intrinsic dimension of tens, and with clusters of
# isotropic 768-d noise every list would hold whole clusters and nprobe 1 would always do.
INTRINSIC_DIM = 32


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Phase:
    """``with Phase(results, "name"):`` records seconds, RSS before and the extra peak RSS."""

    def __init__(self, results: dict, name: str):
        self.results, self.name = results, name

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.rss_before = _status("VmRSS")
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.results[self.name] = {
            "seconds": round(time.perf_counter() - self.started, 3),
            "rss_before_mib": round(self.rss_before / MIB, 1),
            "peak_extra_mib": round((_status("VmHWM") - self.rss_before) / MIB, 1),
        }
        return False


def _latency_ms(fn, items) -> dict:
    times = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(float(np.percentile(times, 90)), 3),
            "queries": len(times)}


def _exact_top(unit: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k (self excluded) of many query rows at once: one BLAS pass per block."""
    best_scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(rows), k), -1, dtype=np.int64)
    queries = unit[rows]
    for start in range(0, len(unit), 131072):
        scores = queries @ unit[start:start + 131072].T
        own = (rows >= start) & (rows < start + len(scores[0]))
        scores[np.nonzero(own)[0], rows[own] - start] = -np.inf
        ids = np.arange(start, start + scores.shape[1])
        merged_s = np.concatenate([best_scores, scores], axis=1)
        merged_i = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
        top = np.argpartition(-merged_s, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_s, top, 1)
        best_ids = np.take_along_axis(merged_i, top, 1)
    return best_ids


def run(rows: int, dim: int = 768, queries: int = 200, exact_queries: int = 20, dedup_threshold: float = 0.9,
        dedup_exact: bool = False, dedup: bool = True, nlist_factor: float | None = None,
        intrinsic_dim: int | None = INTRINSIC_DIM, seed: int = 0) -> dict:
    from vmae_ray import neighbours as nb
    from vmae_ray.synthetic import clustered_unit_vectors

    if nlist_factor is not None:  # an ablation of the index's list count
        nb.NLIST_PER_SQRT_ROWS = nlist_factor

    out: dict = {"rows": rows, "dim": dim, "num_clusters": max(1, rows // 1000), "intrinsic_dim": intrinsic_dim,
                 "threads": _threads(), "nlist_per_sqrt_rows": nb.NLIST_PER_SQRT_ROWS}
    phases: dict = {}
    out["phases"] = phases
    with Phase(phases, "generate"):
        x, source = clustered_unit_vectors(rows, dim, num_clusters=out["num_clusters"], cluster_cosine=0.5,
                                           intrinsic_dim=intrinsic_dim, duplicate_fraction=0.02,
                                           duplicate_cosine=0.97, seed=seed)
    out["matrix_mib"] = round(x.nbytes / MIB, 1)
    norms = nb.row_norms(x)
    rng = np.random.default_rng(seed + 1)
    query_rows = rng.choice(rows, size=min(rows, queries), replace=False)

    # Exact search, as `vmae-ray search` does it (one query at a time, its own row excluded).
    def exact(q):
        nb.cosine_top_k(x, x[q], 10, norms=norms, exclude=_one_hot(rows, q))

    exact(query_rows[0])  # warm-up (page faults, BLAS threads)
    out["exact_search"] = _latency_ms(exact, query_rows[:exact_queries])

    # The index `vmae-ray index` would build.
    plan = nb.plan_index(rows)
    out["index"] = {"plan": plan.describe(), "kind": plan.kind, "nlist": plan.nlist}
    index = nb.new_index(plan, dim)
    if plan.kind == "ivf_flat":
        with Phase(phases, "index_train"):
            train = np.sort(rng.choice(rows, size=min(rows, plan.train_rows), replace=False))
            nb.train_index(index, x[train])
    with Phase(phases, "index_add"):
        nb.add_rows(index, x, np.arange(rows, dtype=np.int64))
    with Phase(phases, "index_tune"):
        sample, sample_ids = nb.sample_indexed(index, nb.TUNE_QUERIES, seed=seed + 2)
        choice = nb.tune_nprobe(index, sample, sample_ids)
    out["index"].update(nprobe=choice.nprobe, tuned_recall=round(choice.recall, 4), tried=choice.tried,
                        build_seconds=round(sum(phases[p]["seconds"] for p in ("index_train", "index_add", "index_tune")
                                                if p in phases), 2),
                        index_mib=round((index.ntotal * (dim * 4 + 8) + plan.nlist * dim * 4) / MIB, 1))
    held_out = np.setdiff1d(query_rows, sample_ids)[:queries]

    def approx(q):
        nb.search_index(index, x[q], 11, choice.nprobe)

    approx(held_out[0])
    out["approx_search"] = _latency_ms(approx, held_out)
    _, found = nb.search_index(index, x[held_out], 11, choice.nprobe)
    truth = _exact_top(x, held_out, 10)
    out["approx_search"]["recall_at_10"] = round(nb.recall_at_k(found, truth, held_out), 4)
    out["approx_search"]["recall_queries"] = int(len(held_out))
    out["speedup_vs_exact"] = round(out["exact_search"]["median_ms"] / out["approx_search"]["median_ms"], 1)
    index.reset()  # free its copy of the vectors before dedup

    if not dedup:
        out["peak_rss_mib"] = round(_status("VmHWM") / MIB, 1)
        return out
    # Dedup, as `vmae-ray dedup` does it.
    with Phase(phases, "dedup"):
        links = nb.near_duplicate_links(x, dedup_threshold, norms=norms)
        groups = nb.duplicate_groups(links, x, norms=norms)
    planted = source >= 0
    out["dedup"] = {"threshold": dedup_threshold, "links": links.num_links, "groups": groups.num_groups,
                    "videos_in_groups": int(len(groups.rows)), "stats": links.stats,
                    "planted_copies": int(planted.sum()),
                    "planted_copies_grouped_with_source": int((links.labels[planted] == links.labels[source[planted]]).sum())}
    if dedup_exact:
        with Phase(phases, "dedup_all_pairs"):
            exact_links = nb.near_duplicate_links(x, dedup_threshold, norms=norms, exact=True)
        same = len(set(zip(exact_links.labels.tolist(), links.labels.tolist()))) == len(set(exact_links.labels.tolist()))
        out["dedup"]["all_pairs"] = {"links": exact_links.num_links, "same_groups": bool(same),
                                     "link_recall": round(links.num_links / max(exact_links.num_links, 1), 4)}
    out["peak_rss_mib"] = round(_status("VmHWM") / MIB, 1)
    return out


def _one_hot(n: int, i: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[i] = True
    return mask


def _threads() -> int:
    try:
        import faiss

        return faiss.omp_get_max_threads()
    except Exception:  # noqa: BLE001
        return os.cpu_count() or 1


def run_in_subprocess(rows: int, *extra: str, timeout: float = 3600) -> dict:
    """One size in a fresh interpreter (clean memory figures); the command is recorded."""
    cmd = [sys.executable, "-m", "bench.vector_bench", "--rows", str(rows), *extra]
    env = dict(os.environ, PYTHONPATH=ROOT)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"error": done.stderr[-3000:], "command": " ".join(["python", *cmd[1:]])}
    result = json.loads(done.stdout[done.stdout.index("{"):])
    result["command"] = " ".join(["python", *cmd[1:]])
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--dedup-exact", action="store_true", help="also dedup with all pairs (N^2: small sizes only)")
    p.add_argument("--no-dedup", dest="dedup", action="store_false", help="search and index only")
    p.add_argument("--nlist-factor", type=float, help="index lists per sqrt(rows) (default: the index's own)")
    p.add_argument("--intrinsic-dim", type=int, default=INTRINSIC_DIM, help="0: clusters of isotropic noise in all D")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    result = run(args.rows, args.dim, args.queries, dedup_exact=args.dedup_exact, dedup=args.dedup,
                 nlist_factor=args.nlist_factor, intrinsic_dim=args.intrinsic_dim or None)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
