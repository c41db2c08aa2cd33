"""The incremental diff's decision (`diff.decide`) against a brute-force reading of the rules.

Each case is a random listing (duplicates, two inputs claiming one video_id, failed parts,
inputs whose metadata request failed) against a random committed state (videos or errors,
fingerprints with and without size/ETag, several files). The reference walks the rules one
input at a time with plain sets and dicts.
"""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from vmae_ray.diff import SIDE_COMMITTED, SIDE_LISTED, decide, diff_schema
from vmae_ray.listing import input_fingerprint
from vmae_ray.schema import ERRORS, VIDEOS

SCHEMA = diff_schema(pa.schema([]))


def _row(**values) -> dict:
    row = {name: None for name in SCHEMA.names}
    row.update(values)
    return row


def random_case(rng: random.Random) -> tuple[list[dict], list[dict]]:
    listed, committed = [], []
    order = 0
    for n in range(rng.randint(0, 30)):
        vid, uri = f"id{n:03d}", f"s3://b/v{n}.mp4"
        size, etag = rng.randint(1, 3), rng.choice(["a", "b"])
        fate = rng.random()
        if fate < 0.7:  # listed (once, or twice, or claimed by a second URI too)
            copies = rng.choice([1, 1, 1, 2])
            for _ in range(copies):
                listed.append(_row(video_id=vid, uri=uri, size_bytes=size, version=etag,
                                   input_fingerprint=input_fingerprint(uri, size, etag), order=order, side=SIDE_LISTED))
                order += 1
            if rng.random() < 0.08:
                other = f"s3://b/other{n}.mp4"
                listed.append(_row(video_id=vid, uri=other, input_fingerprint=input_fingerprint(other, 1, "a"),
                                   order=order, side=SIDE_LISTED))
                order += 1
        elif fate < 0.8:  # listed, but its metadata request failed
            listed.append(_row(video_id=vid, uri=uri, order=order, side=SIDE_LISTED,
                               listing_error=f"could not read the size and version of {uri}"))
            order += 1
        if rng.random() < 0.6:  # committed: as listed, changed, or from a manifest without ETags
            kind = rng.choice(["same", "same", "changed", "unverified"])
            fingerprint = {"same": input_fingerprint(uri, size, etag),
                           "changed": input_fingerprint(uri, size + 10, etag),
                           "unverified": input_fingerprint(uri, None, None)}[kind]
            committed.append(_row(video_id=vid, uri=uri, input_fingerprint=fingerprint, side=SIDE_COMMITTED,
                                  table=rng.choice([VIDEOS, VIDEOS, ERRORS]), file=f"f{rng.randint(0, 3)}.parquet"))
    for k in range(rng.choice([0, 0, 1, 2])):  # a part that failed whole
        listed.append(_row(video_id="", order=order, side=SIDE_LISTED, listing_error=f"could not list part {k}"))
        order += 1
    return listed, committed


def brute_force(listed: list[dict], committed: list[dict], *, replace_all: bool, retry_failed: bool, prune: bool):
    counts = dict(new=0, changed=0, retried=0, done=0, unverified=0, gone=0, pruned=0, duplicates=0, conflicts=0,
                  listing_errors=0, listed=0)
    todo, removals = [], set()
    failed_ids = {r["video_id"] for r in listed if r["listing_error"] and r["video_id"]}
    counts["listing_errors"] = sum(1 for r in listed if r["listing_error"])
    good = sorted((r for r in listed if not r["listing_error"]), key=lambda r: r["order"])
    by_id: dict[str, list[dict]] = {}
    for r in good:
        by_id.setdefault(r["video_id"], []).append(r)
    held: dict[str, list[dict]] = {}
    for r in committed:
        held.setdefault(r["video_id"], []).append(r)
    for vid in sorted(set(by_id) | set(held)):
        rows, old = by_id.get(vid, []), held.get(vid, [])
        if not rows:
            if vid in failed_ids:
                continue
            counts["gone"] += 1
            if prune:
                counts["pruned"] += 1
                removals |= {(vid, c["file"], False) for c in old}
            continue
        if len({r["uri"] for r in rows}) > 1:
            counts["conflicts"] += 1
            continue
        counts["duplicates"] += len(rows) - 1
        counts["listed"] += 1
        first = rows[0]
        if replace_all or not old:
            counts["new"] += 1
            todo.append(vid)
        elif old[0]["input_fingerprint"] == first["input_fingerprint"]:
            if old[0]["table"] == ERRORS and retry_failed:
                counts["retried"] += 1
                todo.append(vid)
                removals |= {(vid, c["file"], True) for c in old}
            else:
                counts["done"] += 1
        elif old[0]["input_fingerprint"] == input_fingerprint(first["uri"], None, None):
            counts["done"] += 1
            counts["unverified"] += 1
        else:
            counts["changed"] += 1
            todo.append(vid)
            removals |= {(vid, c["file"], True) for c in old}
    return counts, todo, removals


@pytest.mark.parametrize("seed", range(60))
def test_decide_equals_the_rules_walked_one_input_at_a_time(seed):
    rng = random.Random(seed)
    listed, committed = random_case(rng)
    rows = listed + committed
    rng.shuffle(rows)  # a partition's rows arrive in any order
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    flags = dict(replace_all=seed % 7 == 0, retry_failed=seed % 3 == 0, prune=seed % 2 == 0)
    todo, removals, counts = decide(table, **flags)
    want_counts, want_todo, want_removals = brute_force(listed, committed, **flags)
    assert {k: getattr(counts, k) for k in want_counts} == want_counts
    assert sorted(todo.column("video_id").to_pylist()) == sorted(want_todo)
    # The first listed row of a video is the one taken (its uri and fingerprint).
    firsts = {}
    for r in sorted((r for r in listed if not r["listing_error"]), key=lambda r: r["order"]):
        firsts.setdefault(r["video_id"], r)
    for row in todo.to_pylist():
        assert row["input_fingerprint"] == firsts[row["video_id"]]["input_fingerprint"]
    # (video_id, file, superseded): redone by this run (changed, retried), else pruned.
    got = set(zip(*(removals.column(c).to_pylist() for c in ("video_id", "file", "superseded"))))
    assert got == want_removals


def test_an_input_whose_metadata_request_failed_is_neither_redone_nor_gone():
    uri = "s3://b/v.mp4"
    rows = [_row(video_id="x", uri=uri, order=0, side=SIDE_LISTED, listing_error="SlowDown"),
            _row(video_id="x", uri=uri, input_fingerprint=input_fingerprint(uri, 5, "e"), side=SIDE_COMMITTED,
                 table=VIDEOS, file="f.parquet")]
    todo, removals, counts = decide(pa.Table.from_pylist(rows, schema=SCHEMA), replace_all=False,
                                    retry_failed=False, prune=True)
    assert (todo.num_rows, removals.num_rows, counts.gone, counts.pruned, counts.listing_errors) == (0, 0, 0, 0, 1)
