"""The cluster files are known to parse: ray_cluster.yaml by Ray's own cluster-launcher validation (the
JSON schema Ray ships, after Ray fills in its provider defaults, as `ray up` does; no cloud call), and the
KubeRay RayJob example against a schema of the RayJob fields it uses, written here from KubeRay's
documented API (its generated CRD reference, v1.7.0; KubeRay's CRD is not vendored: third-party code stays
out of the repository, and no network is reached to fetch it), plus its entrypoint parsed and its config
validated by jobs.run itself, every path that config uses mounted from the shared claim in every Ray pod,
that claim ReadWriteMany and filled by models.yaml, and the image's Dockerfile consistent with both."""

import copy
import functools
import re
import shlex
from importlib import metadata

import jsonschema
import pytest
import yaml

from jobs.run import load_config, parse_args
from schemas.job import LOCAL_PATH_KEYS
from tests.helpers import REPO

RAY_CLUSTER = REPO / "ray_cluster.yaml"
K8S = REPO / "jobs" / "k8s"
RAYJOB, MODELS, DOCKERFILE = K8S / "rayjob.yaml", K8S / "models.yaml", K8S / "Dockerfile"


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
_MOUNT = {"type": "object", "required": ["name", "mountPath"], "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "mountPath": {"type": "string"}, "readOnly": {"type": "boolean"}}}  # fmt: skip
_VOLUME = {
    "type": "object",
    "required": ["name"],
    "minProperties": 2,  # a name and its source
    "properties": {
        "name": {"type": "string"},
        "persistentVolumeClaim": {"type": "object", "required": ["claimName"]},
        "emptyDir": {"type": "object", "properties": {"medium": {"enum": ["", "Memory"]}}},
    },
}
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
                    "items": {
                        "type": "object",
                        "required": ["name", "image"],
                        "properties": {"volumeMounts": {"type": "array", "items": _MOUNT}},
                    },
                },
                "volumes": {"type": "array", "items": _VOLUME},
            },
        }
    },
}
# KubeRay ray.io/v1 RayJob, the fields this example uses (names and types from KubeRay's API reference,
# v1.7.0; unknown fields refused so a misspelt one fails here rather than being dropped by the API server).
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
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "suspend": {"type": "boolean"},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "authOptions": {  # KubeRay 1.5.1+
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "mode": {"enum": ["disabled", "token"]},
                                "secretName": {"type": "string"},
                            },
                        },
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


def _image_dir() -> str:
    """Where the Dockerfile puts the repository (its WORKDIR)."""
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M)
    return workdir


def _rayjob_config(job: dict, monkeypatch):
    """The config the RayJob's entrypoint runs, loaded by jobs.run from this checkout where the image
    holds the repository."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.run"]
    argv = [a.replace(_image_dir(), str(REPO)) for a in argv]
    monkeypatch.chdir(REPO)
    return load_config(parse_args(argv[3:]))


def _ray_pods(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return pods


def test_rayjob_example_fits_the_rayjob_fields_and_runs_a_valid_job(monkeypatch):
    job = yaml.safe_load(RAYJOB.read_text())
    jsonschema.validate(job, RAYJOB_SCHEMA)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == metadata.version("ray")  # the image's Ray is the project's pinned one
    assert cluster["authOptions"]["mode"] == "token"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # one engine per GPU worker
    # the entrypoint is a jobs.run command line whose config, with its --set overrides, validates
    config = _rayjob_config(job, monkeypatch)
    assert config.task.preset == "caption" and config.output.mode == "resume"
    assert config.resources.generate.concurrency == (1, 4)
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = True  # the check can fail
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.validate(typo, RAYJOB_SCHEMA)


def _unreached(job: dict, config, claims: set[str]) -> list[str]:
    """Each local path the config uses that some Ray pod does not have on a mount of one of ``claims``
    (writable), and each pod without the object store's credentials when the config reads or writes
    s3://. Every pod needs them all: the driver (head) checks model.path and the input, the CPU actors
    (any pod) read the tokenizer, the GPU actors load the checkpoint and write the compile cache, Ray Data
    reads and writes anywhere."""
    values = {key: functools.reduce(getattr, key.split("."), config) for key in LOCAL_PATH_KEYS}
    local = {key: v for key, v in values.items() if isinstance(v, str) and "://" not in v}
    remote = any(isinstance(v, str) and v.startswith("s3://") for v in values.values())
    assert "model.path" in local and "engine.compile_cache_dir" in local and remote  # what this example uses
    missing = []
    for pod_name, pod in _ray_pods(job).items():
        volumes = {
            v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])
        }
        (container,) = pod["containers"]
        mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", [])
                  if volumes.get(m["name"]) in claims and not m.get("readOnly")]  # fmt: skip
        missing += [f"{pod_name}: {key} {path}" for key, path in local.items()
                    if not any((path + "/").startswith(mount) for mount in mounts)]  # fmt: skip
        if remote and not any("secretRef" in source for source in container.get("envFrom", [])):
            missing.append(f"{pod_name}: s3 credentials")
    return missing


def test_every_path_the_rayjob_uses_is_on_the_shared_claim_in_every_ray_pod(monkeypatch):
    job = yaml.safe_load(RAYJOB.read_text())
    config = _rayjob_config(job, monkeypatch)
    claim, download = yaml.safe_load_all(MODELS.read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and download["kind"] == "Job"
    # head and workers mount it at once from several nodes, the workers write the compile cache to it
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _unreached(job, config, {claim["metadata"]["name"]}) == []
    workers_only = copy.deepcopy(job)  # the check can fail: the example mounted /models on the workers only
    head = workers_only["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["volumeMounts"] = []
    unreached = _unreached(workers_only, config, {claim["metadata"]["name"]})
    assert unreached[0] == "head: model.path /models/Phi-4-multimodal-instruct"
    # models.yaml puts the checkpoint where model.path says, on that claim
    pod = download["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"]
    assert argv[:3] == ["hf", "download", "microsoft/Phi-4-multimodal-instruct"]
    assert argv[argv.index("--local-dir") + 1] == config.model.path
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/models"}]


def test_the_dockerfile_builds_the_image_the_manifests_run():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)$", text, re.M)
    assert base.startswith(f"rayproject/ray:{metadata.version('ray')}-") and base.endswith("-gpu")
    assert "pip install --no-cache-dir '.[gpu]'" in text
    copied = set(re.findall(r"^COPY --chown=ray:users (\w+) \1$", text, re.M))
    (include,) = re.findall(r"^include = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M)
    packages = set(re.findall(r'"(\w+)\*"', include))  # the packages pyproject installs
    assert copied == packages
    (tag,) = set(re.findall(r"-t (\S+) \.", text))
    job = yaml.safe_load(RAYJOB.read_text())
    images = {c["image"] for pod in _ray_pods(job).values() for c in pod["containers"]}
    images |= {
        c["image"]
        for doc in yaml.safe_load_all(MODELS.read_text())
        if doc["kind"] == "Job"
        for c in doc["spec"]["template"]["spec"]["containers"]
    }
    assert images == {tag}
    assert job["spec"]["entrypoint"].split("--config ")[1].startswith(_image_dir() + "/jobs/configs/")
