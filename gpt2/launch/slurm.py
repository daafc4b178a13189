"""SLURM through submitit: one job of N nodes, one torchrun agent per node, requeue on preemption.

    python launch/slurm.py --nodes 2 --gpus 8 [--config configs/gpt2-124m.yaml] [--partition P] ...
        [--prepare] [--dry-run] [--follow] [key=value ...]
    python launch/slurm.py prepare [--cpus N] [--time T] [--config ...] [key=value ...]

`prepare` submits the data preparation as a CPU job; `--prepare` submits it and the training, which
SLURM starts only after the preparation succeeded (--dependency=afterok). A training job whose data
is visibly missing is refused before it queues.

Each node runs one submitit task, which runs `torchrun --nnodes N --nproc-per-node G` with c10d
rendezvous on the first host of the allocation. SLURM sends SIGUSR2 `--signal-delay` seconds before
the time limit (and `scancel --signal=USR2` does the same): torchrun forwards it to the trainers,
which save a checkpoint at the next step boundary and exit; the task then returns to submitit, which
requeues the job; the requeued job runs the same command and resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2 import logs
from gpt2.config import Config
from gpt2.errors import EXIT_HUNG, EXIT_STORAGE, Gpt2Error, exit_code
from gpt2.launch.common import (
    RDZV_PORT,
    TRAINER_ENV,
    LaunchError,
    check_image,
    check_overrides,
    fit_micro_batch,
    load_trainer_config,
    require,
    torchrun_command,
)
from gpt2.shards import DataError, read_manifest
from gpt2.storage import StorageError

log = logging.getLogger("gpt2.launch.slurm")

DEFAULT_CPUS_PER_GPU = 8
SLURM_CALL_S = 60.0  # slurmctld answers in about a second; one that is down or swamped must not hold us for good
# squeue reasons that no amount of waiting changes: the request exceeds what the partition allows.
NEVER_STARTS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
                "InvalidQOS", "AccountNotAllowed", "QOSMaxCpuPerJobLimit", "QOSMaxNodePerJobLimit")


@dataclass
class Options:
    nodes: int = 1
    gpus: int = 8
    config: str = "configs/gpt2-124m.yaml"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    cpus_per_gpu: int | None = None  # default: DEFAULT_CPUS_PER_GPU, capped at what a node has
    mem: str | None = None
    container_image: str | None = None
    name: str | None = None
    run_dir: str | None = None
    signal_delay_s: int | None = None
    cpus: int | None = None  # the preparation job's CPUs (and tokenizer workers); default: a whole node
    overrides: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """A job, resolved: where things go and what each node runs. `TrainPlan` or `PreparePlan`."""

    name: str
    run_dir: Path
    nodes: int
    procs_per_node: int
    overrides: list[str]
    executor_params: dict[str, Any]
    config_path: str
    data_dir: str
    # the task's process in a session of its own, so that a preemption can stop it with its workers
    own_session = False

    @property
    def folder(self) -> Path:
        return self.run_dir / "submitit"

    def command(self, first_host: str = "$MASTER_HOST", job_id: str = "$SLURM_JOB_ID") -> list[str]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def on_preemption(self, proc: subprocess.Popen) -> None:
        """What SIGUSR2 does to the running task before the requeue (nothing: it got the signal too)."""

    def requeue_message(self) -> str:
        raise NotImplementedError


@dataclass
class TrainPlan(Plan):
    max_restarts: int = 0

    def command(self, first_host: str = "$MASTER_HOST", job_id: str = "$SLURM_JOB_ID") -> list[str]:
        return torchrun_command(self.config_path, self.overrides, nproc_per_node=self.procs_per_node,
                                nnodes=str(self.nodes), rdzv_endpoint=f"{first_host}:{RDZV_PORT}", rdzv_id=job_id,
                                max_restarts=self.max_restarts)

    def describe(self) -> str:
        return f"training ({self.nodes} node(s) x {self.procs_per_node} process(es))"

    def requeue_message(self) -> str:
        return "checkpoint saved after the preemption signal; requeueing"


@dataclass
class PreparePlan(Plan):
    own_session = True

    def command(self, first_host: str = "$MASTER_HOST", job_id: str = "$SLURM_JOB_ID") -> list[str]:
        return ["python", "-m", "gpt2.prepare", self.config_path, *self.overrides]

    def describe(self) -> str:
        return f"preparation of {self.data_dir}"

    def on_preemption(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:  # it resumes after its last finished shard
            os.killpg(proc.pid, signal.SIGTERM)

    def requeue_message(self) -> str:
        return "preparation stopped after the preemption signal; requeueing"


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?$")
_NAME = re.compile(r"^[A-Za-z0-9_.,:+-]+$")  # partition, account, qos, job name: no spaces, newlines, quotes


def slurm_command(args: list[str], check: bool = True) -> str:
    """The output of a SLURM command (sinfo, squeue, scontrol, scancel); LaunchError if it gives no
    answer within SLURM_CALL_S or (with `check`) fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=SLURM_CALL_S)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`{shlex.join(args)}` gave no answer within {SLURM_CALL_S:g} s: slurmctld is down or "
                          "overloaded (`scontrol ping` says which); try again once it answers") from None
    if check and done.returncode != 0:
        said = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise LaunchError(f"`{shlex.join(args)}` failed: {said[0]}")
    return done.stdout


