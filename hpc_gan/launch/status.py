"""``launch/status.py`` (``hpc_gan status``): one row per variant of an experiment.

    python launch/status.py runs/exp1                 # table: state, step, losses, FID, ETA, checkpoint, error
    python launch/status.py runs/exp1 --watch 30      # redraw every 30 s until every job has finished
    python launch/status.py runs/exp1/c_sn_mp --json  # one run directory, as JSON

The target is an experiment directory (``jobs.json`` written by ``launch/submit.py``, one run
directory per variant), a directory of run directories without ``jobs.json`` (shown without job
state), or one run directory (with its job's state when the ``jobs.json`` above it lists it).

Job state. SLURM: ``squeue`` first (it knows queued and running jobs, sacct may lag behind),
``sacct`` once the job has left the queue; only the job's own line counts, not its ``.batch``,
``.extern`` or step lines. Local jobs (``--cluster local``) have no scheduler to ask; what
submitit's local executor leaves decides first: FAILED when a task's result file records an
error, or when the job's controlling process (its job id is that process's id; checked only on
the host that submitted, which jobs.json records) is gone without every task's result; COMPLETED
when every task recorded success. Otherwise: COMPLETED when the newest complete checkpoint is the
last step, RUNNING while metrics keep arriving, UNKNOWN otherwise.

FID: the newest in-training evaluation record of metrics.jsonl (``train.eval_every``), found in
the file's tail like the losses; ``--json`` adds its step and the checkpoint ``best`` names.

Error line of a job: each task's stderr log is read (:func:`job_error_line`); a line of the
project's own (``error: ...``, e.g. ``error: rank 0: rank 1 (host node2) stopped ...``) wins over
other errors, then the lowest task. In one log (:func:`error_line`), scanning lines in order, the
first match wins:

1. a line containing ``Traceback (most recent call last):`` -> the exception line that ends the
   traceback: the first non-empty line after it that is not indented. When the traceback is
   followed by "During handling of the above exception..." or "The above exception was the direct
   cause..." the chained traceback is followed and its exception line is taken (the one that
   killed the job). Text before ``Traceback`` on its line (``[rank0]: ``, ``0: ``) is a prefix:
   only lines carrying it belong to the traceback (other ranks' lines interleave). A log that ends
   inside the traceback gives the ``Traceback`` line itself.
2. a line containing ``error:`` in any case (``srun: error: ...``, ``slurmstepd: error: ... DUE TO
   TIME LIMIT``, this project's ``error: ...``) -> that line.
3. a line whose first word is a Python exception name followed by ``:`` or nothing
   (``RuntimeError: CUDA out of memory``, ``torch.OutOfMemoryError``) -> that line.

Lines are returned stripped of surrounding white space.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

from hpc_gan.dist import process_alive
from hpc_gan.errors import LaunchError
from hpc_gan.launch.submit import JOBS_FILE
from hpc_gan.train import checkpoint as ckpt

# States after which a job does not come back by itself (REQUEUED and REQUEUE_HOLD do).
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                      "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"})
TOOL_TIMEOUT_S = 60  # slurmdbd can hang; a status tool must not
LOCAL_RECENT_S = 600  # a local run whose last metrics record is older than this (and 3 intervals) is not RUNNING
DEFAULT_WATCH_S = 30
TRACEBACK = "Traceback (most recent call last):"
CHAINED = ("During handling of the above exception, another exception occurred:",
           "The above exception was the direct cause of the following exception:")
ERROR_WORD = re.compile(r"\berror:", re.IGNORECASE)
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)(:|$)")
RUN_DIR_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")

Runner = Callable[[list[str]], str]


@dataclass
class Row:
    """What the table shows for one variant; ``state`` is None for a run shown without its job."""

    variant: str
    run_dir: str
    job_id: str | None = None
    state: str | None = None
    elapsed: str = ""
    nodes: int | None = None
    node_list: str = ""
    exit_code: str = ""
    step: int | None = None
    total_steps: int | None = None
    loss_critic: float | None = None
    loss_generator: float | None = None
    patches_per_s: float | None = None
    loss_scale_critic: float | None = None
    loss_scale_generator: float | None = None
    precision: str | None = None
    epsilon: float | None = None
    fid: float | None = None
    fid_step: int | None = None
    best_checkpoint: str | None = None
    eta_s: float | None = None
    checkpoint: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------- SLURM


def run_tool(argv: list[str]) -> str:
    """Run a SLURM client and return its stdout: the one subprocess boundary (tests replace it).

    Raises:
        FileNotFoundError: the tool is not installed.
        subprocess.CalledProcessError: non-zero exit (squeue: the job has left the queue).
        subprocess.TimeoutExpired: no answer within TOOL_TIMEOUT_S.
    """
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=TOOL_TIMEOUT_S).stdout


def normalise_state(text: str) -> str:
    """'CANCELLED by 0' -> 'CANCELLED'; sacct marks truncated fields with '+'."""
    words = text.split()
    return words[0].rstrip("+").upper() if words else "UNKNOWN"


def squeue_state(job_id: str, runner: Runner) -> dict | None:
    """State, elapsed time and nodes from squeue, or None when squeue does not know the job."""
    try:
        out = runner(["squeue", "-j", job_id, "-h", "-o", "%T|%M|%N"])
    except (OSError, subprocess.SubprocessError):  # not installed, or "Invalid job id" once the job has left
        return None
    for line in out.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3 and fields[0]:
            return {"state": normalise_state(fields[0]), "elapsed": fields[1], "node_list": fields[2]}
    return None


def sacct_job_fields(output: str, job_id: str) -> list[str] | None:
    """The fields of the job's own line in ``sacct -P -n`` output.

    sacct lists the job's steps too (``123_0.batch``, ``123_0.extern``, ``123_0.0``), whose states
    differ from the job's (the batch step of a cancelled job may say FAILED). A pending array task
    is listed under its array's pattern (``123_[0-3]``) until it starts, hence the fallback to any
    line that is not a step. The last match is the newest record of a requeued job.
    """
    rows = [line.strip().split("|") for line in output.splitlines() if line.strip()]
    jobs = [fields for fields in rows if len(fields) >= 5 and "." not in fields[0]]
    chosen = [fields for fields in jobs if fields[0] == job_id] or jobs
    return chosen[-1] if chosen else None


def sacct_state(job_id: str, runner: Runner) -> dict:
    """State, elapsed time, nodes and exit code from sacct; state 'UNKNOWN (...)' when it cannot say."""
    argv = ["sacct", "-j", job_id, "--format=JobID,State,Elapsed,NodeList,ExitCode", "-P", "-n"]
    try:
        out = runner(argv)
    except FileNotFoundError:
        return {"state": "UNKNOWN (no sacct)"}
    except subprocess.SubprocessError:  # slurmdbd down or slow
        return {"state": "UNKNOWN (sacct failed)"}
    fields = sacct_job_fields(out, job_id)
    if fields is None:
        return {"state": "UNKNOWN (not in sacct)"}
    return {"state": normalise_state(fields[1]), "elapsed": fields[2], "node_list": fields[3], "exit_code": fields[4]}


def slurm_state(job_id: str, runner: Runner = run_tool) -> dict:
    """The job's state: squeue while it knows the job, else sacct.

    Args:
        job_id: SLURM job id, e.g. ``123`` or an array task ``123_0``.
        runner: runs one argv and returns stdout (see :func:`run_tool`).

    Returns:
        dict with ``state`` (e.g. RUNNING, PENDING, CANCELLED, "UNKNOWN (no sacct)") and, when known,
        ``elapsed``, ``node_list``, ``exit_code``.
    """
    return squeue_state(job_id, runner) or sacct_state(job_id, runner)


# ------------------------------------------------------------------------------------ error line


def error_line(lines: Iterable[str]) -> str | None:
    """The first error of a log, by the rule in this module's docstring; None if there is none.

    Args:
        lines: the log's lines (with or without newlines).

    Returns:
        One stripped line, e.g. ``RuntimeError: CUDA out of memory``.
    """
    stream = iter(lines)
    for line in stream:
        text = line.rstrip("\n")
        if TRACEBACK in text:
            return traceback_exception(text[:text.index(TRACEBACK)], stream) or text.strip()
        stripped = text.strip()
        if ERROR_WORD.search(stripped) or EXCEPTION_LINE.match(stripped):
            return stripped
    return None


def traceback_exception(prefix: str, stream: Iterator[str]) -> str | None:
    """Read one traceback (and those chained after it) just past its ``Traceback`` line; return the
    last exception line, or None if the lines end before one."""
    exception, phase = None, "frames"
    for line in stream:
        if not line.startswith(prefix):  # another rank's line in between
            continue
        body = line[len(prefix):].rstrip("\n")
        if not body.strip():
            continue
        if phase == "frames":
            if not body[0].isspace():
                exception, phase = body.strip(), "after"
        elif phase == "after":
            if body.strip() not in CHAINED:
                return exception
            phase = "chain"
        elif TRACEBACK in body:  # phase "chain": the chained traceback starts
            phase = "frames"
        else:
            return exception
    return exception


def log_error(path: str | os.PathLike | None, experiment: Path) -> str | None:
    """The error line of one stderr log; the log may not exist yet (job pending)."""
    log = _log_path(path, experiment)
    if log is None:
        return None
    with log.open(errors="replace") as handle:
        return error_line(handle)


def _log_path(path: str | os.PathLike | None, experiment: Path) -> Path | None:
    if not path:
        return None
    log = Path(path)
    if not log.is_file():  # jobs.json written with a relative log_dir, read from elsewhere
        log = experiment / "logs" / log.name
    return log if log.is_file() else None


def task_files(task0: str | os.PathLike, job_id: str, tasks: int) -> list[Path]:
    """submitit's per-task files (``<job>_<task>_log.err``, ``..._result.pkl``) from task 0's."""
    path = Path(task0)
    marker = f"{job_id}_0_"
    if marker not in path.name:
        return [path]
    return [path.with_name(path.name.replace(marker, f"{job_id}_{task}_", 1)) for task in range(tasks)]


def job_error_line(logs: Iterable[str | os.PathLike], experiment: Path) -> str | None:
    """The line that says why a job failed, from its tasks' stderr logs: the first of the
    project's own ``error: ...`` lines (they name the rank and what to do), else the first error
    of the lowest task (see the module docstring)."""
    found = [line for line in (log_error(log, experiment) for log in logs) if line]
    return next((line for line in found if line.startswith("error: ")), found[0] if found else None)


def _tasks(job: dict) -> int:
    return int(job.get("nodes") or 1) * int(job.get("tasks_per_node") or 1)


# ------------------------------------------------------------------------------- run directories


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_DIR_MARKERS)


def is_eval(record: dict) -> bool:
    """An evaluation record (``{"step", "eval": {...}, ...}``) rather than a training record
    (the same test as hpc_gan.train.metrics.is_eval, which would import torch)."""
    return "eval" in record


def last_records(path: Path, n: int = 2, tail_bytes: int = 1 << 16, evaluations: bool = False) -> list[dict]:
    """The last ``n`` training records of metrics.jsonl (evaluation records with ``evaluations``),
    reading only its tail (the file grows for days). Lines that do not parse are skipped: rank 0
    may be writing the last one right now."""
    if not path.is_file():
        return []
    with path.open("rb") as handle:
        handle.seek(max(handle.seek(0, 2) - tail_bytes, 0))
        lines = handle.read().decode(errors="replace").splitlines()
    records = []
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record and is_eval(record) == evaluations:
            records.insert(0, record)
        if len(records) == n:
            break
    return records


def configured_steps(run_dir: Path) -> int | None:
    """train.max_steps of the run's config.yaml. Read as plain YAML rather than validated: status
    must keep working on runs written by older versions of the config schema."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
        steps = data["train"]["max_steps"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) and steps > 0 else None


