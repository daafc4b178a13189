"""The recipe of a run: what fixes its data position and its learning-rate schedule.

Every checkpoint's marker records it. A resume compares it with the config it starts with and
names every difference: one that moves the data position (the global batch, the row length, the
shuffle and its seed, the tokenizer, the corpus) is refused, except a new global batch with
`train.allow_batch_change=true`, after which the position continues by tokens seen; a schedule
change is allowed with a warning that gives the old and the new learning rate at the resume step,
or continues without a jump (`optim.on_schedule_change=continue`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from gpt2.config import Config, OptimConfig
from gpt2.errors import ConfigError
from gpt2.optim import lr_at
from gpt2.shards import Manifest
from gpt2.tokenizer import tokenizer_class

# recipe key -> the config key a user changes (data position first, then the schedule)
DATA_KEYS = {"total_batch_tokens": "train.total_batch_tokens", "seq_len": "train.seq_len",
             "shuffle": "data.shuffle", "seed": "train.seed", "tokenizer": "the tokenizer (tokenizer.name)",
             "data": "the corpus in data.dir (its manifest)"}
SCHEDULE_KEYS = {"max_steps": "train.max_steps", "warmup_steps": "optim.warmup_steps", "lr": "optim.lr",
                 "min_lr": "optim.min_lr"}


def data_identity(manifest: Manifest | None) -> str | None:
    """A short hash of what the train stream is: source, tokenizer and every shard with its size,
    then ":" and a hash of the shards' contents (their sha256s) where the manifest records them."""
    if manifest is None:
        return None
    shards = [(s["file"], s["tokens"]) for s in manifest.shards]
    text = json.dumps([manifest.source, manifest.tokenizer, shards])
    names = hashlib.sha256(text.encode()).hexdigest()[:16]
    if not manifest.hashed:
        return names
    content = hashlib.sha256(json.dumps([s["sha256"] for s in manifest.shards]).encode()).hexdigest()[:16]
    return f"{names}:{content}"


def _same(key: str, old: Any, new: Any) -> bool:
    """Whether a recipe value is unchanged; a corpus is compared by content only where both sides
    know it (a checkpoint or a manifest from before shards had hashes knows names and sizes only)."""
    if key != "data" or not (isinstance(old, str) and isinstance(new, str)):
        return old == new
    (old_names, _, old_content), (new_names, _, new_content) = old.partition(":"), new.partition(":")
    return old_names == new_names and (not old_content or not new_content or old_content == new_content)


def recipe_of(cfg: Config, data: str | None, lr_phase: tuple[int, float] | None) -> dict[str, Any]:
    t, o = cfg.train, cfg.optim
    return {"total_batch_tokens": t.total_batch_tokens, "seq_len": t.seq_len, "shuffle": cfg.data.shuffle,
            "seed": t.seed, "tokenizer": tokenizer_class(cfg.tokenizer.name).fingerprint, "data": data,
            "max_steps": t.max_steps, "warmup_steps": o.warmup_steps, "lr": o.lr, "min_lr": o.min_lr,
            "lr_phase": list(lr_phase) if lr_phase else None}


def _recorded(meta: dict[str, Any]) -> dict[str, Any]:
    """The recipe of a checkpoint; for one written before recipes were recorded, what its config says."""
    if "recipe" in meta:
        return meta["recipe"]
    c = meta.get("config", {})
    t, o, d = c.get("train", {}), c.get("optim", {}), c.get("data", {})
    name = c.get("tokenizer", {}).get("name")
    return {"total_batch_tokens": t.get("total_batch_tokens"), "seq_len": t.get("seq_len"),
            "shuffle": d.get("shuffle"), "seed": t.get("seed"),
            "tokenizer": tokenizer_class(name).fingerprint if name else None, "data": None,
            "max_steps": t.get("max_steps"), "warmup_steps": o.get("warmup_steps"), "lr": o.get("lr"),
            "min_lr": o.get("min_lr"), "lr_phase": None}


@dataclass
class Continuation:
    """How a resumed run goes on: where its data position counts from, its schedule, what to say."""

    origin: tuple[int, int] = (0, 0)  # (step, rows read before it): see gpt2.data.Layout
    lr_phase: tuple[int, float] | None = None
    warnings: list[str] = field(default_factory=list)


