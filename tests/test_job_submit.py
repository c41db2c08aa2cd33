"""`ray job submit` end to end: a private Ray cluster, the repository as working_dir.

The module fixture starts its OWN head node with `ray start` (its own temp dir, ports, auth
token) next to the local Ray that other tests in this pytest process start with `ray.init()`,
submits `python jobs/embed_videos.py ...` with the Jobs CLI exactly as the README tells
users to, and reads the tables back with plain pyarrow.

Isolation from the session's Ray (and from other people's Ray on the same machine):
- every port is chosen here (GCS, dashboard, dashboard agent, runtime env agent, node and
  object managers, metrics, Ray client server, and a worker port range outside the default
  10002-19999 that `ray.init()` uses);
- `--temp-dir` is a short private directory: `ray start` writes its `ray_current_cluster`
  address file there, not in /tmp/ray, so a later bare `ray.init()` does not attach to this
  cluster; RAY_ADDRESS is passed to no one and never set in this process's environment;
- teardown never runs `ray stop` (that kills every Ray on the machine, the session's too):
  it terminates exactly the processes of this cluster, found by their command lines (temp
  dir / GCS port) plus all their descendants, and checks they are gone.

Token authentication in Ray 2.60 (read from the installed package:
ray/_private/authentication/authentication_token_setup.py, ray/_private/worker.py,
ray/scripts/scripts.py, ray/_private/authentication/http_token_authentication.py):
- the mode comes only from the env var RAY_AUTH_MODE ("token" or "disabled"; setting it in
  _system_config is an error);
- `ray start --head` with RAY_AUTH_MODE unset turns token auth on when a token can be found
  (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) and warns
  "Token authentication is enabled for this Ray cluster"; this machine has ~/.ray/auth_token;
- a bare `ray.init()` that starts a new local cluster turns it on ALWAYS when RAY_AUTH_MODE
  is unset: it sets os.environ["RAY_AUTH_MODE"] = "token" in the calling process and writes
  ~/.ray/auth_token if missing (so after the session fixture ran, this pytest process has
  RAY_AUTH_MODE=token in its environment);
- `ray.init(address=...)` with an explicit address (RAY_ADDRESS, as a job driver gets) and the
  Jobs CLI/SDK never auto-enable it: they send/attach a token only when RAY_AUTH_MODE=token
  is in their own environment; the dashboard answers 401 without a token, 403 with a wrong one;
- processes the cluster starts (raylet, workers, the job supervisor and the job's driver)
  inherit the environment of `ray start`, so RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH reach the
  driver without a runtime_env.
This test therefore brings its own settings: RAY_AUTH_MODE=token with a fresh token in its
temp dir (RAY_AUTH_TOKEN_PATH; RAY_AUTH_TOKEN removed because it would win), for `ray start`
and `ray job submit` alike, and checks that the dashboard refuses requests without it.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, SHARED_MEDIA

AUDIO_ONLY = os.path.join(SHARED_MEDIA, "nasa_13013.mp4.audio.mp3")
JOB_TIMEOUT_S = 240
# The dashboard's HTTP body limit (ray_constants.DASHBOARD_CLIENT_MAX_SIZE) caps a
# working_dir uploaded by `ray job submit`.
WORKING_DIR_LIMIT = 100 * 2**20

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


# ---------------------------------------------------------------------------------------
# ports and processes


def _free_port() -> int:
    # Bound on all interfaces: Ray listens on the node IP, not only on 127.0.0.1.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(_free_port())
    return sorted(ports, key=lambda _: random.random())


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _worker_port_range(size: int = 100) -> tuple[int, int]:
    """A block of free ports below the ephemeral range and outside Ray's default 10002-19999."""
    rng = random.Random()
    for _ in range(50):
        start = rng.randrange(20000, 32000 - size)
        if all(_port_free(p) for p in range(start, start + size)):
            return start, start + size - 1
    pytest.skip("no free block of worker ports found in 20000-32000")


def _ray_cli() -> list[str]:
    """The `ray` of the interpreter running the tests (the venv's), never another one on PATH."""
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "ray.scripts.scripts"]


def _has_ray_client() -> bool:
    try:
        from ray._private.utils import get_ray_client_dependency_error
    except ImportError:
        return True
    return get_ray_client_dependency_error() is None


