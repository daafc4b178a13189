"""SLURM through submitit: one job of N nodes, one torchrun agent per node, requeue on preemption.

    python launch/slurm.py --nodes 2 --gpus 8 [--config configs/gpt2-124m.yaml] [--partition P] ...
        [--dry-run] [--follow] [key=value ...]

Each node runs one submitit task, which runs `torchrun --nnodes N --nproc-per-node G` with c10d
rendezvous on the first host of the allocation. SLURM sends SIGUSR2 `--signal-delay` seconds before
the time limit (and `scancel --signal=USR2` does the same): torchrun forwards it to the trainers,
which save a checkpoint at the next step boundary and exit; the task then returns to submitit, which
requeues the job; the requeued job runs the same command and resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
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

DEFAULT_CPUS_PER_GPU = 8
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
    overrides: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """Everything the submission needs, resolved: where things go and what runs."""

    name: str
    run_dir: Path
    nodes: int
    procs_per_node: int
    overrides: list[str]
    executor_params: dict[str, Any]
    max_restarts: int
    config_path: str

    @property
    def folder(self) -> Path:
        return self.run_dir / "submitit"

    def command(self, first_host: str = "$MASTER_HOST", job_id: str = "$SLURM_JOB_ID") -> list[str]:
        return torchrun_command(self.config_path, self.overrides, nproc_per_node=self.procs_per_node,
                                nnodes=str(self.nodes), rdzv_endpoint=f"{first_host}:{RDZV_PORT}", rdzv_id=job_id,
                                max_restarts=self.max_restarts)


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?$")
_NAME = re.compile(r"^[A-Za-z0-9_.,:+-]+$")  # partition, account, qos, job name: no spaces, newlines, quotes


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
        print(f"note: asking {cpus_per_node} CPUs per node (all a node of {opts.partition or 'the default partition'}"
              f" has), not {DEFAULT_CPUS_PER_GPU} per process; --cpus-per-gpu sets it", file=sys.stderr)
        return cpus_per_node
    return wanted


def plan(opts: Options, cpus_per_node: int | None = None) -> Plan:
    """Resolve and check the options (LaunchError on bad input; nothing is submitted).
    `cpus_per_node`: what the cluster's nodes have, when known (`check_cluster`)."""
    check_options(opts)
    cfg = load_trainer_config(opts.config, opts.overrides)
    procs = max(opts.gpus, 1)
    overrides, note = fit_micro_batch(cfg, opts.overrides, [opts.nodes * procs], what=f"--gpus {opts.gpus}: ")
    if note:
        print(note, file=sys.stderr)
    if opts.container_image:
        check_image(opts.container_image)
    name = opts.name or cfg.name
    run_dir = Path(opts.run_dir or cfg.launch.run_dir).absolute() / name
    # checkpoints and TensorBoard under the run directory unless the user placed them
    placed = {o.split("=", 1)[0] for o in overrides}
    defaults = []
    if "checkpoint.dir" not in placed:
        defaults.append(f"checkpoint.dir={run_dir / 'checkpoints'}")
    if "logging.dir" not in placed:
        defaults.append(f"logging.dir={run_dir / 'tensorboard'}")
    delay = opts.signal_delay_s if opts.signal_delay_s is not None else cfg.launch.signal_delay_s
    params: dict[str, Any] = dict(
        nodes=opts.nodes,
        ntasks_per_node=1,  # one torchrun agent per node; it starts the per-GPU processes
        cpus_per_task=cpus_per_task(opts, procs, cpus_per_node),
        time=time_to_minutes(opts.time),
        job_name=name,
        signal_delay_s=delay,
        max_num_timeout=cfg.launch.max_requeues,
        additional_parameters={"open-mode": "append"},
        setup=[f"export {k}={shlex.quote(v)}" for k, v in TRAINER_ENV.items()],
    )
    if opts.gpus:
        params["gpus_per_node"] = opts.gpus
    for key in ("partition", "account", "qos", "mem"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    if opts.container_image:
        params["srun_args"] = [f"--container-image={opts.container_image}",
                               f"--container-mounts={run_dir}:{run_dir}", f"--container-workdir={os.getcwd()}"]
    return Plan(name=name, run_dir=run_dir, nodes=opts.nodes, procs_per_node=procs, overrides=defaults + overrides,
                executor_params=params, max_restarts=cfg.launch.max_restarts, config_path=opts.config)


def check_cluster(opts: Options) -> int | None:
    """What can be checked before submitting: sbatch exists, the partition exists, GPUs and nodes
    suffice. Returns the CPUs of the partition's largest node (None if sinfo does not say)."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: run this on a SLURM login node (or use --dry-run to see the job)")
    fmt = ["sinfo", "-h", "-o", "%P %G %D %c"]
    if opts.partition:
        fmt += ["-p", opts.partition]
    out = subprocess.run(fmt, capture_output=True, text=True).stdout.split("\n")
    rows = [line.split() for line in out if line.strip()]
    if opts.partition and not rows:
        known = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
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


class TrainTask:
    """What each SLURM task runs (picklable by reference, so it lives in this importable module)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        env = dict(os.environ, **TRAINER_ENV)
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        cmd = self.plan.command(first_host=hosts[0], job_id=os.environ.get("SLURM_JOB_ID", "gpt2"))
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"[gpt2] node {os.environ.get('SLURM_NODEID')} (requeue {restart}): {shlex.join(cmd)}", flush=True)
        # torchrun of this very environment, whatever PATH the job inherited
        self._proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *cmd[1:]], env=env)
        while self._proc.poll() is None:  # poll, not wait(): the USR2 handler below waits too
            time.sleep(0.5)
        code = self._proc.returncode
        if code != 0:
            if int(os.environ.get("SLURM_PROCID", "0")) != 0:
                time.sleep(60)  # a preempted peer: task 0 is about to requeue the job, which ends us
            raise RuntimeError(f"torchrun exited with {code}; see the log above")
        return code

    def checkpoint(self) -> Any:
        """Called by submitit on SIGUSR2 (task 0): the trainers got the signal too and are saving a
        checkpoint; wait until they exit, then let submitit requeue the same task."""
        import submitit

        deadline = time.time() + self.plan.executor_params["signal_delay_s"] - 5
        while self._proc is not None and self._proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        if self._proc is not None and self._proc.returncode == 0:
            return None  # training finished meanwhile: nothing to requeue
        print("[gpt2] checkpoint saved after the preemption signal; requeueing", flush=True)
        return submitit.helpers.DelayedSubmission(TrainTask(self.plan))


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
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True).stdout
    state, _, reason = out.strip().partition("|")
    return reason if state == "PENDING" and reason.startswith(NEVER_STARTS) else None


