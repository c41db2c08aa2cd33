"""`vmae-ray report`: one self-contained HTML page per committed output, for a person to look at.

    vmae-ray report --tables OUT --output REPORT.html [--color-by COLUMN] [--storage-options JSON|@FILE]

The page reads only committed state (`_SUCCESS` and the files it lists, through
`vmae_ray.reading.CommittedOutput`, local or s3://) and shows, one section each: the run and
its history, failures, throughput, the corpus, the embeddings (a PCA map and nearest-neighbour
cosine similarities) and, when the tables have them, reconstruction losses and labels. A
section without data says so instead of drawing an empty chart.

Self-contained: pictures are PNGs drawn by matplotlib (Agg) inlined as base64 ``data:`` URIs;
no external script, style, font or image, and a Content-Security-Policy that forbids the page
any fetch (``default-src 'none'``; images from ``data:`` only; the one inline script, which
records each picture's decoded width on the page for a browser test to read, is allowed by its
hash). Every value taken from the data (URIs, messages, labels, passthrough values) is
HTML-escaped.

Pure data -> figures/HTML logic apart from the I/O: `load_report_data` reads, `render_html`
draws, `write_report` does both and writes the file.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vmae_ray import schema
from vmae_ray.config import CommandParser, ConfigError, storage_errors_of, storage_for

# Above this many videos, the PCA map and the nearest-neighbour similarities use a random
# sample of this many (seed 0), and the page says so: exact nearest neighbours cost N^2 * D
# multiply-adds (20,000 x 768-d: 3e11; measured 9 s for the search and 3 s for the PCA on
# this project's 2 shared CPU cores, random vectors) and a scatter of more points is a blot
# anyway. The embeddings of all videos are read first (N x D float32 in memory).
MAX_EMBEDDING_POINTS = 20_000
SAMPLE_SEED = 0
# Rows of the failure table: examples per error type; runs listed in the history table.
EXAMPLES_PER_ERROR_TYPE = 3
MAX_HISTORY_ROWS = 30
# Categories drawn in a legend or bar chart; the rest are summed as "other".
MAX_CATEGORIES = 12
# Clips listed as most and least predictable (reconstruction loss).
EXTREME_CLIPS = 5
MAX_MESSAGE_CHARS = 300

# Colours shared by the CSS and the charts.
ACCENT = "#3366aa"
FAIL = "#c0392b"
OK = "#2e8b57"
MUTED = "#888888"
STAGE_COLORS = {"list": "#8e44ad", "read": "#e67e22", "probe": "#c0392b", "decode": "#2980b9", "embed": "#16a085"}

# Records each picture's natural (decoded) width and a total on <body>, once the page has
# loaded: a browser test reads them from the DOM (data-natural-width, data-images-decoded).
IMAGE_CHECK_SCRIPT = (
    "window.addEventListener('load',function(){var imgs=document.images,ok=0;"
    "for(var i=0;i<imgs.length;i++){var w=imgs[i].naturalWidth;imgs[i].setAttribute('data-natural-width',w);"
    "if(imgs[i].complete&&w>0){ok++;}}"
    "document.body.setAttribute('data-images-decoded',ok+'/'+imgs.length);});"
)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
@dataclass
class ReportData:
    """What the page draws, read from one committed output.

    ``videos``/``clips``/``errors`` hold the committed rows without embeddings (only the
    columns the report uses, for clips); ``embeddings`` is the videos' float32 (N, D) matrix in
    the row order of ``videos`` (None when no video is committed).
    """

    uri: str
    manifest: dict[str, Any]
    videos: pa.Table
    clips: pa.Table
    clips_total: int
    errors: pa.Table
    embeddings: np.ndarray | None


CLIP_COLUMNS = ("video_id", "uri", "clip_index", "start_seconds", "end_seconds", "reconstruction_loss")


def load_report_data(uri: str, storage=None, *, color_by: str | None = None) -> ReportData:
    """Read what the report needs from the committed output at ``uri`` (local or any fsspec URI).

    Raises ConfigError naming --tables when ``uri`` is not a committed embed output
    (`reading.open_committed`: no `_SUCCESS`, another command's output, storage errors), and
    naming --color-by when ``color_by`` is not a column of videos/, checked from the Parquet
    footers before any table is read.
    """
    from vmae_ray.reading import embedding_matrix, open_committed
    from vmae_ray.storage import StorageOptions

    committed = open_committed(uri, storage if isinstance(storage, StorageOptions) else StorageOptions(storage))
    if color_by is not None:  # checked from the footers, before any table is read
        choices = [n for n in committed.schema(schema.VIDEOS).names if n != "embedding"]
        if color_by not in choices:
            raise ConfigError("--color-by", f"videos/ has no column {color_by!r}; choose one of: "
                              + (", ".join(choices) if choices else "(no videos committed)"))
    videos = committed.read(schema.VIDEOS)
    embeddings = None
    if videos.num_rows and "embedding" in videos.column_names:
        emb = videos.column("embedding")
        if emb.null_count:
            videos = videos.filter(emb.is_valid())
            emb = videos.column("embedding")
        embeddings = embedding_matrix(emb)
        videos = videos.drop_columns(["embedding"])
    clip_names = committed.schema(schema.CLIPS).names
    clips = committed.read(schema.CLIPS, [c for c in CLIP_COLUMNS if c in clip_names])
    errors = committed.read(schema.ERRORS)
    return ReportData(uri=committed.uri, manifest=committed.manifest, videos=videos, clips=clips,
                      clips_total=clips.num_rows, errors=errors, embeddings=embeddings)


# ------------------------------------------------------------------------------------------
# Pure computations (tested against brute-force references)
# ------------------------------------------------------------------------------------------
def sample_indices(num_rows: int, max_rows: int = MAX_EMBEDDING_POINTS, seed: int = SAMPLE_SEED) -> np.ndarray:
    """Row indices to draw: all of them up to ``max_rows``, else a sorted uniform random sample
    of ``max_rows`` without replacement (seeded, so the same output gives the same page)."""
    if num_rows <= max_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=max_rows, replace=False))


def pca_2d(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows on their first two principal components (scikit-learn's PCA, centred).

    ``matrix``: (N, D) float, N >= 3, D >= 2. Returns (coordinates (N, 2) float64, explained
    variance ratio (2,)). Signs follow scikit-learn's convention (deterministic).
    """
    from sklearn.decomposition import PCA

    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 3 or matrix.shape[1] < 2:
        raise ValueError(f"PCA map needs at least 3 rows of at least 2 dimensions, got shape {matrix.shape}")
    pca = PCA(n_components=2, random_state=SAMPLE_SEED)
    coords = pca.fit_transform(matrix)
    return coords, pca.explained_variance_ratio_


def nearest_neighbour_cosine(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the cosine similarity to its nearest other row and that row's index.

    Exact search (FAISS IndexFlatIP on L2-normalised rows, brute-force inner products), in
    float32: plenty for a histogram of similarities, unlike `neighbours`, which ranks in float64.
    ``matrix``: (N, D) float, N >= 2. Returns (similarities (N,) float32, indices (N,) int64).
    A zero row has similarity 0 to everything. Ties between equal rows are fine: the row
    itself is skipped by index, not by score.
    """
    import faiss

    from vmae_ray.neighbours import row_norms, unit_rows

    x = np.ascontiguousarray(matrix, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"nearest neighbours need at least 2 rows, got shape {x.shape}")
    x = unit_rows(x, row_norms(x))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    # The top 2 hold the row itself and its nearest other row, in some order (equal rows tie).
    scores, ids = index.search(x, 2)
    self_first = ids[:, 0] == np.arange(len(x))
    similarity = np.where(self_first, scores[:, 1], scores[:, 0]).astype(np.float32)
    neighbour = np.where(self_first, ids[:, 1], ids[:, 0]).astype(np.int64)
    return similarity, neighbour


def timeline_rates(seconds: Sequence[float], clips: Sequence[int],
                   window_seconds: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clips/s in consecutive windows of a cumulative (seconds, clips) series.

    The job records a point when a batch arrives at least its interval after the previous
    point, so between two points nothing arrived except within one interval after the first:
    the count is a step function, the last recorded value until the next point (exact to
    within the recording interval; a straight line would spread a burst over a silent gap).
    Windows run 0, w, 2w, ... to the last point; ``window_seconds`` defaults to a 60th of the
    run, at least 1 s. Returns (edges (K+1,) seconds, rates (K,) clips/s); empty arrays for a
    series shorter than two points or of no duration.
    """
    t = np.asarray(seconds, dtype=np.float64)
    c = np.asarray(clips, dtype=np.float64)
    if len(t) < 2 or t[-1] <= t[0]:
        return np.zeros(0), np.zeros(0)
    span = t[-1] - t[0]
    window = window_seconds or max(1.0, span / 60)
    edges = t[0] + np.arange(0.0, span, window)
    if span - (edges[-1] - t[0]) < 1e-9 * max(1.0, span):
        edges = edges[:-1]  # the last window would be empty
    edges = np.append(edges, t[-1])
    done = c[np.searchsorted(t, edges, side="right") - 1]
    return edges, np.diff(done) / np.diff(edges)


def float_values(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float64, nulls as NaN (no Python object per row)."""
    return np.asarray(pc.fill_null(column.cast(pa.float64()), float("nan")).to_numpy(), dtype=np.float64)


def category_values(column: pa.ChunkedArray) -> list[Any]:
    """Python values of a column for colouring or counting: a list column gives its first
    element (``top_labels`` -> the top label), nulls and empty lists give None."""
    values = column.to_pylist()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
        return [v[0] if v else None for v in values]
    return values


def top_categories(values: Sequence[Any], max_categories: int = MAX_CATEGORIES) -> list[tuple[str, int]]:
    """(label, count) by count (then label), the tail beyond ``max_categories - 1`` summed as
    'other'; None counts as '(none)'."""
    counts = Counter("(none)" if v is None else str(v) for v in values)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ranked) <= max_categories:
        return ranked
    head = ranked[: max_categories - 1]
    return head + [("other", sum(n for _, n in ranked[max_categories - 1:]))]


def failure_counts(errors: pa.Table) -> dict[str, dict[str, int]]:
    """{error_type: {stage: count}} of the errors table, error types by total count."""
    if errors.num_rows == 0:
        return {}
    out: dict[str, dict[str, int]] = {}
    for etype, stage in zip(errors.column("error_type").to_pylist(), errors.column("stage").to_pylist()):
        by_stage = out.setdefault(str(etype), {})
        by_stage[str(stage)] = by_stage.get(str(stage), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])))


# ------------------------------------------------------------------------------------------
# Figures (matplotlib Figure + Agg canvas: no pyplot state, no display)
# ------------------------------------------------------------------------------------------
def _figure(width_inches: float, height_inches: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_inches, height_inches), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
        ax.grid(axis="both", color="#e5e5e5", linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _marker_size(num_points: int) -> float:
    return 36.0 if num_points < 200 else 12.0 if num_points < 5000 else 3.0


def _histogram(ax, values: np.ndarray, title: str, xlabel: str, color: str = ACCENT) -> None:
    values = values[np.isfinite(values)]
    bins = min(40, max(5, len(np.histogram_bin_edges(values, bins="auto")) - 1)) if len(values) > 1 else 5
    ax.hist(values, bins=bins, color=color, edgecolor="white", linewidth=0.5)
    # Ticks as plain values: cosine similarities all near 1 would otherwise read as offsets
    # from a corner label ("1e-7+1").
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.yaxis.set_major_locator(_integer_ticks())
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("count", fontsize=8)


def _barh(ax, items: list[tuple[str, int]], title: str, color: str = ACCENT) -> None:
    labels = [_short(label, 28) for label, _ in items][::-1]
    counts = [n for _, n in items][::-1]
    bars = ax.barh(labels, counts, color=color, height=0.6)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.bar_label(bars, fontsize=7, padding=2)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", visible=False)


def figure_failures(counts: dict[str, dict[str, int]]) -> bytes:
    """Horizontal bars per error_type, stacked by stage."""
    fig, axes = _figure(7.0, 0.32 * len(counts) + 1.1)
    ax = axes[0, 0]
    types = list(counts)[::-1]
    left = np.zeros(len(types))
    stages = [s for s in schema.STAGES if any(s in c for c in counts.values())]
    stages += sorted({s for c in counts.values() for s in c} - set(stages))
    for stage in stages:
        widths = np.array([counts[t].get(stage, 0) for t in types], dtype=float)
        ax.barh(types, widths, left=left, height=0.6, label=stage, color=STAGE_COLORS.get(stage, MUTED))
        left += widths
    for y, total in enumerate(left):
        ax.text(total, y, f" {int(total)}", va="center", fontsize=8)
    ax.set_xlabel("inputs", fontsize=8)
    ax.set_title("failed inputs by error_type and stage", fontsize=10)
    ax.grid(axis="y", visible=False)
    ax.set_xlim(0, left.max() * 1.12)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.legend(title="stage", fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _png(fig)


def figure_history(runs: list[dict[str, Any]]) -> bytes:
    """Videos ok and failed per run (stacked bars), oldest first."""
    return _png(draw_history(runs))


def draw_history(runs: list[dict[str, Any]]):
    """`figure_history`'s matplotlib Figure."""
    fig, axes = _figure(6.4, 2.6)
    ax = axes[0, 0]
    x = np.arange(len(runs))
    ok = np.array([(r.get("counts") or {}).get("videos_ok", 0) for r in runs], dtype=float)
    failed = np.array([(r.get("counts") or {}).get("videos_failed", 0) for r in runs], dtype=float)
    ax.bar(x, ok, width=0.7, color=OK, label="videos ok")
    ax.bar(x, failed, width=0.7, bottom=ok, color=FAIL, label="videos failed")
    # Limits set, not autoscaled: a stacked bar of height 0 is a sticky edge at its bottom,
    # which kept the y axis from rising above the tallest run (its bar cut at the top), and a
    # lone run's bar spanned the whole width.
    ax.set_ylim(0, max(1.0, float((ok + failed).max(initial=0.0)) * 1.12))
    ax.set_xlim(-0.6, max(len(runs), 4) - 0.4)
    ax.yaxis.set_major_locator(_integer_ticks())
    step = max(1, len(runs) // 10)
    ax.set_xticks(x[::step], [str(r.get("committed_at", ""))[:10] for r in runs][::step], rotation=30, ha="right")
    ax.set_title("videos per run", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def figure_throughput(report: dict[str, Any]) -> bytes:
    """Each stage's capacity (clips/s) and, when recorded, clips/s over the run."""
    timeline = report.get("clips_timeline") or {}
    has_timeline = len(timeline.get("seconds") or []) >= 2
    fig, axes = _figure(10.0, 2.8, ncols=2 if has_timeline else 1)
    ax = axes[0, 0]
    names = ["decode", "embed"]
    # A stage with no measured busy time has infinite capacity in the report (JSON Infinity).
    capacity = [float(report.get(k) or 0.0) for k in ("decode_capacity_clips_per_second", "embed_capacity_clips_per_second")]
    capacity = [c if np.isfinite(c) else 0.0 for c in capacity]
    colors = [ACCENT if n != report.get("bottleneck") else FAIL for n in names]
    bars = ax.barh(names, capacity, color=colors)
    ax.bar_label(bars, labels=[f"{c:.1f}" for c in capacity], fontsize=8, padding=2)
    if report.get("end_to_end_clips_per_second"):
        ax.axvline(report["end_to_end_clips_per_second"], color=MUTED, linestyle="--", linewidth=1)
        ax.text(report["end_to_end_clips_per_second"], 1.45, " end to end", fontsize=7, color=MUTED)
    ax.set_xlabel("clips/s the stage could sustain (red: the bound)", fontsize=8)
    ax.set_title("stage capacity", fontsize=10)
    ax.grid(axis="y", visible=False)
    if has_timeline:
        ax = axes[0, 1]
        seconds, clips = timeline["seconds"], timeline["clips"]
        edges, rate = timeline_rates(seconds, clips)
        ax.stairs(rate, edges, color=ACCENT, linewidth=1.2, fill=True, alpha=0.35, label="clips/s")
        ax.set_xlabel("seconds since the pipeline started", fontsize=8)
        ax.set_ylabel("clips/s (finished videos)", fontsize=8)
        if report.get("first_clip_seconds") is not None:
            ax.axvline(report["first_clip_seconds"], color=MUTED, linestyle=":", linewidth=1)
        twin = ax.twinx()
        twin.step(seconds, clips, where="post", color=OK, linewidth=1, label="clips done")
        twin.set_ylabel("clips done", fontsize=8, color=OK)
        twin.tick_params(labelsize=8)
        twin.spines[["top"]].set_visible(False)
        ax.set_title("clips/s over the run (dotted: first clip)", fontsize=10)
    return _png(fig)


def figure_corpus(videos: pa.Table) -> bytes:
    """Histograms of duration, short side and fps; counts by codec."""
    fig, axes = _figure(10.0, 5.2, ncols=2, nrows=2)

    def column(name: str) -> np.ndarray:
        return float_values(videos.column(name)) if name in videos.column_names else np.array([], dtype=float)

    _histogram(axes[0, 0], column("duration_seconds"), "duration", "seconds")
    short_side = np.fmin(column("width"), column("height")) if "width" in videos.column_names else np.array([])
    _histogram(axes[0, 1], short_side, "resolution (short side, as in 720p)", "pixels")
    _histogram(axes[1, 0], column("fps"), "frame rate", "frames per second")
    codecs = top_categories(category_values(videos.column("codec"))) if "codec" in videos.column_names else []
    _barh(axes[1, 1], codecs, "videos by codec")
    return _png(fig)


def figure_embeddings(coords: np.ndarray | None, explained: np.ndarray | None, colors: list[Any] | None,
                      color_label: str | None, similarity: np.ndarray | None) -> bytes:
    """The PCA map (coloured by category or value) and the nearest-neighbour similarity histogram."""
    return _png(draw_embeddings(coords, explained, colors, color_label, similarity))


def draw_embeddings(coords: np.ndarray | None, explained: np.ndarray | None, colors: list[Any] | None,
                    color_label: str | None, similarity: np.ndarray | None):
    """`figure_embeddings`'s matplotlib Figure."""
    panels = [p for p in (coords is not None, similarity is not None) if p]
    fig, axes = _figure(10.0 if len(panels) == 2 else 6.0, 4.2, ncols=len(panels))
    col = 0
    if coords is not None:
        ax = axes[0, col]
        col += 1
        size = _marker_size(len(coords))
        if colors is None:
            ax.scatter(coords[:, 0], coords[:, 1], s=size, color=ACCENT, alpha=0.8, linewidths=0)
        elif _is_numeric(colors):
            vals = np.array([np.nan if v is None else v for v in colors], dtype=float)
            sc = ax.scatter(coords[:, 0], coords[:, 1], s=size, c=vals, cmap="viridis", alpha=0.85, linewidths=0)
            fig.colorbar(sc, ax=ax, label=color_label).ax.tick_params(labelsize=7)
        else:
            from matplotlib import colormaps

            cats = top_categories(colors)
            kept = {label for label, _ in cats}
            names = ["(none)" if v is None else str(v) for v in colors]
            names = [n if n in kept else "other" for n in names]
            cmap = colormaps["tab20" if len(cats) > 10 else "tab10"]
            for i, (label, count) in enumerate(cats):
                mask = np.array([n == label for n in names])
                ax.scatter(coords[mask, 0], coords[mask, 1], s=size, color=cmap(i % cmap.N), alpha=0.85, linewidths=0,
                           label=f"{_short(label, 24)} ({count})")
            ax.legend(title=_short(color_label or "", 24), fontsize=7, title_fontsize=8, frameon=False,
                      loc="center left", bbox_to_anchor=(1.0, 0.5))
        ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)", fontsize=8)
        ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)", fontsize=8)
        ax.set_title("video embeddings, PCA", fontsize=10)
    if similarity is not None:
        _histogram(axes[0, col], similarity.astype(float), "nearest-neighbour cosine similarity", "cosine similarity")
    return fig


def figure_distribution(panels: list[tuple[np.ndarray, str, str]]) -> bytes:
    """One histogram per (values, title, xlabel)."""
    fig, axes = _figure(5.0 * len(panels), 2.8, ncols=len(panels))
    for ax, (values, title, xlabel) in zip(axes.flat, panels):
        _histogram(ax, values, title, xlabel)
    return _png(fig)


def figure_labels(items: list[tuple[str, int]]) -> bytes:
    fig, axes = _figure(6.4, 0.3 * len(items) + 1.0)
    _barh(axes[0, 0], items, "videos by top label")
    return _png(fig)


# ------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------
def esc(value: Any) -> str:
    """HTML-escape any value for text or a quoted attribute (URIs and messages are user data)."""
    return html.escape("" if value is None else str(value), quote=True)


def _short(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_numeric(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present) \
        and len(set(present)) > MAX_CATEGORIES


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return esc(value)


def _img(png: bytes, alt: str, figure_id: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img id="fig-{esc(figure_id)}" alt="{esc(alt)}" src="data:image/png;base64,{data}"></figure>'


def _empty(section: str, text: str) -> str:
    return f'<p class="empty" data-empty="{esc(section)}">{esc(text)}</p>'


def _table(headers: list[str], rows: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}" data-section="{section_id}"><h2>{esc(title)}</h2>{body}</section>'


COUNT_LABELS = [
    ("inputs_listed", "inputs listed"), ("inputs_skipped", "already done (skipped)"),
    ("inputs_processed", "inputs processed"), ("videos_ok", "videos ok"), ("videos_failed", "videos failed"),
    ("clips", "clips"), ("no_longer_listed", "no longer listed"), ("backlog", "left for later (--limit)"),
]


def section_run(data: ReportData) -> str:
    m = data.manifest
    counts = m.get("counts") or {}
    backlog = counts.get("backlog") or 0
    if m.get("complete"):
        status = "complete"
    elif m.get("finished") and backlog:
        status = f"finished its share (--limit): {backlog:,} inputs that need work are left for a later run"
    else:
        status = "incomplete (a checkpoint of a run that did not finish)"
    cls = "ok" if m.get("complete") else "fail"
    tiles = "".join(
        f'<div class="tile"><div class="value" id="count-{key}" data-count="{key}">{_num(counts.get(key))}</div>'
        f'<div class="label">{esc(label)}</div></div>'
        for key, label in COUNT_LABELS
    )
    runs = [r for r in m.get("runs") or [] if isinstance(r, dict)]
    last = runs[-1] if runs else {}
    wall = last.get("wall_seconds")
    tiles += (f'<div class="tile"><div class="value" id="wall-seconds" data-wall-seconds="{esc(wall)}">'
              f'{_num(wall, 1)} s</div><div class="label">wall time</div></div>')
    model = m.get("model") or {}
    facts = [
        ("run", m.get("run_id")), ("committed at", m.get("committed_at")),
        ("model", f"{model.get('ref', '')} ({model.get('architecture', '?')}, "
                  f"D={model.get('embedding_dim', '?')}, labels {'on' if model.get('labels') else 'off'})"),
        ("settings fingerprint", m.get("settings_fingerprint")),
        ("committed rows", f"videos/ {data.videos.num_rows:,} · clips/ {data.clips_total:,} · "
                           f"errors/ {data.errors.num_rows:,}"),
    ]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    body = (f'<p class="status {cls}" id="run-status" data-complete="{str(bool(m.get("complete"))).lower()}">'
            f'Last run {esc(status)}.</p><div class="tiles">{tiles}</div><dl>{dl}</dl>')
    body += ('<p class="note">The tiles are the last run\'s counts from <code>_SUCCESS</code>; the tables hold '
             'every run\'s rows (counts of the committed files above).</p>')
    # History: newest first; every run's counts as _SUCCESS recorded them.
    shown = runs[-MAX_HISTORY_ROWS:][::-1]
    rows = []
    for r in shown:
        c = r.get("counts") or {}
        rows.append(
            f'<tr data-run-id="{esc(r.get("run_id"))}"><td><code>{esc(r.get("run_id"))}</code></td>'
            f'<td>{esc(r.get("committed_at"))}</td><td>{"yes" if r.get("complete") else "no"}</td>'
            + "".join(f'<td class="num">{_num(c.get(k))}</td>' for k, _ in COUNT_LABELS)
            + f'<td class="num">{_num(r.get("wall_seconds"), 1)}</td></tr>')
    if rows:
        body += "<h3>History of runs</h3>"
        if len(runs) > len(shown):
            body += f'<p class="note">The last {len(shown)} of {len(runs)} runs.</p>'
        body += _table(["run id", "committed at", "complete", "listed", "skipped", "processed", "ok", "failed",
                        "clips", "wall s"], rows, "history")
        if len(runs) >= 2:
            body += _img(figure_history(runs[-MAX_HISTORY_ROWS:]), "videos ok and failed per run", "history")
    return _section("run", "The run", body)


def section_failures(data: ReportData) -> str:
    errors = data.errors
    if errors.num_rows == 0:
        return _section("failures", "Failures", _empty("failures", "No failures: every input produced clips."))
    counts = failure_counts(errors)
    body = _img(figure_failures(counts), "failed inputs by error type and stage", "failures")
    uris, types = errors.column("uri").to_pylist(), errors.column("error_type").to_pylist()
    stages, messages = errors.column("stage").to_pylist(), errors.column("message").to_pylist()
    examples_of: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        found = examples_of.setdefault(str(t), [])
        if len(found) < EXAMPLES_PER_ERROR_TYPE:
            found.append(i)
    rows = []
    for etype, by_stage in counts.items():
        examples = examples_of.get(etype, [])
        items = "".join(
            f'<li><code class="uri">{esc(uris[i])}</code> <span class="stage">({esc(stages[i])})</span><br>'
            f'<span class="message">{esc(_short(messages[i] or "", MAX_MESSAGE_CHARS))}</span></li>'
            for i in examples)
        stage_text = ", ".join(f"{s}: {n}" for s, n in sorted(by_stage.items()))
        rows.append(f'<tr data-error-type="{esc(etype)}"><td><code>{esc(etype)}</code></td>'
                    f'<td class="num" data-error-count="{esc(etype)}">{sum(by_stage.values()):,}</td>'
                    f'<td>{esc(stage_text)}</td><td><ul class="examples">{items}</ul></td></tr>')
    body += _table(["error_type", "inputs", "by stage", f"examples (up to {EXAMPLES_PER_ERROR_TYPE})"], rows, "failures")
    return _section("failures", "Failures", body)


def section_throughput(data: ReportData) -> str:
    r = data.manifest.get("stage_report") or {}
    if not r.get("decode_capacity_clips_per_second"):
        return _section("throughput", "Throughput", _empty(
            "throughput", "No stage report: the last run embedded no clip (nothing new to process, or every "
            "input it processed failed), so there is no throughput to show."))
    bound = r.get("bottleneck")
    advice = "add decode CPUs (CPU workers)" if bound == "decode" else "add model actors/GPUs"
    rows = [
        ("decode", f"{_num(r.get('decode_clips_per_second_per_task'))} clips/s per task × {_num(r.get('decode_slots'))}",
         r.get("decode_capacity_clips_per_second")),
        ("embed", f"{_num(r.get('embed_clips_per_second_per_actor'))} clips/s per actor × {_num(r.get('embed_actors'))}",
         r.get("embed_capacity_clips_per_second")),
    ]
    trs = "".join(f'<tr data-stage="{name}" class="{"bound" if name == bound else ""}"><td>{name}</td><td>{how}</td>'
                  f'<td class="num" data-capacity="{name}">{_num(cap)}</td></tr>' for name, how, cap in rows)
    body = _table(["stage", "measured", "capacity (clips/s)"], [trs], "stages")
    facts = [
        ("bound by", f'<b id="bottleneck" data-bottleneck="{esc(bound)}">{esc(bound)}</b>'),
        ("end to end", f"{_num(r.get('end_to_end_clips_per_second'))} clips/s over "
                       f"{_num(r.get('pipeline_seconds'), 1)} s of pipeline"),
        ("time to first clip", f'<span id="first-clip-seconds">{_num(r.get("first_clip_seconds"), 1)}</span> s '
                               "(model actor start-up)"),
        ("after start-up", (f"{_num(r.get('after_startup_clips_per_second'))} clips/s "
                            f"({_num(r.get('after_startup_clips'))} clips decoded after the first)")
         if r.get("after_startup_clips_per_second") else "–"),
    ]
    if r.get("model_calls"):
        sizes = r.get("model_call_sizes") or {}
        size_text = ", ".join(f"{k} clips: {v}" for k, v in sorted(sizes.items(), key=lambda kv: -int(kv[0])))
        facts.append(("model calls", f"{_num(r['model_calls'])}, {r.get('clips', 0) / r['model_calls']:.1f} clips per "
                                     f"call (batch size {_num(r.get('batch_size'))}; calls by size: {esc(size_text)})"))
    facts.append(("CPU:GPU hint", f'one model actor keeps about <b id="cpu-gpu-hint">'
                                  f'{_num(r.get("decode_cpus_per_model_actor"), 1)}</b> decode CPUs busy; {advice} '
                                  "to speed up"))
    body += "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
    body += _img(figure_throughput(r), "stage capacity and clips per second over the run", "throughput")
    if len((r.get("clips_timeline") or {}).get("seconds") or []) < 2:
        body += _empty("timeline", "Clips/s over time: not recorded (this output was written by a vmae-ray "
                                   "that did not record a timeline).")
    return _section("throughput", "Throughput (last run)", body)


def section_corpus(data: ReportData) -> str:
    v = data.videos
    if v.num_rows == 0:
        return _section("corpus", "The corpus", _empty("corpus", "No committed video: nothing to describe."))
    facts = []
    if "duration_seconds" in v.column_names:
        total = pc.sum(v.column("duration_seconds")).as_py() or 0.0
        facts.append(("total duration", f"{total / 3600:,.2f} h ({total:,.0f} s)"))
    if "size_bytes" in v.column_names:
        total_bytes = pc.sum(v.column("size_bytes")).as_py() or 0
        facts.append(("total size", f"{total_bytes / 2**30:,.2f} GiB"))
    if "num_clips" in v.column_names:
        facts.append(("clips per video", f"{pc.mean(v.column('num_clips')).as_py() or 0:.2f} on average"))
    damaged = ""
    if "damaged" in v.column_names:  # damaged files embedded from what decodes (decoding.DamageLog)
        count = sum(1 for d in v.column("damaged").to_pylist() if d)
        damaged = (f' <b data-damaged-count="{count}">{count:,}</b> of them damaged (embedded from what decodes; '
                   "the <code>damage</code> column of videos/ says what was wrong).")
    body = f'<p>{v.num_rows:,} videos.{damaged}</p><dl>' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(val)}</dd>"
                                                                    for k, val in facts)
    body += "</dl>" + _img(figure_corpus(v), "duration, resolution, frame rate and codec of the videos", "corpus")
    body += '<div class="cols">'
    if "codec" in v.column_names:
        rows = [f'<tr data-codec="{esc(c)}"><td><code>{esc(c)}</code></td><td class="num" data-codec-count="{esc(c)}">'
                f"{n:,}</td></tr>" for c, n in top_categories(category_values(v.column("codec")), 10**9)]
        body += _table(["codec", "videos"], rows, "codecs")
    if "width" in v.column_names and "height" in v.column_names:
        sizes = top_categories([f"{w}×{h}" for w, h in zip(v.column("width").to_pylist(), v.column("height").to_pylist())])
        body += _table(["width × height", "videos"], [f"<tr><td>{esc(s)}</td><td class='num'>{n:,}</td></tr>"
                                                        for s, n in sizes], "sizes")
    return _section("corpus", "The corpus", body + "</div>")


def default_color_by(videos: pa.Table) -> str | None:
    """top_labels (its first label) when the videos have labels, else no colouring."""
    if "top_labels" in videos.column_names and videos.column("top_labels").null_count < videos.num_rows:
        return "top_labels"
    return None


def section_embeddings(data: ReportData, color_by: str | None) -> str:
    if data.embeddings is None or len(data.embeddings) < 2:
        return _section("embeddings", "The embeddings", _empty(
            "embeddings", "Fewer than 2 committed video embeddings: no map and no neighbours to show."))
    n = len(data.embeddings)
    idx = sample_indices(n)
    x = data.embeddings[idx]
    notes = []
    if len(idx) < n:
        notes.append(f'<p class="note" id="embedding-sample" data-sample="{len(idx)}" data-total="{n}">A random sample '
                     f"of {len(idx):,} of {n:,} videos (seed {SAMPLE_SEED}); more than {MAX_EMBEDDING_POINTS:,} are "
                     "sampled to keep the exact neighbour search and the map fast.</p>")
    color_by = color_by or default_color_by(data.videos)
    colors = category_values(data.videos.column(color_by).take(pa.array(idx))) if color_by else None
    coords = explained = None
    if len(idx) >= 3 and x.shape[1] >= 2:
        coords, explained = pca_2d(x)
    else:
        notes.append(_empty("pca", "Fewer than 3 videos: no PCA map."))
    similarity, _ = nearest_neighbour_cosine(x)
    label = f"{color_by}[0]" if color_by == "top_labels" else color_by
    caption = (f"Each dot is a video (the mean of its clip embeddings) on the first two principal components, "
               f"coloured by <code id='color-by' data-color-by='{esc(color_by or '')}'>{esc(label or 'nothing')}</code>. "
               "Right: for each video, the cosine similarity to its nearest other video (exact search); a mass "
               "near 1 means near-duplicates, or a model that does not tell these videos apart.")
    q = np.quantile(similarity, [0.0, 0.5, 1.0])
    dupes = int((similarity >= 0.99).sum())
    stats = (f'<dl><dt>nearest-neighbour cosine</dt><dd>min {q[0]:.4f} · median <span id="nn-median">{q[1]:.4f}'
             f"</span> · max {q[2]:.4f}</dd><dt>videos with a neighbour at ≥ 0.99</dt><dd>{dupes:,} of {len(idx):,}</dd>"
             "</dl>")
    body = "".join(notes) + _img(figure_embeddings(coords, explained, colors, label, similarity),
                                 "PCA map of the video embeddings and nearest-neighbour similarities", "embeddings")
    return _section("embeddings", "The embeddings", body + f'<p class="note">{caption}</p>' + stats)


def section_reconstruction(data: ReportData) -> str:
    panels, body = [], ""
    clips = data.clips
    has_clips = "reconstruction_loss" in clips.column_names and clips.column("reconstruction_loss").null_count < clips.num_rows
    has_videos = ("reconstruction_loss" in data.videos.column_names
                  and data.videos.column("reconstruction_loss").null_count < data.videos.num_rows)
    if not has_clips and not has_videos:
        return _section("reconstruction", "Reconstruction loss", _empty(
            "reconstruction", "No reconstruction_loss column in clips/ or videos/: the job writes it when run with "
                              "--reconstruction, which needs a pretraining checkpoint with its decoder."))
    if has_clips:
        loss = float_values(clips.column("reconstruction_loss"))
        panels.append((loss, "clips", "reconstruction loss"))
        valid = np.flatnonzero(np.isfinite(loss))
        order = valid[np.argsort(loss[valid], kind="stable")]
        rows_of = clips.select([c for c in ("uri", "clip_index", "start_seconds", "end_seconds") if c in clips.column_names])
        extremes = np.unique(np.concatenate([order[:EXTREME_CLIPS], order[::-1][:EXTREME_CLIPS]]))
        records = dict(zip(extremes.tolist(), rows_of.take(pa.array(extremes, pa.int64())).to_pylist()))

        def listing(indices, which: str) -> str:
            rows = [f'<tr data-{which}-clip="{rank}" data-loss="{loss[i]:.6g}">'
                    f'<td><code class="uri">{esc(records[i].get("uri"))}</code></td>'
                    f'<td class="num">{esc(records[i].get("clip_index"))}</td>'
                    f'<td class="num">{_num(records[i].get("start_seconds"))}–{_num(records[i].get("end_seconds"))}</td>'
                    f'<td class="num">{loss[i]:.4f}</td></tr>' for rank, i in enumerate(indices)]
            return _table(["uri", "clip", "seconds", "loss"], rows, "extremes")

        body += (f"<h3>Most predictable clips (lowest loss)</h3>{listing(order[:EXTREME_CLIPS], 'most')}"
                 f"<h3>Least predictable clips (highest loss)</h3>{listing(order[::-1][:EXTREME_CLIPS], 'least')}")
    if has_videos:
        panels.append((float_values(data.videos.column("reconstruction_loss")), "videos", "reconstruction loss"))
    intro = ('<p class="note">Masked-patch reconstruction loss of the checkpoint\'s decoder: low means the clip is '
             "predictable from a few visible patches (static, repetitive), high means it is not.</p>")
    return _section("reconstruction", "Reconstruction loss",
                    intro + _img(figure_distribution(panels), "reconstruction loss distribution", "reconstruction") + body)


def section_labels(data: ReportData) -> str:
    v = data.videos
    if "top_labels" not in v.column_names or v.column("top_labels").null_count == v.num_rows or v.num_rows == 0:
        return _section("labels", "Labels", _empty(
            "labels", "No labels: the checkpoint has no trained classifier (or labels were off)."))
    items = top_categories(category_values(v.column("top_labels")), 20)
    rows = [f'<tr data-label="{esc(label)}"><td>{esc(label)}</td><td class="num" data-label-count="{esc(label)}">'
            f"{n:,}</td></tr>" for label, n in items]
    return _section("labels", "Labels", '<p class="note">Each video\'s top label (from the mean of its clips\' '
                    "logits).</p>" + _img(figure_labels(items), "videos by top label", "labels")
                    + _table(["top label", "videos"], rows, "labels"))


CSS = f"""
body {{ font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; margin: 0; color: #222; background: #f4f5f7;
        font-size: 14px; }}
header {{ background: #1f2d3d; color: white; padding: 16px 28px; }}
header h1 {{ margin: 0 0 4px 0; font-size: 22px; }}
header .sub {{ color: #c8d0da; font-size: 13px; word-break: break-all; }}
nav {{ padding: 8px 28px; background: #e8ebef; font-size: 13px; }}
nav a {{ margin-right: 14px; color: {ACCENT}; text-decoration: none; }}
main {{ padding: 12px 28px 40px 28px; max-width: 1150px; }}
section {{ background: white; border-radius: 6px; padding: 12px 20px 16px 20px; margin: 14px 0;
           box-shadow: 0 1px 2px rgba(0,0,0,0.08); }}
h2 {{ margin: 4px 0 10px 0; font-size: 18px; color: #1f2d3d; }}
h3 {{ font-size: 14px; margin: 14px 0 6px 0; }}
.tiles {{ display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0 12px 0; }}
.tile {{ background: #f0f3f7; border-radius: 6px; padding: 8px 14px; min-width: 110px; }}
.tile .value {{ font-size: 22px; font-weight: bold; color: #1f2d3d; }}
.tile .label {{ font-size: 12px; color: #555; }}
.status {{ font-weight: bold; }}
.status.ok {{ color: {OK}; }} .status.fail {{ color: {FAIL}; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 3px 14px; margin: 8px 0; }}
dt {{ color: #555; }} dd {{ margin: 0; word-break: break-all; }}
table {{ border-collapse: collapse; margin: 8px 0; font-size: 13px; }}
th, td {{ border-bottom: 1px solid #e3e3e3; padding: 4px 10px 4px 0; text-align: left; vertical-align: top; }}
th {{ color: #555; font-weight: normal; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.bound td {{ color: {FAIL}; font-weight: bold; }}
code {{ font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }}
code.uri {{ word-break: break-all; }}
ul.examples {{ margin: 0; padding-left: 16px; }}
.message {{ color: #666; font-size: 12px; }}
.note {{ color: #555; font-size: 12px; }}
.empty {{ color: #777; font-style: italic; background: #fafafa; padding: 10px; border-radius: 4px; }}
.cols {{ display: flex; flex-wrap: wrap; gap: 0 40px; align-items: flex-start; }}
figure {{ margin: 8px 0; }}
figure img {{ max-width: 100%; height: auto; }}
footer {{ color: #777; font-size: 12px; padding: 0 28px 20px 28px; }}
"""

NAV = [("run", "run"), ("failures", "failures"), ("throughput", "throughput"), ("corpus", "corpus"),
       ("embeddings", "embeddings"), ("reconstruction", "reconstruction"), ("labels", "labels")]


def render_html(data: ReportData, *, color_by: str | None = None) -> str:
    """The whole page for ``data`` as one HTML string (self-contained; see the module doc)."""
    from vmae_ray import __version__

    m = data.manifest
    sections = [section_run(data), section_failures(data), section_throughput(data), section_corpus(data),
                section_embeddings(data, color_by), section_reconstruction(data), section_labels(data)]
    script_hash = base64.b64encode(hashlib.sha256(IMAGE_CHECK_SCRIPT.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'; "
           "base-uri 'none'; form-action 'none'")
    nav = "".join(f'<a href="#{sid}">{esc(label)}</a>' for sid, label in NAV)
    generated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>vmae-ray report: {esc(m.get('run_id'))}</title><style>{CSS}</style></head>\n"
        f'<body data-run-id="{esc(m.get("run_id"))}"><header><h1>vmae-ray run report</h1>'
        f'<div class="sub" id="tables-uri">{esc(data.uri)}</div></header><nav>{nav}</nav><main>\n'
        + "\n".join(sections)
        + f"\n</main><footer>Generated {generated} by vmae-ray {esc(__version__)} from the committed state "
        "(<code>_SUCCESS</code> and the files it lists).</footer>"
        f"<script>{IMAGE_CHECK_SCRIPT}</script></body></html>\n"
    )


def write_report(tables: str, output: str, storage=None, *, color_by: str | None = None) -> str:
    """Read the committed output ``tables``, render the page and write it to ``output`` (a local
    path, written atomically, or any fsspec URI). Returns ``output``. Errors as
    `load_report_data`."""
    from vmae_ray.storage import StorageOptions

    storage = storage if isinstance(storage, StorageOptions) else StorageOptions(storage)
    data = load_report_data(tables, storage, color_by=color_by)
    write_html(render_html(data, color_by=color_by), output, storage)
    return output


def check_html_output(output: str, storage) -> None:
    """Before any work: ``output`` must name a file, not a folder, that does not exist or is an
    HTML page (a report being replaced), and (locally) its folder must be one we can create or
    write in. Raises ValueError or OSError."""
    from vmae_ray.storage import is_local_fs, url_to_fs

    fs, path = url_to_fs(output, storage)
    if output.endswith("/") or fs.isdir(path):
        raise ValueError(f"{output} is a folder; give the path of the HTML file to write")
    if fs.isfile(path):  # replace a page, never anything else (another output's _SUCCESS, say)
        with fs.open(path, "rb") as f:
            head = f.read(64).lstrip().lower()
        if not head.startswith((b"<!doctype html", b"<html")):
            raise ValueError(f"{output} exists and is not an HTML page; remove it or choose another path")
    if is_local_fs(fs):  # nothing is created yet: the folder is made when the page is written
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise PermissionError(f"cannot write in {folder}")


def write_html(page_text: str, output: str, storage) -> None:
    """Write the page to ``output`` (local path or fsspec URI) so that a browser never opens half
    a page (`writing.write_bytes_atomic`: write then rename locally, one PUT on object stores)."""
    from vmae_ray.storage import url_to_fs
    from vmae_ray.writing import write_bytes_atomic

    fs, path = url_to_fs(output, storage)
    write_bytes_atomic(fs, path, page_text.encode("utf-8"))


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def build_parser(prog: str = "vmae-ray report") -> argparse.ArgumentParser:
    p = CommandParser(prog=prog, description="Write one self-contained HTML page about a committed "
                                "output: the run, failures, throughput, the corpus, the embeddings.")
    from vmae_ray.reading import add_tables_arguments

    add_tables_arguments(p)
    p.add_argument("--output", required=True, help="the HTML file to write (local path or fsspec URI)")
    p.add_argument("--color-by", help="videos/ column that colours the PCA map (e.g. a manifest's passthrough "
                   "column; list columns by their first element); default top_labels when labels exist")
    return p


def run_report(argv: Sequence[str], prog: str = "vmae-ray report") -> int:
    """The report command: exit status 0, or 2 for a bad argument (named) before anything is written."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))
    try:
        storage = storage_for(args.storage_options, [args.tables, args.output])
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        with storage_errors_of("--output", args.output, storage):  # credentials, endpoint
            try:
                check_html_output(args.output, storage)
            except (ValueError, OSError) as exc:
                raise ConfigError("--output", str(exc)) from exc
    except ConfigError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    try:
        with storage_errors_of("--tables", args.tables, storage):  # credentials, endpoint (reading the tables' files)
            data = load_report_data(args.tables, storage, color_by=args.color_by)
    except ConfigError as exc:
        parser.error(str(exc))
    write_html(render_html(data, color_by=args.color_by), args.output, storage)
    print(f"report: {args.output} ({time.perf_counter() - started:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_report(sys.argv[1:]))
