"""Command line and config validation: bad flags fail before Ray starts, naming the flag."""

import os
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
        (["--sampling", "stride", "--frame-stride", "-1"], "--frame-stride"),
        (["--frame-stride", "2"], "--frame-stride: applies to --sampling stride only"),  # uniform: no stride
        (["--dry"], "unrecognized arguments: --dry"),  # never taken for --dry-run
        (["--sampling", "stride", "--frame-strid", "2"], "unrecognized arguments: --frame-strid 2"),
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
    assert config_from_args(["--config", str(cfg), "--sampling", "uniform"]).sampling == "uniform"  # its stride unused
    # Relative paths in a config file, as on the command line, are the working directory's.
    assert c.input == os.path.abspath("from-file") and c.sampling == "stride" and c.frame_stride == 3
    assert c.batch_size == 2


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


def test_plan_resources_defaults_come_from_one_place():
    from vmae_ray.config import DEFAULT_BATCH_SIZE_CPU, DEFAULT_BATCH_SIZE_GPU, ConfigError, plan_resources

    cpu = plan_resources(parse(), {"CPU": 8.0})
    assert (cpu.device, cpu.gpus_per_actor, cpu.num_actors, cpu.batch_size) == ("cpu", 0.0, (1, 1), DEFAULT_BATCH_SIZE_CPU)
    assert cpu.decode_slots == 7  # 8 CPUs less one for the model actor
    gpu = plan_resources(parse(), {"CPU": 64.0, "GPU": 4.0})
    assert (gpu.device, gpu.gpus_per_actor, gpu.num_actors, gpu.batch_size) == ("cuda", 1.0, (1, 4), DEFAULT_BATCH_SIZE_GPU)
    assert gpu.decode_slots == 60
    explicit = plan_resources(parse("--batch-size", "5", "--num-actors", "2", "--decode-cpus", "0.5"), {"CPU": 4.0})
    assert (explicit.batch_size, explicit.num_actors, explicit.decode_slots) == (5, (2, 2), 4)
    with pytest.raises(ConfigError, match="--gpus-per-actor"):
        plan_resources(parse("--gpus-per-actor", "1"), {"CPU": 4.0})
    with pytest.raises(ConfigError, match="^--device: GPUs requested"):
        plan_resources(parse("--device", "cuda"), {"CPU": 4.0})
    # A cluster whose autoscaler can add GPU nodes (cluster.yaml: gpu_embed min_workers 0):
    # actors ask for a GPU each and wait for the nodes; the pool may grow to what can be added.
    grows = plan_resources(parse(), {"CPU": 4.0}, gpus_to_add=8.0)
    assert (grows.device, grows.gpus_per_actor, grows.num_actors) == ("cuda", 1.0, (1, 8))
    assert grows.decode_slots == 4 and grows.cluster_gpus == 0  # the actors will take the new nodes' CPUs
    # A cluster this driver connected to that records no maximum (None): GPUs asked are waited
    # for, not refused; nothing asked, nothing assumed.
    waits = plan_resources(parse("--device", "cuda"), {"CPU": 4.0}, gpus_to_add=None)
    assert (waits.device, waits.gpus_per_actor, waits.num_actors) == ("cuda", 1.0, (1, 1))
    assert plan_resources(parse(), {"CPU": 4.0}, gpus_to_add=None).device == "cpu"
    asked = plan_resources(parse("--gpus-per-actor", "1", "--num-actors", "1,4"), {"CPU": 4.0}, gpus_to_add=8.0)
    assert (asked.device, asked.gpus_per_actor, asked.num_actors) == ("cuda", 1.0, (1, 4))
    on_cpu = plan_resources(parse("--device", "cpu"), {"CPU": 8.0, "GPU": 2.0})  # no GPU held for a CPU model
    assert (on_cpu.device, on_cpu.gpus_per_actor, on_cpu.num_actors) == ("cpu", 0.0, (1, 1))
    help_text = __import__("vmae_ray.cli", fromlist=["build_parser"]).build_parser().format_help()
    assert f"default {DEFAULT_BATCH_SIZE_GPU} on GPU, {DEFAULT_BATCH_SIZE_CPU} on CPU" in " ".join(help_text.split())


