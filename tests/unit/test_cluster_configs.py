"""Static checks of the cluster configs under cluster/ and of .rayignore: Ray's own launcher-schema
validation, the shape of the KubeRay manifests, and that every version and image tag agrees with
cluster/versions.yaml and pyproject.toml. Files only: no Ray runtime, no Kubernetes, no network."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = [CLUSTER / "aws" / "cluster.yaml", CLUSTER / "gcp" / "cluster.yaml"]
KUBERAY_YAMLS = {CLUSTER / "kuberay" / "raycluster-gpu.yaml": "RayCluster",
                 CLUSTER / "kuberay" / "rayjob-sweep.yaml": "RayJob"}
MLFLOW_YAML = CLUSTER / "mlflow" / "mlflow.yaml"
SERVER_SH = CLUSTER / "mlflow" / "server.sh"
DOCKERFILE = CLUSTER / "images" / "Dockerfile.gpu"
VERSION_KEYS = {"ray", "python", "torch", "torchvision", "mlflow", "kuberay_operator", "image",
                "ray_base_image"}


@pytest.fixture(scope="module")
def versions() -> dict[str, str]:
    data = yaml.safe_load((CLUSTER / "versions.yaml").read_text())
    assert set(data) == VERSION_KEYS and all(isinstance(v, str) for v in data.values())
    return data


def _python_tag(python: str) -> str:
    """``"3.11"`` -> ``"py311"`` (the tag Ray's images use)."""
    return "py" + python.replace(".", "")


def _validate_launcher(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own check of a cluster-launcher config (what `ray up` runs before touching a cloud): defaults
    merged in, then the JSON schema. PRIVATE Ray API (ray.autoscaler._private.util, Ray 2.60): the one place
    to adapt when Ray moves it. Raises jsonschema.ValidationError on an unknown or misspelled key."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def _ray_uploads(root: Path) -> set[str]:
    """Files under ``root`` that `ray job submit --working-dir` would upload with only .rayignore applied
    (.gitignore off). PRIVATE Ray API (ray._private.runtime_env.packaging, Ray 2.60): Ray's own matcher, so
    the test sees Ray's reading of the patterns, not ours."""
    from ray._private.runtime_env.packaging import _dir_travel

    found: set[str] = set()
    _dir_travel(root, [], lambda p: found.add(p.relative_to(root).as_posix()) if p.is_file() else None,
                include_gitignore=False)
    return found


# ------------------------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.parent.name)
def test_launcher_config_passes_rays_validation(path):
    config = _validate_launcher(yaml.safe_load(path.read_text()))
    assert config["provider"]["type"] == path.parent.name


def test_launcher_validation_rejects_a_misspelled_key():
    config = yaml.safe_load(LAUNCHER_YAMLS[0].read_text())
    config["max_wokers"] = config.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        _validate_launcher(config)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.parent.name)
def test_launcher_shape(path, versions):
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    head_start = " ".join(config["head_start_ray_commands"])
    # the head runs no tasks or actors
    assert head["resources"].get("CPU") == 0 and "--num-cpus=0" in head_start
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers)
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers)
    docker = config["docker"]
    assert docker["image"].endswith("/" + versions["image"])
    assert any(opt.startswith("--shm-size=") for opt in docker["run_options"])
    # token authentication on every node, from a file synced by file_mounts; dashboard on loopback only
    assert "--dashboard-host=127.0.0.1" in head_start
    mounted = set(config["file_mounts"])
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+?);", start).group(1)
        assert token_path.replace("$HOME/", "~/") in mounted


# ---------------------------------------------------------------------------------------------------- KubeRay


def _ray_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("apiVersion") == "ray.io/v1"]


