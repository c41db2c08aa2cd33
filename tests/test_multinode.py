"""A Ray cluster of several nodes on this machine, one of which dies mid-run.

`ray.cluster_utils.Cluster` runs a head and two worker nodes (each its own raylet and object
store) in a helper process; the job's driver connects to it with RAY_ADDRESS, as on a real
cluster. Mid-run the helper removes a worker node without grace (its raylet and workers are
killed, its objects lost): Ray retries the lost tasks and restarts the actor elsewhere. The run
finishes (or a rerun does) with every input exactly once and the same results as an
undisturbed run. Token settings are our own: authentication off for this private cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT
from tests.test_robustness import CRASH_ARGS, assert_same_results, check_final, log_tail

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HELPER = textwrap.dedent("""
    import os, sys, time
    from ray.cluster_utils import Cluster

    control = sys.argv[1]
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "object_store_memory": 96 * 2**20, "include_dashboard": False})
    survivor = cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)
    victim = cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)
    cluster.wait_for_nodes()
    with open(control + ".address", "w") as f:
        f.write(cluster.address)
    while True:
        if os.path.exists(control + ".kill"):
            cluster.remove_node(victim, allow_graceful=False)
            open(control + ".killed", "w").close()
            os.remove(control + ".kill")
        if os.path.exists(control + ".stop"):
            cluster.shutdown()
            break
        time.sleep(0.05)
""")


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    control = str(work / "control")
    script = work / "cluster_helper.py"
    script.write_text(HELPER)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = open(work / "helper.log", "wb")
    proc = subprocess.Popen([sys.executable, str(script), control], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not os.path.exists(control + ".address"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the cluster did not start:\n{(work / 'helper.log').read_text()[-3000:]}")
        time.sleep(0.2)
    address = open(control + ".address").read().strip()
    yield {"address": address, "control": control, "env": env}
    open(control + ".stop", "w").close()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _driver(address: str, args: list, log: str, env: dict) -> subprocess.Popen:
    full = {**env, "RAY_ADDRESS": address}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "embed_videos.py"), *map(str, args)],
                                cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT)


def test_a_node_killed_mid_run_loses_nothing_and_counts_nothing_twice(three_nodes, baseline, crash_corpus,
                                                                     tiny_classifier, tmp_path):
    out = str(tmp_path / "out")
    args = ["--input", crash_corpus["dir"], "--output", out, "--model", tiny_classifier, *CRASH_ARGS,
            "--videos-per-task", "1"]  # many small decode tasks, spread over both worker nodes
    log = str(tmp_path / "driver.log")
    proc = _driver(three_nodes["address"], args, log, three_nodes["env"])
    control = three_nodes["control"]
    # Kill the node once the pipeline is under way: the first checkpoint commit was made.
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if "checkpoint: committed" in open(log, errors="replace").read():
            break
        time.sleep(0.1)
    open(control + ".kill", "w").close()
    while not os.path.exists(control + ".killed"):
        time.sleep(0.1)
    code = proc.wait(300)
    reran = code != 0
    if reran:  # the run failed: a rerun resumes from what it committed
        proc = _driver(three_nodes["address"], args, str(tmp_path / "rerun.log"), three_nodes["env"])
        assert proc.wait(300) == 0, log_tail(str(tmp_path / "rerun.log"))
    check_final(out, crash_corpus["ids"])
    assert_same_results(out, baseline)
    print(f"first driver exit {code}; rerun: {reran}\n{log_tail(log, 1500)}")
