"""The driver's side of the commit: accept receipts exactly once, commit them periodically.

Workers write the tables; the driver sees one small receipt per model actor call
(`vmae_ray.staging`) and does per-receipt work only. `ReceiptLedger` keeps, per input of the
run's to-do table, one bit (done or not), and per video split across calls the clips seen so
far; `Committer` turns the accepted files into commits (`writing.OutputStore.commit`).

Exactly once, whatever Ray retries: a receipt is accepted whole, or dropped whole when it
finishes an input that an accepted receipt already finished (a retried task, a restarted
actor, a task re-run after a lost node): its files are deleted and its other inputs stay
undone, so the run processes them again (`pipeline` runs a further round over the inputs
whose bit is still clear). Files no accepted receipt names are never committed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmae_ray.schema import TABLES
from vmae_ray.staging import PARTS, CallStats

log = logging.getLogger(__name__)


class Bitmap:
    """One bit per input number in [0, size): N/8 bytes, whatever the inputs are."""

    def __init__(self, size: int):
        self.size = int(size)
        self.bits = np.zeros((self.size + 7) // 8, dtype=np.uint8)

    def _check(self, numbers: np.ndarray) -> None:
        if len(numbers) and (numbers.min() < 0 or numbers.max() >= self.size):
            bad = numbers[(numbers < 0) | (numbers >= self.size)][0]
            raise ValueError(f"input number {bad} is outside the run's {self.size} inputs")

    def get(self, numbers) -> np.ndarray:
        """Bool array: which of ``numbers`` are set."""
        numbers = np.asarray(numbers, dtype=np.int64)
        self._check(numbers)
        return ((self.bits[numbers >> 3] >> (numbers & 7).astype(np.uint8)) & 1).astype(bool)

    def set(self, numbers) -> None:
        numbers = np.asarray(numbers, dtype=np.int64)
        self._check(numbers)
        np.bitwise_or.at(self.bits, numbers >> 3, (1 << (numbers & 7)).astype(np.uint8))

    def count(self) -> int:
        return int(np.unpackbits(self.bits, count=self.size, bitorder="little").sum()) if self.size else 0

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)


@dataclass
class SplitVideo:
    """A video whose clips came in several receipts' ``parts/`` files."""

    num_clips: int
    clips: set[int] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    queued: bool = False


class ReceiptLedger:
    """Accepts or drops receipts; knows which inputs are done and what awaits a commit.

    Pure bookkeeping (no Ray, no I/O): `offer` returns the staged files to delete when it drops
    a receipt. Memory: `Bitmap` of the run's inputs, plus the clips of split videos in flight
    and the file names accepted since the last commit.
    """

    def __init__(self, num_inputs: int):
        self.done = Bitmap(num_inputs)
        self.split: dict[int, SplitVideo] = {}
        self.ready: list[int] = []  # split videos whose parts cover all their clips
        self.pending: dict[str, list[str]] = {t: [] for t in TABLES}
        self.totals = CallStats()  # summed over accepted receipts
        self.accepted = 0
        self.dropped = 0
        self.first_receipt_at: float | None = None  # time.time() of the first accepted receipt
        self.last_receipt_at: float | None = None

    @property
    def num_done(self) -> int:
        return self.totals.videos + self.totals.errors

    @property
    def has_pending(self) -> bool:
        return any(self.pending.values())

    def offer(self, receipt: dict[str, Any]) -> list[str]:
        """Accept ``receipt`` (a `schema.RECEIPT_SCHEMA` row) or drop it whole; returns the staged
        files to delete ([] when accepted). Raises ValueError for an input number outside the run."""
        done = np.asarray(receipt.get("done") or [], dtype=np.int64)
        if len(done) and (self.done.get(done).any() or len(np.unique(done)) != len(done)):
            self.dropped += 1
            overlap = int(self.done.get(done).sum())
            log.warning("dropped a duplicate receipt (%s): %d of its %d inputs were already done; its other inputs "
                        "are processed again", receipt.get("attempt"), overlap, len(done))
            return list(receipt.get("files") or [])
        self.done.set(done)
        for n in done.tolist():
            self.split.pop(n, None)
        for rel in receipt.get("files") or []:
            table = rel.split("/", 1)[0]
            if table in self.pending:
                self.pending[table].append(rel)
        parts_file = next((rel for rel in receipt.get("files") or [] if rel.startswith(PARTS + "/")), None)
        for part in receipt.get("parts") or []:
            n = int(part["input_number"])
            if self.done.get([n])[0]:
                continue  # finished by another receipt: these clips are not needed
            video = self.split.setdefault(n, SplitVideo(num_clips=int(part["num_clips"])))
            video.clips.update(int(k) for k in part["clip_index"])
            if parts_file is not None:
                video.files.add(parts_file)
            if len(video.clips) >= video.num_clips and not video.queued:
                video.queued = True
                self.ready.append(n)
        self.totals.add(json.loads(receipt.get("stats") or "{}"))
        self.accepted += 1
        now = time.time()
        self.first_receipt_at = self.first_receipt_at or now
        self.last_receipt_at = now
        return []

    def take_ready(self) -> list[tuple[int, list[str]]]:
        """Split videos ready to be finished: (input number, their parts files); each once."""
        out = [(n, sorted(self.split[n].files)) for n in self.ready if n in self.split]
        self.ready = []
        return out

    def requeue(self, numbers: list[int]) -> None:
        """Queue again split videos whose finishing receipt was dropped (and are not done)."""
        for n in numbers:
            video = self.split.get(n)
            if video is not None and not self.done.get([n])[0]:
                self.ready.append(n)

    def take_pending(self) -> dict[str, list[str]]:
        out, self.pending = self.pending, {t: [] for t in TABLES}
        return out
