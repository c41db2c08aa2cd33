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
