"""Command line and config validation: bad flags fail before Ray starts, naming the flag."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from vmae_ray.cli import config_from_args


def parse(*args):
    return config_from_args(["--input", "in/", "--output", "out/", *args])


def test_defaults():
    c = parse()
    assert c.model == "MCG-NJU/videomae-base-short-ssv2"
    assert c.sampling == "uniform" and c.clips_per_video == 1 and c.resume


def test_stride_options():
    c = parse("--sampling", "stride", "--clips-per-video", "all", "--frame-stride", "2", "--num-actors", "1,4")
    assert c.clips_per_video is None and c.frame_stride == 2 and c.num_actors == (1, 4)
    assert parse("--sampling", "stride").clips_per_video == 4
    assert parse("--num-actors", "3").num_actors == (3, 3)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--sampling", "random"], "--sampling"),
        (["--dtype", "int8"], "--dtype"),
        (["--num-actors", "4,2"], "--num-actors"),
        (["--num-actors", "x"], "--num-actors"),
        (["--batch-size", "0"], "--batch-size"),
        (["--clips-per-video", "3"], "--clips-per-video"),  # uniform takes one clip
        (["--sampling", "stride", "--clips-per-video", "many"], "--clips-per-video"),
        (["--storage-options", "{not json"], "--storage-options"),
        (["--labels", "maybe"], "--labels"),
        (["--frame-stride", "-1"], "--frame-stride"),
    ],
)
def test_bad_flags_name_the_flag(args, needle, capsys):
    with pytest.raises(SystemExit) as info:
        parse(*args)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_config_file_and_flags_win(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: from-file/\noutput: out/\nsampling: stride\nframe-stride: 8\nbatch_size: 2\n")
    c = config_from_args(["--config", str(cfg), "--frame-stride", "3"])
    assert c.input == "from-file/" and c.sampling == "stride" and c.frame_stride == 3 and c.batch_size == 2


def test_config_file_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: a\noutput: b\nframes: 3\n")
    with pytest.raises(SystemExit):
        config_from_args(["--config", str(cfg)])
    assert "unknown option 'frames'" in capsys.readouterr().err


def test_secrets_redacted_in_config_dict():
    c = parse("--storage-options", '{"key": "AKIAEXAMPLE", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x"}}')
    text = str(c.to_dict())
    assert "s3cr3t" not in text and "AKIAEXAMPLE" not in text and "http://x" in text


def test_script_rejects_bad_flag_without_starting_ray():
    """The job script exits 2 with the flag named, fast (no Ray start: well under its ~10 s)."""
    proc = subprocess.run([sys.executable, "jobs/embed_videos.py", "--input", "x", "--output", "y",
                           "--sampling", "sideways"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--sampling" in proc.stderr and "uniform" in proc.stderr
    assert "Started a local Ray" not in proc.stderr + proc.stdout