def tag_step(tag: str | None) -> int | None:
    match = re.search(r"(\d+)$", tag or "")
    return int(match.group(1)) if match else None


def eta_seconds(records: list[dict], total: int | None) -> float | None:
    """Remaining steps at the step rate between the last two metrics records."""
    if len(records) < 2 or total is None:
        return None
    (a, b) = records[-2:]
    steps, seconds = b["step"] - a["step"], b.get("time", 0) - a.get("time", 0)
    if steps <= 0 or seconds <= 0:
        return None
    return max(total - b["step"], 0) * seconds / steps


def fill_progress(row: Row, run_dir: Path) -> list[dict]:
    """Step, losses, throughput, loss scales, epsilon (dp), FID, ETA and checkpoints of a run; returns the last
    training records."""
    records = last_records(run_dir / "metrics.jsonl")
    row.total_steps = row.total_steps or configured_steps(run_dir)
    row.checkpoint = ckpt.newest_complete(run_dir / "checkpoints")
    row.best_checkpoint = ckpt.best_tag(run_dir / "checkpoints")
    for evaluation in last_records(run_dir / "metrics.jsonl", n=1, evaluations=True):
        row.fid, row.fid_step = evaluation["eval"].get("fid"), evaluation["step"]
    if records:
        last = records[-1]
        row.step = last["step"]
        for key in ("loss_critic", "loss_generator", "patches_per_s", "loss_scale_critic", "loss_scale_generator",
                    "precision", "epsilon"):
            setattr(row, key, last.get(key))
    row.eta_s = eta_seconds(records, row.total_steps)
    return records