def continuation(meta: dict[str, Any] | None, cfg: Config, data: str | None) -> Continuation:
    """Compare the checkpoint's recipe (its marker `meta`) with `cfg`; ConfigError for a change
    that would move the data position, unless allowed. `data` None: the corpus is not prepared
    yet and is compared once it is."""
    if meta is None:
        return Continuation()
    old, new = _recorded(meta), recipe_of(cfg, data, None)
    step = int(meta.get("step", 0))
    position = meta.get("data_position", {})
    origin = tuple(position.get("origin", (0, 0)))
    phase = tuple(old["lr_phase"]) if old.get("lr_phase") else None
    differs = {k for k in (*DATA_KEYS, *SCHEDULE_KEYS) if old.get(k) is not None and new[k] is not None
               and not _same(k, old.get(k), new[k])}
    _refuse_data_changes(differs, old, new, cfg, step)
    if "total_batch_tokens" in differs:  # allowed: continue by tokens seen
        rows_before = origin[1] + (step - origin[0]) * (old["total_batch_tokens"] // old["seq_len"])
        origin = (step, rows_before)
    result = Continuation(origin=origin, lr_phase=phase)  # type: ignore[arg-type]
    if "total_batch_tokens" in differs:
        result.warnings.append(
            f"train.total_batch_tokens is {new['total_batch_tokens']:,} now, {old['total_batch_tokens']:,} in the "
            f"checkpoint (train.allow_batch_change=true): the data position continues by tokens seen, at row "
            f"{origin[1]:,} ({origin[1] * (cfg.train.seq_len + 1):,} tokens into the train stream)")
    schedule = sorted(differs & set(SCHEDULE_KEYS))
    if schedule:
        result.lr_phase, note = _new_schedule(old, cfg, step, phase)
        changes = ", ".join(f"{SCHEDULE_KEYS[k]} {old[k]} -> {new[k]}" for k in schedule)
        result.warnings.append(f"the learning-rate schedule differs from the checkpoint's ({changes}): {note}")
    return result


def _refuse_data_changes(differs: set[str], old: dict[str, Any], new: dict[str, Any], cfg: Config,
                         step: int) -> None:
    fixed = [k for k in DATA_KEYS if k in differs and k != "total_batch_tokens"]
    if fixed:
        changes = "; ".join(f"{DATA_KEYS[k]}: {_show(k, old[k])} in the checkpoint, {_show(k, new[k])} now"
                            for k in fixed)
        raise ConfigError(
            f"this run cannot resume from its checkpoint at step {step}: {changes}. That changes which tokens "
            "the rows hold, so the rows already trained on would be read again or skipped. Resume with the "
            "checkpoint's settings (python -m gpt2.checkpoint inspect shows them), or start a new run in "
            "another checkpoint.dir from these weights (python -m gpt2.checkpoint export CHECKPOINT DIR, then "
            "model.init_from=DIR)")
    if "total_batch_tokens" in differs and not cfg.train.allow_batch_change:
        old_rows = old["total_batch_tokens"] // old["seq_len"]
        raise ConfigError(
            f"train.total_batch_tokens is {new['total_batch_tokens']:,}, the checkpoint at step {step} was written "
            f"with {old['total_batch_tokens']:,}: the loader would read step {step} from another place in the data "
            f"(rows are read by step x rows per step: {step} x {new['total_batch_tokens'] // new['seq_len']} instead "
            f"of {step} x {old_rows}), skipping or repeating rows. To resume with the new batch and go on from "
            f"the tokens already seen, add train.allow_batch_change=true; to keep the old one, set "
            f"train.total_batch_tokens={old['total_batch_tokens']}")


def _show(key: str, value: Any) -> str:
    if key in ("tokenizer", "data") and isinstance(value, str):
        return value if len(value) <= 32 else f"{value[:32]}..."
    return repr(value)


def _new_schedule(old: dict[str, Any], cfg: Config, step: int, phase: tuple[int, float] | None
                  ) -> tuple[tuple[int, float] | None, str]:
    """(lr phase, what happens) for a resume with another schedule."""
    old_optim = OptimConfig(lr=old["lr"], min_lr=old["min_lr"], warmup_steps=old["warmup_steps"])
    was = lr_at(step, old_optim, old["max_steps"], phase)
    redrawn = lr_at(step, cfg.optim, cfg.train.max_steps)
    if cfg.optim.on_schedule_change == "continue":
        if step < cfg.optim.warmup_steps:
            raise ConfigError(f"optim.on_schedule_change=continue decays from the lr at the resume step, but step "
                              f"{step} is still in the warm-up (optim.warmup_steps={cfg.optim.warmup_steps})")
        return (step, was), (f"continuing with a new cosine decay from the lr at step {step}, {was:.3e}, down to "
                             f"{cfg.optim.min_lr:.3e} at step {cfg.train.max_steps} "
                             "(optim.on_schedule_change=continue)")
    return None, (f"the lr at step {step} goes from {was:.3e} (the checkpoint's schedule) to {redrawn:.3e} (the new "
                  "one). To decay from the current lr instead, without a jump, add optim.on_schedule_change=continue")
