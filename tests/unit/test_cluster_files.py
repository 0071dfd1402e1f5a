"""The cluster files are known to parse: ray_cluster.yaml by Ray's own cluster-launcher validation (the
JSON schema Ray ships, after Ray fills in its provider defaults, as `ray up` does; no cloud call), and the
KubeRay RayJob example against a schema of the RayJob fields it uses, written here from KubeRay's
documented API (KubeRay's CRD is not vendored: third-party code stays out of the repository, and no
network is reached to fetch it), plus its entrypoint parsed and its config validated by jobs.run itself."""

import copy
import shlex
from importlib import metadata

import jsonschema
import pytest
import yaml

from jobs.run import load_config, parse_args
from tests.helpers import REPO

RAY_CLUSTER = REPO / "ray_cluster.yaml"
RAYJOB = REPO / "jobs" / "k8s" / "rayjob.yaml"


def _ray_validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_yaml_passes_rays_own_validation():
    config = yaml.safe_load(RAY_CLUSTER.read_text())
    _ray_validate(config)
    typo = copy.deepcopy(config)
    typo["available_node_types"]["gpu_worker"]["min_worker"] = 1  # the check can fail
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _ray_validate(typo)


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name", "image"]},
                },
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            },
        }
    },
}
# KubeRay ray.io/v1 RayJob, the fields this example uses (names and types as KubeRay documents them;
# unknown fields refused so a misspelt one fails here rather than being dropped by the API server).
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "entrypoint": {"type": "string"},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "runtimeEnvYAML": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode"]},
                "suspend": {"type": "boolean"},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["template"],
                            "additionalProperties": False,
                            "properties": {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE},
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "template"],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "rayStartParams": _STR_MAP,
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_rayjob_example_fits_the_rayjob_fields_and_runs_a_valid_job(tmp_path, monkeypatch):
    job = yaml.safe_load(RAYJOB.read_text())
    jsonschema.validate(job, RAYJOB_SCHEMA)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == metadata.version("ray")  # the image's Ray is the project's pinned one
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # one engine per GPU worker
    # the entrypoint is a jobs.run command line whose config, with its --set overrides, validates
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.run"]
    monkeypatch.chdir(REPO)  # the image's working directory is the repository
    config = load_config(parse_args(argv[3:]))
    assert config.task.preset == "caption" and config.output.mode == "resume"
    assert config.resources.generate.concurrency == (1, 4)
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = True  # the check can fail
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.validate(typo, RAYJOB_SCHEMA)
