"""``launch/submit.py``: one submitit array, one task per variant, each a multi-node DeepSpeed job.

    python launch/submit.py --variant c_sn_mp --nodes 4 --gpus-per-node 4 --time 1440
    python launch/submit.py --variant gp,sn,sn_mp,c_sn_mp --profile smoke --cluster local
    python launch/submit.py --variant all --dry-run

Everything is checked before anything is submitted: the configs of all variants, the data
manifest, fp16 without GPUs, the run directories (a run directory that already holds
checkpoints is refused unless ``--resume`` or ``--overwrite``). The experiment directory
``<output_root>/<name>/`` gets one run directory per variant (with its resolved config.yaml),
the submitit logs under ``logs/`` and ``jobs.json`` (job ids, log paths) that
``launch/status.py`` reads. The command line is :mod:`hpc_gan.launch.cli_submit`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from hpc_gan import config as config_mod
from hpc_gan.data.manifest import load_manifest
from hpc_gan.errors import HpcGanError, LaunchError
from hpc_gan.io import check_output_path, set_aside, write_text_atomic
from hpc_gan.launch.slurm_params import slurm_parameters
from hpc_gan.train import checkpoint as ckpt

JOBS_FILE = "jobs.json"


@dataclass
class PlannedRun:
    variant: str
    cfg: config_mod.RunConfig
    config_file: Path


def resolve_cluster(choice: str) -> str:
    if choice == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if choice == "slurm" and not shutil.which("sbatch"):
        raise LaunchError("--cluster slurm but no 'sbatch' on this machine; run on a login node or use --cluster local")
    return choice


def variants_of(text: str) -> list[str]:
    valid = config_mod.available("variants")
    names = valid if text == "all" else [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise LaunchError(f"--variant is empty; valid variants: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise LaunchError(f"--variant {text} names a variant twice")
    return names


def cli_overrides(args: argparse.Namespace, cluster: str) -> list[str]:
    """Command-line resources as config overrides (they win over the files, --set wins over them)."""
    pairs = {"cluster.nodes": args.nodes, "cluster.gpus_per_node": args.gpus_per_node,
             "cluster.tasks_per_node": args.gpus_per_node or args.tasks_per_node, "cluster.time_min": args.time,
             "cluster.partition": args.partition, "cluster.account": args.account, "cluster.qos": args.qos,
             "cluster.mem_gb": args.mem, "name": args.name}
    overrides = [f"{k}={v}" for k, v in pairs.items() if v is not None]
    if cluster == "local" and (args.nodes or 1) > 1:
        raise LaunchError(f"--nodes {args.nodes} with --cluster local: a local job runs on this one machine; use --nodes 1")
    return overrides


def plan_runs(args: argparse.Namespace, cluster: str) -> list[PlannedRun]:
    """Compose and check every variant's config before anything is written or submitted."""
    runs = []
    for variant in variants_of(args.variant):
        cfg = config_mod.load_config(variant, args.profile, args.cluster_config,
                                     cli_overrides(args, cluster) + args.overrides)
        cfg.data.root = str(Path(cfg.data.root).resolve())  # jobs may start in another directory
        cfg.output_root = str(Path(cfg.output_root).resolve())
        check_precision(cfg, cluster)
        runs.append(PlannedRun(variant, cfg, cfg.run_dir / "config.yaml"))
    load_manifest(runs[0].cfg.data.root)  # a missing or malformed manifest fails here, before submission
    return runs


def check_precision(cfg: config_mod.RunConfig, cluster: str) -> None:
    """Refuse a job whose precision its nodes cannot run (fp16 without GPUs), before submitting it."""
    try:
        config_mod.resolve_precision(cfg.train, cfg.cluster.gpus_per_node > 0, gpus="GPUs",
                                     fix="add --gpus-per-node N or use --set train.precision=bf16")
    except HpcGanError as exc:
        raise LaunchError(f"variant {cfg.variant}: {exc}") from None


