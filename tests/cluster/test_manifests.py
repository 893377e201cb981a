"""The cluster configs in cluster/: valid for the tools that read them, and in step with the repo.

- ``cluster/aws-gpu.yaml`` against the JSON schema inside the ``ray`` package, then through
  the same default-filling and validation ``ray up`` runs before it touches AWS;
- the KubeRay manifests for the fields KubeRay requires (the CRD's non-optional fields and
  the ones autoscaling needs), their images and versions against ``pyproject.toml``;
- ``serveConfigV2`` against ``config/serve.yaml`` (``cluster/sync_kuberay.py --check``) and
  against Serve's own deploy-config schema;
- the ``ARCFACE_*`` variables the configs set, through ``engines.load_config``: they must
  name real keys, or the S3 engine cache silently stays local.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import dashboard_queries

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
SYNC = CLUSTER / "sync_kuberay.py"
GPU_ARCHITECTURES = {"A10G", "A100", "H100"}


def pins() -> dict[str, str]:
    """``name -> version`` of the exact pins in pyproject.toml (tomllib is 3.11+; we support 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', text))


RAY = pins()["ray"]
ORT_GPU = pins()["onnxruntime-gpu"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def engine_cache_from_env(env: dict[str, str]):
    """The TensorRT storage config a node with ``env`` would run with."""
    from engines import load_config

    return load_config(environ=env).tensorrt.storage


# -- cluster launcher ------------------------------------------------------------------------

def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_config_is_valid_for_ray_up():
    import jsonschema
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = load(LAUNCHER)
    jsonschema.validate(config, ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before AWS calls


@pytest.mark.parametrize("breakage", ["fractional GPU", "unknown key", "no node_config"])
def test_the_schema_check_catches_broken_launcher_configs(breakage):
    import jsonschema

    config = load(LAUNCHER)
    node = config["available_node_types"]["gpu_a10g"]
    if breakage == "fractional GPU":
        node["resources"]["GPU"] = 0.5
    elif breakage == "unknown key":
        node["min_replicas"] = 1
    else:
        del node["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


def test_launcher_gpu_types_image_setup_and_engine_cache():
    config = load(LAUNCHER)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU") and head["resources"].get("CPU") == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    archs = {key.split(":", 1)[1] for t in gpu_types.values() for key in t["resources"]
             if key.startswith("accelerator_type:")}
    assert archs == GPU_ARCHITECTURES
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]

    assert config["docker"]["image"] == f"rayproject/ray:{RAY}-py311-gpu"
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"pip install .*-e \"\$HOME/arcface-ray\[gpu\]\"", setup)
    assert f"onnxruntime-gpu=={ORT_GPU}" in setup
    assert config["file_mounts"]["~/arcface-ray"] == "."

    env = dict(opt.split(None, 1)[1].split("=", 1) for opt in config["docker"]["run_options"]
               if opt.startswith("--env "))
    storage = engine_cache_from_env(env)
    assert (storage.type, storage.bucket, storage.prefix) == ("s3", env["ARCFACE_TENSORRT__STORAGE__BUCKET"],
                                                             "arcface/engines")
    assert env["RAY_AUTH_MODE"] == "token"


# -- KubeRay ---------------------------------------------------------------------------------

def cluster_spec(manifest: dict) -> dict:
    """RayService nests its cluster under ``rayClusterConfig``, RayJob under ``rayClusterSpec``."""
    spec = manifest["spec"]
    key, other = {"RayService": ("rayClusterConfig", "rayClusterSpec"),
                  "RayJob": ("rayClusterSpec", "rayClusterConfig")}[manifest["kind"]]
    assert other not in spec, f"{manifest['kind']} has no {other}: KubeRay would ignore it"
    return spec[key]


def containers(template: dict) -> list[dict]:
    found = template["spec"]["containers"]
    assert found and all(c.get("name") and c.get("image") for c in found)
    return found


@pytest.mark.parametrize("path,kind", [(RAYSERVICE, "RayService"), (RAYJOB, "RayJob")])
def test_kuberay_manifest_has_what_kuberay_requires(path, kind):
    manifest = load(path)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)
    assert manifest["metadata"]["name"]
    cluster = cluster_spec(manifest)
    assert cluster["rayVersion"] == RAY
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map[string]string
    images = {c["image"] for c in containers(head["template"])}
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert all(isinstance(group[k], int) for k in ("minReplicas", "maxReplicas", "replicas"))
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        assert group["template"]["spec"]["restartPolicy"] == "Never"  # autoscaled pods
        for c in containers(group["template"]):
            images.add(c["image"])
            res = c["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
            storage = engine_cache_from_env({e["name"]: e["value"] for e in c["env"]})
            assert storage.type == "s3" and storage.bucket
    assert len(images) == 1
    repo, _, tag = images.pop().rpartition(":")
    assert repo.endswith("/arcface-ray") and f"ray{RAY}" in tag and tag.endswith("-py311-gpu")


def test_dockerfile_builds_on_the_pinned_ray_image():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY)}-py311-gpu$", text, re.M)
    assert f"onnxruntime-gpu=={ORT_GPU}" in text and '-e ".[gpu]"' in text