def time_to_minutes(spec: str) -> int:
    """SLURM time ([D-]HH:MM:SS, [D-]HH:MM, MM, MM:SS) in whole minutes; LaunchError if malformed."""
    m = _TIME.match(spec.strip())
    if not m:
        raise LaunchError(f"--time '{spec}' is not a SLURM time; use [D-]HH:MM:SS (e.g. 24:00:00 or 1-12:00:00)")
    days = int(m.group(1) or 0)
    parts = [int(p) for p in m.group(2, 3, 4) if p is not None]
    if len(parts) == 1:
        h, mins, s = (parts[0], 0, 0) if m.group(1) else (0, parts[0], 0)
    elif len(parts) == 2:
        h, mins, s = (0, *parts) if not m.group(1) else (*parts, 0)
    else:
        h, mins, s = parts
    return max(1, days * 1440 + h * 60 + mins + (1 if s else 0))


def check_options(opts: Options) -> None:
    """The launcher's own flags, before anything else (LaunchError, nothing submitted)."""
    if opts.nodes < 1 or opts.gpus < 0:
        raise LaunchError("--nodes must be >= 1 and --gpus >= 0")
    if opts.cpus_per_gpu is not None and opts.cpus_per_gpu < 1:
        raise LaunchError(f"--cpus-per-gpu must be at least 1, got {opts.cpus_per_gpu}")
    if opts.signal_delay_s is not None and opts.signal_delay_s < 0:
        raise LaunchError(f"--signal-delay must be 0 or more seconds, got {opts.signal_delay_s}")
    if opts.mem is not None and not _MEM.match(opts.mem):
        raise LaunchError(f"--mem '{opts.mem}' is not a SLURM memory size; use e.g. 64G or 512000M (or 0 for all)")
    for flag in ("partition", "account", "qos", "name"):
        value = getattr(opts, flag)
        if value is not None and not _NAME.match(value):
            raise LaunchError(f"--{flag} {value!r} may hold only letters, digits and _.,:+-")
    time_to_minutes(opts.time)


