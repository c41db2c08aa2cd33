"""End to end on local Ray: synthetic + shared media, manifests, both sampling policies.

Tables are read back with plain pyarrow (no Ray), as a consumer would.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import CASE_FILES, CASES_DIR, SHARED_FILES, SHARED_MEDIA
from vmae_ray.cli import config_from_args
from vmae_ray.config import ConfigError
from vmae_ray.pipeline import run


def read_table(output: str, table: str) -> pa.Table:
    folder = os.path.join(output, table)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet")) if os.path.isdir(folder) else []
    return pa.concat_tables([pq.read_table(os.path.join(folder, f)) for f in files]) if files else None


def success(output: str) -> dict:
    with open(os.path.join(output, "_SUCCESS")) as f:
        return json.load(f)


def run_job(*args):
    return run(config_from_args(list(args)))


def assert_exactly_once(output: str, expected_ids: set[str]) -> None:
    videos, errors = read_table(output, "videos"), read_table(output, "errors")
    video_ids = videos.column("video_id").to_pylist() if videos is not None else []
    error_ids = errors.column("video_id").to_pylist() if errors is not None else []
    assert len(video_ids) == len(set(video_ids)), "a video appears twice in videos/"
    assert len(error_ids) == len(set(error_ids)), "an input appears twice in errors/"
    assert not set(video_ids) & set(error_ids), "an input is in both videos/ and errors/"
    assert set(video_ids) | set(error_ids) == expected_ids


@pytest.fixture(scope="module")
def manifest_run(ray_session, tiny_classifier, synthetic_corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    uris = list(synthetic_corpus.values())
    shared = [m for m in SHARED_FILES if os.path.isdir(SHARED_MEDIA)]
    uris += [m.path for m in shared]
    cases = list(CASE_FILES.values()) if os.path.isdir(CASES_DIR) else []
    uris += [c.path for c in cases]
    ids = [f"vid-{i:02d}" for i in range(len(uris))]
    manifest = work / "manifest.csv"
    pacsv.write_csv(pa.table({"uri": uris, "video_id": ids, "split": [f"s{i % 3}" for i in range(len(uris))]}),
                    manifest)
    out = str(work / "out")
    summary = run_job("--input", str(manifest), "--output", out, "--model", tiny_classifier, "--top-k", "3")
    return {"out": out, "ids": dict(zip(ids, uris)), "summary": summary, "shared": shared, "cases": cases}


def test_manifest_tables_schema_and_counts(manifest_run):
    out, ids = manifest_run["out"], manifest_run["ids"]
    clips, videos, errors = (read_table(out, t) for t in ("clips", "videos", "errors"))
    assert_exactly_once(out, set(ids))
    dim = 64
    assert clips.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert videos.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    for name, typ in [("video_id", pa.string()), ("uri", pa.string()), ("clip_index", pa.int32()),
                      ("start_seconds", pa.float64()), ("end_seconds", pa.float64()),
                      ("frame_indices", pa.list_(pa.int32())), ("top_labels", pa.list_(pa.string())),
                      ("top_scores", pa.list_(pa.float32())), ("split", pa.string())]:
        assert clips.schema.field(name).type == typ, name
    for name in ("num_clips", "duration_seconds", "width", "height", "fps", "codec", "stream_index",
                 "top_labels", "top_scores", "split"):
        assert name in videos.column_names
    for name in ("stage", "error_type", "message", "split"):
        assert name in errors.column_names
    # Uniform sampling: one clip per video, num_frames indices each, in decode order.
    assert clips.num_rows == videos.num_rows
    for row in clips.to_pylist():
        assert len(row["frame_indices"]) == 8 and row["frame_indices"] == sorted(row["frame_indices"])
        assert len(row["top_labels"]) == 3 and row["top_scores"] == sorted(row["top_scores"], reverse=True)
        assert row["split"] == f"s{int(row['video_id'][-2:]) % 3}"
    assert not np.isnan(np.stack(clips.column("embedding").to_numpy(zero_copy_only=False))).any()
    manifest = success(out)
    assert manifest["counts"]["videos_ok"] == videos.num_rows
    assert manifest["counts"]["videos_failed"] == (errors.num_rows if errors is not None else 0)
    assert manifest["counts"]["clips"] == clips.num_rows
    assert set(manifest["versions"]) >= {"python", "torch", "transformers", "av", "ray"}
    assert manifest["config"]["model"]


def _rows_by_video(out: str, table: str) -> dict[str, dict]:
    """A committed table's rows by video_id (uniform sampling here: one clip per video)."""
    return {r["video_id"]: r for r in read_table(out, table).to_pylist()}