@dataclass
class Cluster:
    temp_dir: str
    env: dict[str, str]
    token: str
    gcs_port: int
    dashboard_url: str
    started: list = field(default_factory=list)  # psutil.Process seen while running
    starter: subprocess.Popen | None = None  # `ray start`, running in the background
    start_log: str = ""

    def wait_ready(self, timeout: float = 120) -> None:
        """Wait for `ray start` to finish and the dashboard (Jobs API) to answer."""
        if self.starter is not None:
            try:
                code = self.starter.wait(timeout=timeout)
            finally:
                self.remember()
            self.starter = None
            if code != 0:
                with open(self.start_log, errors="replace") as f:
                    raise AssertionError(f"ray start exited {code}:\n{f.read()}")
            _wait_for_dashboard(self, timeout=60)

    def processes(self):
        """This cluster's processes: command line names our temp dir or GCS port, plus descendants."""
        import psutil

        port = re.compile(rf":{self.gcs_port}(?!\d)")
        me = os.getpid()
        roots = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.info["pid"] == me:
                continue
            cmdline = " ".join(proc.info["cmdline"] or ())
            if self.temp_dir in cmdline or port.search(cmdline):
                roots.append(proc)
        found = {p.pid: p for p in roots}
        for proc in roots:
            try:
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
        found.pop(me, None)
        return list(found.values())

    def remember(self) -> None:
        import psutil

        known = set()
        for p in self.started:
            try:
                known.add((p.pid, p.create_time()))
            except psutil.Error:
                pass
        for proc in self.processes():
            try:
                if (proc.pid, proc.create_time()) not in known:
                    self.started.append(proc)
            except psutil.Error:
                pass


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120, check: bool = True,
         cwd: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout}\n"
                             f"--- stderr\n{result.stderr}")
    return result


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _terminate(procs, grace: float) -> list:
    """SIGTERM, wait up to `grace` seconds, SIGKILL what is left; return what still runs."""
    import psutil

    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [p for p in alive if _alive(p)]