def cpus_per_task(opts: Options, procs: int, cpus_per_node: int | None) -> int:
    """CPUs for each node's task: --cpus-per-gpu x processes, the default capped at what a node has."""
    if opts.cpus_per_gpu is not None:
        wanted = opts.cpus_per_gpu * procs
        if cpus_per_node is not None and wanted > cpus_per_node:
            raise LaunchError(
                f"--cpus-per-gpu {opts.cpus_per_gpu} x {procs} process(es) asks {wanted} CPUs per node, but the "
                f"nodes of {opts.partition or 'the default partition'} have {cpus_per_node}: the job could never "
                f"start. Use --cpus-per-gpu {max(cpus_per_node // procs, 1)} or less")
        return wanted
    wanted = DEFAULT_CPUS_PER_GPU * procs
    if cpus_per_node is not None and wanted > cpus_per_node:
        log.warning(f"asking {cpus_per_node} CPUs per node (all a node of {opts.partition or 'the default partition'}"
                    f" has), not {DEFAULT_CPUS_PER_GPU} per process; --cpus-per-gpu sets it")
        return cpus_per_node
    return wanted


def placed_paths(cfg: Config, opts: Options, overrides: list[str]) -> tuple[Path, list[str], str]:
    """The job's run directory, the overrides that put data, checkpoints and TensorBoard on shared
    storage, absolute, the same for the preparation and the training job, and the data directory:

        <run root>/data/<name of data.dir>      (unless data.dir is absolute, a URL, or set here)
        <run root>/<name>/checkpoints, /tensorboard, /submitit

    `tensorboard --logdir <run root>` shows every run.
    """
    root = Path(opts.run_dir or cfg.launch.run_dir).absolute()
    run_dir = root / (opts.name or cfg.name)
    placed = {o.split("=", 1)[0] for o in overrides}
    defaults = []
    data_dir = cfg.data.dir
    if "data.dir" not in placed and "://" not in cfg.data.dir and not Path(cfg.data.dir).is_absolute():
        data_dir = str(root / "data" / Path(cfg.data.dir).name)
        defaults.append(f"data.dir={data_dir}")
    if "checkpoint.dir" not in placed:
        defaults.append(f"checkpoint.dir={run_dir / 'checkpoints'}")
    if "logging.dir" not in placed:
        defaults.append(f"logging.dir={run_dir / 'tensorboard'}")
    return run_dir, defaults, data_dir