def test_shared_media_outcomes(manifest_run):
    if not manifest_run["shared"]:
        pytest.skip(f"shared media folder not found at {SHARED_MEDIA}")
    out, ids = manifest_run["out"], manifest_run["ids"]
    by_uri = {u: v for v, u in ids.items()}
    videos = _rows_by_video(out, "videos")
    errors = _rows_by_video(out, "errors")
    for media in manifest_run["shared"]:
        vid = by_uri[media.path]
        if media.expect_error:
            assert errors[vid]["error_type"] == media.expect_error and errors[vid]["stage"] == "probe"
        else:
            assert vid in videos, errors.get(vid)
            if media.video_stream is not None:
                assert videos[vid]["stream_index"] == media.video_stream
                assert videos[vid]["width"] == 480


def test_real_world_cases_right_values(manifest_run):
    """../shared/media/cases through the job: time span, displayed size, frames, cover art."""
    if not manifest_run["cases"]:
        pytest.skip(f"shared media cases not found at {CASES_DIR}")
    out, ids = manifest_run["out"], manifest_run["ids"]
    by_uri = {u: v for v, u in ids.items()}
    videos = _rows_by_video(out, "videos")
    errors = _rows_by_video(out, "errors")
    clips = _rows_by_video(out, "clips")
    for case in manifest_run["cases"]:
        vid = by_uri[case.path]
        if case.expect_error:
            assert errors[vid]["error_type"] == case.expect_error and "still picture" in errors[vid]["message"]
            continue
        row = videos[vid]
        assert row["duration_seconds"] == pytest.approx(case.duration_seconds, abs=1e-3), case.name
        assert (row["width"], row["height"]) == case.displayed_size, case.name
        # Uniform sampling with the checkpoint's 8 frames: brute-force segment midpoints.
        expected = [int((i + 0.5) * case.num_frames / 8) for i in range(8)]
        assert clips[vid]["frame_indices"] == expected, case.name
        assert clips[vid]["start_seconds"] == pytest.approx(expected[0] / case.fps, abs=1e-3), case.name
    facts = {c.name: videos[by_uri[c.path]] for c in manifest_run["cases"] if not c.expect_error}
    for name, row in facts.items():
        rotation = 90 if name == "c01_phone_portrait_rot90.mp4" else 0
        sar = 32 / 27 if name == "c13_anamorphic_sar.mp4" else 1.0
        assert (row["display_rotation_degrees"], row["display_hflip"]) == (rotation, False), name
        assert row["sample_aspect_ratio"] == pytest.approx(sar), name
        assert row["num_streams"] == 1
    schema = read_table(out, "videos").schema
    for name, typ in [("display_rotation_degrees", pa.int32()), ("display_hflip", pa.bool_()),
                      ("sample_aspect_ratio", pa.float64())]:
        assert schema.field(name).type == typ