@pytest.mark.parametrize("path", list(KUBERAY_YAMLS), ids=lambda p: p.stem)
def test_kuberay_manifest(path, versions):
    docs = _ray_documents(path)
    assert [d["kind"] for d in docs] == [KUBERAY_YAMLS[path]]
    spec = docs[0]["spec"]
    cluster = spec["rayClusterSpec"] if docs[0]["kind"] == "RayJob" else spec
    assert cluster["rayVersion"] == versions["ray"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    for group in gpu_groups:
        pod = group["template"]["spec"]
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
        shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        for container in pod["containers"]:
            assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in container["volumeMounts"])
    for pod in [head["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]:
        for container in pod["containers"]:
            assert container["image"].endswith("/" + versions["image"])
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc.cluster.local:5000"
            assert env["PUREGEN_ROOT"]


def test_rayjob_runs_a_sweep_and_cleans_up():
    spec = _ray_documents(CLUSTER / "kuberay" / "rayjob-sweep.yaml")[0]["spec"]
    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[:2] == ["puregen-dist", "sweep"] and (REPO / entrypoint[2]).is_file()
    # a $VAR here would be expanded by the submitter pod's shell, which lacks the Ray containers' env
    assert "$" not in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "PUREGEN_GIT_REVISION" in runtime_env["env_vars"] and runtime_env["working_dir"]


# ------------------------------------------------------------------------------------------ version agreement


def test_versions_file_is_self_consistent(versions):
    tag = _python_tag(versions["python"])
    assert versions["ray_base_image"] == f"rayproject/ray:{versions['ray']}-{tag}-gpu"
    assert "/" not in versions["image"]  # registry-less; the YAMLs add the registry
    name, image_tag = versions["image"].split(":")
    assert name == "puregen-dist" and f"ray{versions['ray']}" in image_tag and tag in image_tag
    assert Version(versions["kuberay_operator"]) >= Version("1.5.1")  # first with authOptions


def test_pyproject_admits_the_pinned_versions(versions):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = {r.name: r for r in map(Requirement, project["dependencies"])}
    for name in ("ray", "torch", "torchvision", "mlflow"):
        assert requirements[name].specifier.contains(versions[name]), (name, str(requirements[name]))
    assert SpecifierSet(project["requires-python"]).contains(versions["python"])


def test_dockerfile_defaults_equal_versions(versions):
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    assert args == {"RAY_VERSION": versions["ray"], "PYTHON_TAG": _python_tag(versions["python"]),
                    "TORCH_VERSION": versions["torch"], "TORCHVISION_VERSION": versions["torchvision"],
                    "MLFLOW_VERSION": versions["mlflow"]}
    base = re.search(r"^FROM (\S+)$", text, flags=re.M).group(1)
    assert re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base) == versions["ray_base_image"]
    assert '"torch==${TORCH_VERSION}"' in text and '"mlflow==${MLFLOW_VERSION}"' in text
    # only the package sources go into the image: no data, outputs or MLflow stores
    copied = {src for line in text.splitlines() if line.startswith("COPY")
              for src in line.split()[1:-1] if not src.startswith("--")}
    assert copied == {"pyproject.toml", "README.md", "puregen_dist/"}


def test_every_image_reference_uses_the_pinned_tags(versions):
    yamls = sorted(CLUSTER.rglob("*.yaml"))
    ray_images: list[str] = []
    project_images: list[str] = []
    for path in yamls:
        text = path.read_text()
        ray_images += re.findall(r"rayproject/ray:[\w.\-]+", text)
        project_images += [(path.name, m) for m in re.findall(r"[\w.\-/]*puregen-dist:[\w.\-]+", text)]
    assert all(image == versions["ray_base_image"] for image in ray_images), ray_images
    assert project_images and all(image.endswith("/" + versions["image"]) or image == versions["image"]
                                  for _, image in project_images), project_images
    users = {name for name, _ in project_images}
    assert {"raycluster-gpu.yaml", "rayjob-sweep.yaml", "cluster.yaml"} <= users


def _mlflow_manifest() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MLFLOW_YAML.read_text()) if d}


def test_mlflow_manifest(versions):
    docs = _mlflow_manifest()
    assert set(docs) == {"Namespace", "Deployment", "Service"}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/mlflow/mlflow:v{versions['mlflow']}"
    service = docs["Service"]
    assert (service["metadata"]["name"], service["metadata"]["namespace"]) == ("mlflow", "mlflow")
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 5000
    command = " ".join(container["args"])
    # the in-cluster URL must pass MLflow's Host-header check (its defaults answer 403 to DNS names)
    hosts = re.search(r"--allowed-hosts '([^']+)'", command).group(1).split(",")
    assert "mlflow.mlflow.svc.cluster.local:5000" in hosts
    env = {e["name"] for e in container["env"]}
    assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"} <= env


# ---------------------------------------------------------------------------------------------- MLflow server


def _mlflow_server_flags() -> set[str]:
    from mlflow.cli import server

    return {opt for param in server.params for opt in param.opts}


def test_server_script_is_local_by_default_and_uses_real_flags():
    text = SERVER_SH.read_text()
    assert 'MLFLOW_HOST:-127.0.0.1' in text and "set -euo pipefail" in text
    bash = shutil.which("bash")
    if bash:
        subprocess.run([bash, "-n", str(SERVER_SH)], check=True)
    known = _mlflow_server_flags()  # of the installed MLflow (the version pinned in cluster/versions.yaml)
    (container,) = _mlflow_manifest()["Deployment"]["spec"]["template"]["spec"]["containers"]
    manifest_command = " ".join(container["args"]).split("exec mlflow server", 1)[1]
    for source in (text.split("exec mlflow server", 1)[1], manifest_command):
        used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", source))
        assert used and used <= known, used - known


# ------------------------------------------------------------------------------------------------- .rayignore


def test_rayignore_keeps_outputs_and_stores_out_and_the_package_in(tmp_path):
    text = (REPO / ".rayignore").read_text()
    patterns = {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
    assert {"outputs/", "mlflow.db"} <= patterns
    assert not any(p.lstrip("/!").startswith(("puregen_dist", "sweeps")) for p in patterns)
    shutil.copy(REPO / ".rayignore", tmp_path / ".rayignore")
    kept = ["puregen_dist/cli.py", "puregen_dist/reference_models/ebm/model.safetensors", "sweeps/a.yaml",
            "pyproject.toml", "README.md"]
    dropped = ["outputs/store/x.bin", "mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/a",
               "ray_results/e/r.json", "docs/results/sweep/mlflow.db", "docs/results/sweep/report.md",
               ".venv/bin/python", "datasets/cifar10/x", "data.parquet", ".git/HEAD",
               "puregen_dist/__pycache__/cli.pyc", "puregen_dist.egg-info/PKG-INFO"]
    for name in kept + dropped:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    uploaded = _ray_uploads(tmp_path)
    assert set(kept) <= uploaded
    assert not set(dropped) & uploaded, set(dropped) & uploaded
