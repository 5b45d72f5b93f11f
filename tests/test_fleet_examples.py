"""The scheduler examples (examples/slurm, examples/k8s): valid syntax, and they say what the READMEs say."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tasks import layout

EXAMPLES = layout.ROOT / "examples"


def test_sbatch_script_is_valid_bash_with_one_task_per_node_and_a_fleet_report():
    script = EXAMPLES / "slurm" / "m40.sbatch"
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and "#SBATCH --ntasks-per-node=1" in text
    assert "srun --ntasks-per-node=1" in text and 'nox -s fleet -- "$M40_RESULTS"' in text
    for option in (
        '--nnodes "$SLURM_NNODES"',
        '--node-rank "$SLURM_NODEID"',
        "--rdzv-endpoint",
        '--rdzv-id "$SLURM_JOB_ID"',
        "--rdzv-timeout",
    ):
        assert option in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_sbatch_script_passes_shellcheck():
    check = subprocess.run(["shellcheck", str(EXAMPLES / "slurm" / "m40.sbatch")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_k8s_example_is_an_indexed_job_on_the_device_plugin_with_a_rendezvous_service_and_a_results_volume():
    docs = list(yaml.safe_load_all((EXAMPLES / "k8s" / "m40-job.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(by_kind) == ["Job", "PersistentVolumeClaim", "Service"]
    service, claim, job = by_kind["Service"], by_kind["PersistentVolumeClaim"], by_kind["Job"]
    assert service["apiVersion"] == "v1" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert "ReadWriteMany" in claim["spec"]["accessModes"]

    spec = job["spec"]
    assert job["apiVersion"] == "batch/v1" and spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NNODES"] == str(spec["completions"])  # --nnodes matches the pods
    assert env["RDZV_ENDPOINT"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}:29500"
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    script = container["args"][0]
    for option in (
        '--nnodes "$NNODES"',
        '--node-rank "$JOB_COMPLETION_INDEX"',
        '--rdzv-endpoint "$RDZV_ENDPOINT"',
        '--rdzv-id "$RDZV_ID"',
    ):
        assert option in script
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["results"] == "/results" and "/results/" in script
    assert volumes["results"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