def check_run_dirs(runs: list[PlannedRun], resume: bool, overwrite: bool) -> list[str]:
    """Refuse an output_root that cannot be written, and a new run mixed into a directory that
    already holds checkpoints; returns one note per resumed run whose checkpoint another number
    of ranks wrote (the job converts it)."""
    if resume and overwrite:
        raise LaunchError("--resume and --overwrite exclude each other")
    notes = []
    for run in runs:
        check_output_path(run.cfg.output_root, "output_root")  # a file, under a file, not writable: one line
        tag = ckpt.newest_complete(run.cfg.run_dir / "checkpoints")
        if tag is None or overwrite:
            continue
        state = ckpt.read_state(run.cfg.run_dir / "checkpoints" / tag)
        saved = state.get("variant")
        if saved != run.variant:
            raise LaunchError(f"'{run.cfg.run_dir}' holds checkpoints of variant '{saved}'; use another --name "
                              "or --overwrite")
        if not resume:
            raise LaunchError(f"'{run.cfg.run_dir}' already holds checkpoints ({tag}); pass --resume to continue "
                              "or --overwrite to start over")
        written, world = state.get("world_size"), run.cfg.cluster.nodes * run.cfg.cluster.tasks_per_node
        if written and written != world:
            if run.cfg.privacy.enabled:
                raise LaunchError(f"variant {run.variant}: checkpoint {tag} was written by {written} ranks and the "
                                  f"dp variant cannot resume on {world} (its Poisson rate q is part of the privacy "
                                  f"accounting); resume with --nodes/--tasks-per-node giving {written} ranks")
            notes.append(f"{run.variant}: checkpoint {tag} was written by {written} ranks, this job has {world}: it "
                         "converts the ZeRO shards to DeepSpeed's universal format when it starts (Adam moments "
                         "kept, data position continued; docs/CHECKPOINTS.md)")
    return notes


def write_configs(runs: list[PlannedRun]) -> None:
    for run in runs:
        config_mod.save_config(run.cfg, run.config_file)


def executor_for(cluster: str, runs: list[PlannedRun], log_dir: Path):
    import submitit

    cfg = runs[0].cfg
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=str(log_dir), max_num_timeout=cfg.cluster.max_requeues)
        executor.update_parameters(**slurm_parameters(cfg, f"hpc_gan-{cfg.name}", len(runs)))
    else:
        executor = submitit.LocalExecutor(folder=str(log_dir))
        executor.update_parameters(timeout_min=cfg.cluster.time_min, tasks_per_node=cfg.cluster.tasks_per_node,
                                   nodes=1, gpus_per_node=cfg.cluster.gpus_per_node)
    return executor


def check_same_resources(runs: list[PlannedRun]) -> None:
    """One array shares one set of SLURM parameters."""
    first = slurm_parameters(runs[0].cfg, "x")
    for run in runs[1:]:
        if slurm_parameters(run.cfg, "x") != first:
            raise LaunchError(f"variants {runs[0].variant} and {run.variant} ask for different resources (from their "
                              "config files); submit them separately or set the cluster keys with --set")


def submit_array(tasks: list[tuple[PlannedRun, object]], cluster: str, record_file: str) -> list:
    """Submit one job per (run, job callable) as one array; record and print the job ids."""
    runs = [run for run, _ in tasks]
    check_same_resources(runs)
    experiment = runs[0].cfg.run_dir.parent
    executor = executor_for(cluster, runs, experiment / "logs")
    with executor.batch():
        jobs = [executor.submit(job) for _, job in tasks]
    record = jobs_record(runs, jobs, cluster, experiment / "logs")
    write_text_atomic(experiment / record_file, json.dumps(record, indent=1))
    print_submitted(record, experiment)
    return jobs


