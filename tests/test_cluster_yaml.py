"""cluster.yaml is a config `ray up` accepts, checked offline.

Validated the way the launcher does before it talks to AWS: against the autoscaler's own
JSON schema shipped in the installed Ray, then through `prepare_config` +
`validate_config` (the same two calls `ray up` makes first; neither contacts AWS). The
AWS-specific `node_config` blocks, which Ray's schema leaves open, are checked against
botocore's offline model of EC2 RunInstances. Nothing here starts Ray.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_YAML = os.path.join(ROOT, "cluster.yaml")

# Instance families with NVIDIA GPUs (g4dn, g5, g6, g6e, gr6, p3, p4d, p5, p6, ...).
GPU_INSTANCE_FAMILY = re.compile(r"^(g\d+[a-z]*|gr\d+|p\d+[a-z]*)\.", re.IGNORECASE)
ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


@pytest.fixture(scope="module")
def config_text() -> str:
    with open(CLUSTER_YAML, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def config(config_text: str) -> dict:
    data = yaml.safe_load(config_text)
    assert isinstance(data, dict), "cluster.yaml must be a mapping"
    return data


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {name: t for name, t in config["available_node_types"].items() if name != head}


def _is_gpu_type(node_type: dict) -> bool:
    gpus = node_type.get("resources", {}).get("GPU", 0)
    instance_type = node_type["node_config"].get("InstanceType", "")
    return gpus > 0 or bool(GPU_INSTANCE_FAMILY.match(instance_type))


def test_validates_against_ray_autoscaler_schema(config, ray_schema):
    import jsonschema

    jsonschema.validate(config, ray_schema)


def test_passes_ray_validate_config_as_ray_up_does(config):
    # `ray up` runs prepare_config (merge the AWS defaults.yaml, fill per-type worker
    # bounds) and then validate_config; both are local. The steps after them
    # (resource autodetection, bootstrap_aws) call AWS APIs and are not run here.
    from ray.autoscaler._private.providers import _NODE_PROVIDERS
    from ray.autoscaler._private.util import check_legacy_fields, prepare_config, validate_config

    assert config["provider"]["type"] in _NODE_PROVIDERS
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    check_legacy_fields(prepared)  # the first check bootstrap_aws makes
    # Our commands must replace the AWS defaults (a conda env and a Ray nightly wheel).
    assert prepared["setup_commands"] == config["setup_commands"]
    assert not any("ray-wheels" in c or "nightly" in c for c in prepared["worker_setup_commands"])


def test_cluster_name_provider_and_user(config):
    assert config["cluster_name"] == "vmae-ray"
    provider = config["provider"]
    assert provider["type"] == "aws"
    assert provider["region"] == "us-west-2"
    assert provider["cache_stopped_nodes"] is False
    assert config["auth"]["ssh_user"] == "ubuntu"


def test_has_a_gpu_worker_type_and_a_cpu_only_worker_type(config):
    workers = _worker_types(config)
    gpu = [n for n, t in workers.items() if _is_gpu_type(t)]
    cpu_only = [n for n, t in workers.items() if not _is_gpu_type(t) and t.get("resources", {}).get("CPU", 1) > 0]
    assert gpu, f"no worker type with GPUs among {sorted(workers)}"
    assert cpu_only, f"no CPU-only worker type among {sorted(workers)}"
    for name in gpu:
        # A GPU type that states its resources must state GPUs (the autoscaler plans with them).
        resources = workers[name].get("resources")
        if resources:
            assert resources.get("GPU", 0) >= 1, f"{name}: GPU instance type without a GPU resource"


def test_head_takes_no_work(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert not head["resources"].get("GPU")


def test_worker_bounds_are_consistent(config):
    total_max = config["max_workers"]
    assert total_max >= 0
    sum_min = 0
    for name, node_type in _worker_types(config).items():
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers", total_max)
        assert 0 <= lo <= hi, f"{name}: min_workers {lo} > max_workers {hi}"
        assert hi <= total_max, f"{name}: max_workers {hi} above the global max_workers {total_max}"
        sum_min += lo
    assert sum_min <= total_max
    # The global bound should not silently cap the per-type bounds.
    assert total_max >= sum(t.get("max_workers", 0) for t in _worker_types(config).values())


def test_every_node_has_an_instance_profile_and_no_keys(config, config_text):
    # Ray attaches its default role to the head only; workers read and write S3 too.
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn", "").startswith("arn:aws:iam::") or profile.get("Name"), (
            f"{name}: no IamInstanceProfile; S3 access must come from an instance role"
        )

    assert not ACCESS_KEY_ID.search(config_text), "cluster.yaml contains something shaped like an AWS access key id"
    lowered = config_text.lower()
    for needle in ("aws_secret_access_key", "aws_access_key_id", "aws_session_token", "secret_key", "access_key"):
        assert needle not in lowered, f"cluster.yaml mentions {needle}"

    def strings(value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield str(k)
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    for s in strings(config):
        assert not ACCESS_KEY_ID.search(s), f"access-key-like string in cluster.yaml: {s[:8]}..."
        # 40-character base64 runs are what secret access keys look like.
        assert not re.search(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])", s), (
            f"secret-key-like string in cluster.yaml: {s[:8]}..."
        )


def test_node_configs_are_valid_run_instances_parameters(config):
    # Ray passes node_config to EC2 RunInstances; its schema does not look inside.
    # botocore's bundled service model catches misspelt keys and wrong types offline.
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    model = botocore_session.get_session().get_service_model("ec2")
    shape = model.operation_model("RunInstances").input_shape
    for name, node_type in config["available_node_types"].items():
        params = dict(node_type["node_config"], MinCount=1, MaxCount=1)
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}.node_config: {report.generate_report()}"


def test_commands_install_the_package_and_start_ray(config):
    mounts = config["file_mounts"]
    assert mounts.get("/home/ubuntu/vmae-ray") == "."
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "-e /home/ubuntu/vmae-ray" in setup
    assert "download.pytorch.org/whl/cu" in setup, "GPU nodes need a CUDA build of torch"
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_every_file_and_section_it_cites_exists(config_text):
    """The comments name files (of this repository, or `ray/...` of the installed Ray) and a
    README section: each must exist (it once cited a docs/cluster.md that did not)."""
    import ray

    cited = set(re.findall(r"(?<![\w/.:-])((?:[\w-]+/)*[\w-]+\.(?:md|py|yaml|yml|json))\b", config_text))
    assert {"README.md", "tests/test_cluster_yaml.py", "ray/autoscaler/ray-schema.json"} <= cited
    for path in cited:
        base = os.path.dirname(os.path.dirname(ray.__file__)) if path.startswith("ray/") else ROOT
        assert os.path.isfile(os.path.join(base, path)), f"cluster.yaml cites {path}, which does not exist"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        headings = {line.lstrip("#").strip() for line in f if line.startswith("#")}
    sections = re.findall(r'README\.md, "([^"]+)"', " ".join(line.lstrip("# ") for line in config_text.splitlines()))
    assert sections and all(s in headings for s in sections), (sections, sorted(headings))