def executor_params(opts: Options, cfg: Config, name: str, nodes: int, cpus: int, run_dir: Path) -> dict[str, Any]:
    """submitit's SLURM parameters, shared by the preparation and the training job."""
    delay = opts.signal_delay_s if opts.signal_delay_s is not None else cfg.launch.signal_delay_s
    params: dict[str, Any] = dict(
        nodes=nodes,
        ntasks_per_node=1,  # training: one torchrun agent per node, which starts the per-GPU processes
        cpus_per_task=cpus,
        time=time_to_minutes(opts.time),
        job_name=name,
        signal_delay_s=delay,
        max_num_timeout=cfg.launch.max_requeues,
        additional_parameters={"open-mode": "append"},
        setup=[f"export {k}={shlex.quote(v)}" for k, v in TRAINER_ENV.items()],
    )
    for key in ("partition", "account", "qos", "mem"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    if opts.container_image:
        params["srun_args"] = [f"--container-image={opts.container_image}",
                               f"--container-mounts={run_dir.parent}:{run_dir.parent}",
                               f"--container-workdir={os.getcwd()}"]
    return params


def plan(opts: Options, cfg: Config | None = None, cpus_per_node: int | None = None) -> TrainPlan:
    """Resolve and check the training job (LaunchError on bad input; nothing is submitted). `cfg`:
    the trainer config with the user's overrides (loaded here if not given); `cpus_per_node`: what
    the cluster's nodes have, when known (`check_cluster`)."""
    check_options(opts)
    cfg = cfg or load_trainer_config(opts.config, opts.overrides)
    procs = max(opts.gpus, 1)
    overrides, note = fit_micro_batch(cfg, opts.overrides, [opts.nodes * procs], what=f"--gpus {opts.gpus}: ")
    if note:
        log.warning(note)
    if opts.container_image:
        check_image(opts.container_image)
    run_dir, defaults, data_dir = placed_paths(cfg, opts, overrides)
    name = opts.name or cfg.name
    params = executor_params(opts, cfg, name, opts.nodes, cpus_per_task(opts, procs, cpus_per_node), run_dir)
    if opts.gpus:
        params["gpus_per_node"] = opts.gpus
    return TrainPlan(name=name, run_dir=run_dir, nodes=opts.nodes, procs_per_node=procs,
                     overrides=defaults + overrides, executor_params=params, config_path=opts.config,
                     data_dir=data_dir, max_restarts=cfg.launch.max_restarts)


def prepare_plan(opts: Options, cfg: Config | None = None, cpus_per_node: int | None = None) -> PreparePlan:
    """The preparation job: one node, `--cpus` CPUs (default: a whole node) and as many tokenizer
    workers; the same data.dir as the training job. Requeued on preemption like training: the
    preparation resumes after its last finished shard."""
    check_options(opts)
    cfg = cfg or load_trainer_config(opts.config, opts.overrides)
    if opts.cpus is not None and opts.cpus < 1:
        raise LaunchError(f"--cpus must be at least 1, got {opts.cpus}")
    if opts.cpus is not None and cpus_per_node is not None and opts.cpus > cpus_per_node:
        raise LaunchError(f"--cpus {opts.cpus} is more than a node of {opts.partition or 'the default partition'} "
                          f"has ({cpus_per_node}): the job could never start")
    cpus = opts.cpus or cpus_per_node or DEFAULT_CPUS_PER_GPU
    run_dir, defaults, data_dir = placed_paths(cfg, opts, opts.overrides)
    data_defaults = [d for d in defaults if d.startswith("data.dir=")]
    overrides = [*data_defaults, *opts.overrides, f"data.workers={cpus}"]
    name = f"{opts.name or cfg.name}-prepare"
    params = executor_params(opts, cfg, name, 1, cpus, run_dir)
    return PreparePlan(name=name, run_dir=run_dir, nodes=1, procs_per_node=1, overrides=overrides,
                       executor_params=params, config_path=opts.config, data_dir=data_dir)


def check_data(p: Plan, cfg: Config, opts: Options) -> None:
    """Refuse a training job whose data is visibly not there: it would queue, get its GPUs and fail."""
    if cfg.data.auto_prepare or cfg.data.wait_for_data_s:
        return  # the trainer prepares it, or waits for it
    try:
        manifest = read_manifest(p.data_dir, cfg.data.storage_options)
    except DataError as err:  # there, but broken: the job would fail on it
        raise LaunchError(f"{err}; the job would wait for GPUs, then fail") from None
    except (StorageError, OSError) as err:
        log.warning(f"could not check {p.data_dir} from here ({err}); submitting anyway")
        return
    if manifest is None or not manifest.complete:
        state = "is missing" if manifest is None else f"is incomplete ({len(manifest.shards)} shards so far)"
        again = shlex.join(["python", "launch/slurm.py", "prepare", "--config", opts.config, *opts.overrides])
        raise LaunchError(
            f"the training data {p.data_dir}/manifest.json {state}: the job would wait for GPUs, then fail. "
            f"Prepare it first ({again}), or add --prepare to submit the preparation and make training wait for "
            "it (--dependency=afterok)")


def check_cluster(opts: Options) -> int | None:
    """What can be checked before submitting: sbatch exists, the partition exists, GPUs and nodes
    suffice. Returns the CPUs of the partition's largest node (None if sinfo does not say)."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: run this on a SLURM login node (or use --dry-run to see the job)")
    fmt = ["sinfo", "-h", "-o", "%P %G %D %c"]
    if opts.partition:
        fmt += ["-p", opts.partition]
    out = slurm_command(fmt).split("\n")
    rows = [line.split() for line in out if line.strip()]
    if opts.partition and not rows:
        known = slurm_command(["sinfo", "-h", "-o", "%P"]).split()
        raise LaunchError(f"partition '{opts.partition}' does not exist; partitions: {', '.join(known) or 'none'}")
    if opts.gpus:
        best = 0
        for _, gres, _, _ in rows:
            for item in gres.split(","):
                bits = item.split(":")  # gpu:8 or gpu:h100:8(S:0-1)
                if bits[0] == "gpu":
                    best = max(best, int(bits[-1].split("(")[0]))
        if opts.gpus > best:
            raise LaunchError(f"--gpus {opts.gpus} is more than the nodes of "
                              f"{opts.partition or 'the default partition'} have ({best} GPUs per node)")
    total_nodes = sum(int(r[2]) for r in rows) if rows else 0
    if opts.nodes > total_nodes:
        raise LaunchError(f"--nodes {opts.nodes} is more than {opts.partition or 'the cluster'} has ({total_nodes})")
    cpus = [int(r[3].rstrip("+")) for r in rows if r[3].rstrip("+").isdigit()]
    return max(cpus) if cpus else None


class JobTask:
    """What each SLURM task runs, the training or the preparation (picklable by reference, so it lives
    in this importable module)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        logs.setup()  # a process of its own on the node
        env = dict(os.environ, **TRAINER_ENV)
        hosts = slurm_command(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]]).split()
        cmd = self.plan.command(first_host=hosts[0], job_id=os.environ.get("SLURM_JOB_ID", "gpt2"))
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        log.info(f"[gpt2] node {os.environ.get('SLURM_NODEID')} (requeue {restart}): {shlex.join(cmd)}")
        # torchrun and python of this very environment, whatever PATH the job inherited
        program = [sys.executable, "-m", "gpt2.launch.torchrun"] if cmd[0] == "torchrun" else [sys.executable]
        self._proc = subprocess.Popen([*program, *cmd[1:]], env=env, start_new_session=self.plan.own_session)
        while self._proc.poll() is None:  # poll, not wait(): the USR2 handler below waits too
            time.sleep(0.5)
        code = self._proc.returncode
        if code != 0:
            if int(os.environ.get("SLURM_PROCID", "0")) != 0:
                time.sleep(60)  # a preempted peer: task 0 is about to requeue the job, which ends us
            elif code in (EXIT_HUNG, EXIT_STORAGE) and int(restart) < self.plan.executor_params["max_num_timeout"]:
                log.info(f"[gpt2] the trainers exited {code} (retryable); requeueing job {os.environ['SLURM_JOB_ID']}")
                try:
                    slurm_command(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]])
                    time.sleep(60)  # the requeue ends this task
                except LaunchError as err:
                    log.error(f"[gpt2] could not requeue: {err}")
            raise RuntimeError(f"{shlex.join(cmd[:3])} exited with {code}; see the log above")
        return code

    def checkpoint(self) -> Any:
        """Called by submitit on SIGUSR2 (task 0): the plan stops what must be stopped (the trainers got
        the signal too and are saving a checkpoint), we wait until the task exits, then submitit
        requeues the same task."""
        import submitit

        if self._proc is not None:
            self.plan.on_preemption(self._proc)
        deadline = time.monotonic() + self.plan.executor_params["signal_delay_s"] - 5
        while self._proc is not None and self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if self._proc is not None and self._proc.returncode == 0:
            return None  # finished meanwhile: nothing to requeue
        log.info(f"[gpt2] {self.plan.requeue_message()}")
        return submitit.helpers.DelayedSubmission(JobTask(self.plan))


