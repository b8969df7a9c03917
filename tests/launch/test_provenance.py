"""The tags launch/ gives a run's MLflow run: code version, machine, GPUs, Slurm job.

Run: pytest tests/launch/test_provenance.py
"""

import re

from moe_lab.launch.distributed import detect_env
from moe_lab.launch.provenance import run_tags


def test_tags_name_commit_machine_and_slurm_job():
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "777",
               "SLURM_ARRAY_JOB_ID": "770", "SLURM_ARRAY_TASK_ID": "3",
               "SLURM_JOB_NUM_NODES": "2", "SLURM_RESTART_COUNT": "1", "MASTER_ADDR": "node-a"}
    tags = run_tags(detect_env(environ), "experiments/tiny_moe.yaml", environ)
    assert (tags["slurm.job_id"], tags["slurm.array_job_id"], tags["slurm.array_task_id"],
            tags["slurm.nodes"], tags["slurm.restart_count"]) == ("777", "770", "3", "2", "1")
    assert (tags["world_size"], tags["launcher"]) == ("8", "slurm")
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git.commit"]) and tags["git.dirty"] in ("true",
                                                                                       "false")
    assert tags["host"] and tags["gpu.count"] == "0"
    assert tags["config_file"].endswith("tiny_moe.yaml")
    plain = run_tags(detect_env({}), "x.yaml", {})
    assert not any(k.startswith("slurm.") for k in plain) and plain["launcher"] == "single"