def submit(runs: list[PlannedRun], cluster: str, wait: bool, overwrite: bool = False) -> int:
    from hpc_gan.launch.job import TrainJob

    check_same_resources(runs)  # before write_configs touches a run directory
    # --overwrite: the old run directories are deleted only once the scheduler has accepted the jobs
    with set_aside([run.cfg.run_dir for run in runs] if overwrite else []):
        write_configs(runs)
        jobs = submit_array([(run, TrainJob(str(run.config_file))) for run in runs], cluster, JOBS_FILE)
    return wait_for(jobs, runs) if wait else 0


def check_trained(runs: list[PlannedRun]) -> None:
    """Refuse before submitting a job that needs a trained run which is not there."""
    from hpc_gan.launch.job import newest_consolidated

    for run in runs:
        newest_consolidated(run.cfg.run_dir)  # nothing to sample from
        if not run.config_file.is_file():
            raise LaunchError(f"'{run.config_file}' is missing: was {run.variant} trained with this --name?")


def submit_evaluation(runs: list[PlannedRun], cluster: str, wait: bool, n_samples: int) -> int:
    """One evaluation job per trained variant (sample, then evaluate), as one array."""
    from hpc_gan.launch.job import EvalJob

    check_trained(runs)
    tasks = [(run, EvalJob(str(run.config_file), n_samples, run.cfg.train.seed)) for run in runs]
    jobs = submit_array(tasks, cluster, "eval_jobs.json")
    print("reports: " + ", ".join(str(run.cfg.run_dir / "eval" / "report.md") for run in runs))
    return wait_for(jobs, runs) if wait else 0


def submit_tstr(runs: list[PlannedRun], cluster: str, nifti: dict, steps: int, with_real: bool = False,
                wait: bool = False) -> int:
    """One array: the downstream test of each trained variant (and of real data when ``with_real``).

    Args:
        runs: the trained variants.
        cluster: ``slurm`` or ``local``.
        nifti: ``images``, ``labels`` and ``masks`` (or None) directories of the real subjects.
        steps: maximum U-Net steps per test.
        with_real: also a U-Net trained on the real patches (``--tstr-real``).
        wait: block until the jobs end.

    Returns:
        0, or the status of :func:`wait_for` when waiting.

    Raises:
        LaunchError: no images or labels given, or a run not trained yet.
    """
    from hpc_gan.launch.job import TstrJob

    if not (nifti.get("images") and nifti.get("labels")):
        raise LaunchError("--job tstr needs --images and --labels (and --masks for the intracranial setting)")
    nifti = {"images": str(Path(nifti["images"]).resolve()), "labels": str(Path(nifti["labels"]).resolve()),
             "masks": str(Path(nifti["masks"]).resolve()) if nifti.get("masks") else None}
    check_trained(runs)
    experiment = runs[0].cfg.run_dir.parent
    tasks = [(run, TstrJob(str(run.config_file), run.variant, str(run.cfg.run_dir / "tstr"), nifti, steps))
             for run in runs]
    if with_real:
        tasks.append((PlannedRun("real", runs[0].cfg, runs[0].config_file),
                      TstrJob(str(runs[0].config_file), "real", str(experiment / "tstr_real"), nifti, steps)))
    jobs = submit_array(tasks, cluster, "tstr_jobs.json")
    print(f"table:  hpc_gan compare {' '.join(job.out for _, job in tasks)}")
    return wait_for(jobs, [run for run, _ in tasks]) if wait else 0


