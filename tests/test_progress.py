"""What a run prints and returns: the sizing hint's trust, the progress line's ETA, exit statuses."""

import pytest

from vmae_ray.config import Resources
from vmae_ray.diff import DiffCounts
from vmae_ray.progress import (
    EXIT_ALL_FAILED,
    EXIT_LISTING_ERRORS,
    EXIT_OK,
    HINT_MIN_CLIPS,
    HINT_MIN_SECONDS,
    ProgressLine,
    RunSummary,
    format_seconds,
    stage_report,
    summary_text,
)
from vmae_ray.staging import CallStats

RES = Resources(device="cpu", gpus_per_actor=0.0, num_actors=(1, 1), batch_size=4, decode_slots=2,
                cluster_cpus=2.0, cluster_gpus=0.0)


def _totals(clips: int) -> CallStats:
    # 0.05 s of decode and 0.01 s of model per clip: one actor keeps 5 decode CPUs busy.
    return CallStats(clips=clips, videos=clips, decode_seconds=0.05 * clips, embed_seconds=0.01 * clips,
                     model_calls={4: clips // 4})


@pytest.mark.parametrize("clips, wall, reliable", [
    (40, 10.0, False),  # a pilot run: the ratio is mostly start-up
    (HINT_MIN_CLIPS, 5.0, False),  # enough clips, too short
    (HINT_MIN_CLIPS - 4, 2 * HINT_MIN_SECONDS, False),  # long enough, too few clips
    (HINT_MIN_CLIPS, HINT_MIN_SECONDS, True),
])
def test_the_sizing_hint_says_when_its_sample_is_too_small(clips, wall, reliable):
    report = stage_report(_totals(clips), RES, wall, first_receipt_seconds=1.0, after_startup=None)
    assert report["decode_cpus_per_model_actor"] == 5.0
    assert report["mean_clips_per_model_call"] == 4.0
    assert report["hint_reliable"] is reliable
    summary = RunSummary(run_id="r", output="/out", videos_ok=clips, clips=clips, pipeline_seconds=wall,
                         inputs_processed=clips, stage_report=report)
    (hint,) = [line for line in summary_text(summary, None, None).splitlines() if "hint:" in line]
    assert "keeps about 5.0 decode CPUs busy" in hint
    assert ("too few to size a cluster by" in hint) is (not reliable)


def test_the_eta_is_the_remaining_inputs_over_the_recent_rate():
    line = ProgressLine(total=1000, every_seconds=30, window_seconds=300)
    now = line.started
    # 100 inputs in the first 100 s, then 400 in the next 100 s: the window (300 s) holds both,
    # so 500 done at 2.5 per second leaves 500 for 200 s.
    line.points = [(now - 200, 0), (now - 100, 100)]
    line.started = now - 200
    text = line.line(done=500, failed=3, clips=2000)
    assert text.startswith("progress: 500/1000 inputs (3 failed), 2000 clips, 10.0 clips/s")
    assert text.endswith("ETA 0:03:20")
    # A point older than the window (with a newer one before now) is dropped, so only the recent
    # rate counts: 400 in the last 100 s -> 500 left in 125 s.
    line = ProgressLine(total=1000, every_seconds=30, window_seconds=90)
    now = line.started
    line.started = now - 200
    line.points = [(now - 200, 0), (now - 100, 100)]
    assert line.line(done=500, failed=0, clips=0).endswith("ETA 0:02:05")
    assert ProgressLine(total=10, every_seconds=1).line(done=0, failed=0, clips=0).endswith("ETA unknown")
    assert format_seconds(3 * 3600 + 61.4) == "3:01:01"


@pytest.mark.parametrize("processed, ok, failed, listing_errors, dry_run, code", [
    (5, 5, 0, 0, False, EXIT_OK),
    (5, 4, 1, 0, False, EXIT_OK),  # some failed: their error rows say so; the run did its work
    (0, 0, 0, 0, False, EXIT_OK),  # nothing needed work
    (5, 0, 5, 0, False, EXIT_ALL_FAILED),
    (5, 5, 0, 2, False, EXIT_LISTING_ERRORS),
    (5, 0, 5, 2, False, EXIT_ALL_FAILED),  # all failed is the louder of the two
    (5, 0, 0, 2, True, EXIT_OK),  # a dry run only reports
])
def test_exit_status(processed, ok, failed, listing_errors, dry_run, code):
    summary = RunSummary(run_id="r", output="/out", dry_run=dry_run, inputs_processed=processed, videos_ok=ok,
                         videos_failed=failed, diff=DiffCounts(listed=processed, listing_errors=listing_errors))
    assert summary.exit_code == code