def _stop(cluster: Cluster) -> None:
    """Terminate exactly this cluster's processes and check they are gone.

    The order of `ray stop` (ray/scripts/scripts.py): raylet first (its workers and agents
    follow it), then everything else, GCS last; each SIGTERM then SIGKILL after a grace period.
    """
    cluster.remember()
    procs = [p for p in cluster.started if _alive(p) and p.pid != os.getpid()]

    def name(p) -> str:
        try:
            return p.name()
        except Exception:
            return ""

    raylets = [p for p in procs if name(p) == "raylet"]
    gcs = [p for p in procs if name(p) == "gcs_server"]
    others = [p for p in procs if p not in raylets and p not in gcs]
    survivors = _terminate(raylets, 5) + _terminate(others, 5) + _terminate(gcs, 5)
    # Anything that started while we were stopping (a worker the raylet was starting).
    late = [p for p in cluster.processes() if _alive(p)]
    survivors += _terminate(late, 2)
    assert not survivors, f"processes of the test cluster survived teardown: {[(p.pid, name(p)) for p in survivors]}"
    assert not [p for p in cluster.processes() if _alive(p)], "the test cluster still has processes"


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("psutil")
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing is not None:
        # Not a skip: `ray job submit` is a supported way to run the job, and it needs the
        # dashboard (the Jobs API server), which only ray[default] installs.
        pytest.fail(f"ray[default] is not installed ({missing}); `ray job submit` needs the dashboard. "
                    "The project must depend on ray[data,default].")
    # Short: Ray puts unix sockets under it and a socket path is limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="vmr-", dir="/tmp")
    token = secrets.token_hex(32)
    token_path = os.path.join(temp_dir, "auth_token")
    with open(token_path, "w") as f:
        f.write(token)
    os.chmod(token_path, 0o600)

    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_JOB_HEADERS"):
        env.pop(name, None)
    # Nodes with no S3 credentials of their own (no instance profile either): a job gets only
    # what its runtime_env or --storage-options give it.
    for name in [n for n in env if n.startswith("AWS_")]:
        env.pop(name)
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": token_path,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_DEDUP_LOGS": "0",
        "TOKENIZERS_PARALLELISM": "false",
        # `python` in the job's entrypoint is this interpreter (the venv), as for a user who
        # activated the venv before `ray start`; the cluster's workers run sys.executable.
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),
    })

    (gcs_port, dashboard_port, client_port, node_manager_port, object_manager_port, runtime_env_port,
     agent_listen_port, agent_grpc_port, metrics_port) = _free_ports(9)
    min_worker, max_worker = _worker_port_range()
    start = _ray_cli() + [
        "start", "--head",
        f"--port={gcs_port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--node-manager-port={node_manager_port}", f"--object-manager-port={object_manager_port}",
        f"--runtime-env-agent-port={runtime_env_port}",
        f"--dashboard-agent-listen-port={agent_listen_port}", f"--dashboard-agent-grpc-port={agent_grpc_port}",
        f"--metrics-export-port={metrics_port}",
        f"--min-worker-port={min_worker}", f"--max-worker-port={max_worker}",
        "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={256 * 2**20}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats", "--log-style=record", "--log-color=false",
    ]
    if _has_ray_client():
        # With ray[client] installed `ray start --head` would take the fixed port 10001; without
        # it, naming a port is an error (and no client server starts).
        start.append(f"--ray-client-server-port={client_port}")
    cluster = Cluster(temp_dir=temp_dir, env=env, token=token, gcs_port=gcs_port,
                      dashboard_url=f"http://127.0.0.1:{dashboard_port}")
    cluster.start_log = os.path.join(temp_dir, "ray_start.log")
    try:
        # In the background: the test builds its inputs (torch import, checkpoint, videos)
        # while the head starts, and calls cluster.wait_ready() before it submits.
        with open(cluster.start_log, "w") as log:
            cluster.starter = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, cwd=temp_dir)
        yield cluster
    finally:
        try:
            if cluster.starter is not None:
                try:
                    cluster.starter.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    cluster.starter.kill()
                    cluster.starter.wait()
            _stop(cluster)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _http(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_for_dashboard(cluster: Cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = _http(cluster.dashboard_url + "/api/jobs/", cluster.token)
            if last == 200:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"the dashboard at {cluster.dashboard_url} did not answer in {timeout}s (last: {last})")


# ---------------------------------------------------------------------------------------
# inputs


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    from vmae_ray.synthetic import make_tiny_checkpoint

    work = tmp_path_factory.mktemp("job_submit")
    ckpt = make_tiny_checkpoint(str(work / "ckpt"), classifier=True, num_frames=8, image_size=32,
                                patch_size=16, num_labels=5)
    corpus = work / "corpus"
    corpus.mkdir()
    try:
        from vmae_ray.synthetic import make_video
    except ImportError:
        make_video = None
    videos: list[str] = []
    if make_video is not None:
        for i in range(2):
            videos.append(make_video(str(corpus / f"synthetic_{i}.mp4"), codec="h264", width=96, height=64,
                                     fps=30, num_frames=20, gop_size=10, seed=i))
    elif os.path.isdir(SHARED_MEDIA):
        for name in ("h264_10bits.mp4", "h265_video.mp4"):
            if os.path.exists(os.path.join(SHARED_MEDIA, name)):
                videos.append(shutil.copy(os.path.join(SHARED_MEDIA, name), corpus / name))
    if not videos:
        pytest.skip("no test videos: vmae_ray.synthetic is missing and so is the shared media folder")
    audio_only = None
    if os.path.exists(AUDIO_ONLY):
        audio_only = shutil.copy(AUDIO_ONLY, corpus / os.path.basename(AUDIO_ONLY))
    return {"ckpt": ckpt, "corpus": str(corpus), "videos": [str(v) for v in videos],
            "audio_only": str(audio_only) if audio_only else None, "out": str(work / "out")}


# ---------------------------------------------------------------------------------------
# the test


def _read(output: str, table: str) -> pa.Table | None:
    folder = os.path.join(output, table)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".parquet")) if os.path.isdir(folder) else []
    return pa.concat_tables([pq.read_table(os.path.join(folder, f)) for f in files]) if files else None


def _rows(table: pa.Table | None) -> list[dict]:
    return table.select([c for c in ("video_id", "uri", "stage", "error_type", "message")
                         if c in table.column_names]).to_pylist() if table is not None else []


def _working_dir_package(cluster: Cluster) -> str | None:
    """The directory the cluster unpacked our working_dir into (session_*/runtime_resources/...)."""
    for dirpath, dirnames, _ in os.walk(cluster.temp_dir):
        if os.path.basename(dirpath) == "working_dir_files":
            pkgs = [d for d in dirnames if d.startswith("_ray_pkg_")]
            if pkgs:
                return os.path.join(dirpath, pkgs[0])
        if dirpath.count(os.sep) - cluster.temp_dir.count(os.sep) > 4:
            dirnames[:] = []
    return None


