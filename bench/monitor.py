"""Peak memory while a peer runs: this process, Ray's worker processes, Ray's object store.

A sampling thread polls every ``interval`` seconds:

* RSS of this process (the driver; for the in-process model-card loop, everything);
* RSS of every Ray worker process (``ray::...`` process titles): the largest single worker
  (e.g. one decode task) and the sum over workers. The sum counts object-store pages mapped
  into several workers more than once, so it is an upper bound, not the machine's use;
* the object store's bytes in use (and spilled), from the raylet's memory-info reply (the
  same source as ``ray memory --stats-only``);
* CPU seconds spent during the run by every process on the machine, grouped: this process,
  Ray workers (by task/actor title), Ray's own daemons, and everything else (other jobs on a
  shared machine), so a slow run can be told apart from a busy machine. A worker is named by
  the last task or actor it ran (its title reads ``ray::IDLE`` between tasks); "IDLE" is left
  only for workers that never ran one while sampled (e.g. started, then not used).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import psutil

IDLE = "ray worker: IDLE"


def _ray_store_stats() -> tuple[int, int] | None:
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        if not ray.is_initialized():
            return None
        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        stats = reply.store_stats
        return int(stats.object_store_bytes_used), int(getattr(stats, "spilled_bytes_total", 0))
    except Exception:  # noqa: BLE001 - stats are best effort
        return None


@dataclass
class Peaks:
    driver_rss: int = 0
    worker_rss_max: int = 0
    worker_rss_sum: int = 0
    object_store_used: int = 0
    object_store_spilled: int = 0
    samples: int = 0
    worker_titles: dict[str, int] = field(default_factory=dict)  # title -> peak RSS
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # process group -> CPU s
    wall_seconds: float = 0.0

    def as_dict(self) -> dict:
        mib = 2**20
        top = sorted(self.worker_titles.items(), key=lambda kv: -kv[1])[:4]
        return {
            "driver_rss_mib": round(self.driver_rss / mib, 1),
            "worker_rss_max_mib": round(self.worker_rss_max / mib, 1),
            "worker_rss_sum_mib": round(self.worker_rss_sum / mib, 1),
            "object_store_peak_mib": round(self.object_store_used / mib, 1),
            "object_store_spilled_mib": round(self.object_store_spilled / mib, 1),
            "samples": self.samples,
            "largest_workers": {k[:60]: round(v / mib, 1) for k, v in top},
            "wall_seconds": round(self.wall_seconds, 2),
            "cpu_seconds": {k: round(v, 2) for k, v in sorted(self.cpu_seconds.items(), key=lambda kv: -kv[1])},
        }


class ResourceMonitor:
    """``with ResourceMonitor() as m: ...`` then ``m.peaks``."""

    def __init__(self, interval: float = 0.5, ray_stats: bool = True):
        self.interval = interval
        self.ray_stats = ray_stats
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._me = psutil.Process(os.getpid())
        self._cpu_first: dict[int, tuple[float, float]] = {}  # pid -> (create time, cpu s)
        self._cpu_last: dict[int, tuple[float, float, str]] = {}  # pid -> (create time, cpu s, group)
        self._started = 0.0

    def _group(self, pid: int, cmd: list[str]) -> str:
        if pid == self._me.pid:
            return "driver (this process)"
        head = cmd[0] if cmd else ""
        if head.startswith("ray::"):
            title = head.split("(", 1)[0] if "MapBatches" not in head and "MapWorker" not in head else head
            return "ray worker: " + title[5:60]
        joined = " ".join(cmd[:6])
        if "multiprocessing" in joined and ("spawn_main" in joined or "forkserver" in joined):
            return "multiprocessing children (vmae-ray's isolated decoders)"
        if any(k in joined for k in ("raylet", "gcs_server", "ray/dashboard", "ray/_private", "ray/autoscaler",
                                     "runtime_env", "log_monitor")):
            return "ray daemons"
        return "other processes"

    def _cpu_snapshot(self, first: bool) -> None:
        for p in psutil.process_iter(["pid", "cmdline", "cpu_times", "create_time"]):
            info = p.info
            times = info.get("cpu_times")
            if times is None:
                continue
            cpu = times.user + times.system
            key = (info.get("create_time") or 0.0)
            if first:
                self._cpu_first[p.pid] = (key, cpu)
            group = self._group(p.pid, info.get("cmdline") or [])
            previous = self._cpu_last.get(p.pid)
            # A Ray worker's title is ray::IDLE between tasks: keep the task it last ran, so a
            # decode worker's CPU is not reported as idle time.
            if group == IDLE and previous is not None and previous[0] == key:
                group = previous[2]
            self._cpu_last[p.pid] = (key, cpu, group)

    def _cpu_totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (ctime, cpu, group) in self._cpu_last.items():
            first = self._cpu_first.get(pid)
            base = first[1] if first and first[0] == ctime else 0.0
            if cpu - base > 0.005:
                out[group] = out.get(group, 0.0) + cpu - base
        return out

    def _workers(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = p.info.get("cmdline") or []
            if cmd and cmd[0].startswith("ray::") and p.pid != self._me.pid:
                out.append(p)
        return out

    def sample(self) -> None:
        pk = self.peaks
        try:
            self._cpu_snapshot(first=False)
        except psutil.Error:
            pass
        try:
            pk.driver_rss = max(pk.driver_rss, self._me.memory_info().rss)
        except psutil.Error:
            pass
        total = 0
        for p in self._workers():
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            pk.worker_rss_max = max(pk.worker_rss_max, rss)
            title = (p.info.get("cmdline") or ["?"])[0]
            pk.worker_titles[title] = max(pk.worker_titles.get(title, 0), rss)
        pk.worker_rss_sum = max(pk.worker_rss_sum, total)
        if self.ray_stats:
            stats = _ray_store_stats()
            if stats is not None:
                pk.object_store_used = max(pk.object_store_used, stats[0])
                pk.object_store_spilled = max(pk.object_store_spilled, stats[1])
        pk.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> ResourceMonitor:
        self._cpu_snapshot(first=True)
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="bench-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()
        self.peaks.wall_seconds = time.perf_counter() - self._started
        self.peaks.cpu_seconds = self._cpu_totals()


def timed(fn, *args, **kwargs):
    """(result, wall seconds)."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started