def follow(job, log: Path) -> int:
    """Print the job's log as it grows until the job ends; return 0 if it completed. A job that can
    never start is cancelled with the reason, instead of being waited for forever."""
    pos = 0
    while True:
        reason = never_starts(job.job_id)
        if reason:
            subprocess.run(["scancel", job.job_id], capture_output=True)
            print(f"[gpt2] job {job.job_id} can never start (squeue: Reason={reason}: it asks more than the "
                  "partition allows; see `scontrol show partition` and the --nodes/--gpus/--cpus-per-gpu/--time "
                  "options); cancelled it", flush=True)
            return 1
        done = job.done(force_check=True)
        if log.exists():
            with open(log) as f:
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
            print(f"[gpt2] job {job.job_id} ended: {outcome}")
            return 0 if outcome == "COMPLETED" else 1
        time.sleep(2)


def submit(opts: Options, dry_run: bool = False, do_follow: bool = False) -> int:
    if dry_run:
        print(dry_run_text(plan(opts)))
        return 0
    p = plan(opts, cpus_per_node=check_cluster(opts))
    p.folder.mkdir(parents=True, exist_ok=True)
    job = executor_for(p).submit(TrainTask(p))
    log = p.folder / job.job_id / f"{job.job_id}_0_log.out"
    print(f"submitted job {job.job_id} ({p.nodes} node(s) x {p.procs_per_node} process(es))\n"
          f"  log:         {log}\n"
          f"  watch:       squeue -j {job.job_id}; tail -f {log}\n"
          f"  TensorBoard: tensorboard --logdir {p.run_dir.parent}\n"
          f"  checkpoints: {p.run_dir / 'checkpoints'}")
    return follow(job, log) if do_follow else 0


def parse_args(argv: list[str] | None) -> tuple[Options, argparse.Namespace]:
    a = argparse.ArgumentParser(prog="python launch/slurm.py", description=__doc__.split("\n")[0])
    a.add_argument("--nodes", type=int, default=1)
    a.add_argument("--gpus", type=int, default=8, help="GPUs (processes) per node; 0 runs one CPU process per node")
    a.add_argument("--config", default=Options.config)
    a.add_argument("--partition")
    a.add_argument("--account")
    a.add_argument("--qos")
    a.add_argument("--time", default=Options.time, help="time limit, [D-]HH:MM:SS")
    a.add_argument("--cpus-per-gpu", type=int, default=None,
                   help=f"CPUs per process (default {DEFAULT_CPUS_PER_GPU}, capped at what a node has)")
    a.add_argument("--mem")
    a.add_argument("--container-image", help="pyxis/enroot image for clusters that run jobs in containers")
    a.add_argument("--name")
    a.add_argument("--run-dir", help="shared directory for logs, checkpoints and TensorBoard (default: launch.run_dir)")
    a.add_argument("--signal-delay", type=int, default=None, dest="signal_delay_s",
                   help="seconds before the time limit at which SIGUSR2 asks for a checkpoint")
    a.add_argument("--dry-run", action="store_true", help="print the sbatch script and torchrun command only")
    a.add_argument("--follow", action="store_true", help="tail the job's log until it ends")
    a.add_argument("overrides", nargs="*", help="trainer config overrides key=value")
    args = a.parse_args(argv)
    opts = Options(**{k: v for k, v in vars(args).items() if k not in ("dry_run", "follow", "overrides")},
                   overrides=check_overrides(args.overrides))
    return opts, args


def command_main(argv: list[str] | None = None) -> int:
    """`python -m gpt2.launch.slurm --print-torchrun ...`: the torchrun line for slurm/train.sbatch."""
    opts, _ = parse_args(argv)
    p = plan(opts)
    print(shlex.join(p.command(first_host=os.environ.get("MASTER_HOST", "$MASTER_HOST"),
                               job_id=os.environ.get("SLURM_JOB_ID", "$SLURM_JOB_ID"))))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["--print-torchrun"]:
            return command_main(argv[1:])
        opts, args = parse_args(argv)
        return submit(opts, dry_run=args.dry_run, do_follow=args.follow)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
