"""`python -m gpt2.train CONFIG [key=value ...]`, alone or under `torchrun`.

Every start resumes from the newest complete checkpoint (checkpoint.resume=auto), so torchrun
restarts, requeued SLURM jobs and restarted Kubernetes pods all use the same command. SIGTERM,
SIGINT and SIGUSR2 finish the current step, save a checkpoint and exit with EXIT_PREEMPTED.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2 import distributed, logs
from gpt2.checkpoint import Checkpointer, ResumePlan, ResumePoint, apply_plan, check_fits, plan_resume
from gpt2.checkpoint.lease import Lease, submission_of
from gpt2.compile_cache import CompileCache, cache_counts
from gpt2.config import CheckpointConfig, Config, ConfigError, cli_config, grad_accum_steps, to_dict, to_yaml
from gpt2.data import ReadAhead, build_loaders, row_hash, to_device
from gpt2.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_STORAGE,
    CrashLoop,
    DataError,
    Gpt2Error,
    exit_code,
)
from gpt2.evaluator import Evaluator
from gpt2.goodput import process_age_s, run_goodput
from gpt2.metrics import (
    MetricsLogger,
    StepRecord,
    device_peak_flops,
    failed_in_a_row,
    mfu,
    read_ledger,
    recent_step_times,
)
from gpt2.microbatch import choose_micro_batch
from gpt2.model import build_model, flops_per_token
from gpt2.optim import NonFiniteGuard, build_optimizer, lr_at
from gpt2.prepare import prepare_missing, see_prepared_data, wait_for_data
from gpt2.recipe import Continuation, continuation, data_identity, recipe_of
from gpt2.runtime import PreemptionFlag, RNGState, autocast_for, ignore_stop_signals, resolve_dtype, set_tf32
from gpt2.shards import read_manifest
from gpt2.storage import ensure_directory
from gpt2.tokenizer import tokenizer_class
from gpt2.watchdog import RECENT_STEPS, Watchdog, in_collective, phase, record_within_deadline

log = logging.getLogger("gpt2.train")  # also when run as __main__

# Steps after each (re)start whose throughput is not plotted: compilation and caches warm up.
WARMUP = 2

USAGE = """usage: python -m gpt2.train CONFIG [key=value ...]
       torchrun --nproc-per-node N -m gpt2.train CONFIG [key=value ...]

e.g.   python -m gpt2.train configs/demo.yaml
       torchrun --nproc-per-node 8 -m gpt2.train configs/gpt2-124m.yaml train.max_steps=100 optim.lr=3e-4
"""


class Progress:
    """How far training has come: the number of optimizer steps taken (a part of every checkpoint)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


@dataclass
class StepOutput:
    """What one optimizer step returns (before the all-reduce)."""

    loss_sum: torch.Tensor  # loss summed over this rank's micro-steps
    grad_norm: torch.Tensor
    batch_hash: int
    data_seconds: float  # host time spent reading and copying batches


@dataclass
class StartUp:
    """What the start-up decided, for the Trainer to build on."""

    micro_batch: int
    plan: ResumePlan | None = None  # what it resumes from, and which lineage it trains
    lease: Lease | None = None  # rank 0's hold on the run
    data: str | None = None  # identity of the train stream (gpt2.recipe.data_identity)
    continuation: Continuation = field(default_factory=Continuation)
    notes: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # the run's recent step times before this start

    @property
    def resume(self) -> ResumePoint | None:
        return self.plan.point if self.plan else None


def refuse_crash_loop(cfg: Config, submission: str | None, plan: ResumePlan) -> None:
    """CrashLoop when the last train.max_failed_restarts attempts of this scheduler job each failed
    from the checkpoint this start would resume from: restarting again would only repeat that."""
    limit = cfg.train.max_failed_restarts
    if not limit or submission is None:  # a start by hand is a decision of its own
        return
    step = int(plan.point.meta.get("step", 0)) if plan.point else 0
    streak = failed_in_a_row(read_ledger(cfg.logging.dir), submission, step)
    if len(streak) < limit:
        return
    where = f"checkpoint {plan.point.url} (step {step})" if plan.point else "the start (no checkpoint yet)"
    failures = "; ".join(
        f"attempt {a['attempt']}: " + (f"exit {a['end']['exit_code']}, {a['end'].get('reason', '')}"[:200]
                                      if a["end"] and a["end"].get("exit_code") is not None
                                      else "killed (no end record: SIGKILL, out of memory, a lost node)")
        for a in reversed(streak))
    raise CrashLoop(
        f"this job ({submission}) failed {len(streak)} times in a row from {where} without saving a new "
        f"checkpoint ({failures}); another restart would repeat it, so it stops here. Fix the cause and submit "
        "the job again (a new submission counts afresh), or set train.max_failed_restarts=0 to restart regardless")