def test_video_embedding_is_mean_of_clips(manifest_run):
    out = manifest_run["out"]
    clips = read_table(out, "clips").to_pandas()
    videos = read_table(out, "videos").to_pandas()
    for _, video in videos.iterrows():
        mine = np.stack(clips[clips.video_id == video.video_id].embedding.to_list())
        np.testing.assert_allclose(video.embedding, mine.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_rerun_processes_nothing_new(manifest_run, ray_session, tiny_classifier, tmp_path):
    out = manifest_run["out"]
    copy = str(tmp_path / "out")
    shutil.copytree(out, copy)
    manifest = [r for r in os.listdir(os.path.dirname(out)) if r.endswith(".csv")][0]
    summary = run_job("--input", os.path.join(os.path.dirname(out), manifest), "--output", copy,
                      "--model", tiny_classifier, "--top-k", "3")
    assert summary.inputs_skipped == len(manifest_run["ids"]) and summary.videos_ok == 0
    assert_exactly_once(copy, set(manifest_run["ids"]))
    assert len(success(copy)["runs"]) == 2


def test_directory_stride_pretraining_checkpoint(ray_session, tiny_pretraining, synthetic_corpus, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name, path in synthetic_corpus.items():
        shutil.copy(path, folder / name)
    (folder / "notes.txt").write_text("not a video: skipped by the directory listing")
    out = str(tmp_path / "out")
    summary = run_job("--input", str(folder), "--output", out, "--model", tiny_pretraining,
                      "--sampling", "stride", "--clips-per-video", "2", "--frame-stride", "2")
    clips, videos = read_table(out, "clips"), read_table(out, "videos")
    assert "top_labels" not in clips.column_names  # no trained classifier: no labels
    assert videos.num_rows == len(synthetic_corpus) and summary.videos_failed == 0
    per_video = dict(zip(videos.column("uri").to_pylist(), videos.column("num_clips").to_pylist()))
    # c_short.mp4 (5 frames) is shorter than one clip: one clip; the others have two.
    for uri, n in per_video.items():
        assert n == (1 if uri.endswith("c_short.mp4") else 2), uri
    assert clips.num_rows == sum(per_video.values())
    for row in clips.to_pylist():
        if row["uri"].endswith("d_vfr.mkv"):
            continue  # variable rate: sampled by time, so index gaps vary
        idx = row["frame_indices"]
        # Constant rate: frames exactly `frame_stride` apart, then the last one repeats.
        assert all(b - a == 2 or (b == a and b == idx[-1]) or b - a < 2 for a, b in zip(idx, idx[1:])), idx
    assert success(out)["stage_report"]["bottleneck"] in ("decode", "embed")


def test_labels_refused_for_pretraining_checkpoint(tiny_pretraining, tmp_path):
    with pytest.raises(ConfigError, match="no trained classifier"):
        run_job("--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", tiny_pretraining,
                "--labels", "on")


def test_changed_settings_refused_then_replaced_with_overwrite(manifest_run, tiny_classifier, tmp_path):
    """A changed setting is refused, naming it, before any work (a nightly job's typo must not
    replace a corpus); with --overwrite every input is processed again and the first commit
    replaces all old rows: old rows never stay beside new ones."""
    copy = str(tmp_path / "out")
    shutil.copytree(manifest_run["out"], copy)
    old_files = {t: sorted(os.listdir(os.path.join(copy, t))) for t in ("clips", "videos")}
    before = open(os.path.join(copy, "_SUCCESS"), "rb").read()
    manifest = os.path.join(os.path.dirname(manifest_run["out"]), "manifest.csv")
    args = ["--input", manifest, "--output", copy, "--model", tiny_classifier, "--top-k", "3",
            "--sampling", "stride", "--clips-per-video", "2"]
    with pytest.raises(ConfigError, match="^--output: .*other settings \\(--sampling: 'uniform' -> 'stride', "
                                          "--clips-per-video: 1 -> 2\\)"):
        run(config_from_args(args))
    assert open(os.path.join(copy, "_SUCCESS"), "rb").read() == before
    assert {t: sorted(os.listdir(os.path.join(copy, t))) for t in ("clips", "videos")} == old_files
    summary = run_job(*args, "--overwrite")
    assert summary.inputs_skipped == 0
    assert_exactly_once(copy, set(manifest_run["ids"]))
    clips = read_table(copy, "clips")
    assert set(clips.column("settings_fingerprint").to_pylist()) == {success(copy)["settings_fingerprint"]}
    assert clips.num_rows > read_table(manifest_run["out"], "clips").num_rows  # two clips per long video now
    for table, names in old_files.items():
        assert not set(names) & set(os.listdir(os.path.join(copy, table)))
    assert [r["run_id"] for r in success(copy)["runs"]] == [summary.run_id]


def test_decode_and_embed_are_separate_operators(manifest_run):
    """Decode (CPU tasks) and embed (GPU actors) scale apart: Ray Data must not fuse them. The
    input blocks come from a streaming repartition, one decode task per block of inputs."""
    operators = [op["name"] for op in manifest_run["summary"].stage_report["operators"]]
    assert "MapBatches(decode_batch)" in operators and "MapBatches(EmbedActor)" in operators, operators
    assert not any("decode_batch" in op and "EmbedActor" in op for op in operators), operators
    assert any(op.startswith("StreamingRepartition") for op in operators), operators


@pytest.mark.parametrize("user_value", [None, "RATE_BASED"])
def test_cluster_autoscaler_default_and_user_override(ray_session, monkeypatch, user_value):
    """Ray Data's RATE_BASED autoscaler leaves fractional CPUs of a fixed cluster unused (see
    graph.DEFAULT_CLUSTER_AUTOSCALER); the job picks V2 unless the user chose one."""
    from vmae_ray.config import EmbedConfig, Resources
    from vmae_ray.graph import CLUSTER_AUTOSCALER_ENV, embed_dataset

    if user_value is None:
        monkeypatch.delenv(CLUSTER_AUTOSCALER_ENV, raising=False)
    else:
        monkeypatch.setenv(CLUSTER_AUTOSCALER_ENV, user_value)
    res = Resources(device="cpu", gpus_per_actor=0, num_actors=(1, 1), batch_size=2, decode_slots=1,
                    cluster_cpus=2, cluster_gpus=0)
    # Built, not run: the dataset is lazy.
    embed_dataset(todo_items=[{"file": "todo/x.parquet", "first": 0, "take": 1}], store=None, run_id="r", params=None,
                  storage=None, config=EmbedConfig(input="i", output="o"), res=res, writer=None, num_inputs=1,
                  clip_bytes=1)
    assert os.environ[CLUSTER_AUTOSCALER_ENV] == (user_value or "V2")


def test_stage_report_times_start_up_apart(manifest_run):
    """The job reports when the first embedded clip arrived and the rate after it, counting
    only clips decoded after that moment (not the backlog decoded during start-up)."""
    summary = manifest_run["summary"]
    report = summary.stage_report
    assert 0 < report["first_clip_seconds"] <= summary.pipeline_seconds
    assert report["bottleneck"] in ("decode", "embed")
    if "after_startup_clips_per_second" in report:  # absent only if every clip arrived in one batch
        assert 0 < report["after_startup_clips"] < summary.clips
        assert report["after_startup_clips_per_second"] > 0
    manifest = success(manifest_run["out"])
    assert manifest["stage_report"]["first_clip_seconds"] == report["first_clip_seconds"]


def test_model_calls_get_full_batches(ray_session, tiny_classifier, tmp_path):
    """--batch-size is clips per model call: in each actor call (one receipt), every model call
    but the last embeds exactly that many clips, so at most one short call per receipt.

    Twelve videos of three clips each and a batch of four: a video's clips (three) do not add up
    to batches by themselves. The driver counts the calls by size from the receipts
    (`stage_report["model_call_sizes"]`); the clips they add up to are the run's."""
    from vmae_ray.synthetic import make_video

    corpus = tmp_path / "corpus"
    for i in range(12):
        make_video(str(corpus / f"v{i:02d}.mp4"), width=64, height=48, num_frames=48, gop_size=12, seed=i)
    summary = run_job("--input", str(corpus), "--output", str(tmp_path / "out"), "--model", tiny_classifier,
                      "--sampling", "stride", "--clips-per-video", "3", "--batch-size", "4")
    report = summary.stage_report
    sizes = {int(k): v for k, v in report["model_call_sizes"].items()}
    assert summary.clips == 36 and summary.videos_failed == 0
    assert sum(size * calls for size, calls in sizes.items()) == summary.clips
    assert max(sizes) == 4
    receipts = len(os.listdir(tmp_path / "out" / "clips"))  # one clips shard per receipt here
    assert sum(calls for size, calls in sizes.items() if size < 4) <= receipts, (sizes, receipts)


def test_rows_per_call_and_videos_per_task_bounds():
    """An actor call is about k model calls (k <= 32, <= 2 GiB of clips, >= 4 calls per actor
    for the run's clips) of whole decoded rows; decode tasks hold at most 1024 inputs and a
    large run is at least 4096 of them."""
    from vmae_ray.graph import MAX_VIDEOS_PER_TASK, rows_per_call, videos_per_task

    base = 16 * 224 * 224 * 3  # one VideoMAE-B clip of uint8 RGB: 2.4 MB
    assert rows_per_call(32, base, 1.0, 10**6, 8) == 32 * 27  # 2 GiB // (32 x 2.4 MB) = 27 calls
    assert rows_per_call(4, 16 * 32 * 32 * 3, 1.0, 10**6, 1) == 4 * 32  # small clips: 32 calls
    assert rows_per_call(4, 16 * 32 * 32 * 3, 1.0, 36, 1) == 4 * 2  # 36 clips: 36 // 16 = 2 calls
    assert rows_per_call(2, 16 * 32 * 32 * 3, 1.0, 12, 1) == 2  # fewer clips than 4 calls: one call
    assert rows_per_call(64, 10**10, 1.0, 10**6, 1) == 64  # a call bigger than the byte cap is still one call
    for batch in (1, 3, 8):
        for per_row in (1, 2, 3, 4):
            for clips in (0, 5, 100, 10_000):
                assert rows_per_call(batch, 4096, float(per_row), clips, 2) * per_row % batch == 0
    assert videos_per_task(10**6, 64) * 4096 >= 10**6 > (videos_per_task(10**6, 64) - 1) * 4096
    assert videos_per_task(10**8, 64) == MAX_VIDEOS_PER_TASK
    assert videos_per_task(16, 2) == 4  # two tasks per decode slot
    assert videos_per_task(10**6, 64, given=7) == 7


def test_device_cuda_on_a_cluster_without_gpus_is_refused_before_work(ray_session, tiny_classifier,
                                                                      synthetic_corpus, tmp_path):
    """--device cuda where Ray has no GPU and can add none (the Ray this process started):
    ConfigError naming --device right after Ray starts; nothing committed, and with --overwrite
    the tables already there are untouched (they are replaced only by a first commit)."""
    from vmae_ray.graph import gpus_the_cluster_can_add
    from vmae_ray.storage import StorageOptions
    from vmae_ray.writing import write_committed

    if ray_session.cluster_resources().get("GPU"):
        pytest.skip("this Ray has a GPU")
    assert gpus_the_cluster_can_add(ray_session.cluster_resources()) == 0.0  # started here: a fixed cluster
    folder = os.path.dirname(next(iter(synthetic_corpus.values())))
    out = tmp_path / "out"
    args = ["--input", folder, "--output", str(out), "--model", tiny_classifier, "--device", "cuda"]
    with pytest.raises(ConfigError, match="^--device: GPUs requested"):
        run(config_from_args(args))
    assert not out.exists()  # not even an empty folder
    write_committed(str(out), StorageOptions(), {"videos": pa.table({"video_id": ["old"], "uri": ["/old.mp4"]})}, {})
    before = {p: (out / p).read_bytes() for p in ["_SUCCESS", *(f"videos/{n}" for n in os.listdir(out / "videos"))]}
    with pytest.raises(ConfigError, match="^--device"):
        run(config_from_args([*args, "--overwrite"]))
    after = {p: (out / p).read_bytes() for p in before if (out / p).is_file()}
    assert after == before