def test_ray_job_submit_end_to_end(ray_cluster, job_inputs):
    cluster, inputs = ray_cluster, job_inputs
    cluster.wait_ready()
    started = time.monotonic()

    # The cluster really runs with token auth, and with OUR token (not ~/.ray/auth_token).
    assert _http(cluster.dashboard_url + "/api/jobs/", None) == 401
    assert _http(cluster.dashboard_url + "/api/jobs/", secrets.token_hex(32)) == 403

    submission_id = f"vmae-ray-test-{secrets.token_hex(4)}"
    extensions = "mp4,mp3" if inputs["audio_only"] else "mp4"
    submit = _ray_cli() + [
        "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ROOT,
        "--submission-id", submission_id, "--no-wait", "--log-style=record", "--log-color=false",
        "--", "python", "jobs/embed_videos.py",
        "--input", inputs["corpus"], "--output", inputs["out"], "--model", inputs["ckpt"],
        "--extensions", extensions, "--batch-size", "4", "--progress-seconds", "5",
    ]
    # cwd elsewhere: nothing may depend on being started from the checkout.
    submitted = _run(submit, cluster.env, timeout=120, cwd=cluster.temp_dir)
    assert submission_id in submitted.stdout + submitted.stderr

    from ray.job_submission import JobStatus, JobSubmissionClient

    # The SDK attaches a token only when RAY_AUTH_MODE=token in THIS process; pass it explicitly
    # so the result does not depend on what other tests did to os.environ.
    client = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(submission_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            logs = client.get_job_logs(submission_id)
            client.stop_job(submission_id)
            pytest.fail(f"job {submission_id} still {status} after {JOB_TIMEOUT_S}s; logs:\n{logs}")
        time.sleep(1.0)
        status = client.get_job_status(submission_id)
    cluster.remember()
    logs = client.get_job_logs(submission_id)
    info = client.get_job_info(submission_id)
    job_seconds = time.monotonic() - started
    print(f"\njob {submission_id}: {status} in {job_seconds:.1f}s (submit to end)")
    if status != JobStatus.SUCCEEDED:
        pytest.fail(f"job {submission_id} ended {status}: {info.message}\n--- ray job logs\n{logs}")

    assert "committed to" in logs, logs

    # The working_dir the cluster unpacked: the repository without the ignored .venv/.
    package = _working_dir_package(cluster)
    assert package is not None, "no unpacked working_dir found under the cluster's temp dir"
    assert os.path.isfile(os.path.join(package, "jobs", "embed_videos.py"))
    assert os.path.isfile(os.path.join(package, "vmae_ray", "pipeline.py"))
    assert not os.path.exists(os.path.join(package, ".venv")), ".venv was uploaded: .gitignore not honoured"
    uploaded = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(package) for f in fs)
    assert uploaded < WORKING_DIR_LIMIT / 10, f"working_dir is {uploaded / 2**20:.1f} MiB unpacked"

    # Tables, read with plain pyarrow as a consumer would.
    out = inputs["out"]
    expected = {os.path.abspath(p) for p in inputs["videos"]}
    if inputs["audio_only"]:
        expected.add(os.path.abspath(inputs["audio_only"]))
    videos, errors = _read(out, "videos"), _read(out, "errors")
    video_rows, error_rows = _rows(videos), _rows(errors)
    video_uris = [os.path.abspath(r["uri"].removeprefix("file://")) for r in video_rows]
    error_uris = [os.path.abspath(r["uri"].removeprefix("file://")) for r in error_rows]
    assert len(video_uris) == len(set(video_uris)) and len(error_uris) == len(set(error_uris))
    assert not set(video_uris) & set(error_uris), "an input is in both videos/ and errors/"
    assert set(video_uris) | set(error_uris) == expected, (video_rows, error_rows)
    for path in inputs["videos"]:
        assert os.path.abspath(path) in video_uris, f"{path} failed: {error_rows}"
    if inputs["audio_only"]:
        (audio_row,) = [r for r in error_rows if r["uri"].endswith(os.path.basename(inputs["audio_only"]))]
        assert audio_row["error_type"] == "no_video_stream", audio_row
    clips = _read(out, "clips")
    assert clips is not None and clips.num_rows >= len(inputs["videos"])
    assert pa.types.is_fixed_size_list(clips.schema.field("embedding").type)

    with open(os.path.join(out, "_SUCCESS")) as f:
        manifest = json.load(f)
    counts = manifest["counts"]
    assert counts["inputs_listed"] == len(expected)
    assert counts["videos_ok"] == len(inputs["videos"]) == (videos.num_rows if videos is not None else 0)
    assert counts["videos_failed"] == len(expected) - len(inputs["videos"])
    assert counts["videos_failed"] == (errors.num_rows if errors is not None else 0)
    assert counts["clips"] == clips.num_rows
    if inputs["audio_only"]:
        assert counts["errors_by_type"].get("no_video_stream") == 1


# ---------------------------------------------------------------------------------------
# secrets stay out of commits and out of the uploaded working_dir

