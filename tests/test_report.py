"""`vmae-ray report`: the page's numbers against _SUCCESS and the Parquet files read with plain
pyarrow, its pictures decoded by Pillow and by a real browser (headless Chromium), no network.

One module-scoped job run (local Ray, the tiny classifier) over good synthetic videos, broken
ones (synthetic.make_hostile_corpus) and a missing input whose name is HTML, gives failures of
several types and stages, labels and a passthrough column at once. Outputs the job cannot make
yet (reconstruction losses) or makes no more (no clips/s timeline) are derived from it with
writing.write_committed, without Ray.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.browser import DomReader, render_page
from vmae_ray import report, schema
from vmae_ray.cli import config_from_args
from vmae_ray.cli import main as cli_main
from vmae_ray.pipeline import run
from vmae_ray.progress import ClipTimeline
from vmae_ray.storage import StorageOptions
from vmae_ray.synthetic import make_hostile_corpus
from vmae_ray.writing import write_committed

# Broken inputs whose outcome is certain (make_hostile_corpus documents each).
HOSTILE = {"zero_bytes.mp4": "corrupt", "random_bytes.mp4": "corrupt", "audio_only.mp3": "no_video_stream",
           "huge_dims.mkv": "too_large"}
# A missing input whose name is markup: it must show on the page as text, never as an element.
EVIL_NAME = 'missing_<img src=x onerror="alert(1)">&amp;.mp4'


# ------------------------------------------------------------------------------------------
# Pure computations against brute-force references
# ------------------------------------------------------------------------------------------
def test_nearest_neighbour_cosine_is_exact():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 12)).astype(np.float32)
    x[7] = x[3] * 2.5  # same direction as row 3: cosine 1 both ways
    x[10] = 0.0  # a zero row: similarity 0 to everything
    sim, nn = report.nearest_neighbour_cosine(x)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    full = (x @ x.T) / np.outer(safe, safe)
    np.fill_diagonal(full, -np.inf)
    np.testing.assert_allclose(sim, full.max(axis=1), atol=1e-5)
    assert nn[3] == 7 and nn[7] == 3 and sim[3] == pytest.approx(1.0, abs=1e-5)
    assert sim[10] == pytest.approx(0.0, abs=1e-6)
    unique = [i for i in range(len(x)) if i != 10 and np.sum(full[i] >= full[i].max() - 1e-6) == 1]
    assert (nn[unique] == full.argmax(axis=1)[unique]).all()
    assert (nn != np.arange(len(x))).all()


def test_pca_matches_covariance_eigenvectors():
    rng = np.random.default_rng(5)
    # Known anisotropy: variances 25, 4, then small, in a random rotation.
    basis, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    latent = rng.standard_normal((300, 8)) * np.array([5.0, 2.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1])
    x = latent @ basis.T + 3.0
    coords, ratio = report.pca_2d(x)
    centred = x - x.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    reference = centred @ eigenvectors[:, order[:2]]
    for k in range(2):  # a principal axis has no sign of its own
        sign = np.sign(reference[:, k] @ coords[:, k])
        np.testing.assert_allclose(coords[:, k], sign * reference[:, k], atol=1e-8)
    np.testing.assert_allclose(ratio, eigenvalues[order[:2]] / eigenvalues.sum(), rtol=1e-8)


def test_timeline_rates_and_the_recorded_series():
    # The count changes only at recorded points: a burst at 20 s after silence stays a burst.
    edges, rates = report.timeline_rates([0, 10, 20], [0, 0, 100], window_seconds=5)
    np.testing.assert_allclose(edges, [0, 5, 10, 15, 20])
    np.testing.assert_allclose(rates, [0, 0, 0, 20])
    edges, rates = report.timeline_rates(np.arange(0, 31.0), np.arange(0, 31) * 7, window_seconds=4)
    np.testing.assert_allclose(edges, [0, 4, 8, 12, 16, 20, 24, 28, 30])
    np.testing.assert_allclose(rates, [7] * 8)
    # The job's recorder: bounded however long the run, starts at (0, 0), ends at the run's end.
    timeline = ClipTimeline(interval_seconds=1.0, max_points=64)
    for step in range(20_000):
        timeline.saw(step * 0.5, step * 3)
    series = timeline.report(10_000.2, 60_001)["clips_timeline"]
    assert len(series["seconds"]) <= 65
    assert series["seconds"][0] == 0 and series["clips"][0] == 0
    assert series["seconds"][-1] == 10_000.2 and series["clips"][-1] == 60_001
    assert np.all(np.diff(series["seconds"]) > 0) and np.all(np.diff(series["clips"]) >= 0)
    # Every kept point is one the recorder saw (3 clips per half second): none is made up.
    assert all(c == int(round(s * 6)) for s, c in zip(series["seconds"][1:-1], series["clips"][1:-1]))


def test_sample_indices_and_categories():
    assert report.sample_indices(5, max_rows=10).tolist() == [0, 1, 2, 3, 4]
    idx = report.sample_indices(1000, max_rows=100)
    assert len(set(idx.tolist())) == 100 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, report.sample_indices(1000, max_rows=100))  # seeded
    values = ["a"] * 5 + ["b"] * 3 + ["c", "d", None]
    assert report.top_categories(values, max_categories=3) == [("a", 5), ("b", 3), ("other", 3)]
    col = pa.chunked_array([pa.array([["x", "y"], [], None], pa.list_(pa.string()))])
    assert report.category_values(col) == ["x", None, None]


# ------------------------------------------------------------------------------------------
# One job run: failures of several kinds, labels, a passthrough column
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_run(ray_session, tiny_classifier, synthetic_corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    broken = dict((os.path.basename(p), p) for p, _ in
                  make_hostile_corpus(work / "hostile", source_video=synthetic_corpus["a_h264.mp4"]))
    uris = list(synthetic_corpus.values()) + [broken[name] for name in HOSTILE] + [str(work / EVIL_NAME)]
    manifest = work / "manifest.csv"
    pacsv.write_csv(pa.table({"uri": uris, "split": ["train" if i % 2 else "val" for i in range(len(uris))]}), manifest)
    out = str(work / "out")
    run(config_from_args(["--input", str(manifest), "--output", out, "--model", tiny_classifier, "--top-k", "2"]))
    with open(os.path.join(out, "_SUCCESS")) as f:
        success = json.load(f)
    return {"out": out, "work": work, "success": success}


def committed_table(out: str, success: dict, table: str) -> pa.Table | None:
    """A table read with plain pyarrow from the files _SUCCESS lists (the reference reader)."""
    files = success["files"].get(table) or []
    return pa.concat_tables([pq.read_table(os.path.join(out, rel)) for rel in files]) if files else None


def images_of(html_text: str) -> list[dict[str, str]]:
    return [a for tag, a in DomReader(html_text).elements if tag == "img"]


def assert_self_contained(html_text: str) -> None:
    """No reference that would make a browser fetch: every src/href is a data: URI or a fragment,
    no <link>/<base>/<iframe>/<object>, no url(...) or @import in styles."""
    dom = DomReader(html_text)
    for tag, attrs in dom.elements:
        assert tag not in ("link", "base", "iframe", "object", "embed", "frame"), tag
        for name in ("src", "href", "srcset", "poster", "data", "action", "background"):
            if name in attrs:
                value = attrs[name].strip().lower()
                assert value.startswith("data:") or value.startswith("#"), (tag, name, attrs[name][:80])
                assert "http://" not in value and "https://" not in value
    for style in re.findall(r"<style[^>]*>(.*?)</style>", html_text, flags=re.S | re.I):
        lowered = style.lower()
        assert "url(" not in lowered and "@import" not in lowered and "@font-face" not in lowered


def test_report_in_a_browser_matches_success(hostile_run, tmp_path, capsys):
    out, success = hostile_run["out"], hostile_run["success"]
    page = tmp_path / "report.html"
    # Through the installed command's dispatcher, as a user runs it.
    assert cli_main(["report", "--tables", out, "--output", str(page), "--color-by", "split"]) == 0
    assert str(page) in capsys.readouterr().out
    html_text = page.read_text(encoding="utf-8")
    assert_self_contained(html_text)

    shown = render_page(str(page), str(tmp_path / "chromium"))
    dom = DomReader(shown.dom)
    assert shown.page_requests == [], shown.page_requests

    # The counts on the page are _SUCCESS's, and the failures are the errors/ files' rows.
    counts = success["counts"]
    on_page = {a["data-count"]: int(dom.text(i).replace(",", "")) for i, _, a in dom.find(data_count=None)}
    assert on_page == {k: counts[k] for k in on_page} and set(on_page) >= {"videos_ok", "videos_failed", "clips"}
    errors = committed_table(out, success, "errors")
    expected_failures = dict(Counter(errors.column("error_type").to_pylist()))
    failures = {a["data-error-count"]: int(dom.text(i).replace(",", "")) for i, _, a in dom.find(data_error_count=None)}
    assert failures == expected_failures == counts["errors_by_type"]
    assert {"corrupt", "no_video_stream", "too_large", "not_found"} <= set(failures)
    assert counts["videos_failed"] == len(HOSTILE) + 1 and counts["videos_ok"] == 4

    # The markup in a URI is text on the page: no element came from it.
    assert EVIL_NAME in dom.all_text
    assert all(a["src"].startswith("data:image/png;base64,") for a in images_of(shown.dom))

    # Every picture decodes: in Chromium (naturalWidth, recorded on the page at load) and in Pillow.
    source_images = images_of(html_text)
    assert len(source_images) >= 5
    assert dom.find(data_images_decoded=f"{len(source_images)}/{len(source_images)}")
    for browser_img, file_img in zip(images_of(shown.dom), source_images):
        picture = Image.open(io.BytesIO(base64.b64decode(file_img["src"].split(",", 1)[1])))
        picture.load()
        assert int(browser_img["data-natural-width"]) == picture.width > 0

    # The screenshot is a rendered page, not a blank one.
    shot = np.asarray(Image.open(io.BytesIO(shown.screenshot)).convert("RGB"))
    assert shot.shape[0] > 1000 and shot.std() > 20
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 50

    # Labels: each video's top label counted from videos/ read with pyarrow; the map's colouring.
    videos = committed_table(out, success, "videos")
    top = Counter(labels[0] for labels in videos.column("top_labels").to_pylist())
    labels = {a["data-label-count"]: int(dom.text(i)) for i, _, a in dom.find(data_label_count=None)}
    assert labels == dict(top)
    assert dom.find(data_color_by="split")
    # What this output has no data for says so.
    assert dom.find(data_empty="reconstruction")
    assert not dom.find(data_empty="timeline")
    timeline = success["stage_report"]["clips_timeline"]
    assert timeline["clips"][-1] == counts["clips"] and timeline["seconds"][-1] == success["stage_report"]["pipeline_seconds"]


def test_network_check_sees_a_page_that_fetches(tmp_path):
    """The browser check can fail: a page with a remote picture is caught by both checks."""
    page = tmp_path / "fetches.html"
    page.write_text('<html><body><p>x</p><img src="https://example.invalid/a.png"></body></html>')
    with pytest.raises(AssertionError):
        assert_self_contained(page.read_text())
    shown = render_page(str(page), str(tmp_path / "chromium"), width=400, height=300)
    assert shown.page_requests == ["https://example.invalid/a.png"]


def derived_output(hostile_run, uri: str, storage: StorageOptions | None = None, *,
                   reconstruction: bool = False) -> pa.Table:
    """Commit at ``uri`` (write_committed) an output made from the run's tables: no errors, no
    labels, no clips/s timeline (as written before it was recorded) and, with ``reconstruction``,
    reconstruction_loss columns of known values. Returns its clips table."""
    out, success = hostile_run["out"], hostile_run["success"]
    videos = committed_table(out, success, "videos").drop_columns(["top_labels", "top_scores"])
    clips = committed_table(out, success, "clips").drop_columns(["top_labels", "top_scores"])
    if reconstruction:
        # A permutation of known values, so the most and least predictable clips are known.
        loss = np.random.default_rng(0).permutation(np.linspace(0.1, 0.9, clips.num_rows)).astype(np.float32)
        clips = clips.append_column("reconstruction_loss", pa.array(loss, pa.float32()))
        videos = videos.append_column("reconstruction_loss", pa.array(np.full(videos.num_rows, 0.5, np.float32)))
    manifest = {k: v for k, v in success.items() if k not in ("files", "format", "run_id")}
    manifest["stage_report"] = {k: v for k, v in success["stage_report"].items() if k != "clips_timeline"}
    manifest["counts"] = {**success["counts"], "videos_failed": 0, "errors_by_type": {}}
    write_committed(uri, storage or StorageOptions(), {"clips": clips, "videos": videos,
                                                       "errors": schema.errors_schema().empty_table()}, manifest)
    return clips


def test_sections_without_data_say_so_and_reconstruction_extremes(hostile_run, tmp_path):
    uri = str(tmp_path / "with_loss")
    clips = derived_output(hostile_run, uri, reconstruction=True)
    page = tmp_path / "r.html"
    report.write_report(uri, str(page))
    html_text = page.read_text(encoding="utf-8")
    assert_self_contained(html_text)
    dom = DomReader(html_text)
    for section in ("failures", "labels", "timeline"):
        assert dom.find(data_empty=section), section
    assert not dom.find(data_empty="reconstruction")
    loss = np.asarray(clips.column("reconstruction_loss"))
    uris = clips.column("uri").to_pylist()
    order = np.argsort(loss)
    for which, expected in (("most", order[:report.EXTREME_CLIPS]), ("least", order[::-1][:report.EXTREME_CLIPS])):
        rows = sorted(dom.find(**{f"data_{which}_clip": None}), key=lambda r: int(r[2][f"data-{which}-clip"]))
        np.testing.assert_allclose([float(a["data-loss"]) for _, _, a in rows], loss[expected], rtol=1e-5)
        assert [uris[k] in dom.text(i) for k, (i, _, _) in zip(expected, rows)] == [True] * len(rows)
    # No labels and no --color-by: the map is one colour.
    assert dom.find(data_color_by="")


def test_old_output_without_timeline_on_s3(hostile_run, s3_server, s3_bucket, tmp_path):
    """An output written before the timeline existed, committed to and read from s3://."""
    uri, storage = f"s3://{s3_bucket}/old", StorageOptions(s3_server.storage_options)
    derived_output(hostile_run, uri, storage)
    page = tmp_path / "old.html"
    assert report.run_report(["--tables", uri, "--output", str(page),
                              "--storage-options", json.dumps(s3_server.storage_options)]) == 0
    dom = DomReader(page.read_text(encoding="utf-8"))
    assert dom.find(data_empty="timeline") and dom.find(data_empty="failures")
    counts = {a["data-count"]: int(dom.text(i).replace(",", "")) for i, _, a in dom.find(data_count=None)}
    assert counts["videos_ok"] == hostile_run["success"]["counts"]["videos_ok"]