class Trainer:
    """Builds the parts of a run (data, model, optimizer, checkpointer, evaluator, metrics) and trains.

    `Trainer.build(cfg, dist)` is the one start-up of a run (train, bench): the lease, what the run
    resumes from, the micro-batch, the batch split, the data, and the recipe check.
    """

    @classmethod
    def build(cls, cfg: Config, dist: distributed.Dist, watchdog: Watchdog | None = None) -> Trainer:
        """Everything between a parsed config and the first step. What can refuse the start (the
        config, the checkpoint, the model's fit, the recipe, the data) is checked before the lease
        is taken, so a refused start disturbs nothing; only the lease holder then prepares data,
        writes the ledger, moves checkpoints aside and records a new lineage."""
        n_vocab = tokenizer_class(cfg.tokenizer.name).n_vocab
        if n_vocab > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer '{cfg.tokenizer.name}' has {n_vocab} ids but model.vocab_size is "
                              f"{cfg.model.vocab_size}")
        submission = submission_of(dict(os.environ))
        start = cls.decide(cfg, dist, submission)
        start.lease = take_lease(cfg.checkpoint, dist.is_main)
        try:
            # another trainer held the run before (this start may have watched or waited): what it
            # resumes from is decided again, on what that trainer left
            if distributed.broadcast_object(bool(start.lease and start.lease.took_over)):
                start = dataclasses.replace(cls.decide(cfg, dist, submission), lease=start.lease)
            # rank 0 prepares missing data (an hour for the full corpus) while the others wait
            distributed.decided_on_rank_0(lambda: prepare_missing(cfg), dist.is_main,
                                          "preparing data: waiting for rank 0")
            if cfg.data.auto_prepare and not dist.is_main:
                see_prepared_data(cfg)
            if start.data is None:  # the corpus, now that it is prepared
                start.data = data_identity(read_manifest(cfg.data.dir, cfg.data.storage_options))
                start.continuation = continuation(start.resume.meta if start.resume else None, cfg, start.data)
            start.hosts = same_data_everywhere(cfg, start.data)
            start.step_times = distributed.broadcast_object(  # type: ignore[assignment]
                recent_step_times(cfg.logging.dir, dist.world_size, RECENT_STEPS) if dist.is_main else None)
            return cls(cfg, dist, start, watchdog)
        except BaseException:
            if start.lease is not None:
                start.lease.release()
            raise

    @staticmethod
    def decide(cfg: Config, dist: distributed.Dist, submission: str | None) -> StartUp:
        """What this start resumes from and how it goes on, reading only: every check that can refuse it."""
        plan = plan_resume(cfg.checkpoint, dist.is_main, submission)
        distributed.decided_on_rank_0(lambda: refuse_crash_loop(cfg, submission, plan), dist.is_main,
                                      "checking for a crash loop: waiting for rank 0")
        if plan.point is not None and plan.point.state is not None:
            with torch.device("meta"):  # shapes only, no memory
                check_fits(plan.point, {"model": build_model(cfg.model)})
        micro_batch, notes = cfg.train.micro_batch, []
        if micro_batch == "auto":
            micro_batch, why = choose_micro_batch(cfg, dist, plan.point)
            notes.append(f"train.micro_batch=auto chose {micro_batch}: {why}")
        t = cfg.train  # a batch that cannot be split fails before any work
        grad_accum_steps(t.total_batch_tokens, micro_batch, t.seq_len, dist.world_size)
        wait_for_data(cfg)  # for another job's data, with data.wait_for_data_s
        manifest = read_manifest(cfg.data.dir, cfg.data.storage_options)
        # a corpus still being prepared (data.auto_prepare after a cut preparation) is not the corpus
        data = data_identity(manifest) if manifest is not None and manifest.complete else None
        # the recipe check; with data still to prepare, the corpus is compared once it is there
        going_on = continuation(plan.point.meta if plan.point else None, cfg, data)
        return StartUp(micro_batch, plan, None, data, going_on, notes)  # type: ignore[arg-type]

    def __init__(self, cfg: Config, dist: distributed.Dist, start: StartUp, watchdog: Watchdog | None = None):
        self.born = time.monotonic() - process_age_s()  # the process's start, on the monotonic clock
        self.cfg, self.dist, self.device, self.micro_batch = cfg, dist, dist.device, start.micro_batch
        self.start, self.lr_phase, self.lease = start, start.continuation.lr_phase, start.lease
        self.watchdog = watchdog or Watchdog(0)  # bench: none
        self.dtype = resolve_dtype(cfg.train.dtype, self.device)
        self.autocast = autocast_for(self.device, self.dtype)
        set_tf32(self.device, cfg.train.tf32)
        self.train_loader, self.val_loader = build_loaders(cfg, self.micro_batch, dist.rank, dist.world_size,
                                                           start.continuation.origin)
        self.accum = self.train_loader.layout.accum_steps
        self.read_ahead = ReadAhead(self.train_loader)

        torch.manual_seed(cfg.train.seed)
        self.raw_model = build_model(cfg.model).to(self.device)
        self.model: torch.nn.Module = self.raw_model
        if cfg.train.compile:
            self.model = torch.compile(self.model, mode=cfg.train.compile_mode)
        if dist.world_size > 1:  # DDP's constructor is a collective: a frozen peer is found at the barrier
            distributed.wait_for_all(phase_name="start-up: waiting for every rank's model")
            self.model = DDP(self.model, device_ids=[dist.local_rank] if self.device.type == "cuda" else None,
                             bucket_cap_mb=cfg.train.ddp_bucket_cap_mb, gradient_as_bucket_view=True,
                             static_graph=cfg.train.ddp_static_graph)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, self.device.type)
        self.guard = NonFiniteGuard(cfg.optim.max_skipped_steps)

        self.progress = Progress()
        self.preemption = PreemptionFlag()
        self.checkpointer = Checkpointer(
            cfg.checkpoint, is_writer=dist.is_main, describe=self.describe, lease=self.lease,
            lineage=start.plan.lineage if start.plan else None, stopping=lambda: self.preemption.is_set,
            parts={"model": self.raw_model, "optimizer": self.optimizer, "progress": self.progress, "rng": RNGState()})
        if start.resume is not None:
            self.checkpointer.restore(start.resume)
        # a (re)start drops the events logged at or after the step it starts from (a failed attempt's
        # steps after its checkpoint, an abandoned branch, a start-over's predecessor); a finished run keeps all
        purge = self.progress.step if self.progress.step < cfg.train.max_steps else None
        self.metrics = MetricsLogger(cfg.logging.dir, dist.is_main, cfg.train.max_steps, cfg.train.log_every,
                                     purge_step=purge, gate=self.lease)
        self.evaluator = Evaluator(cfg, dist, self.model, self.raw_model, self.val_loader, self.autocast,
                                   self.metrics, stopping=lambda: self.preemption.is_set)
        n_params = self.raw_model.num_params()
        self.flops_per_token = flops_per_token(n_params, cfg.model.n_layer, cfg.model.n_embd, cfg.train.seq_len)
        self.peak_flops, self.device_name = device_peak_flops(self.device, self.dtype)
        self.announce(n_params)
        if dist.is_main and start.plan is not None:  # only now, with this attempt on record
            apply_plan(cfg.checkpoint, start.plan, self.lease.fence if self.lease else lambda: None)
        # the others wait for rank 0's part (moving checkpoints aside on an object store copies them)
        # as long as it lives, not in the first step's collective under the step times from before
        distributed.wait_for_all(phase_name="start-up: waiting for every rank")

    def announce(self, n_params: int) -> None:
        """Say what this run is: on the console, in the attempt ledger, and once per start in TensorBoard."""
        cfg, dist, start = self.cfg, self.dist, self.start
        log.info(f"model: {n_params:,} parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token (6N + 6*L*C*T); "
                 f"world size {dist.world_size}, {self.accum} micro-steps of {self.micro_batch} x "
                 f"{cfg.train.seq_len} per rank = {cfg.train.total_batch_tokens:,} tokens/step; device "
                 f"{self.device_name} ({self.dtype}); "
                 + (f"peak {self.peak_flops / 1e12:.0f} TFLOP/s" if self.peak_flops
                    else "MFU unknown (no known peak FLOP/s for this device)"))
        log.info(f"resumed from {start.resume.url} at step {self.progress.step}" if start.resume
                 else f"no checkpoint under {cfg.checkpoint.dir}: starting from scratch")
        lease, plan = self.lease, start.plan
        for note in start.notes:
            log.info(note)
        for warning in start.continuation.warnings:
            log.warning(warning)
        m, o, t = cfg.model, cfg.optim, cfg.train
        took_over = lease.took_over if lease else None
        self.metrics.attempt_started(self.progress.step, {
            "hosts": start.hosts, "world_size": dist.world_size, "job_id": lease.owner.submission if lease else None,
            "pid": os.getpid(),
            "micro_batch": self.micro_batch, "resumed_from_step": self.progress.step if start.resume else None,
            "checkpoint": start.resume.url if start.resume else None,
            "lineage": plan.lineage.id if plan else None, "began": plan.begins if plan else None,
            "checkpoint_dir": cfg.checkpoint.dir if "://" in cfg.checkpoint.dir
            else os.path.abspath(cfg.checkpoint.dir),
            "max_steps": t.max_steps, "total_batch_tokens": t.total_batch_tokens,
            "process_s": time.monotonic() - self.born},
            generation=lease.generation if lease else None,
            superseded=(took_over.generation, took_over.superseded) if took_over and took_over.superseded else None)
        if dist.is_main:  # the run so far, as TensorBoard scalars
            self.metrics.scalars(self.progress.step, run_goodput(cfg.logging.dir).scalars())
        self.metrics.start(self.progress.step, {
            "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head, "lr": o.lr, "min_lr": o.min_lr,
            "warmup_steps": o.warmup_steps, "weight_decay": o.weight_decay, "max_steps": t.max_steps,
            "total_batch_tokens": t.total_batch_tokens, "seq_len": t.seq_len, "micro_batch": self.micro_batch,
            "world_size": dist.world_size, "compile": t.compile}, self.micro_batch, self.accum)
        self.metrics.text("config", "```\n" + to_yaml(cfg, redact=True) + "\n```"
                          + "".join(f"\n\n{note}" for note in start.notes + start.continuation.warnings),
                          self.progress.step)

    def describe(self, step: int) -> dict[str, Any]:
        """What a checkpoint's commit marker says about it (`gpt2.checkpoint inspect` shows it)."""
        return {
            "tokens_seen": self.tokens_seen(step),
            "world_size": self.dist.world_size,
            "micro_batch": self.micro_batch,
            "data_position": {"next_step": step, "rows_per_step": self.train_loader.layout.rows_per_step,
                              "rows_before": self.train_loader.layout.rows_before(step),
                              "origin": list(self.train_loader.layout.origin),
                              "epoch": self.train_loader.epoch_of(step)},
            "recipe": recipe_of(self.cfg, self.start.data, self.lr_phase),
            "sample_seed": self.cfg.train.seed,
            "config": to_dict(self.cfg, redact=True),
        }

    def tokens_seen(self, step: int) -> int:
        """Tokens trained on before `step` (the batch may have changed on the way: train.allow_batch_change)."""
        return self.train_loader.layout.rows_before(step) * self.cfg.train.seq_len

    def fit(self) -> int:
        """Train from the resumed step to train.max_steps, or to a stop; returns the exit code."""
        cfg, max_steps, watchdog = self.cfg, self.cfg.train.max_steps, self.watchdog
        if self.progress.step >= max_steps:
            self.stop_reason = f"training already complete ({self.progress.step}/{max_steps} steps)"
            log.info(self.stop_reason)
            return EXIT_OK
        first = self.progress.step
        self.read_first_batches(first)
        if cfg.train.compile:
            with watchdog.phase("compiling the training step", ceiling=True):
                self.warm_up()
        watchdog.steps(before=self.start.step_times, compiled=cfg.train.compile)
        with self.preemption:
            for step in range(self.progress.step, max_steps):
                self.evaluator.run_due(step)
                t0 = time.monotonic()
                out = self.train_step(step)
                loss, preempted, batch_hash = self.reduce(out.loss_sum, out.batch_hash)  # syncs: time after it
                dt = time.monotonic() - t0
                self.progress.step = done = step + 1
                warmup = step - first < WARMUP
                # a wait for a shard's copy is not the step's own time (it would raise the limit)
                watchdog.step_done(max(dt - self.read_ahead.waited(), 0.0), timed=not warmup)
                self.checkpointer.check_lease()  # a superseded writer stops before writing anything
                self.metrics.step(self.record(step, loss, out, batch_hash, dt, warmup))
                if done == max_steps:
                    self.evaluator.run_due(done, last=True)
                    self.checkpointer.save_final(done, "final")
                elif preempted:
                    self.checkpointer.save_final(done, "preemption")
                    self.stop_reason = f"preempted: checkpoint saved at step {done}"
                    log.info(f"{self.stop_reason}; exiting with {EXIT_PREEMPTED}")
                    return EXIT_PREEMPTED
                elif done == cfg.train.stop_at_step:
                    self.checkpointer.save_final(done, "stop_at_step")
                    self.stop_reason = f"stopped at step {done} (train.stop_at_step)"
                    log.info(f"{self.stop_reason}; checkpoint saved")
                    return EXIT_OK
                elif not self.guard.skipped:  # no periodic save while updates are being skipped
                    self.checkpointer.step_end(done)
        self.stop_reason = f"finished: {max_steps} steps"
        log.info(f"training complete: {max_steps} steps; checkpoints in {cfg.checkpoint.dir}, "
                 f"TensorBoard: tensorboard --logdir {cfg.logging.dir}")
        return EXIT_OK

    def record_end(self, code: int, reason: str) -> None:
        """The end of this attempt in the ledger, unless another attempt took the run over (then
        that one records it)."""
        if self.lease is None or not self.lease.superseded:
            try:  # after an outage the lease is unconfirmed, yet this end is ours to record (if no successor did)
                self.metrics.attempt_ended(self.progress.step, code, reason, unconfirmed=code == EXIT_STORAGE,
                                           clock=self.clock())
            except Gpt2Error as err:  # e.g. the logging disk is full: the exit code and message still say why
                log.warning(f"could not record the end of this attempt: {err}")

    def read_first_batches(self, step: int) -> None:
        """Have the first step's and the first evaluation's data here before any collective: a rank
        that copies a shard shows progress, and its peers wait for it while every rank lives instead
        of in the step's all-reduce, where a wait is not progress."""
        def read() -> None:
            self.read_ahead.read_early(step)
            if self.val_loader is not None:
                self.val_loader.read_early(self.dist.rank, self.dist.world_size)

        # a stop meanwhile is acted on at the first step (a save), or ends a wait for a peer that is gone
        with self.preemption:
            distributed.done_on_every_rank(read, "reading the first batches", lambda: self.preemption.is_set)

    def warm_up(self) -> None:
        """Compile the training step before the first collective: a forward and backward of a batch of
        zeros without gradient sync, the evaluation's forward, then a barrier (within the process-group
        timeout). Ranks whose compilation is slow (another node, a cold cache) then no longer stall
        their peers' all-reduce. The compiled artifacts are kept with the run (gpt2.compile_cache)."""
        t0 = time.monotonic()
        cfg = self.cfg
        cache = CompileCache(cfg.checkpoint.dir, cfg.checkpoint.storage_options, self.device.type, {
            "model": dataclasses.asdict(cfg.model), "micro_batch": self.micro_batch, "seq_len": cfg.train.seq_len,
            "dtype": str(self.dtype), "mode": cfg.train.compile_mode, "world_size": self.dist.world_size})
        cache.load()
        x = torch.zeros((self.micro_batch, cfg.train.seq_len), dtype=torch.long, device=self.device)
        sync = self.model.no_sync() if isinstance(self.model, DDP) else nullcontext()
        with sync:
            with self.autocast:
                _, loss = self.model(x, x)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.evaluator.warm_up()
        if self.dist.is_main and not cache.loaded:
            cache.save()
        distributed.barrier()
        hits, misses = cache_counts()
        log.info(f"compiled the training step in {time.monotonic() - t0:.1f} s (every rank ready; compile cache: "
                 f"{hits} hits, {misses} misses{', from stored artifacts' if cache.loaded else ''})")

    def record(self, step: int, loss: float, out: StepOutput, batch_hash: int, dt: float,
               warmup: bool) -> StepRecord:
        tokens_per_sec = self.cfg.train.total_batch_tokens / dt
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return StepRecord(
            step=step, loss=loss, lr=lr_at(step, self.cfg.optim, self.cfg.train.max_steps, self.lr_phase),
            grad_norm=float(out.grad_norm), step_time_ms=dt * 1000, tokens_per_sec=tokens_per_sec,
            mfu=mfu(tokens_per_sec, self.flops_per_token, self.peak_flops, self.dist.world_size),
            batch_hash=batch_hash, world_size=self.dist.world_size, tokens_seen=self.tokens_seen(step + 1),
            data_share=out.data_seconds / dt,
            peak_memory_gib=peak, warmup=warmup, **self.clock())

    def clock(self) -> dict[str, float]:
        """This attempt's clock for goodput: seconds since the process started, and the time spent
        in checkpoint stalls and evaluation so far."""
        return {"attempt_s": time.monotonic() - self.born, "checkpoint_s": self.checkpointer.stalled_s,
                "eval_s": self.evaluator.seconds}

    def train_step(self, step: int) -> StepOutput:
        """One optimizer step over this rank's micro-batches."""
        lr = lr_at(step, self.cfg.optim, self.cfg.train.max_steps, self.lr_phase)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        batch_hash = 0
        data_seconds = 0.0
        for micro in range(self.accum):
            t0 = time.perf_counter()
            rows = self.read_ahead.rows(step, micro)
            batch_hash += row_hash(rows, self.train_loader.layout.offset_in_step(micro, self.dist.rank))
            x, y = to_device(rows, self.device)  # pinned + non-blocking on CUDA
            data_seconds += time.perf_counter() - t0
            # gradients are all-reduced only on the last micro-step (forward and backward both): a
            # wait for the other ranks, whose work is then progress for this rank's watchdog
            if micro == self.accum - 1:
                sync = in_collective()
            else:
                sync = self.model.no_sync() if isinstance(self.model, DDP) else nullcontext()
            started = time.perf_counter()
            with sync:
                with self.autocast:
                    _, loss = self.model(x, y)
                loss = loss / self.accum
                loss_sum += loss.detach()
                loss.backward()
            # progress per micro-step, and a measure for the first steps: one longer than the floor still moves
            self.watchdog.micro_step_done(time.perf_counter() - started)
        with in_collective():  # on a GPU, the all-reduce is waited for here
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.optim.grad_clip)
            allowed = self.guard.allows(step, float(norm))
        if allowed:
            self.optimizer.step()
        return StepOutput(loss_sum, norm, batch_hash, data_seconds)

    def reduce(self, loss_sum: torch.Tensor, batch_hash: int) -> tuple[float, bool, int]:
        """One all-reduce for the mean loss, the preemption flag of any rank and the global batch hash."""
        flag = 1.0 if self.preemption.is_set else 0.0
        shared = torch.tensor([0.0, flag, float(batch_hash)], dtype=torch.float64, device=self.device)
        shared[0] = loss_sum.double()
        distributed.all_reduce_sum(shared)
        return float(shared[0]) / self.dist.world_size, bool(shared[1] > 0), int(shared[2])

    def close(self) -> None:
        self.read_ahead.close()
        self.checkpointer.close()
        self.metrics.close()
        if self.lease is not None:
            self.lease.release()