def test_main_lists_commands_and_refuses_unknown(capsys):
    from vmae_ray.cli import main

    assert main(["--help"]) == 0
    assert "embed" in capsys.readouterr().out
    from vmae_ray import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out == f"vmae-ray {__version__}\n"
    from importlib.metadata import version

    assert version("vmae-ray") == __version__  # pyproject.toml and the package say the same
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["--input", "--model"])
def test_bad_path_reported_fast_without_torch(tmp_path, classifier_dir, bad):
    """A missing --input or a --model typo is reported before torch or transformers are
    imported (about a second), naming the flag once."""
    paths = {"--input": str(tmp_path), "--model": classifier_dir}
    paths[bad] = str(tmp_path / "missing") if bad == "--input" else "./x"
    (tmp_path / "a.mp4").write_bytes(b"")
    code = ("import sys\nfrom vmae_ray.cli import main\ntry:\n    main(['embed', '--input', sys.argv[1], "
            "'--output', sys.argv[2], '--model', sys.argv[3]])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, paths["--input"], str(tmp_path / "out"), paths["--model"]],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["exit", "2", "False", "False"], proc.stderr
    lines = proc.stderr.strip().splitlines()
    (error_line,) = [line for line in lines if "error:" in line]
    assert error_line.count(bad) == 1 and proc.stderr.count(bad) == 1, proc.stderr  # named once, no usage dump
    assert ("does not exist" if bad == "--input" else "no such local directory") in error_line


def test_config_round_trips_through_success_dict():
    from vmae_ray.config import EmbedConfig

    c = parse("--sampling", "stride", "--clips-per-video", "all", "--num-actors", "1,3", "--extensions", "mp4,mkv",
              "--storage-options", '{"secret": "s3cr3t"}')
    again = EmbedConfig.from_dict({**c.to_dict(redact=True), "a_key_from_a_newer_release": 1})
    assert again.num_actors == (1, 3) and again.extensions == (".mp4", ".mkv") and again.clips_per_video is None
    assert again.storage_options == {}  # redacted secrets are never read back as values
    assert {**again.to_dict(), "storage_options": None} == {**c.to_dict(), "storage_options": None}


def test_a_bad_input_with_overwrite_keeps_the_committed_tables(tmp_path, classifier_dir):
    """--input is listed before --output is touched: a typo costs nothing under --overwrite."""
    import os

    import pyarrow as pa

    from vmae_ray.config import ConfigError
    from vmae_ray.planning import prepare
    from vmae_ray.storage import StorageOptions
    from vmae_ray.writing import write_committed

    out = str(tmp_path / "out")
    write_committed(out, StorageOptions(), {"videos": pa.table({"video_id": ["a"], "uri": ["/a.mp4"]})}, {})
    before = sorted(os.listdir(out))
    config = config_from_args(["--input", str(tmp_path / "typo"), "--output", out, "--model", classifier_dir,
                               "--overwrite"])
    with pytest.raises(ConfigError, match="--input"):
        prepare(config)
    assert sorted(os.listdir(out)) == before and os.path.exists(os.path.join(out, "_SUCCESS"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_folder_holding_other_files_is_refused(tmp_path, classifier_dir, overwrite):
    """--output pointed at a folder of the user's (its videos/ sub-folder is one of the job's
    table names): exit-2 error naming --output, nothing deleted, nothing written."""
    import os

    from vmae_ray.config import ConfigError
    from vmae_ray.planning import prepare
    from vmae_ray.synthetic import make_video

    corpus = tmp_path / "corpus"
    make_video(str(corpus / "videos" / "pan.mp4"), width=64, height=48, num_frames=8)
    (corpus / "notes.txt").write_text("mine")
    before = sorted(os.path.relpath(os.path.join(d, n), corpus) for d, _, ns in os.walk(corpus) for n in ns)
    args = ["--input", str(corpus / "videos"), "--output", str(corpus), "--model", classifier_dir]
    with pytest.raises(ConfigError, match="vmae-ray did not write") as err:
        prepare(config_from_args([*args, "--overwrite"] if overwrite else args))
    assert err.value.option == "--output" and "videos/pan.mp4" in str(err.value)
    after = sorted(os.path.relpath(os.path.join(d, n), corpus) for d, _, ns in os.walk(corpus) for n in ns)
    assert after == before == ["notes.txt", "videos/pan.mp4"]


NO_AWS_CREDENTIALS = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                      "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.mark.parametrize("command, flag", [
    (["embed", "--input", "s3://no-such-bucket/in/", "--output", "{tmp}/o", "--model", "{ckpt}"], "--input"),
    (["embed", "--input", "{tmp}", "--output", "s3://no-such-bucket/out", "--model", "{ckpt}"], "--output"),
    (["embed", "--input", "{tmp}", "--output", "{tmp}/o", "--model", "s3://no-such-bucket/model/"], "--model"),
    (["search", "--tables", "s3://no-such-bucket/t", "--query", "a"], "--tables"),
    (["report", "--tables", "s3://no-such-bucket/t", "--output", "{tmp}/r.html"], "--tables"),
])
def test_s3_without_credentials_is_a_named_error(tmp_path, classifier_dir, command, flag):
    """No AWS credentials anywhere (botocore's NoCredentialsError, raised before any request):
    exit 2 naming the flag and saying what to set, no traceback."""
    argv = [a.format(tmp=tmp_path, ckpt=classifier_dir) for a in command]
    (tmp_path / "a.mp4").write_bytes(b"")  # an input to list (it is never decoded)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "VMAE_RAY_STORAGE_OPTIONS"}
    proc = subprocess.run([sys.executable, "-m", "vmae_ray.cli", *argv], capture_output=True, text=True, timeout=120,
                          env={**env, **NO_AWS_CREDENTIALS})
    assert proc.returncode == 2, proc.stderr[-2000:]
    (error_line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert f"error: {flag}: s3://no-such-bucket" in error_line and "AWS_ACCESS_KEY_ID" in error_line
    assert "Traceback" not in proc.stderr


def test_a_hub_checkpoint_that_cannot_be_fetched_keeps_its_own_message(tmp_path):
    """The checkpoint module's message (what failed and why) reaches the user as it is: the
    storage-error wrapper must not relabel it from its cause (LocalEntryNotFoundError is a
    FileNotFoundError: "not found" would be wrong for a repo that exists)."""
    (tmp_path / "a.mp4").write_bytes(b"")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "vmae_ray.cli", "embed", "--input", str(tmp_path), "--output",
                           str(tmp_path / "out"), "--model", "MCG-NJU/videomae-base-short-ssv2"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (error_line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "error: --model: 'MCG-NJU/videomae-base-short-ssv2': could not fetch it from the Hugging Face hub" in error_line
    assert "not found (" not in error_line and "AWS_" not in error_line


def test_embed_refuses_another_commands_output(tmp_path, classifier_dir):
    """An --output holding `probe apply`'s labels/ (or dedup's duplicates/): refused before
    recovery, the other output's _SUCCESS and tables untouched."""
    import pyarrow as pa

    from vmae_ray.config import ConfigError
    from vmae_ray.planning import prepare
    from vmae_ray.storage import StorageOptions
    from vmae_ray.writing import write_committed

    out = tmp_path / "labels_out"
    write_committed(str(out), StorageOptions(), {"labels": pa.table({"video_id": ["a"], "uri": ["/a.mp4"]})}, {})
    before = (out / "_SUCCESS").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.mp4").write_bytes(b"")
    with pytest.raises(ConfigError, match="^--output: .*holds another committed output \\(tables labels\\)"):
        prepare(config_from_args(["--input", str(tmp_path / "in"), "--output", str(out), "--model", classifier_dir]))
    assert (out / "_SUCCESS").read_bytes() == before and len(os.listdir(out / "labels")) == 1


def test_output_equal_to_input_is_refused_and_relative_paths_are_made_absolute(tmp_path, monkeypatch, capsys):
    """--output naming the --input folder (however spelled) is refused, naming --output once;
    relative paths are the working directory's, before anything else sees them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "videos").mkdir()
    for output in ("videos", "./videos/", str(tmp_path / "videos"), "file://" + str(tmp_path / "videos")):
        with pytest.raises(SystemExit):
            config_from_args(["--input", "videos", "--output", output])
        err = capsys.readouterr().err
        assert "--output: is the same place as --input" in err and err.count("--output") == 1, err
    c = config_from_args(["--input", "videos", "--output", "videos/tables", "--model", "org/name"])
    assert (c.input, c.output, c.model) == (str(tmp_path / "videos"), str(tmp_path / "videos" / "tables"), "org/name")
