"""SLURM parameters of a job: a pure function of the run config (golden-file tested).

The dict uses submitit's ``SlurmExecutor`` vocabulary, so the same dict configures the executor
and renders the sbatch script that ``--dry-run`` prints.
"""

from __future__ import annotations

from hpc_gan.config import RunConfig


def slurm_parameters(cfg: RunConfig, job_name: str, array_size: int = 1) -> dict:
    """SLURM parameters for one training job (one array task per variant).

    Args:
        cfg: the resolved run config (its ``cluster`` section).
        job_name: shown by squeue, e.g. ``hpc_gan-exp1``.
        array_size: number of variants submitted together (caps the array parallelism).

    Returns:
        Keyword arguments for ``submitit.SlurmExecutor.update_parameters``.

    Example:
        >>> slurm_parameters(load_config("c_sn_mp", cluster="gpu_node"), "hpc_gan-exp")["gpus_per_node"]
        4
    """
    c = cfg.cluster
    params = {
        "job_name": job_name,
        "nodes": c.nodes,
        "ntasks_per_node": c.tasks_per_node,
        "cpus_per_task": c.cpus_per_task,
        "time": c.time_min,
        # ranks are told this long before the limit, checkpoint together, and the job is requeued
        "signal_delay_s": c.signal_delay_s,
        "array_parallelism": min(c.array_parallelism, max(array_size, 1)),
        "stderr_to_stdout": False,
        "additional_parameters": {"requeue": True},
    }
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    if c.mem_gb:
        params["mem"] = f"{c.mem_gb}GB"
    for key in ("partition", "account", "qos"):
        if getattr(c, key):
            params[key] = getattr(c, key)
    return params