def same_data_everywhere(cfg: Config, data: str | None) -> list[str]:
    """The run's hosts, once every rank found the same data (its identity) in data.dir; DataError
    on every rank where a node holds other data (a node-local data.dir prepared apart)."""
    views: list[tuple[str, str | None]] = distributed.all_gather_object((socket.gethostname(), data))  # type: ignore[assignment]
    others = sorted({host for host, seen in views if seen != views[0][1]})
    if others:
        raise DataError(f"data.dir {cfg.data.dir} holds other data on {', '.join(others)} than on rank 0's node "
                        f"({views[0][0]}): data.dir must be storage that every node shares (a shared file system "
                        "or an object store)")
    return sorted({host for host, _ in views})


def take_lease(cfg: CheckpointConfig, is_main: bool) -> Lease | None:
    """Rank 0's lease on the run (None elsewhere, and with checkpoint.lease_ttl_s=0); every rank
    raises LeaseHeld if another trainer has it. Taking it may wait for an ending holder (up to
    checkpoint.lease_wait_s); the other ranks wait as long as rank 0 lives."""

    def acquire() -> Lease | None:
        if not cfg.lease_ttl_s:
            return None
        ensure_directory(cfg.dir, cfg.storage_options, "checkpoint.dir")
        with phase("taking the run's lease", ceiling=True):
            return Lease(cfg.dir, cfg.lease_ttl_s, cfg.storage_options, cfg.retries,
                         wait_s=cfg.lease_wait_s, outage_s=cfg.outage_s).acquire(cfg.take_over)

    lease, _ = distributed.decided_on_rank_0(acquire, is_main, "taking the run's lease: waiting for rank 0",
                                             share=lambda lease: None)
    return lease