SECRET_FILES = ["storage.json", "jobs/storage.json", "storage-options.json", "prod.secret", "s3.secrets", ".env",
                ".env.local", "credentials", "conf/credentials.json", "me_credentials.csv", "rootkey_accessKeys.csv",
                ".aws/credentials", "deploy.pem", "auth_token"]
CODE_FILES = ["vmae_ray/storage.py", "jobs/embed_videos.py", "tests/s3_server.py", "README.md", "cluster.yaml"]


def test_secret_files_are_neither_committed_nor_uploaded(tmp_path):
    """git (for .gitignore) and Ray's own working_dir packaging (what `ray job submit
    --working-dir .` uploads), with and without .gitignore honoured: secret-looking files are
    left out, the code is not."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import _zip_files

    ignored = _run(["git", "check-ignore", "--no-index", *SECRET_FILES, *CODE_FILES], dict(os.environ),
                   check=False, cwd=ROOT).stdout.split()
    assert sorted(ignored) == sorted(SECRET_FILES)
    tree = tmp_path / "checkout"
    for name in (".gitignore", ".rayignore"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tree / name)
    for name in SECRET_FILES + CODE_FILES:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    for include_gitignore in (True, False):  # False: RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1
        package = tmp_path / f"pkg-{include_gitignore}.zip"
        _zip_files(str(tree), [], str(package), include_gitignore=include_gitignore)
        uploaded = {n for n in ZipFile(package).namelist() if not n.endswith("/")}
        assert not uploaded & set(SECRET_FILES), (include_gitignore, sorted(uploaded & set(SECRET_FILES)))
        assert set(CODE_FILES) <= uploaded


# ---------------------------------------------------------------------------------------
# credentials of a submitted job


def _submit_and_wait(cluster: Cluster, entrypoint: list[str], env: dict[str, str], runtime_env: dict) -> tuple[str, str]:
    """Submit ``entrypoint`` with the Jobs CLI from ``env`` (the submitting shell); (status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    submission_id = f"vmae-ray-test-{secrets.token_hex(4)}"
    _run(_ray_cli() + ["job", "submit", "--address", cluster.dashboard_url, "--working-dir", ROOT,
                       "--submission-id", submission_id, "--no-wait", "--runtime-env-json", json.dumps(runtime_env),
                       "--", *entrypoint], env, timeout=120, cwd=cluster.temp_dir)
    client = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {cluster.token}"})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(submission_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                   JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            pytest.fail(f"job {submission_id} still {status} after {JOB_TIMEOUT_S}s")
        time.sleep(0.5)
    cluster.remember()
    return str(status), client.get_job_logs(submission_id)


def test_credentials_reach_a_submitted_job_only_the_documented_ways(ray_cluster, s3_server, s3_bucket):
    """AWS_* exported in the submitting shell do not reach the job, and its refusal says what it
    saw and what to do; the same keys as runtime_env variables do reach it."""
    import numpy as np

    from vmae_ray.storage import StorageOptions
    from vmae_ray.writing import write_committed

    cluster = ray_cluster
    vectors = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 4)
    rows = {"video_id": ["v0", "v1", "v2", "v3"], "uri": [f"/c/v{i}.mp4" for i in range(4)], "embedding": emb}
    write_committed(f"s3://{s3_bucket}/tables", StorageOptions(s3_server.storage_options),
                    {"videos": pa.table(rows)}, {"model": {}})
    entrypoint = ["python", "-m", "vmae_ray.cli", "search", "--tables", f"s3://{s3_bucket}/tables", "--query", "v0"]
    # Not credentials: where the server is, on every process of the job.
    endpoint = {"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_DEFAULT_REGION": s3_server.region,
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    keys = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    cluster.wait_ready()

    shell = {**cluster.env, **keys}  # exported where `ray job submit` runs
    status, logs = _submit_and_wait(cluster, entrypoint, shell, {"env_vars": endpoint})
    assert status == "FAILED", logs
    assert f"--tables: s3://{s3_bucket}/tables: access denied or no credentials (NoCredentialsError" in logs, logs
    assert ", a `ray job submit` job): AWS_ACCESS_KEY_ID unset, AWS_SECRET_ACCESS_KEY unset" in logs, logs
    assert "botocore finds no credentials" in logs
    assert "the AWS_* variables of the shell that submitted it do not reach it" in logs
    assert s3_server.secret_key not in logs

    status, logs = _submit_and_wait(cluster, entrypoint, cluster.env, {"env_vars": {**endpoint, **keys}})
    assert status == "SUCCEEDED", logs
    assert re.search(r"^\s+1\s+0\.707107\s+v1\s+/c/v1\.mp4$", logs, re.M), logs  # cos 45 degrees