def is_complete(row: Row) -> bool:
    """The newest complete checkpoint is the run's last step."""
    return row.total_steps is not None and tag_step(row.checkpoint) == row.total_steps


def local_outcome(job: dict, experiment: Path) -> str | None:
    """FAILED or COMPLETED from what submitit's local executor leaves (see the module
    docstring), None when that does not decide."""
    if not job.get("stderr") or not job.get("job_id"):
        return None
    outcomes = [_result_outcome(_sibling(log, "result.pkl"), experiment)
                for log in task_files(job["stderr"], str(job["job_id"]), _tasks(job))]
    if "error" in outcomes:
        return "FAILED"
    if outcomes and all(outcome == "success" for outcome in outcomes):
        return "COMPLETED"
    if job.get("host") == socket.gethostname() and str(job["job_id"]).isdigit() \
            and not process_alive(int(job["job_id"])):
        return "FAILED"  # killed (or its machine restarted) before every task wrote a result
    return None


def _sibling(log: Path, suffix: str) -> Path:
    """``<job>_<task>_log.err`` -> ``<job>_<task>_<suffix>``."""
    return log.with_name(log.name.rsplit("_log.", 1)[0] + "_" + suffix)


def _result_outcome(path: Path, experiment: Path) -> str | None:
    """"success" or "error" from a task's result file (submitit pickles (outcome, result));
    None when there is none yet or it cannot be read."""
    if not path.is_file():
        path = experiment / "logs" / path.name
    try:
        with path.open("rb") as handle:
            outcome = pickle.load(handle)[0]  # files of this experiment's own jobs
    except Exception:  # absent, being written, or from another submitit version
        return None
    return outcome if outcome in ("success", "error") else None