def main(argv: list[str] | None = None) -> None:
    logs.setup()
    cfg = cli_config(sys.argv[1:] if argv is None else argv, USAGE)
    sys.exit(run(cfg))


def run(cfg: Config) -> int:
    """Train per `cfg`; returns the process exit code (errors become messages here)."""
    trainer: Trainer | None = None
    dist = None
    code, reason = EXIT_ERROR, "failed"

    def hung(phase_name: str) -> None:  # the watchdog's record before it exits the process
        if trainer is not None:
            trainer.record_end(watchdog.exit_code, f"hung in phase '{phase_name}': {watchdog.cause}")

    def end_stopped_peers() -> None:  # its last act (/proc only: nothing that can hang)
        stopped = distributed.end_stopped_local_peers()
        if stopped:
            log.error(f"killed this node's stopped worker(s) {stopped}: torchrun would wait 30 s for them to "
                      "answer its SIGTERM, which a stopped process never does")

    last_step: list[int | str] = ["?"]  # for the watchdog's message once the trainer is gone (the teardown)
    watchdog = Watchdog(cfg.train.hang_timeout_s, on_hang=hung, before_exit=end_stopped_peers, where=lambda: (
        f"rank {dist.rank if dist else os.environ.get('RANK', '?')}, "
        f"step {trainer.progress.step if trainer else last_step[0]}"))
    with watchdog:  # everything, the clean-up after the loop too, is watched
        try:
            # collectives time out after twice the watchdog's ceiling: the watchdog, with its clearer
            # message, acts first
            dist = distributed.init(cfg.train.device, 2 * cfg.train.hang_timeout_s, cfg.train.hang_timeout_s)
            logs.setup(dist.rank)
            trainer = Trainer.build(cfg, dist, watchdog)
            code = trainer.fit()
            reason = trainer.stop_reason
        except Gpt2Error as err:
            watchdog.yield_to_hang_exit()
            log.error("%s", err)
            code, reason = exit_code(err), f"{type(err).__name__}: {err}"
        except Exception as err:
            watchdog.yield_to_hang_exit()  # e.g. the collective of a peer the watchdog just killed
            reason = f"crashed: {type(err).__name__}: {err}"
            if dist is not None and dist.world_size > 1:
                # A peer may have died (torchrun then restarts the whole group from the last checkpoint):
                # any further collective or DDP destructor could hang, so leave without tearing down.
                ignore_stop_signals()  # torchrun's SIGTERM, for the failed peer, comes any moment now
                lost = distributed.group_failure(err)
                code = exit_code(lost) if lost else EXIT_ERROR  # 201 for a lost peer: a restart helps
                if lost is None:
                    traceback.print_exc()
                else:
                    log.error("%s", lost)
                    reason = f"{type(lost).__name__}: {lost}"
                if trainer is not None:
                    record_within_deadline(lambda: trainer.record_end(code, reason), "the end of this attempt")
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
            raise
        finally:
            with watchdog.phase("finishing (the last records, the lease, the group's teardown)", ceiling=True):
                if trainer is not None:
                    trainer.record_end(code, reason)
                    trainer.close()
                    last_step[0] = trainer.progress.step
                trainer = None  # the DDP module goes before the process group
                if code in (EXIT_OK, EXIT_PREEMPTED):
                    try:
                        distributed.teardown()
                    except Exception as err:  # a peer gone at the very end: its checkpoints decide the restart
                        lost = distributed.group_failure(err)
                        if lost is None:
                            raise
                        log.error("%s", lost)
                        code = exit_code(lost)
                else:
                    distributed.abort()
    if code == EXIT_OK and dist is not None and dist.is_main:
        log.info(f"outputs: checkpoints {cfg.checkpoint.dir} | TensorBoard {cfg.logging.dir} "
                 f"(tensorboard --logdir {cfg.logging.dir}) | steps {os.path.join(cfg.logging.dir, 'steps.jsonl')}")
    return code


if __name__ == "__main__":
    main()
