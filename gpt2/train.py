"""`python -m gpt2.train CONFIG [key=value ...]`, alone or under `torchrun`.

Every start resumes from the newest complete checkpoint (checkpoint.resume=auto), so torchrun
restarts, requeued SLURM jobs and restarted Kubernetes pods all use the same command. SIGTERM,
SIGINT and SIGUSR2 finish the current step, save a checkpoint and exit with EXIT_PREEMPTED.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2 import distributed, hellaswag
from gpt2.checkpoint import Checkpointer, CheckpointError
from gpt2.config import Config, ConfigError, cli_config, grad_accum_steps, to_yaml
from gpt2.data import build_loaders, to_device
from gpt2.evaluate import val_loss
from gpt2.metrics import Metrics, device_peak_flops, mfu
from gpt2.model import GPT, GPTConfig, flops_per_token
from gpt2.optim import build_optimizer, lr_at
from gpt2.sample import sample_texts
from gpt2.shards import DataError, read_manifest
from gpt2.storage import StorageError
from gpt2.tokenizer import Tokenizer, TokenizerError, get_tokenizer, tokenizer_class

log = logging.getLogger("gpt2.train")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
# Preempted (signal received, checkpoint saved). In the 128-255 range that Kubeflow's
# restartPolicy=ExitCode treats as retryable, and not 128+N for a common signal N.
EXIT_PREEMPTED = 200
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

USAGE = """usage: python -m gpt2.train CONFIG [key=value ...]
       torchrun --nproc-per-node N -m gpt2.train CONFIG [key=value ...]

e.g.   python -m gpt2.train configs/demo.yaml
       torchrun --nproc-per-node 8 -m gpt2.train configs/gpt2-124m.yaml train.max_steps=100 optim.lr=3e-4
"""


def build_model(cfg: Config) -> GPT:
    m = cfg.model
    if m.init_from:
        return GPT.from_pretrained(m.init_from, pad_vocab_to=m.pad_vocab_to)
    return GPT(GPTConfig(block_size=m.block_size, vocab_size=m.vocab_size, n_layer=m.n_layer,
                         n_head=m.n_head, n_embd=m.n_embd, pad_vocab_to=m.pad_vocab_to))


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.train.dtype)


class PreemptionFlag:
    """Set by SIGTERM/SIGINT/SIGUSR2; acted on at the next step boundary on every rank."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        # Repeats are expected (SLURM signals every process of a step, torchrun forwards the same
        # signal again); a worker that never gets to save is SIGKILLed by torchrun after 30 s.
        if self.signum is None:
            print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step", flush=True)
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    step_time_ms: float
    tokens_per_sec: float
    mfu: float | None
    batch_hash: int
    world_size: int


class StepLog:
    """steps.jsonl beside the TensorBoard events: one JSON line per step, full float precision.

    After a restart a step may appear twice; the last line for a step is the one that counts.
    """

    def __init__(self, log_dir: str | None):
        self.path = Path(log_dir) / "steps.jsonl" if log_dir else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: StepRecord) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record.__dict__) + "\n")


def row_hash(rows: np.ndarray, first_position: int) -> int:
    """Position-aware checksum of batch rows; sums over ranks to the same value at any world size."""
    return sum(zlib.crc32(np.int64(first_position + i).tobytes() + row.tobytes()) for i, row in enumerate(rows))


