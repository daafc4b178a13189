"""Checkpoints on any fsspec URL: atomic commit, keep-last-k, async save, verified load, resume.

`store.CheckpointStore` is the storage mechanics of one directory; `checkpointer.Checkpointer` is the
policy the trainer uses (interval, keep, async, which failures are fatal) and `find_resume_point`
the one answer to "what would a resume load"; `weights` turns a checkpoint into a model.
CLI: `python -m gpt2.checkpoint list|inspect|export DIR_OR_URL [...]`.
"""

from gpt2.checkpoint.checkpointer import Checkpointer, ResumePoint, Stateful, find_resume_point
from gpt2.checkpoint.store import (
    MARKER,
    STATE_FILE,
    CheckpointInfo,
    CheckpointStore,
    is_checkpoint,
    load_checkpoint,
    load_state,
    read_meta,
    resolve_checkpoint,
    step_dir_name,
)
from gpt2.errors import CheckpointError

__all__ = [
    "MARKER", "STATE_FILE", "CheckpointError", "CheckpointInfo", "CheckpointStore", "Checkpointer", "ResumePoint",
    "Stateful", "find_resume_point", "is_checkpoint", "load_checkpoint", "load_state", "read_meta",
    "resolve_checkpoint", "step_dir_name",
]
