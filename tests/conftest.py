"""Shared fixtures: one local Ray per test session, tiny checkpoints, test media.

Test media are declared once here: the real files of ../shared/media (skipped with a
visible reason when the folder is missing) and synthetic videos made with PyAV by
`vmae_ray.synthetic` (the recipe is the call's arguments).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3_server"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MEDIA = os.path.abspath(os.path.join(ROOT, "..", "shared", "media"))

# Keep Ray quiet and small on a 2-core CI machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class MediaFile:
    name: str
    streams: str
    expect_error: str | None = None  # error_type the job must report, or None if it decodes
    video_stream: int | None = None  # the stream the job must choose, where there is a choice

    @property
    def path(self) -> str:
        return os.path.join(SHARED_MEDIA, self.name)


SHARED_FILES = [
    MediaFile("av1_video.mkv", "AV1 640x360, container reports no frame count"),
    MediaFile("bt709_full_range.mp4", "H.264 1280x720 full range, 30 frames"),
    MediaFile("h264_10bits.mp4", "H.264 10-bit 200x200"),
    MediaFile("h265_10bits.mp4", "HEVC 10-bit 200x200"),
    MediaFile("h265_video.mp4", "HEVC 128x128, 10 frames (shorter than a clip)"),
    MediaFile("nasa_13013.mp4", "two video streams 320x180@25 and 480x270@29.97", video_stream=3),
    MediaFile("nasa_13013.mp4.audio.mp3", "audio only", expect_error="no_video_stream"),
    MediaFile("var_fps_video.mp4", "H.264 variable frame rate, 300 frames"),
]


def require_shared_media() -> str:
    if not os.path.isdir(SHARED_MEDIA):
        pytest.skip(f"shared media folder not found at {SHARED_MEDIA}")
    return SHARED_MEDIA


@pytest.fixture(scope="session")
def shared_media() -> str:
    return require_shared_media()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs ~10 s here)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> str:
    """A fine-tuned-style checkpoint: classifier head with id2label, non-default preprocessing."""
    from vmae_ray.synthetic import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "classifier"), classifier=True,
                                num_frames=8, image_size=32, patch_size=16, num_labels=5, seed=1)


@pytest.fixture(scope="session")
def tiny_pretraining(tmp_path_factory) -> str:
    """Laid out like videomae-base-short-ssv2: encoder + decoder, no classifier."""
    from vmae_ray.synthetic import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "pretraining"), classifier=False,
                                pretraining_layout=True, num_frames=8, image_size=32, patch_size=16, seed=2)


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> dict[str, str]:
    """Small synthetic videos (name -> path): codecs, sizes, lengths and rates that differ."""
    from vmae_ray.synthetic import make_video

    root = tmp_path_factory.mktemp("synthetic")
    recipes = {
        "a_h264.mp4": dict(codec="h264", width=160, height=120, fps=30, num_frames=45, gop_size=15),
        "b_vp9.webm": dict(codec="libvpx-vp9", width=128, height=96, fps=12, num_frames=24, gop_size=12),
        "c_short.mp4": dict(codec="h264", width=96, height=64, fps=30, num_frames=5, gop_size=5),
        "d_vfr.mkv": dict(codec="h264", width=128, height=72, fps=30, num_frames=40, gop_size=20, vfr=True),
    }
    return {name: make_video(str(root / name), seed=i, **kw) for i, (name, kw) in enumerate(recipes.items())}


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> str:
    """make_tiny_checkpoint's defaults: 8 frames of 64x64, resize short side to 72, crop 64,
    ImageNet mean/std (so nothing passes with hard-coded library defaults); a classifier head."""
    from vmae_ray.synthetic import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "classifier64", classifier=True)


@pytest.fixture(scope="session")
def pretraining_dir(tmp_path_factory) -> str:
    """As `classifier_dir`, laid out as a pretraining checkpoint (encoder + decoder)."""
    from vmae_ray.synthetic import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "pretraining64", pretraining_layout=True)


def copy_checkpoint(src: str, tmp_path: Path) -> Path:
    """A copy of a checkpoint directory, to edit in a test."""
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    """Set keys of a JSON file; a value of None removes the key."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def long_videos(tmp_path_factory):
    """Frame-coded videos long enough for sparse plans to seek (GOP << gaps between targets)."""
    from vmae_ray.synthetic import make_video

    root = tmp_path_factory.mktemp("seek")
    recipes = {
        "h264_bframes.mp4": dict(codec="h264", width=160, height=120, fps=30, num_frames=480, gop_size=30),
        "h264.mkv": dict(codec="h264", width=160, height=120, fps=25, num_frames=400, gop_size=40),
        "vp9.webm": dict(codec="libvpx-vp9", width=160, height=120, fps=12, num_frames=300, gop_size=24),
        "vfr.mkv": dict(codec="h264", width=160, height=120, fps=30, num_frames=400, gop_size=40, vfr=True),
        # Long GOPs with B-frames: the pre-roll after a seek skips non-reference frames.
        "h264_longgop.mp4": dict(codec="h264", width=160, height=120, fps=30, num_frames=480, gop_size=200),
    }
    return {name: make_video(str(root / name), seed=i, **kw) for i, (name, kw) in enumerate(recipes.items())}


# ---------------------------------------------------------------------------------------------
# ../shared/media/cases: small videos reproducing public bug reports, with the right values its
# README states (declared once here; tests assert them against frame codes read from pixels).

CASES_DIR = os.path.join(SHARED_MEDIA, "cases")
UNIFORM16_60_FRAMES = (1, 5, 9, 13, 16, 20, 24, 28, 31, 35, 39, 43, 46, 50, 54, 58)