@pytest.mark.parametrize("args, flag", [(["--color-by", "nope"], "--color-by"), ([], "--tables")])
def test_bad_arguments_exit_2_naming_the_flag(hostile_run, tmp_path, capsys, args, flag):
    tables = hostile_run["out"] if flag == "--color-by" else str(tmp_path / "nothing-here")
    page = tmp_path / "r.html"
    with pytest.raises(SystemExit) as info:
        report.run_report(["--tables", tables, "--output", str(page), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and not page.exists()
    if flag == "--color-by":
        assert "split" in err and "codec" in err  # the columns one may choose


def test_an_output_folder_is_refused_before_any_work(hostile_run, tmp_path, capsys):
    """--output naming a folder: exit 2 naming --output, and nothing written or left behind."""
    folder = tmp_path / "a folder"
    folder.mkdir()
    with pytest.raises(SystemExit) as info:
        report.run_report(["--tables", hostile_run["out"], "--output", str(folder)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --output:" in err and "is a folder" in err and "Traceback" not in err
    assert os.listdir(folder) == [] and sorted(os.listdir(tmp_path)) == ["a folder"]
    # A path with a trailing slash, and an existing file that is not a page (another output's
    # _SUCCESS, say): refused, the file untouched.
    other = tmp_path / "_SUCCESS"
    other.write_text('{"format": "vmae-ray/1"}')
    for output, needle in ((str(tmp_path / "new") + "/", "is a folder"), (str(other), "is not an HTML page")):
        with pytest.raises(SystemExit) as info:
            report.run_report(["--tables", hostile_run["out"], "--output", output])
        assert info.value.code == 2 and needle in capsys.readouterr().err
    assert other.read_text() == '{"format": "vmae-ray/1"}'
    other.unlink()
    # A --tables typo with the page in a folder that does not exist yet: that folder is not made.
    with pytest.raises(SystemExit) as info:
        report.run_report(["--tables", str(tmp_path / "typo"), "--output", str(tmp_path / "new" / "r.html")])
    assert info.value.code == 2 and sorted(os.listdir(tmp_path)) == ["a folder"]


def test_counts_tiles_follow_success_not_a_constant(hostile_run, tmp_path):
    """The tiles come from _SUCCESS: edit its counts and the page changes with them."""
    uri = str(tmp_path / "edited")
    derived_output(hostile_run, uri)
    path = os.path.join(uri, "_SUCCESS")
    with open(path) as f:
        manifest = json.load(f)
    manifest["counts"]["clips"] = 123_456
    # A second, later run in the history (a nightly run that found 2 new videos, 1 broken).
    later = {"run_id": "20991231T000000Z-later", "complete": True, "committed_at": "2099-12-31T00:00:00Z",
             "counts": {"inputs_listed": 11, "inputs_skipped": 9, "inputs_processed": 2, "videos_ok": 1,
                        "videos_failed": 1, "clips": 1}, "wall_seconds": 5.0}
    manifest["runs"] = manifest["runs"] + [later]
    with open(path, "w") as f:
        json.dump(manifest, f)
    data = report.load_report_data(uri)
    dom = DomReader(report.render_html(data))
    (index, _, _), = dom.find(data_count="clips")
    assert dom.text(index) == "123,456"
    history = [a["data-run-id"] for _, tag, a in dom.find(data_run_id=None) if tag == "tr"]
    assert history == [later["run_id"], hostile_run["success"]["run_id"]]  # newest first
    assert dom.find(id="fig-history")
    assert pc.sum(data.videos.column("num_clips")).as_py() == data.clips_total


# ------------------------------------------------------------------------------------------
# Figures read back through matplotlib's own renderer (what the PNG shows)
# ------------------------------------------------------------------------------------------
def _rendered(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_nearest_neighbour_axis_reads_plain_values():
    """Similarities all within 3e-7 of 1 (near-duplicate corpora): no offset text ("1e-7+1")
    beside the axis; each tick label is its value written out, and the labels do not overlap."""
    similarity = (1 - np.random.default_rng(0).uniform(0, 3e-7, 40)).astype(np.float32)
    fig = report.draw_embeddings(None, None, None, None, similarity)
    renderer = _rendered(fig)
    (ax,) = fig.axes
    assert ax.get_title() == "nearest-neighbour cosine similarity"
    assert ax.xaxis.get_offset_text().get_text() == ""
    low, high = ax.get_xlim()
    ticks = [(t.get_loc(), t.label1.get_text()) for t in ax.xaxis.get_major_ticks() if low <= t.get_loc() <= high]
    assert len(ticks) >= 3
    for value, label in ticks:
        assert float(label) == pytest.approx(value, abs=1e-9), (value, label)
    boxes = sorted((t.label1.get_window_extent(renderer) for t in ax.xaxis.get_major_ticks()
                    if low <= t.get_loc() <= high), key=lambda b: b.x0)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), "tick labels overlap"
    assert boxes[0].x0 >= 0 and boxes[-1].x1 <= fig.bbox.width


@pytest.mark.parametrize("counts", [[(80, 0)], [(80, 0), (0, 0), (3, 1), (120, 4)], [(0, 7)], [(0, 0)],
                                    [(5, 1)] * 25])
def test_videos_per_run_bars_are_whole_and_the_legend_clear_of_them(counts):
    """Every bar lies inside the axes with room above the tallest, and the legend covers none:
    a lone run used to fill the axes to its top (a zero-height bar on it is a sticky edge)."""
    runs = [{"committed_at": f"2026-12-{i % 28 + 1:02d}T02:00:00Z", "counts": {"videos_ok": ok, "videos_failed": bad}}
            for i, (ok, bad) in enumerate(counts)]
    fig = report.draw_history(runs)
    renderer = _rendered(fig)
    (ax,) = fig.axes
    bars = [p for p in ax.patches if p.get_height() > 0]
    assert len(bars) == sum((ok > 0) + (bad > 0) for ok, bad in counts)
    top = max((ok + bad for ok, bad in counts), default=0)
    assert ax.get_ylim()[1] >= max(1.0, 1.1 * top)
    axes_box = ax.get_window_extent(renderer)
    legend_box = ax.get_legend().get_window_extent(renderer)
    for bar in bars:
        box = bar.get_window_extent(renderer)
        assert axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 < axes_box.y1
        assert not box.overlaps(legend_box), "the legend covers a bar"
    assert axes_box.width > 0 and legend_box.x1 <= fig.bbox.width