def local_state(row: Row, records: list[dict], now: float) -> str:
    if is_complete(row):
        return "COMPLETED"
    if records:
        last = records[-1].get("time", 0.0)
        interval = last - records[0].get("time", 0.0)
        if now - last <= max(LOCAL_RECENT_S, 3 * interval):
            return "RUNNING"
    return "UNKNOWN"


def is_finished(row: Row) -> bool:
    """A known job state decides; without one (no SLURM answer, a bare run directory) the last
    checkpoint does."""
    if row.state and not row.state.startswith("UNKNOWN"):
        return row.state in FINISHED
    return is_complete(row)


def build_row(variant: str, run_dir: Path, job: dict | None, cluster: str, experiment: Path, runner: Runner,
              now: float) -> Row:
    row = Row(variant, str(run_dir))
    if job:
        row.job_id, row.nodes, row.total_steps = str(job.get("job_id", "")), job.get("nodes"), job.get("total_steps")
    records = fill_progress(row, run_dir)
    if job:
        if cluster == "local":
            row.state = local_outcome(job, experiment) or local_state(row, records, now)
        else:
            for key, value in slurm_state(row.job_id, runner).items():
                setattr(row, key, value)
        logs = task_files(job["stderr"], row.job_id, _tasks(job)) if job.get("stderr") else []
        row.error = job_error_line(logs, experiment)
    if is_finished(row):
        row.eta_s = None
    return row


# ----------------------------------------------------------------------------------- experiments


def read_jobs(experiment: Path) -> dict:
    """jobs.json of an experiment; LaunchError if it is not one written by launch/submit.py."""
    path = experiment / JOBS_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LaunchError(f"cannot read '{path}' ({exc.__class__.__name__}: {exc}); it is written by "
                          "launch/submit.py") from None
    if not isinstance(record, dict) or not isinstance(record.get("jobs"), dict):
        raise LaunchError(f"'{path}' has no 'jobs' mapping; it is not a jobs file written by launch/submit.py")
    return record


def run_dir_of(experiment: Path, variant: str, job: dict) -> Path:
    """The variant's directory beside jobs.json, else the recorded one: recorded paths may be
    relative to where submit ran, or stale after the experiment was copied elsewhere."""
    beside = experiment / variant
    return beside if beside.is_dir() or not job.get("run_dir") else Path(job["run_dir"])