class Trainer:
    def __init__(self, cfg: Config, dist: distributed.Dist):
        self.cfg, self.dist = cfg, dist
        self.device = dist.device
        self.dtype = resolve_dtype(cfg, self.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and self.dtype == torch.bfloat16 else nullcontext())
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
            torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        self.accum = grad_accum_steps(cfg, dist.world_size)
        n_vocab = tokenizer_class(cfg.tokenizer.name).n_vocab
        if n_vocab > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer '{cfg.tokenizer.name}' has {n_vocab} ids but "
                              f"model.vocab_size is {cfg.model.vocab_size}")
        self._tokenizer: Tokenizer | None = None
        if cfg.eval.sample_every or cfg.eval.hellaswag_every:
            self._tokenizer = self.tokenizer  # missing tokenizer files fail now, not at the first sample
        self.train_loader, self.val_loader = build_loaders(cfg, dist.rank, dist.world_size)

        torch.manual_seed(cfg.train.seed)
        self.raw_model = build_model(cfg).to(self.device)
        self.model: torch.nn.Module = self.raw_model
        if cfg.train.compile:
            self.model = torch.compile(self.model, mode=cfg.train.compile_mode)
        if dist.world_size > 1:
            self.model = DDP(self.model, device_ids=[dist.local_rank] if self.device.type == "cuda" else None,
                             bucket_cap_mb=cfg.train.ddp_bucket_cap_mb, gradient_as_bucket_view=True,
                             static_graph=cfg.train.ddp_static_graph)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, self.device.type)
        self.checkpointer = Checkpointer(cfg.checkpoint, is_writer=dist.is_main)
        self.step = 0
        self.resumed_from: str | None = None

        n_params = self.raw_model.num_params()
        self.flops_per_token = flops_per_token(n_params, cfg.model.n_layer, cfg.model.n_embd, cfg.train.seq_len)
        self.peak_flops, self.device_name = device_peak_flops(self.device, self.dtype)
        self.metrics: Metrics | None = None
        self.step_log = StepLog(cfg.logging.dir if dist.is_main else None)
        self.preemption = PreemptionFlag()
        self._hellaswag_path = None
        self.data_seconds = 0.0  # host time spent reading and copying batches in the last step
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="gpt2-data")
        self._prefetched: tuple[tuple[int, int], Future] | None = None
        self.main_print(
            f"model: {n_params:,} parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token (6N + 6*L*C*T); "
            f"world size {dist.world_size}, {self.accum} micro-steps of {cfg.train.micro_batch} x "
            f"{cfg.train.seq_len} per rank = {cfg.train.total_batch_tokens:,} tokens/step; device "
            f"{self.device_name} ({self.dtype}); "
            + (f"peak {self.peak_flops / 1e12:.0f} TFLOP/s" if self.peak_flops
               else "MFU unknown (no known peak FLOP/s for this device)")
        )

    # ---- helpers --------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.cfg.tokenizer.name, self.cfg.tokenizer.files_dir)
        return self._tokenizer

    def main_print(self, *args: Any) -> None:
        if self.dist.is_main:
            print(*args, flush=True)

    def state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tokens_seen": self.step * self.cfg.train.total_batch_tokens,
            "lr": lr_at(max(self.step - 1, 0), self.cfg.optim, self.cfg.train.max_steps),
            "world_size": self.dist.world_size,
            "rng": rng,
        }

    def meta(self) -> dict[str, Any]:
        import yaml

        return {
            "tokens_seen": self.step * self.cfg.train.total_batch_tokens,
            "world_size": self.dist.world_size,
            "data_position": {"next_step": self.step, "rows_per_step": self.train_loader.layout.rows_per_step,
                              "epoch": self.train_loader.epoch_of(self.step)},
            "sample_seed": self.cfg.train.seed,
            "config": yaml.safe_load(to_yaml(self.cfg, redact=True)),
        }

    def resume(self) -> None:
        """Load the checkpoint rank 0 picks (the newest loadable one) on every rank."""
        found = self.checkpointer.load_for_resume() if self.dist.is_main else None
        target = distributed.broadcast_object(found[0] if found else None)
        if target is None:
            self.main_print(f"no checkpoint under {self.cfg.checkpoint.dir}: starting from scratch")
            return
        state = found[1] if found else self.checkpointer.load(target)  # type: ignore[index]
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.resumed_from = target
        self.main_print(f"resumed from {target} at step {self.step} (written at world size {state['world_size']}, "
                        f"now {self.dist.world_size})")

    def save(self, blocking: bool) -> None:
        self.checkpointer.save(self.state(), self.step, self.meta(), blocking=blocking)

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate(self, step: int, last: bool) -> None:
        e = self.cfg.eval
        if self.val_loader is not None and e.val_every and (step % e.val_every == 0 or last):
            loss = val_loss(self.model, self.val_loader, self.device, self.dist.rank, self.dist.world_size,
                            self.autocast)
            self.main_print(f"step {step}: val loss {loss:.4f}")
            self.metrics.scalars(step, {"val/loss": loss})  # type: ignore[union-attr]
        if e.hellaswag_every and (step % e.hellaswag_every == 0 or last) and self._hellaswag() is not None:
            # the uncompiled module: HellaSwag rows vary in length, which compiled graphs dislike
            r = hellaswag.evaluate(self.raw_model, self.tokenizer, self._hellaswag(), self.device,
                                   self.dist.rank, self.dist.world_size, e.hellaswag_limit,
                                   self.cfg.model.block_size, self.autocast)
            self.main_print(f"step {step}: HellaSwag acc_norm {r.correct_norm}/{r.total} = {r.acc_norm:.4f}")
            self.metrics.scalars(step, {"eval/hellaswag_acc_norm": r.acc_norm, "eval/hellaswag_acc": r.acc})  # type: ignore[union-attr]
        if self.dist.is_main and e.sample_every and step > 0 and (step % e.sample_every == 0 or last):
            texts = sample_texts(self.raw_model, self.tokenizer, e.sample_prompt, e.num_samples, e.sample_tokens,
                                 e.top_k, seed=self.cfg.train.seed + step, device=self.device)
            for i, t in enumerate(texts):
                print(f"step {step} sample {i}: {t!r}", flush=True)
            self.metrics.text("samples", "\n\n".join(f"{i}: {t}" for i, t in enumerate(texts)), step)  # type: ignore[union-attr]

    def _hellaswag(self):
        if self._hellaswag_path is None:
            try:
                self._hellaswag_path = hellaswag.data_path(self.cfg.eval.hellaswag_path)
            except hellaswag.HellaSwagUnavailable as err:
                self.main_print(f"WARNING: HellaSwag disabled for this run: {err}")
                self._hellaswag_path = False
        return self._hellaswag_path or None

    # ---- the loop -------------------------------------------------------------------------------

    def _rows(self, step: int, micro: int) -> np.ndarray:
        """This micro-batch's rows, read ahead in a thread while the previous one computes."""
        key = (step, micro)
        if self._prefetched is not None and self._prefetched[0] == key:
            rows = self._prefetched[1].result()
        else:
            rows = self.train_loader.rows(step, micro)
        upcoming = (step, micro + 1) if micro + 1 < self.accum else (step + 1, 0)
        self._prefetched = (upcoming, self._reader.submit(self.train_loader.rows, *upcoming))
        return rows

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step; returns (loss summed over micro-steps on this rank, grad norm, batch hash)."""
        lr = lr_at(step, self.cfg.optim, self.cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        batch_hash = 0
        layout = self.train_loader.layout
        self.data_seconds = 0.0
        for micro in range(self.accum):
            t0 = time.perf_counter()
            rows = self._rows(step, micro)
            batch_hash += row_hash(rows, layout.first_row(0, micro, self.dist.rank))
            x, y = to_device(rows, self.device)  # pinned + non-blocking on CUDA
            self.data_seconds += time.perf_counter() - t0
            last = micro == self.accum - 1
            # gradients are all-reduced only on the last micro-step (forward and backward both)
            sync = self.model.no_sync() if isinstance(self.model, DDP) and not last else nullcontext()
            with sync:
                with self.autocast:
                    _, loss = self.model(x, y)
                loss = loss / self.accum
                loss_sum += loss.detach()
                loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        return loss_sum, norm, batch_hash

    def run(self) -> int:
        cfg = self.cfg
        self.resume()
        start = self.step
        if self.dist.is_main:
            self.metrics = Metrics(cfg.logging.dir, purge_step=start if start > 0 else None)
            self.metrics.text("config", "```\n" + to_yaml(cfg, redact=True) + "\n```", start)
        else:
            self.metrics = Metrics(None)
        self.preemption.install()
        try:
            return self._loop(start)
        finally:
            self.preemption.restore()
            self.metrics.close()

    def _loop(self, start: int) -> int:
        cfg = self.cfg
        max_steps = cfg.train.max_steps
        if start >= max_steps:
            self.main_print(f"training already complete ({start}/{max_steps} steps)")
            return EXIT_OK
        for step in range(start, max_steps):
            self.evaluate(step, last=False)
            t0 = time.time()
            loss_sum, norm, batch_hash = self.train_step(step)
            # one all-reduce carries the loss, the preemption flag and the batch checksum
            flag = 1.0 if self.preemption.signum is not None else 0.0
            shared = torch.tensor([0.0, flag, float(batch_hash)], dtype=torch.float64, device=self.device)
            shared[0] = loss_sum.double()
            distributed.all_reduce_sum(shared)
            loss = float(shared[0]) / self.dist.world_size  # .item() syncs: the step is timed after it
            dt = time.time() - t0
            self.step = step + 1
            tokens_per_sec = cfg.train.total_batch_tokens / dt
            utilisation = mfu(tokens_per_sec, self.flops_per_token, self.peak_flops, self.dist.world_size)
            lr = lr_at(step, cfg.optim, max_steps)
            record = StepRecord(step, loss, lr, float(norm), dt * 1000, tokens_per_sec, utilisation,
                                int(shared[2]), self.dist.world_size)
            self._log_step(record)
            preempted = shared[1] > 0
            last = self.step == max_steps
            stop_here = self.step == cfg.train.stop_at_step
            if preempted or last or stop_here:
                if last:
                    self.evaluate(self.step, last=True)
                self.checkpointer.wait(raise_errors=False)
                try:
                    self.save(blocking=True)
                except Exception as err:
                    raise CheckpointError(
                        f"the {'preemption' if preempted else 'final'} checkpoint could not be saved to "
                        f"{cfg.checkpoint.dir}: {err}"
                    ) from err
                if preempted and not last:
                    self.main_print(f"preempted: checkpoint saved at step {self.step}; exiting with {EXIT_PREEMPTED}")
                    return EXIT_PREEMPTED
                if stop_here and not last:
                    self.main_print(f"stopping at step {self.step} (train.stop_at_step); checkpoint saved")
                    return EXIT_OK
            elif self.step % cfg.checkpoint.every == 0:
                try:
                    self.checkpointer.wait(raise_errors=True)
                except Exception as err:
                    log.error("CHECKPOINT SAVE FAILED: %s; training goes on and the next save tries again", err)
                try:
                    self.save(blocking=not cfg.checkpoint.async_save)
                except Exception as err:
                    log.error("CHECKPOINT SAVE FAILED at step %d: %s; training goes on and the next save "
                              "tries again", self.step, err)
        self.main_print(f"training complete: {max_steps} steps; checkpoints in {cfg.checkpoint.dir}, "
                        f"TensorBoard: tensorboard --logdir {cfg.logging.dir}")
        return EXIT_OK

    def _log_step(self, r: StepRecord) -> None:
        if not self.dist.is_main:
            return
        self.step_log.write(r)
        self.metrics.scalars(r.step, {  # type: ignore[union-attr]
            "train/loss": r.loss, "train/lr": r.lr, "train/grad_norm": r.grad_norm,
            "perf/tokens_per_sec": r.tokens_per_sec, "perf/mfu": r.mfu, "perf/step_time_ms": r.step_time_ms,
        })
        if r.step % self.cfg.train.log_every == 0 or r.step == self.cfg.train.max_steps - 1:
            util = f"MFU {100 * r.mfu:.1f}%" if r.mfu is not None else "MFU n/a"
            print(f"step {r.step:6d}/{self.cfg.train.max_steps} | loss {r.loss:.6f} | lr {r.lr:.3e} | "
                  f"norm {r.grad_norm:.4f} | {r.step_time_ms:.1f} ms | {r.tokens_per_sec:,.0f} tok/s | {util}",
                  flush=True)

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        self.checkpointer.wait(raise_errors=False)


def ensure_data(cfg: Config, dist: distributed.Dist) -> None:
    """With data.auto_prepare, rank 0 prepares missing shards while the others wait."""
    if not cfg.data.auto_prepare:
        return
    if dist.is_main:
        manifest = read_manifest(cfg.data.dir, cfg.data.storage_options)
        if manifest is None or not manifest.complete:
            from gpt2.prepare import prepare

            print(f"preparing {cfg.data.source} into {cfg.data.dir} (data.auto_prepare=true)", flush=True)
            print(prepare(cfg, progress=False), flush=True)
    distributed.barrier()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = cli_config(sys.argv[1:] if argv is None else argv, USAGE)
    sys.exit(run(cfg))


def run(cfg: Config) -> int:
    """Train per `cfg`; returns the process exit code."""
    dist = distributed.init(cfg.train.device)
    trainer = None
    code = EXIT_ERROR
    try:
        grad_accum_steps(cfg, dist.world_size)  # a batch that cannot be split fails before any work
        ensure_data(cfg, dist)
        trainer = Trainer(cfg, dist)
        code = trainer.run()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = EXIT_CONFIG
    except (DataError, TokenizerError, CheckpointError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = EXIT_ERROR
    except Exception:
        if dist.world_size > 1:
            # A peer may have died (torchrun then restarts the whole group from the last checkpoint):
            # any further collective or DDP destructor could hang, so leave without tearing down.
            traceback.print_exc()
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(EXIT_ERROR)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        if code in (EXIT_OK, EXIT_PREEMPTED):
            distributed.teardown()
        else:
            distributed.abort()
    if code == EXIT_OK and dist.is_main:
        print(f"outputs: checkpoints {cfg.checkpoint.dir} | TensorBoard {cfg.logging.dir} "
              f"(tensorboard --logdir {cfg.logging.dir}) | steps {os.path.join(cfg.logging.dir, 'steps.jsonl')}")
    return code


if __name__ == "__main__":
    main()
