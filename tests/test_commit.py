"""The driver's receipt ledger without Ray: exactly once per input whatever arrives twice.

A receipt is accepted whole or dropped whole: one that finishes an input already finished
(a retried task's, a restarted actor's) is dropped with all its files, and its other inputs
stay undone for another round. Videos split across calls are finished once their parts
cover their plan.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from vmae_ray.commit import Bitmap, ReceiptLedger


def receipt(attempt: str, done=(), parts=(), files=None, **stats) -> dict:
    files = files if files is not None else [f"clips/part-r-{attempt}.parquet", f"videos/part-r-{attempt}.parquet"]
    if parts:
        files = [*files, f"parts/part-r-{attempt}.parquet"]
    return {"attempt": attempt, "files": files, "done": list(done),
            "parts": [{"input_number": n, "num_clips": c, "clip_index": list(k)} for n, c, k in parts],
            "stats": json.dumps({"videos": len(done), "clips": len(done), **stats})}


def test_bitmap_against_a_set():
    rng = np.random.default_rng(0)
    bitmap, truth = Bitmap(1000), set()
    for _ in range(20):
        numbers = rng.integers(0, 1000, 30)
        bitmap.set(numbers)
        truth |= set(numbers.tolist())
        probe = rng.integers(0, 1000, 50)
        assert bitmap.get(probe).tolist() == [int(n) in truth for n in probe]
    assert bitmap.count() == len(truth)
    assert bitmap.nbytes == 125  # one bit per input
    with pytest.raises(ValueError, match="outside the run's 1000 inputs"):
        bitmap.get([1000])


def test_a_receipt_overlapping_accepted_inputs_is_dropped_whole():
    ledger = ReceiptLedger(10)
    assert ledger.offer(receipt("a", done=[0, 1, 2])) == []
    dup = receipt("b", done=[2, 3])  # input 2 again: a retried task's receipt
    assert ledger.offer(dup) == dup["files"]  # all its files are deleted
    assert ledger.done.get([0, 1, 2, 3]).tolist() == [True, True, True, False]  # 3 stays undone
    assert ledger.offer(receipt("c", done=[3])) == []
    assert (ledger.accepted, ledger.dropped, ledger.totals.videos) == (2, 1, 4)
    pending = ledger.take_pending()
    assert pending["clips"] == ["clips/part-r-a.parquet", "clips/part-r-c.parquet"]
    assert ledger.take_pending() == {"clips": [], "videos": [], "errors": []}


def test_a_receipt_naming_one_input_twice_is_dropped():
    ledger = ReceiptLedger(4)
    assert ledger.offer(receipt("a", done=[1, 1])) != []
    assert ledger.done.count() == 0


def test_split_videos_are_ready_once_their_parts_cover_the_plan():
    ledger = ReceiptLedger(5)
    ledger.offer(receipt("a", done=[0], parts=[(4, 5, [0, 1])]))
    ledger.offer(receipt("b", done=[1], parts=[(4, 5, [1, 2])]))  # clip 1 twice: a retried read
    assert ledger.take_ready() == []
    ledger.offer(receipt("c", done=[], parts=[(4, 5, [3, 4])], files=[]))
    assert ledger.take_ready() == [(4, ["parts/part-r-a.parquet", "parts/part-r-b.parquet",
                                        "parts/part-r-c.parquet"])]
    assert ledger.take_ready() == []  # once
    ledger.requeue([4])  # its finishing receipt was dropped: ready again
    assert [n for n, _ in ledger.take_ready()] == [4]
    ledger.offer(receipt("fin", done=[4]))
    ledger.requeue([4])  # done now: nothing to finish
    assert ledger.take_ready() == [] and ledger.split == {}


def test_parts_of_a_video_finished_elsewhere_are_ignored():
    ledger = ReceiptLedger(3)
    ledger.offer(receipt("a", done=[2]))
    ledger.offer(receipt("b", done=[0], parts=[(2, 3, [0, 1, 2])]))
    assert ledger.split == {} and ledger.take_ready() == []


def test_totals_sum_accepted_receipts_only():
    ledger = ReceiptLedger(4)
    ledger.offer(receipt("a", done=[0], decode_seconds=1.5, model_calls={"4": 2}, decoded_at={"100": 3}))
    ledger.offer(receipt("b", done=[0], decode_seconds=9.0, model_calls={"4": 9}))  # dropped
    ledger.offer(receipt("c", done=[1], decode_seconds=0.5, model_calls={"4": 1, "2": 1}, decoded_at={"101": 2}))
    t = ledger.totals
    assert (t.decode_seconds, t.model_calls, t.clips_decoded_since(101)) == (2.0, {4: 3, 2: 1}, 2)
