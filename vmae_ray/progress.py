"""What a run tells its operator: the progress line, the summary, the stage report.

All of it comes from per-receipt totals (`staging.CallStats`): the driver never looks at a row.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vmae_ray.config import Resources
from vmae_ray.diff import DiffCounts
from vmae_ray.staging import CallStats

# A sizing hint from fewer clips (or a shorter pipeline) than this says it is a rough one:
# start-up and the last, partial calls weigh too much in a pilot of a few dozen clips.
HINT_MIN_CLIPS = 1000
HINT_MIN_SECONDS = 60.0

# Exit statuses of `vmae-ray embed` (README, "Exit status").
EXIT_OK = 0
EXIT_FAILED = 1  # the run failed (an exception): what was committed stays, rerun to resume
EXIT_USAGE = 2  # a bad argument, before any work
EXIT_ALL_FAILED = 3  # every input the run processed failed (their error rows are committed)
EXIT_LISTING_ERRORS = 4  # some inputs could not be listed; the rest are committed
EXIT_LOCKED = 75  # another run holds --output (EX_TEMPFAIL: try again later)


@dataclass
class RunSummary:
    run_id: str
    output: str
    dry_run: bool = False
    diff: DiffCounts = field(default_factory=DiffCounts)
    inputs_processed: int = 0  # the inputs this run took on (after --limit)
    backlog: int = 0  # inputs that need work and were left for a later run (--limit)
    videos_ok: int = 0
    videos_failed: int = 0
    clips: int = 0
    wall_seconds: float = 0.0
    ray_start_seconds: float = 0.0
    list_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    rounds: int = 0
    receipts_dropped: int = 0
    stage_report: dict[str, Any] = field(default_factory=dict)
    errors_by_type: dict[str, int] = field(default_factory=dict)

    @property
    def inputs_listed(self) -> int:
        return self.diff.listed

    @property
    def inputs_skipped(self) -> int:
        return self.diff.done

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.pipeline_seconds if self.pipeline_seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """`EXIT_OK` when every input is accounted for and one succeeded or none needed work;
        `EXIT_ALL_FAILED` when every input the run processed failed; `EXIT_LISTING_ERRORS` when
        some inputs could not be listed (or two inputs claimed one video_id)."""
        if self.dry_run:
            return EXIT_OK
        if self.inputs_processed and self.videos_ok == 0 and self.videos_failed >= self.inputs_processed:
            return EXIT_ALL_FAILED
        if self.diff.listing_errors or self.diff.conflicts:
            return EXIT_LISTING_ERRORS
        return EXIT_OK


class ProgressLine:
    """'progress: 1234/10000 inputs (12 failed), 3456 clips, 45.6 clips/s, ETA 0:03:12' every
    ``every_seconds``; the ETA is the remaining inputs over the rate of the last minutes."""

    def __init__(self, total: int, every_seconds: float, window_seconds: float = 300.0):
        self.total = total
        self.every = every_seconds
        self.window = window_seconds
        self.started = time.perf_counter()
        self.last = self.started
        self.points: list[tuple[float, int]] = [(self.started, 0)]

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.every

    def line(self, done: int, failed: int, clips: int) -> str:
        now = time.perf_counter()
        self.last = now
        self.points.append((now, done))
        while len(self.points) > 2 and now - self.points[1][0] > self.window:
            self.points.pop(0)
        elapsed = max(now - self.started, 1e-9)
        (t0, d0) = self.points[0]
        rate = (done - d0) / max(now - t0, 1e-9)
        eta = "ETA unknown" if rate <= 0 else f"ETA {format_seconds((self.total - done) / rate)}"
        return (f"progress: {done}/{self.total} inputs ({failed} failed), {clips} clips, "
                f"{clips / elapsed:.1f} clips/s, {eta}")


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ClipTimeline:
    """Clips of finished videos against seconds since the pipeline started, for `vmae-ray report`'s
    clips/s chart (``stage_report.clips_timeline`` in _SUCCESS: ``seconds`` and cumulative ``clips``).

    A point at most every `interval_seconds`, and at most `max_points` of them: when full, every
    other point goes and the interval doubles, so _SUCCESS stays a few KB however long the run.
    The last point is the run's end, where ``clips`` equals the run's count.
    """

    def __init__(self, interval_seconds: float = 1.0, max_points: int = 256):
        self.interval_seconds, self.max_points = interval_seconds, max_points
        self.seconds: list[float] = [0.0]
        self.clips: list[int] = [0]

    def saw(self, seconds: float, clips: int) -> None:
        if seconds - self.seconds[-1] < self.interval_seconds:
            return
        self.seconds.append(seconds)
        self.clips.append(clips)
        if len(self.seconds) > self.max_points:
            self.seconds, self.clips = self.seconds[::2], self.clips[::2]
            self.interval_seconds *= 2

    def report(self, seconds: float, clips: int) -> dict[str, Any]:
        if seconds > self.seconds[-1]:
            self.seconds.append(seconds)
            self.clips.append(clips)
        else:
            self.clips[-1] = clips
        return {"clips_timeline": {"seconds": [round(s, 3) for s in self.seconds], "clips": list(self.clips)}}



def stage_report(totals: CallStats, res: Resources, wall: float, *, first_receipt_seconds: float | None,
                 after_startup: tuple[int, float] | None) -> dict[str, Any]:
    """Throughput each stage could sustain on its own, which one bounded the run, batch fill.

    Busy seconds are measured in the workers (summed over accepted receipts); a stage's
    capacity is its clips per busy second times the number of workers it had.
    ``model_call_sizes`` counts the model calls by the number of clips they embedded
    ({clips: calls}). ``after_startup`` = (clips decoded after the first receipt, seconds
    from the first receipt to the last).
    """
    if totals.clips == 0:
        return {}
    decode_rate = totals.clips / totals.decode_seconds if totals.decode_seconds > 0 else float("inf")
    embed_rate = totals.clips / totals.embed_seconds if totals.embed_seconds > 0 else float("inf")
    decode_capacity = decode_rate * res.decode_slots
    embed_capacity = embed_rate * res.num_actors[1]
    calls = sum(totals.model_calls.values())
    out: dict[str, Any] = {
        "clips": totals.clips, "pipeline_seconds": round(wall, 3),
        "end_to_end_clips_per_second": round(totals.clips / wall, 3) if wall > 0 else None,
        "decode_clips_per_second_per_task": round(decode_rate, 3), "decode_slots": res.decode_slots,
        "decode_capacity_clips_per_second": round(decode_capacity, 3),
        "embed_clips_per_second_per_actor": round(embed_rate, 3), "embed_actors": res.num_actors[1],
        "embed_capacity_clips_per_second": round(embed_capacity, 3),
        "bottleneck": "decode" if decode_capacity < embed_capacity else "embed",
        # How many decode CPUs one model actor can keep busy: the CPU:GPU ratio to provision.
        "decode_cpus_per_model_actor": round(embed_rate / decode_rate, 2) if decode_rate > 0 else 0.0,
        "hint_reliable": totals.clips >= HINT_MIN_CLIPS and wall >= HINT_MIN_SECONDS,
        "batch_size": res.batch_size, "model_calls": calls,
        "mean_clips_per_model_call": round(sum(k * v for k, v in totals.model_calls.items()) / calls, 3) if calls else None,
        "model_call_sizes": {str(k): v for k, v in sorted(totals.model_calls.items())},
    }
    if first_receipt_seconds is not None:
        out["first_clip_seconds"] = round(first_receipt_seconds, 3)
    if after_startup and after_startup[0] and after_startup[1] > 0:
        out["after_startup_clips_per_second"] = round(after_startup[0] / after_startup[1], 3)
        out["after_startup_clips"] = after_startup[0]
    return out


def summary_text(summary: RunSummary, licence: str | None, licence_warning: str | None) -> str:
    """The lines a run prints at its end (or a dry run instead of running)."""
    d = summary.diff
    verb = "would process" if summary.dry_run else "processed"
    lines = [f"vmae-ray {'dry run' if summary.dry_run else 'run'} {summary.run_id} "
             f"{'for' if summary.dry_run else 'committed to'} {summary.output}",
             f"  inputs: {d.listed} listed, {d.done} already done, {summary.inputs_processed} {verb} "
             + (f"of {d.to_process} that need work " if summary.backlog else "")
             + f"({d.new} new, {d.changed} changed, {d.retried} failed before and retried)"
             + (f", {summary.backlog} left for later (--limit)" if summary.backlog else "")]
    if d.unverified:
        lines.append(f"  {d.unverified} of the done inputs were committed from a manifest without size or ETag: "
                     "they count as done by their URI")
    if d.gone:
        shown = ", ".join(d.examples.get("gone", []))
        kept = (" (their rows stay: --prune is held back while part of --input could not be listed)"
                if d.prune_held_back else " (their rows stay; --prune removes them)")
        lines.append(f"  no longer listed: {d.gone}" + (f" (rows removed: {d.pruned}, --prune)" if d.pruned else kept)
                     + (f"; e.g. {shown}" if shown else ""))
    if d.duplicates:
        lines.append(f"  {d.duplicates} listed rows named an input listed already (counted once)")
    for kind, count, what in (("conflicts", d.conflicts, "video_ids given to two inputs (not processed)"),
                              ("listing_errors", d.listing_errors, "listing errors")):
        if count:
            lines.append(f"  {what}: {count}")
            lines += [f"    {e}" for e in d.examples.get(kind, [])]
    if summary.dry_run:
        lines.append("  nothing was decoded or written")
    else:
        errors = (f" ({', '.join(f'{k}: {v}' for k, v in sorted(summary.errors_by_type.items()))})"
                  if summary.errors_by_type else "")
        lines.append(f"  -> {summary.videos_ok} ok, {summary.videos_failed} failed{errors}")
        lines.append(f"  clips: {summary.clips}; wall {summary.wall_seconds:.1f}s (ray start "
                     f"{summary.ray_start_seconds:.1f}s, listing and diff {summary.list_seconds:.1f}s, pipeline "
                     f"{summary.pipeline_seconds:.1f}s); {summary.clips_per_second:.2f} clips/s")
        if summary.receipts_dropped:
            lines.append(f"  {summary.receipts_dropped} duplicate receipt(s) dropped (retried work), "
                         f"{summary.rounds} round(s)")
        r = summary.stage_report
        if r.get("first_clip_seconds") is not None:
            line = f"  first clip after {r['first_clip_seconds']:.1f}s (model actor start-up)"
            if r.get("after_startup_clips_per_second"):
                line += (f"; {r['after_startup_clips_per_second']:.2f} clips/s from then on "
                         f"({r['after_startup_clips']} clips decoded after it)")
            lines.append(line)
        if r:
            lines.append(
                f"  stages: decode {r['decode_clips_per_second_per_task']:.2f} clips/s per task x {r['decode_slots']} "
                f"= {r['decode_capacity_clips_per_second']:.2f}; embed {r['embed_clips_per_second_per_actor']:.2f} "
                f"clips/s per actor x {r['embed_actors']} = {r['embed_capacity_clips_per_second']:.2f}; "
                f"bound by {r['bottleneck']}")
            if r.get("model_calls"):
                lines.append(f"  model calls: {r['model_calls']}, {r['mean_clips_per_model_call']:.1f} clips per call "
                             f"(batch size {r['batch_size']})")
            hint = (f"  hint: one model actor keeps about {r['decode_cpus_per_model_actor']:.1f} decode CPUs busy; "
                    + ("add decode CPUs (CPU workers) to speed up" if r["bottleneck"] == "decode"
                       else "add model actors/GPUs to speed up"))
            if not r.get("hint_reliable"):
                hint += (f" (from {r['clips']} clips in {r['pipeline_seconds']:.0f}s: too few to size a cluster by; "
                         f"measure a run of at least {HINT_MIN_CLIPS} clips and {HINT_MIN_SECONDS:.0f}s)")
            lines.append(hint)
    if licence:
        lines.append(f"  {licence}")
    if licence_warning:
        lines.append(f"  WARNING: {licence_warning}")
    return "\n".join(lines)


# Lines Ray prints on every normal run that look like errors but are not (one pattern each):
# Ray Data passes every actor pool's constructor arguments by reference, which the core
# worker reports at ERROR level for any restartable actor (ray-project/ray#53727).
RAY_NOISE = (
    re.compile(r"has constructor arguments in the object store and max_restarts > 0"),
)


@contextlib.contextmanager
def quiet_ray_noise():
    """Drop `RAY_NOISE` lines from this process's stderr (file descriptor 2, where Ray's C++
    core worker writes) while the block runs; every other line passes through unchanged.
    Entered after Ray has started, so no process Ray spawns inherits the filter."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:  # no stderr to filter
        yield
        return
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                text = line.decode("utf-8", "replace")
                if not any(p.search(text) for p in RAY_NOISE):
                    os.write(saved, line)

    thread = threading.Thread(target=forward, name="vmae-ray-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread sees its end
        thread.join(timeout=5)
        os.close(saved)
