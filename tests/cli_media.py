"""Test media made with ffmpeg's command line, and right values read with ffprobe.

The encoders, muxers and bitstream filters are those of the system's ffmpeg (Debian's
package; `make test` and .ci/run install it with apt-get), independent of the PyAV build the
decoder uses. Pictures are the project's frame-coded ones (`synthetic.coded_frames`: frame k
carries the block code of k that `synthetic.frame_number_from_rgb` reads back), fed to ffmpeg
as raw RGB, or flat colour bars for colour tests. Each recipe is its command line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from fractions import Fraction

import numpy as np
import pytest

from vmae_ray.synthetic import coded_frames


def require_ffmpeg() -> None:
    """Skip (with the reason) where ffmpeg's command line is missing."""
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found: `make test` installs ffmpeg with apt-get "
                    "(apt-get install -y ffmpeg)")


def ffmpeg(*args: str, stdin: bytes | None = None) -> str:
    """Run ffmpeg (errors only on stderr); returns its stderr."""
    command = ["ffmpeg", "-v", "error", "-y", *(["-nostdin"] if stdin is None else []), *args]
    done = subprocess.run(command, input=stdin, capture_output=True, check=False)
    if done.returncode:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return done.stderr.decode(errors="replace")


def encode_frames(path: str, frames: Iterable[np.ndarray], *, fps: float | Fraction, args: list[str],
                  input_args: list[str] | None = None) -> str:
    """Encode RGB frames (H, W, 3 uint8) with ffmpeg's command line: ``ffmpeg -f rawvideo
    -pix_fmt rgb24 -s WxH -r FPS -i - [input_args] ARGS PATH``."""
    frames = list(frames)
    height, width = frames[0].shape[:2]
    raw = b"".join(np.ascontiguousarray(f).tobytes() for f in frames)
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
           *(input_args or []), *args, path, stdin=raw)
    return path


def encode_coded(path: str, *, width: int, height: int, fps: float | Fraction, num_frames: int, args: list[str],
                 first_code: int = 0, seed: int = 0, input_args: list[str] | None = None) -> str:
    """`encode_frames` of frame-coded pictures: frame k shows the code ``first_code + k``."""
    return encode_frames(path, coded_frames(width, height, num_frames, seed=seed, first_code=first_code), fps=fps,
                         args=args, input_args=input_args)


def ffprobe(path: str, *args: str) -> dict:
    done = subprocess.run(["ffprobe", "-v", "error", "-of", "json", *args, path], capture_output=True, check=True)
    return json.loads(done.stdout)


def video_stream_facts(path: str) -> dict:
    """ffprobe's reading of the first video stream, frames and packets counted by decoding:
    nb_read_frames, nb_read_packets, r_frame_rate (as a Fraction) and the tags."""
    info = ffprobe(path, "-select_streams", "v:0", "-count_frames", "-count_packets", "-show_entries",
                   "stream=nb_read_frames,nb_read_packets,r_frame_rate,avg_frame_rate,duration,color_space,"
                   "color_range,color_transfer,color_primaries:format=duration,format_name")
    stream = info["streams"][0]
    stream["nb_read_frames"] = int(stream["nb_read_frames"])
    stream["nb_read_packets"] = int(stream["nb_read_packets"])
    stream["r_frame_rate"] = Fraction(stream["r_frame_rate"])
    stream["format"] = info.get("format", {})
    return stream


def frame_times(path: str, *, as_decoded: bool = False) -> list[float]:
    """Presentation times of the decoded frames (ffprobe -show_frames), sorted, or with
    ``as_decoded`` in the order the decoder gave them (a restart shows as a step back)."""
    info = ffprobe(path, "-select_streams", "v:0", "-show_entries", "frame=best_effort_timestamp_time")
    times = [float(f["best_effort_timestamp_time"]) for f in info["frames"]
             if f.get("best_effort_timestamp_time") not in (None, "N/A")]
    return times if as_decoded else sorted(times)


def packet_end(path: str) -> float:
    """The end of the last presented video frame by the packets: max(pts + duration) (ffprobe)."""
    info = ffprobe(path, "-select_streams", "v:0", "-show_entries", "packet=pts_time,duration_time")
    return max(float(p["pts_time"]) + float(p.get("duration_time", 0) or 0) for p in info["packets"]
               if p.get("pts_time") not in (None, "N/A"))


def decode_errors(path: str) -> str:
    """What `ffmpeg -v error -i PATH -map 0:v:0 -f null -` prints: nothing for a sound video stream."""
    return ffmpeg("-i", path, "-map", "0:v:0", "-f", "null", "-")