@dataclass(frozen=True)
class CaseFile:
    name: str  # path under cases/
    what: str
    num_frames: int | None = None
    fps: float | None = None
    duration_seconds: float | None = None
    start_seconds: float | None = None  # presentation time of frame 0
    displayed_size: tuple[int, int] | None = None  # (width, height) as players show it
    uniform16: tuple[int, ...] | None = None  # frame indices of uniform 16
    stride4_clip0: tuple[int, ...] | None = None  # frame indices of stride 4, clip 0
    stride4_all_clips: int | None = None  # clips of stride 4 with --clips-per-video all
    expect_error: str | None = None
    first_code: int = 0  # the frame code drawn on frame 0

    @property
    def path(self) -> str:
        return os.path.join(CASES_DIR, self.name)


CASE_FILES = {c.name: c for c in [
    CaseFile("c01_phone_portrait_rot90.mp4", "H.264 320x180 stored, display matrix rotate 90", 60, 30, 2.0, 0.0,
             (180, 320), UNIFORM16_60_FRAMES),
    CaseFile("c02_audio_with_cover.mp4", "AAC + MJPEG cover art (attached_pic)", expect_error="no_video_stream"),
    CaseFile("c05_resolution_change.ts", "H.264 in MPEG-TS, 320x240 then 480x270 from frame 30", 60, 30, 2.0, 1.4,
             (320, 240)),
    CaseFile("c08_mpeg4_bframes.avi", "MPEG-4 Part 2 with B-frames in AVI, header start 0.0 s", 75, 25, 3.0, 0.04,
             (320, 240), (2, 7, 11, 16, 21, 25, 30, 35, 39, 44, 49, 53, 58, 63, 67, 72), tuple(range(0, 64, 4))),
    CaseFile("c12_mkv_starts_at_10s.mkv", "H.264 in Matroska from 10.0 s, Duration element 12.0 s", 60, 30, 2.0, 10.0,
             (320, 240), UNIFORM16_60_FRAMES, stride4_all_clips=1),
    CaseFile("c13_anamorphic_sar.mp4", "H.264 240x160 stored, sample aspect ratio 32:27", 60, 30, 2.0, 0.0, (284, 160)),
    CaseFile("brackets/talk [1].mp4", "named as yt-dlp names downloads", 30, 30, 1.0, 0.0, (160, 120), first_code=100),
    CaseFile("brackets/talk 1.mp4", "the neighbour a glob reading of 'talk [1].mp4' matches", 30, 30, 1.0, 0.0,
             (160, 120), first_code=500),
]}


def case_file(name: str) -> CaseFile:
    """The case ``name`` (skipped with a visible reason when ../shared/media/cases is missing)."""
    if not os.path.isdir(CASES_DIR):
        pytest.skip(f"shared media cases not found at {CASES_DIR}")
    return CASE_FILES[name]


def decoded_clip(job_args: list[str], uri: str, clip_index: int):
    """Clip ``clip_index`` of ``uri``, uint8 (T, H, W, 3), decoded again in this process the way
    a job with ``job_args`` (its command line) decodes it."""
    from vmae_ray.checkpoint import load_model_spec
    from vmae_ray.cli import config_from_args
    from vmae_ray.planning import decode_params
    from vmae_ray.stages import decode_video, video_clips
    from vmae_ray.storage import StorageOptions

    config = config_from_args(job_args)
    spec = load_model_spec(config.model)
    item = {"video_id": "any", "uri": uri, "size_bytes": None, "input_fingerprint": None}
    facts, pixels = video_clips(list(decode_video(item, decode_params(config, spec, spec.num_frames),
                                                  StorageOptions({}))))
    for fact, clip in zip(facts, pixels):
        if fact["clip_index"] == clip_index:
            return clip
    raise AssertionError(f"no clip {clip_index} in {uri}")


def uniform_indices(num_frames: int, segments: int) -> list[int]:
    """Brute force for constant-rate video: the frame on screen at the middle of each of
    ``segments`` equal segments of ``num_frames`` frames (frame k covers [k, k + 1))."""
    return [int((i + 0.5) * num_frames / segments) for i in range(segments)]


# ---------------------------------------------------------------------------------------------
# A small corpus and its undisturbed run, shared by the crash, kill, lease and multi-node tests.


@pytest.fixture(scope="module")
def ray_address(ray_session) -> str:
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def crash_corpus(tmp_path_factory) -> dict:
    """16 inputs (14 small videos, 2 broken files); ~42 clips with the crash settings."""
    from vmae_ray.listing import video_id_for_uri
    from vmae_ray.synthetic import make_video

    folder = tmp_path_factory.mktemp("crash_corpus")
    for i in range(14):
        make_video(str(folder / f"v{i:02d}.mp4"), codec="h264", width=64, height=48, fps=10,
                   num_frames=30 + 2 * i, gop_size=10, seed=100 + i)
    (folder / "broken_empty.mp4").write_bytes(b"")
    (folder / "broken_text.mp4").write_bytes(b"this is not a video\n" * 50)
    ids = {video_id_for_uri(str(p)) for p in folder.iterdir()}
    return {"dir": str(folder), "ids": ids}


@pytest.fixture(scope="module")
def baseline(ray_session, tiny_classifier, crash_corpus, tmp_path_factory) -> str:
    """An undisturbed run over the crash corpus: what every disturbed run must reproduce."""
    out = str(tmp_path_factory.mktemp("baseline") / "out")
    from tests.test_robustness import CRASH_ARGS, check_final, run_job

    run_job("--input", crash_corpus["dir"], "--output", out, "--model", tiny_classifier, *CRASH_ARGS)
    state = check_final(out, crash_corpus["ids"])
    assert len(state["errors"]) == 2 and len(state["videos"]) == 14
    return out