def executor_for(p: Plan):
    submitit = require("submitit", "slurm")

    executor = submitit.SlurmExecutor(folder=str(p.folder / "%j"),
                                      max_num_timeout=p.executor_params["max_num_timeout"])
    params = {k: v for k, v in p.executor_params.items() if k != "max_num_timeout"}
    executor.update_parameters(**params)
    return executor


def dry_run_text(p: Plan) -> str:
    """The sbatch script submitit would write (built without a cluster) and the per-node command."""
    require("submitit", "slurm")
    from submitit.slurm.slurm import _make_sbatch_string

    folder = p.folder / "%j"
    params = {k: v for k, v in p.executor_params.items() if k != "max_num_timeout"}
    submit_cmd = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    sbatch = _make_sbatch_string(command=submit_cmd, folder=folder, **params)
    return (f"# sbatch script (submitit):\n{sbatch}\n\n# on each node, task runs:\n"
            f"{shlex.join(p.command())}\n")


def never_starts(job_id: str) -> str | None:
    """The reason a pending job can never start (it asks more than its partition allows), else None."""
    try:
        out = slurm_command(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], check=False)
    except LaunchError as err:  # asked again at the next poll
        log.warning(f"[gpt2] {err}")
        return None
    state, _, reason = out.strip().partition("|")
    return reason if state == "PENDING" and reason.startswith(NEVER_STARTS) else None