def test_rayjob_runs_the_episode_job_with_valid_arguments():
    from data_jobs.embed_episodes import build_parser, spec_from_args

    manifest = load(RAYJOB)
    spec = manifest["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "data_jobs.embed_episodes"]
    job = spec_from_args(build_parser().parse_args(argv[3:]))  # the job's own parser accepts it
    assert job.settings.actor_num_gpus == 1
    gpu_group = cluster_spec(manifest)["workerGroupSpecs"][0]
    assert job.settings.actors_max <= gpu_group["maxReplicas"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


# -- serveConfigV2 == config/serve.yaml ------------------------------------------------------

def leaves(tree, path=""):
    """Flatten to ``{path: value}``; list items are keyed by their ``name`` where they have one."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(leaves(value, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(tree, list) and all(isinstance(x, dict) and "name" in x for x in tree):
        out = {}
        for item in tree:
            out.update(leaves(item, f"{path}[{item['name']}]"))
        return out
    return {path: tree}


def test_rayservice_serves_the_application_of_config_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    manifest = load(RAYSERVICE)
    v2 = manifest["spec"]["serveConfigV2"]
    assert isinstance(v2, str)
    served = yaml.safe_load(v2)
    ServeDeploySchema.model_validate(served)
    assert yaml.safe_load((CLUSTER / "serve-gpu.yaml").read_text()) == served
    local = leaves(load(REPO / "config" / "serve.yaml"))
    gpu = leaves(served)
    dep = "applications[arcface].deployments[EmbeddingDeployment]"
    args = "applications[arcface].args"
    changed = {k for k in local.keys() | gpu.keys() if local.get(k) != gpu.get(k)}
    # the same application; a GPU cluster differs in exactly these settings: reachable from the
    # network, so auth is required (the token file every node mounts), and a GPU per replica
    assert changed == {f"{dep}.ray_actor_options.num_gpus", f"{dep}.autoscaling_config.max_replicas",
                       "http_options.host", f"{args}.require_auth", f"{args}.auth_token_file",
                       # sized for a GPU's speed: a tighter queue bound, more requests reaching it
                       f"{args}.max_queue_wait_s", f"{dep}.max_ongoing_requests"}
    assert gpu[f"{args}.max_queue_wait_s"] < local[f"{args}.max_queue_wait_s"]
    assert gpu["http_options.host"] == "0.0.0.0" and local["http_options.host"] == "127.0.0.1"
    assert gpu[f"{args}.require_auth"] is True and local[f"{args}.require_auth"] is False
    assert gpu[f"{dep}.ray_actor_options.num_gpus"] == 1
    gpu_group = cluster_spec(manifest)["workerGroupSpecs"][0]
    assert gpu[f"{dep}.autoscaling_config.max_replicas"] <= gpu_group["maxReplicas"]
    head = containers(cluster_spec(manifest)["headGroupSpec"]["template"])[0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert (ports["serve"], ports["grpc"]) == (served["http_options"]["port"], served["grpc_options"]["port"])
    # the token file the replicas read: a Secret mounted where auth_token_file points (~ of user ray)
    token_file = gpu[f"{args}.auth_token_file"]
    for template in (cluster_spec(manifest)["headGroupSpec"]["template"], gpu_group["template"]):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in containers(template):
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            mount = mounts["/home/ray/.arcface"]
            assert token_file == "~/.arcface/serve_token" and mount["readOnly"] is True
            assert volumes[mount["name"]]["secret"]["secretName"] == "arcface-serve-token"
    assert load(LAUNCHER)["file_mounts"]["~/.arcface/serve_token"] == "~/.arcface/serve_token"


def run_sync(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SYNC), *args], capture_output=True, text=True, timeout=120)


def test_sync_check_passes_on_the_committed_files():
    done = run_sync("--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_sync_check_catches_a_stale_rayservice_and_sync_repairs_it(tmp_path):
    serve = tmp_path / "serve.yaml"
    serve.write_text((REPO / "config" / "serve.yaml").read_text().replace("max_batch_size: 32",
                                                                          "max_batch_size: 48"))
    gpu, rayservice = tmp_path / "serve-gpu.yaml", tmp_path / "rayservice.yaml"
    gpu.write_text((CLUSTER / "serve-gpu.yaml").read_text())
    rayservice.write_text(RAYSERVICE.read_text())
    paths = ("--serve-config", str(serve), "--serve-gpu", str(gpu), "--rayservice", str(rayservice))
    stale = run_sync("--check", *paths)
    added = [ln for ln in stale.stdout.splitlines() if ln.startswith("+") and "max_batch_size: 48" in ln]
    assert stale.returncode == 1 and len(added) == 2, stale.stdout  # serve-gpu.yaml and the RayService
    assert run_sync(*paths).returncode == 0
    assert run_sync("--check", *paths).returncode == 0
    fixed = load(rayservice)
    assert yaml.safe_load(fixed["spec"]["serveConfigV2"])["applications"][0]["deployments"][0][
        "user_config"]["max_batch_size"] == 48
    before = load(RAYSERVICE)
    del before["spec"]["serveConfigV2"], fixed["spec"]["serveConfigV2"]
    assert fixed == before  # nothing else in the manifest moved


# -- monitoring: PodMonitor and Grafana dashboard ----------------------------------------------
PODMONITOR = CLUSTER / "kuberay" / "podmonitor.yaml"


def test_podmonitor_scrapes_the_metrics_port_of_every_ray_pod_of_the_service():
    monitor = load(PODMONITOR)
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    service = load(RAYSERVICE)
    spec = service["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    for pod in pods:
        ports = {p.get("name"): p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert ports.get(endpoint["port"]) == 8080, ports  # Ray's --metrics-export-port under KubeRay
    selector = monitor["spec"]["selector"]
    assert selector["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    (expr,) = selector["matchExpressions"]
    assert expr["values"] == [service["metadata"]["name"]]


def test_dashboard_is_grafana_json_on_a_prometheus_datasource():
    dash = json.loads((CLUSTER / "grafana" / "arcface-serve.json").read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs and all(e.count("(") == e.count(")") for e in exprs), panel["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("faces embedded per second", "faces per engine batch", "queue wait", "engine time",
                   "rejected", "replicas"):
        assert needed in titles, needed
    assert all(re.findall(r"\bray_[a-z0-9_]+", e) for e in dashboard_queries())