def collect(target: str | Path, runner: Runner = run_tool, now: float | None = None) -> list[Row]:
    """One row per variant of an experiment directory, or one row for a run directory.

    Args:
        target: experiment directory (holding jobs.json, or run directories) or one run directory.
        runner: runs squeue/sacct (see :func:`run_tool`).
        now: the time to judge local runs by (default: now).

    Returns:
        Rows in jobs.json order (sorted by variant without jobs.json).

    Raises:
        LaunchError: the path does not exist, or is neither an experiment nor a run directory.
    """
    path, now = Path(target), time.time() if now is None else now
    if not path.exists():
        raise LaunchError(f"'{target}' does not exist; pass an experiment directory (holding {JOBS_FILE}) "
                          "or a run directory")
    if (path / JOBS_FILE).is_file():
        record = read_jobs(path)
        return [build_row(variant, run_dir_of(path, variant, job), job, record.get("cluster", "slurm"), path,
                          runner, now) for variant, job in record["jobs"].items()]
    if is_run_dir(path):
        record = read_jobs(path.parent) if (path.parent / JOBS_FILE).is_file() else {"jobs": {}}
        return [build_row(path.name, path, record["jobs"].get(path.name), record.get("cluster", "slurm"),
                          path.parent, runner, now)]
    children = sorted(child for child in path.iterdir() if is_run_dir(child)) if path.is_dir() else []
    if not children:
        raise LaunchError(f"'{target}' is neither an experiment directory (no {JOBS_FILE}, no run directories "
                          f"inside) nor a run directory (no {', '.join(RUN_DIR_MARKERS)})")
    return [build_row(child.name, child, None, "", path, runner, now) for child in children]


# --------------------------------------------------------------------------------------- display


COLUMNS = ("VARIANT", "STATE", "JOB", "NODES", "ELAPSED", "STEP", "LOSS D", "LOSS G", "PATCH/S", "SCALE D/G",
           "EPSILON", "FID", "ETA", "CHECKPOINT")


def duration(seconds: float | None) -> str:
    """3725 -> '1h02m'; None -> '-'."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cells(row: Row) -> tuple[str, ...]:
    steps = "-" if row.step is None and row.total_steps is None else f"{number(row.step, 'd')}/{row.total_steps or '?'}"
    # Loss scales mean something only under fp16 dynamic loss scaling (1.0 otherwise).
    scale = (f"{number(row.loss_scale_critic, 'g')}/{number(row.loss_scale_generator, 'g')}"
             if row.precision == "fp16" else "-")
    nodes = " ".join(str(part) for part in (row.nodes, row.node_list) if part not in (None, "")) or "-"
    return (row.variant, row.state or "-", row.job_id or "-", nodes, row.elapsed or "-", steps,
            number(row.loss_critic, ".4f"), number(row.loss_generator, ".4f"), number(row.patches_per_s, ".1f"),
            scale, number(row.epsilon, ".4g"), number(row.fid, ".4g"), duration(row.eta_s), row.checkpoint or "-")


def render(rows: list[Row]) -> str:
    """The table, with each row's error line under it."""
    table = [COLUMNS] + [cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(table[0], widths)).rstrip()]
    for row, line in zip(rows, table[1:]):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if row.error:
            out.append(f"    {row.error}")
    return "\n".join(out)


def show(rows: list[Row], as_json: bool, out: TextIO, watching: bool = False) -> None:
    if as_json:  # one document per refresh when watching, so a reader can parse line by line
        out.write(json.dumps([asdict(row) for row in rows], indent=None if watching else 1) + "\n")
    else:
        out.write(render(rows) + "\n")
    out.flush()


def watch(target: str | Path, interval: float, as_json: bool = False, runner: Runner = run_tool,
          out: TextIO = sys.stdout, sleep: Callable[[float], None] = time.sleep) -> int:
    """Redraw every ``interval`` seconds until every row :func:`is_finished` or Ctrl-C.

    Returns:
        0 (Ctrl-C is the normal way to stop watching unfinished runs).

    Raises:
        LaunchError: as :func:`collect`.
    """
    try:
        while True:
            rows = collect(target, runner)
            if not as_json:
                if out.isatty():
                    out.write("\033[H\033[J")  # clear the screen, cursor home: redraw in place
                out.write(f"{target} at {time.strftime('%H:%M:%S')} (every {interval:g} s, Ctrl-C to stop)\n")
            show(rows, as_json, out, watching=True)
            if all(is_finished(row) for row in rows):
                return 0
            sleep(interval)
    except KeyboardInterrupt:
        return 0