def jobs_record(runs, jobs, cluster: str, log_dir: Path) -> dict:
    entries = {}
    for run, job in zip(runs, jobs):
        entries[run.variant] = {"job_id": str(job.job_id), "run_dir": str(run.cfg.run_dir), "config": str(run.config_file),
                                "nodes": run.cfg.cluster.nodes, "tasks_per_node": run.cfg.cluster.tasks_per_node,
                                "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                                "total_steps": run.cfg.train.max_steps or None,
                                # a local job's id is its controlling process's pid: status checks it on this host
                                "host": socket.gethostname()}
    first = str(jobs[0].job_id)
    return {"cluster": cluster, "name": runs[0].cfg.name, "log_dir": str(log_dir),
            "submitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "array_job_id": first.split("_")[0], "jobs": entries}


def print_submitted(record: dict, experiment: Path) -> None:
    kind = "SLURM array job" if record["cluster"] == "slurm" else "local jobs from"
    print(f"submitted {len(record['jobs'])} variant(s) as {kind} {record['array_job_id']} ({record['name']})")
    for variant, entry in record["jobs"].items():
        print(f"  {variant:10s} job {entry['job_id']:>10s}  run {entry['run_dir']}")
        print(f"  {'':10s} log {entry['stdout']}")
    script = Path(sys.argv[0]).parent / "status.py" if sys.argv[0].endswith("submit.py") else "launch/status.py"
    print(f"watch:  python {script} {experiment} --watch")
    print(f"logs:   tail -f {next(iter(record['jobs'].values()))['stdout']}")


def wait_for(jobs, runs) -> int:
    """Block until all jobs end; non-zero if any failed. A failed job gets one line:
    ``<variant>: FAILED (<why>)`` (:func:`failure_reason`)."""
    failed = 0
    for run, job in zip(runs, jobs):
        try:
            job.results()
            print(f"{run.variant}: finished")
        except Exception as exc:  # submitit re-raises the job's exception with its log excerpt
            failed += 1
            print(f"{run.variant}: FAILED ({failure_reason(job, exc)})")
    return 1 if failed else 0


def failure_reason(job, exc: BaseException) -> str:
    """One line on why a job failed: the error line of its tasks' logs (the project's own
    ``error: rank N: ...`` first, see launch/status.py), else the exception line of the traceback
    submitit relays, else the exception's type. (submitit's message ends with the log paths,
    whose last line is no reason.)"""
    from hpc_gan.launch.status import error_line, job_error_line

    try:
        logs = [job.task(task).paths.stderr for task in range(job.num_tasks)]
        experiment = Path(job.paths.folder).parent
    except Exception:  # not a submitit job (tests), or its paths cannot be formed
        logs, experiment = [], Path(".")
    text = str(exc)
    line = job_error_line(logs, experiment) or error_line(text.splitlines())
    return " ".join((line or type(exc).__name__).split())


def print_dry_run(runs: list[PlannedRun], cluster: str) -> None:
    import yaml
    from submitit.slurm.slurm import _make_sbatch_string

    from hpc_gan.train.ds_config import critic_config, generator_config

    for run in runs:
        cuda = run.cfg.cluster.gpus_per_node > 0
        world = run.cfg.cluster.nodes * run.cfg.cluster.tasks_per_node
        print(f"# ---- {run.variant}: resolved config ({run.config_file})")
        print(yaml.safe_dump(config_mod.to_dict(run.cfg), sort_keys=False), end="")
        if run.cfg.privacy.enabled:
            print(f"# ---- {run.variant}: no DeepSpeed: DP-SGD critic with Opacus across {world} rank(s), fp32 "
                  "(hpc_gan.train.dp_trainer.py, docs/PRIVACY.md)")
            continue
        print(f"# ---- {run.variant}: DeepSpeed generator config (world size {world})")
        print(json.dumps(generator_config(run.cfg, world, cuda), indent=1))
        print(f"# ---- {run.variant}: DeepSpeed critic config")
        print(json.dumps(critic_config(run.cfg, world, cuda), indent=1))
    log_dir = runs[0].cfg.run_dir.parent / "logs"
    params = slurm_parameters(runs[0].cfg, f"hpc_gan-{runs[0].cfg.name}", len(runs))
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-u", "-m", "submitit.core._submit", str(log_dir)])
    print(f"# ---- sbatch script ({cluster} would run it as an array of {len(runs)} task(s); nothing submitted)")
    print(_make_sbatch_string(command=command, folder=str(log_dir), map_count=len(runs) if len(runs) > 1 else None,
                              **params))
