"""The job: plan -> lease -> list and diff -> embed rounds -> commit, and what it prints.

`run(config)` is the whole job. Everything that can be checked without Ray (flags, the
checkpoint's files, the --input's plan, the output's committed state) is checked first
(`planning.prepare`), so bad input fails before a cluster is touched. Then the run takes the
output's lease (`lease`), recovers what a killed run left, lists and diffs on Ray
(`diff`), rewrites the shard groups of superseded rows, and runs the embed graph (`graph`),
whose workers write the tables and send receipts that the driver accepts exactly once and
commits periodically (`commit`, `writing`). The driver's work is per receipt and per file:
it never holds an input, a row or a clip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from typing import Any

from vmae_ray import schema
from vmae_ray.checkpoint import is_non_commercial
from vmae_ray.commit import ReceiptLedger
from vmae_ray.config import ConfigError, EmbedConfig, Resources, plan_resources, storage_errors_of
from vmae_ray.diff import (
    DiffCounts,
    diff_dataset,
    diff_schema,
    listing_dataset,
    num_partitions,
    plan_todo,
    read_diff_receipts,
    rewrite_removals,
)
from vmae_ray.graph import embed_dataset, finish_remote, gpus_the_cluster_can_add, init_ray, lost_remote
from vmae_ray.lease import OutputLease
from vmae_ray.planning import Plan, check_state, decode_params, embedding_settings, licence_lines, prepare, software_versions
from vmae_ray.progress import ClipTimeline, ProgressLine, RunSummary, quiet_ray_noise, stage_report, summary_text
from vmae_ray.staging import VideoWriter
from vmae_ray.writing import CommittedState, failpoint, new_run_id

log = logging.getLogger("vmae_ray")

# Rounds over the inputs still undone after a round (dropped duplicate receipts leave some).
MAX_ROUNDS = 3
# Split videos finished per task (`staging.VideoWriter.finish`).
FINISH_VIDEOS_PER_TASK = 64


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is when a record is emitted (a test harness
    may swap it), not the stream it was created with."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s vmae-ray %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # child loggers (vmae_ray.writing, ...) reach it by propagation


def run(config: EmbedConfig) -> RunSummary:
    """Run the job (or, with ``dry_run``, say what it would do); returns its summary.

    Raises ConfigError for bad input before any Ray work starts, `lease.LeaseHeldError` when
    another run writes --output, RuntimeError when the run fails (what it committed stays).
    """
    _setup_logging()
    started = time.perf_counter()
    config = config.resolved()
    plan = prepare(config)
    run_id = config.run_id or new_run_id()
    summary = RunSummary(run_id=run_id, output=config.output, dry_run=config.dry_run)
    licence, licence_warning = licence_lines(plan.spec)
    if licence_warning and not config.dry_run:
        log.warning("%s", licence_warning)
    if config.dry_run:
        summary.ray_start_seconds = init_ray(config)
        listed = time.perf_counter()
        _, _, _, counts = _diff(plan, plan.state, run_id=None, replace_all=False)
        _check_listed(plan, counts)
        summary.list_seconds = time.perf_counter() - listed
        _account(summary, counts, config.limit)
        summary.wall_seconds = time.perf_counter() - started
        print(summary_text(summary, licence, licence_warning), flush=True)
        return summary
    quiet = contextlib.ExitStack()
    lease = OutputLease(plan.store, run_id, lease_seconds=config.lease_seconds, wait_seconds=config.wait_for_lock)
    with storage_errors_of("--output", config.output, plan.storage):
        lease.acquire()
    try:
        _run_with_lease(plan, run_id, summary, lease, started, quiet)
    finally:
        lease.release()
        quiet.close()
    print(summary_text(summary, licence, licence_warning), flush=True)
    return summary


def _account(summary: RunSummary, counts: DiffCounts, limit: int | None) -> None:
    summary.diff = counts
    summary.inputs_processed = counts.to_process if limit is None else min(limit, counts.to_process)
    summary.backlog = counts.to_process - summary.inputs_processed


def _run_with_lease(plan: Plan, run_id: str, summary: RunSummary, lease: OutputLease, started: float,
                    quiet: contextlib.ExitStack) -> None:
    config = plan.config
    with storage_errors_of("--output", config.output, plan.storage):
        try:
            state = plan.store.recover()
        except ValueError as exc:
            raise ConfigError("--output", str(exc)) from exc
        except OSError as exc:
            raise ConfigError("--output", f"cannot write to {config.output}: {type(exc).__name__}: {exc}") from exc
    check_state(plan, state)  # recovery may have rolled a commit forward
    replace_all = plan.replace_all(state)
    summary.ray_start_seconds = init_ray(config)
    quiet.enter_context(quiet_ray_noise())
    import ray

    cluster = ray.cluster_resources()
    # A --device/--gpus-per-actor the cluster cannot serve is a ConfigError here, before any work.
    addable = gpus_the_cluster_can_add(cluster)
    res = plan_resources(config, cluster, gpus_to_add=addable)
    listed = time.perf_counter()
    todo_files, removal_files, removals, counts = _diff(plan, state, run_id=run_id, replace_all=replace_all)
    _check_listed(plan, counts)
    _account(summary, counts, config.limit)
    summary.list_seconds = time.perf_counter() - listed
    log.info("run %s: %d inputs listed, %d already done, %d to process (%d new, %d changed, %d retried)%s%s; "
             "model %s (%s, D=%d)%s", run_id, counts.listed, counts.done, summary.inputs_processed, counts.new,
             counts.changed, counts.retried, f", {summary.backlog} left for later (--limit)" if summary.backlog else "",
             f", {counts.gone} no longer listed" if counts.gone else "", config.model, plan.spec.architecture,
             plan.spec.hidden_size,
             (f", with labels from the head {config.head}" if plan.head else ", with labels") if plan.with_labels else "")
    todo_items, total = plan_todo(todo_files, config.limit)
    assert total == summary.inputs_processed, (total, summary.inputs_processed)
    replaced: dict[str, str | None] = {}
    if removals and not replace_all:
        # With a backlog (--limit), inputs superseded but left for later keep their rows.
        taken = {item["file"]: item["take"] for item in todo_items} if summary.backlog else None
        replaced = rewrite_removals(removal_files, store=plan.store, run_id=run_id,
                                    committed={f for rels in state.files.values() for f in rels},
                                    ungrouped=_ungrouped(state), removals=removals, taken=taken)
    committer = Committer(plan, state, run_id, summary, res, lease, started, replace_all=replace_all, replaced=replaced)
    ledger = ReceiptLedger(summary.inputs_processed)
    if summary.inputs_processed:
        if replace_all:  # said once the run is sure to start
            log.warning("--overwrite: every input is processed again and the committed rows of %s are replaced at "
                        "this run's first commit", config.output)
        if res.gpus_per_actor > 0 and not cluster.get("GPU"):
            log.warning("the cluster has no GPU now: the model actors wait for the autoscaler to add GPU nodes "
                        "(a cluster that cannot add them leaves this run waiting; stop it and use --device cpu)")
        log.info("ray: %g CPUs, %g GPUs (%s more the autoscaler can add); model actors %s on %s, %g GPU each, "
                 "batch %d", res.cluster_cpus, res.cluster_gpus, "unknown" if addable is None else f"{addable:g}",
                 res.num_actors, res.device, res.gpus_per_actor, res.batch_size)
        try:
            _embed(plan, run_id, summary, res, ledger, committer, todo_items)
        except Exception as exc:
            done = f"{committer.commits} checkpoint(s) committed" if committer.commits else "nothing was committed"
            raise RuntimeError(f"run {run_id} failed; {done}, rerun to resume ({_short(exc)})") from exc
    committer.commit(ledger, complete=summary.backlog == 0, final=True)


def _check_listed(plan: Plan, counts: DiffCounts) -> None:
    """An --input that lists nothing (and could list everything) is a mistake, not a night off."""
    if counts.listed or counts.listing_errors or counts.conflicts or counts.duplicates:
        return
    if plan.listing.kind == "directory":
        raise ConfigError("--input", f"no video files under {plan.config.input!r} (looked for "
                          f"{', '.join(plan.listing.extensions)}; use a glob or a manifest for other names)")
    raise ConfigError("--input", f"{plan.config.input!r} lists no input")


def _ungrouped(state: CommittedState) -> set[str]:
    """Committed files whose clips are not stored beside their videos row (written before
    layout 2): a removal there scans the older clips files."""
    if state.layout >= 2:
        return set(state.manifest.get("ungrouped") or [])
    return {f for rels in state.files.values() for f in rels}


def _diff(plan: Plan, state: CommittedState, *, run_id: str | None, replace_all: bool):
    """List and diff on Ray; (to-do files with rows, removal files, removals, counts)."""
    started = time.perf_counter()
    log.info("listing %s in %d part(s) on Ray%s", plan.config.input, len(plan.listing.parts),
             ", with one metadata request per input (the manifest gives no ETag)" if plan.listing.needs_stat else "")
    listing = listing_dataset(plan.listing, plan.storage).materialize()
    rows = listing.count()
    log.info("listed %d rows in %.1fs; diffing against %s", rows, time.perf_counter() - started, plan.config.output)
    committed = [] if replace_all else state.files_of(schema.VIDEOS) + state.files_of(schema.ERRORS)
    config = plan.config
    # Partitions for the listing's rows and the committed rows: one per input the last run knew
    # of (a nightly run over one day's prefix may meet an output of millions of inputs), or as
    # many as listed when _SUCCESS says nothing of them.
    committed_rows = 0
    if committed:
        last = state.manifest.get("counts") or {}
        known = sum(int(last.get(k) or 0) for k in ("inputs_listed", "no_longer_listed")) - int(last.get("pruned") or 0)
        committed_rows = max(known, rows)
    partitions = num_partitions(rows + committed_rows)

    def diff(prune: bool):
        ds = diff_dataset(listing, committed_files=committed, output=config.output, storage=plan.storage,
                          schema=diff_schema(plan.passthrough_schema), num_partitions=partitions,
                          run_id=run_id, replace_all=replace_all, retry_failed=config.retry_failed, prune=prune,
                          passthrough=tuple(plan.passthrough_schema.names))
        return read_diff_receipts(ds.iter_batches(batch_size=None, batch_format="pyarrow"))

    result = diff(config.prune)
    counts = result[3]
    if config.prune and counts.listing_errors and counts.pruned:
        # A part that could not be listed (access denied, throttling, a bad manifest file) hides
        # inputs that still exist: none is taken for removed until the whole input lists. The
        # listing is materialized, so this second diff lists nothing again.
        log.warning("--prune held back: %d part(s) of --input could not be listed, so the %d committed input(s) "
                    "not listed keep their rows this run", counts.listing_errors, counts.gone)
        result = diff(False)
        result[3].prune_held_back = 1
    return result


def _embed(plan: Plan, run_id: str, summary: RunSummary, res: Resources, ledger: ReceiptLedger,
           committer: Committer, todo_items: list[dict[str, Any]]) -> None:
    """The embed rounds: the to-do inputs, then (rarely) those left undone by dropped receipts."""
    import ray

    config = plan.config
    writer = VideoWriter(config.output, plan.storage, run_id, plan.output_schemas(), plan.embedded_schema(),
                         plan.settings_fingerprint, labels=plan.labeler, with_reconstruction=config.reconstruction)
    params = decode_params(config, plan.spec, plan.num_frames)
    clip_bytes = plan.num_frames * plan.spec.crop_height * plan.spec.crop_width * 3
    finish = finish_remote()
    pending_finish: dict[Any, list[int]] = {}
    progress = ProgressLine(summary.inputs_processed, config.progress_seconds)
    timeline = ClipTimeline()
    pipeline_started = time.perf_counter()
    started_wall = time.time()

    def offer(table, finishing: list[int] | None = None) -> None:
        for receipt in table.to_pylist():
            dropped = ledger.offer(receipt)
            if dropped:
                plan.store.remove_staged(run_id, dropped)
                if finishing:
                    ledger.requeue(finishing)
            else:
                failpoint("after_accept")

    def launch_finish() -> None:
        ready = ledger.take_ready()
        for i in range(0, len(ready), FINISH_VIDEOS_PER_TASK):
            chunk = ready[i:i + FINISH_VIDEOS_PER_TASK]
            pending_finish[finish.remote(writer, chunk)] = [n for n, _ in chunk]

    def poll_finish(timeout: float) -> None:
        while pending_finish:
            ready, _ = ray.wait(list(pending_finish), num_returns=1, timeout=timeout)
            if not ready:
                return
            videos = pending_finish.pop(ready[0])
            offer(ray.get(ready[0]), finishing=videos)

    for round_number in range(1, MAX_ROUNDS + 1):
        summary.rounds = round_number
        done_ref = None if round_number == 1 else ray.put(ledger.done.bits)
        ds = embed_dataset(todo_items=todo_items, store=plan.store, run_id=run_id, params=params,
                           storage=plan.storage, config=config, res=res, writer=writer,
                           num_inputs=summary.inputs_processed - ledger.done.count(), clip_bytes=clip_bytes,
                           done_ref=done_ref)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            offer(batch)
            launch_finish()
            poll_finish(0)
            now = time.perf_counter()
            timeline.saw(now - pipeline_started, ledger.totals.clips)
            if progress.due():
                log.info("%s", progress.line(ledger.num_done, ledger.totals.errors, ledger.totals.clips))
            committer.maybe_commit(ledger)
        operators = ray_data_operators(ds.stats())
        while pending_finish or ledger.ready:
            launch_finish()
            poll_finish(None)
        missing = summary.inputs_processed - ledger.done.count()
        if not missing:
            break
        if round_number < MAX_ROUNDS:
            log.warning("%d inputs have no accepted result after round %d (their receipts were dropped as "
                        "duplicates, or a split video lost a part): processing them again", missing, round_number)
    missing = summary.inputs_processed - ledger.done.count()
    if missing:
        log.error("%d inputs produced no result; recording them as errors", missing)
        lost = lost_remote()
        offer(ray.get(lost.remote(writer, plan.store, run_id, todo_items, ledger.done.bits)))
    summary.pipeline_seconds = time.perf_counter() - pipeline_started
    summary.receipts_dropped = ledger.dropped
    totals = ledger.totals
    first = None if ledger.first_receipt_at is None else ledger.first_receipt_at - started_wall
    after = None
    if ledger.first_receipt_at is not None and ledger.last_receipt_at is not None:
        after = (totals.clips_decoded_since(ledger.first_receipt_at), ledger.last_receipt_at - ledger.first_receipt_at)
    summary.stage_report = stage_report(totals, res, summary.pipeline_seconds, first_receipt_seconds=first,
                                        after_startup=after)
    if summary.stage_report:
        summary.stage_report.update(timeline.report(summary.pipeline_seconds, totals.clips))
        summary.stage_report["operators"] = operators


class Committer:
    """Commits accepted receipts: periodically during the run and once at the end.

    Each commit is a consistent state (receipts hold whole videos: a video's clip rows and
    video row, or its error row, are committed together), so a crash loses at most the work
    since the last commit and a rerun resumes from there. The first commit also replaces the
    shard groups rewritten without superseded rows (and, with --overwrite, drops every old
    file). `_SUCCESS` says whether the run it describes is complete.
    """

    def __init__(self, plan: Plan, state: CommittedState, run_id: str, summary: RunSummary, res: Resources,
                 lease: OutputLease, started: float, *, replace_all: bool, replaced: dict[str, str | None]):
        self.plan, self.state, self.run_id, self.summary, self.res = plan, state, run_id, summary, res
        self.lease = lease
        self.started = started
        self.replace_all = replace_all
        self.replaced = replaced
        self.ungrouped = set() if replace_all else _ungrouped(state)
        # Keep the history of runs, unless this run replaces results of other settings.
        self.base_runs = state.manifest.get("runs", []) if state.exists and not replace_all else []
        self.versions = software_versions()
        self.last_commit = time.perf_counter()
        self.commits = 0

    def maybe_commit(self, ledger: ReceiptLedger) -> None:
        # A checkpoint with no newly accepted file would only rewrite _SUCCESS.
        if (time.perf_counter() - self.last_commit >= self.plan.config.commit_every_seconds and ledger.has_pending):
            self.commit(ledger, complete=False, final=False)
            log.info("checkpoint: committed %d videos, %d errors so far", ledger.totals.videos, ledger.totals.errors)

    def commit(self, ledger: ReceiptLedger, *, complete: bool, final: bool) -> None:
        plan, summary, totals = self.plan, self.summary, ledger.totals
        self.lease.check()
        staged = ledger.take_pending()
        summary.videos_ok, summary.videos_failed, summary.clips = totals.videos, totals.errors, totals.clips
        summary.errors_by_type = dict(sorted(totals.errors_by_type.items()))
        summary.wall_seconds = time.perf_counter() - self.started
        d = summary.diff
        counts = {"inputs_listed": d.listed, "inputs_skipped": d.done,
                  "inputs_processed": summary.inputs_processed if complete else ledger.num_done,
                  "videos_ok": summary.videos_ok, "videos_failed": summary.videos_failed, "clips": summary.clips,
                  "errors_by_type": summary.errors_by_type, "new": d.new, "changed": d.changed, "retried": d.retried,
                  "no_longer_listed": d.gone, "pruned": d.pruned, "listing_errors": d.listing_errors,
                  "conflicts": d.conflicts, "backlog": summary.backlog}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        run_entry = {"run_id": self.run_id, "complete": complete, "committed_at": now, "counts": counts,
                     "wall_seconds": round(summary.wall_seconds, 3)}
        config = plan.config
        for old, new in self.replaced.items():
            if old in self.ungrouped:
                self.ungrouped.discard(old)
                if new is not None:
                    self.ungrouped.add(new)
        manifest = {
            # complete: every listed input is accounted for; finished: this run ended (a --limit
            # run finishes with a backlog: finished, not complete).
            "run_id": self.run_id, "complete": complete, "finished": final, "committed_at": now, "counts": counts,
            "settings_fingerprint": plan.settings_fingerprint, "embedding_fingerprint": plan.embedding_fingerprint,
            # What the fingerprint hashes, so that a head's refusal can say which setting differs.
            "embedding_settings": embedding_settings(config, plan.spec, plan.num_frames),
            "config": config.to_dict(redact=True),
            "model": {"ref": config.model, "architecture": plan.spec.architecture,
                      "fingerprint": plan.spec.fingerprint, "num_frames": plan.num_frames,
                      "embedding_dim": plan.spec.hidden_size, "labels": plan.with_labels,
                      "license": plan.spec.license, "non_commercial": is_non_commercial(plan.spec.license),
                      "reconstruction": ({"mask_ratio": config.mask_ratio, "mask_seed": config.mask_seed,
                                          "norm_pix_loss": plan.spec.norm_pix_loss}
                                         if config.reconstruction else None)},
            **({"head": {"uri": config.head, **plan.head.describe()}} if plan.head is not None else {}),
            "versions": self.versions, "resources": dataclasses.asdict(self.res),
            "stage_report": summary.stage_report,
            "ungrouped": sorted(self.ungrouped),
            "runs": self.base_runs + [run_entry],
        }
        # Every table folder exists once a run has committed, even with no row (a reader of
        # errors/ gets an empty table of the right columns, not "no such folder").
        schemas = plan.output_schemas()
        for table in schema.TABLES:
            has = staged.get(table) or (not self.replace_all and self.state.files_of(table)
                                        and any(self.replaced.get(f, f) for f in self.state.files_of(table)))
            if not has:
                rel = f"{table}/part-{self.run_id}-00000.parquet"
                plan.store.write_table(self.run_id, rel, getattr(schemas, table).empty_table())
                staged.setdefault(table, []).append(rel)
        success = plan.store.commit(self.run_id, staged, manifest, self.state, replace_all=self.replace_all,
                                    replaced=self.replaced, final=final)
        self.state = CommittedState(success)
        self.replace_all = False
        self.replaced = {}
        self.last_commit = time.perf_counter()
        self.commits += 1


def ray_data_operators(stats: str) -> list[dict[str, Any]]:
    """The operators of an executed Ray Data dataset, from its stats text ("Operator 3 Name: 12
    tasks executed, 40 blocks produced ..."): [{name, tasks, blocks}] (counts absent when the
    stats give none)."""
    import re

    out = []
    for m in re.finditer(r"^Operator \d+ (.+?):(?: (\d+) tasks executed, (\d+) blocks produced)?", stats,
                         flags=re.MULTILINE):
        entry: dict[str, Any] = {"name": m.group(1)}
        if m.group(2):
            entry.update(tasks=int(m.group(2)), blocks=int(m.group(3)))
        out.append(entry)
    return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:500] if text else type(exc).__name__