def follow(job, log_path: Path) -> int:
    """Print the job's log as it grows until the job ends; return 0 if it completed. A job that can
    never start is cancelled with the reason, instead of being waited for forever."""
    pos = 0
    while True:
        reason = never_starts(job.job_id)
        if reason:
            try:
                slurm_command(["scancel", job.job_id], check=False)
                cancelled = "cancelled it"
            except LaunchError as err:
                cancelled = f"{err}: cancel it yourself (scancel {job.job_id})"
            log.error(f"[gpt2] job {job.job_id} can never start (squeue: Reason={reason}: it asks more than the "
                      "partition allows; see `scontrol show partition` and the --nodes/--gpus/--cpus-per-gpu/--time "
                      f"options); {cancelled}")
            return 1
        done = job.done(force_check=True)
        if log_path.exists():
            with open(log_path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                print(chunk, end="", flush=True)
        if done:
            try:
                job.results()  # one per node; raises what a task raised
                outcome = "COMPLETED"
            except Exception as err:
                outcome = f"FAILED ({type(err).__name__}: {str(err).strip().splitlines()[-1:]})"
            log.info(f"[gpt2] job {job.job_id} ended: {outcome}")
            return 0 if outcome == "COMPLETED" else 1
        time.sleep(2)


def submit(opts: Options, dry_run: bool = False, do_follow: bool = False, with_prepare: bool = False,
           prepare_only: bool = False) -> int:
    """Submit the training job, the preparation job, or both (training after the preparation succeeded)."""
    check_options(opts)
    cpus_per_node = None if dry_run else check_cluster(opts)
    cfg = load_trainer_config(opts.config, opts.overrides)  # once per submission
    prep = prepare_plan(opts, cfg, cpus_per_node) if (with_prepare or prepare_only) else None
    train = None if prepare_only else plan(opts, cfg, cpus_per_node)
    if train is not None and prep is not None and train.data_dir != prep.data_dir:
        raise LaunchError(f"the preparation would write {prep.data_dir} but training reads {train.data_dir}")
    if dry_run:
        print("\n".join(dry_run_text(p) for p in (prep, train) if p is not None))
        return 0
    if train is not None and prep is None:
        check_data(train, cfg, opts)
    jobs = []
    for p in (prep, train):
        if p is None:
            continue
        if p is train and prep is not None:  # starts only once the preparation has succeeded
            p.executor_params["additional_parameters"]["dependency"] = f"afterok:{jobs[0][0].job_id}"
        p.folder.mkdir(parents=True, exist_ok=True)
        job = executor_for(p).submit(JobTask(p))
        log_path = p.folder / job.job_id / f"{job.job_id}_0_log.out"
        jobs.append((job, log_path))
        after = f", after job {jobs[0][0].job_id} succeeds" if len(jobs) == 2 else ""
        print(f"submitted job {job.job_id}: {p.describe()}{after}\n"
              f"  log:         {log_path}\n"
              f"  watch:       squeue -j {job.job_id}; tail -f {log_path}")
    last = jobs[-1][0]
    print(f"  data:        {(train or prep).data_dir}")  # type: ignore[union-attr]
    if train is not None:
        print(f"  TensorBoard: tensorboard --logdir {train.run_dir.parent}\n"
              f"  checkpoints: {train.run_dir / 'checkpoints'}")
    if not do_follow:
        return 0
    for job, log_path in jobs:
        code = follow(job, log_path)
        if code != 0:
            if job is not last:
                try:
                    slurm_command(["scancel", last.job_id], check=False)
                    log.info(f"[gpt2] cancelled the training job {last.job_id}: its preparation failed")
                except LaunchError as err:
                    log.error(f"[gpt2] {err}: cancel the training job yourself (scancel {last.job_id}); its "
                              "preparation failed")
            return code
    return 0


def parse_args(argv: list[str], prepare: bool = False) -> tuple[Options, argparse.Namespace]:
    prog = "python launch/slurm.py" + (" prepare" if prepare else "")
    a = argparse.ArgumentParser(prog=prog, description=("Prepare the data as a CPU job." if prepare
                                                        else __doc__.split("\n")[0]))
    if prepare:
        a.add_argument("--cpus", type=int, default=None,
                       help="CPUs of the job, and tokenizer workers (default: all of a node)")
        a.add_argument("--time", default="12:00:00", help="time limit, [D-]HH:MM:SS")
        a.set_defaults(nodes=1, gpus=0)
    else:
        a.add_argument("--nodes", type=int, default=1)
        a.add_argument("--gpus", type=int, default=8,
                       help="GPUs (processes) per node; 0 runs one CPU process per node")
        a.add_argument("--time", default=Options.time, help="time limit, [D-]HH:MM:SS")
        a.add_argument("--cpus-per-gpu", type=int, default=None,
                       help=f"CPUs per process (default {DEFAULT_CPUS_PER_GPU}, capped at what a node has)")
        a.add_argument("--signal-delay", type=int, default=None, dest="signal_delay_s",
                       help="seconds before the time limit at which SIGUSR2 asks for a checkpoint")
        a.add_argument("--prepare", action="store_true",
                       help="also submit the data preparation; training starts once it has succeeded")
        a.add_argument("--prepare-cpus", type=int, default=None, dest="cpus",
                       help="CPUs of the preparation job with --prepare (default: all of a node)")
    a.add_argument("--config", default=Options.config)
    a.add_argument("--partition")
    a.add_argument("--account")
    a.add_argument("--qos")
    a.add_argument("--mem")
    a.add_argument("--container-image", help="pyxis/enroot image for clusters that run jobs in containers")
    a.add_argument("--name")
    a.add_argument("--run-dir", help="shared directory for data, logs, checkpoints and TensorBoard "
                                     "(default: launch.run_dir)")
    a.add_argument("--dry-run", action="store_true", help="print the sbatch script and command only")
    a.add_argument("--follow", action="store_true", help="tail the job's log until it ends")
    a.add_argument("overrides", nargs="*", help="trainer config overrides key=value")
    args = a.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("dry_run", "follow", "overrides", "prepare")}
    return Options(**fields, overrides=check_overrides(args.overrides)), args


def command_main(argv: list[str] | None = None) -> int:
    """`python -m gpt2.launch.slurm --print-torchrun ...`: the torchrun line for slurm/train.sbatch."""
    opts, _ = parse_args(argv)
    p = plan(opts)
    print(shlex.join(p.command(first_host=os.environ.get("MASTER_HOST", "$MASTER_HOST"),
                               job_id=os.environ.get("SLURM_JOB_ID", "$SLURM_JOB_ID"))))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logs.setup()
    try:
        if argv[:1] == ["--print-torchrun"]:
            return command_main(argv[1:])
        if argv[:1] == ["prepare"]:
            opts, args = parse_args(argv[1:], prepare=True)
            return submit(opts, dry_run=args.dry_run, do_follow=args.follow, prepare_only=True)
        opts, args = parse_args(argv)
        return submit(opts, dry_run=args.dry_run, do_follow=args.follow, with_prepare=args.prepare)
    except Gpt2Error as err:
        log.error("%s", err)
        return exit_code(err)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
