"""Checkpoints on any fsspec URL: atomic commit, keep-last-k, async save, verified load, resume, lineage.

`store.CheckpointStore` is the storage mechanics of one directory; `checkpointer.Checkpointer` is the
policy the trainer uses (interval, keep, async, fencing, which failures are fatal) and
`plan_resume` the one answer to "what would a resume load, and which lineage does it train";
`lease` says who may write, `lineage` which checkpoints belong to the run; `weights` turns a
checkpoint into a model. CLI: `python -m gpt2.checkpoint list|inspect|export DIR_OR_URL [...]`.
"""

from gpt2.checkpoint.checkpointer import (
    Checkpointer,
    ResumePlan,
    ResumePoint,
    Stateful,
    apply_plan,
    check_fits,
    find_resume_point,
    plan_resume,
)
from gpt2.checkpoint.lineage import Lineage, read_lineage
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
    state_path,
    step_dir_name,
)
from gpt2.errors import CheckpointError

__all__ = [
    "MARKER", "STATE_FILE", "CheckpointError", "CheckpointInfo", "CheckpointStore", "Checkpointer", "Lineage",
    "ResumePlan", "ResumePoint", "Stateful", "apply_plan", "check_fits", "find_resume_point", "is_checkpoint",
    "load_checkpoint", "load_state", "plan_resume", "read_lineage", "read_meta", "resolve_checkpoint", "state_path",
    "step_dir_name",
]
