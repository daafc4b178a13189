"""The lineage of a run: which checkpoints in `checkpoint.dir` belong to the trajectory being trained.

A lineage begins with a start from scratch, a start-over (`checkpoint.resume=never`) or a rollback
(`checkpoint.resume=PATH`), and goes on through every `resume=auto` start. Its record names its id,
how it began (the step, the parent checkpoint's URL, the request and the submission that made it)
and its ancestors: each earlier lineage with the last step of it that this one builds on. Every
commit marker carries the record of its checkpoint's lineage; `checkpoint.dir/LINEAGE` holds the
current one (so that a lineage that has no checkpoint yet is known, e.g. after a rollback whose
first save has not come).

A checkpoint belongs to a lineage when it is of that lineage, or of an ancestor at or before the
step where it was left. Starting a lineage moves every checkpoint that does not belong aside, as
`step-N.abandoned-LINEAGE`; so a directory holds one trajectory, and a later `resume=auto` can
never resume an abandoned branch.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from gpt2.errors import CheckpointError
from gpt2.storage import filesystem, join, with_retries, write_bytes

LINEAGE_FILE = "LINEAGE"
UNRECORDED = "unrecorded"  # checkpoints written before lineages were recorded


@dataclass
class Lineage:
    id: str
    began: dict[str, Any] = field(default_factory=dict)  # step, from (a URL or None), request, by
    ancestors: list[dict[str, Any]] = field(default_factory=list)  # [{"id", "until_step"}], nearest first

    @classmethod
    def new(cls, step: int = 0, parent: Lineage | None = None, url: str | None = None, request: str = "auto",
            by: str | None = None) -> Lineage:
        ancestors = [{"id": parent.id, "until_step": step}, *parent.ancestors] if parent else []
        return cls(uuid.uuid4().hex[:12], {"step": step, "from": url, "request": request, "by": by}, ancestors)

    @classmethod
    def of(cls, meta: dict[str, Any]) -> Lineage:
        """The lineage a commit marker records (UNRECORDED for a checkpoint from before lineages)."""
        record = meta.get("lineage")
        if not isinstance(record, dict):
            return cls(UNRECORDED)
        return cls(str(record["id"]), dict(record.get("began") or {}), list(record.get("ancestors") or []))

    def owns(self, meta: dict[str, Any]) -> bool:
        """Whether the checkpoint with marker `meta` belongs to this lineage."""
        theirs = Lineage.of(meta).id
        if theirs == self.id:
            return True
        step = int(meta.get("step", -1))
        return any(a["id"] == theirs and step <= int(a["until_step"]) for a in self.ancestors)

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def began_by(self, request: str, submission: str | None) -> bool:
        """Whether this lineage was begun by `request` from the same submission (a requeue or a
        restart of the start that made it, which then continues it instead of beginning again)."""
        return submission is not None and self.began.get("by") == submission and self.began.get("request") == request

    def describe(self) -> str:
        if self.id == UNRECORDED:
            return "a lineage from before lineages were recorded"
        b = self.began
        origin = f"from {b['from']} (step {b.get('step')})" if b.get("from") else "from scratch"
        how = {"never": "a start-over", "auto": "a first start"}.get(b.get("request", "auto"), "a rollback")
        return f"lineage {self.id}: {how} {origin}"


def read_lineage(directory: str, storage_options: dict[str, Any] | None = None, retries: int = 3) -> Lineage | None:
    """The current lineage recorded in `directory/LINEAGE`, or None."""
    fs, root = filesystem(directory, storage_options)
    path = join(root, LINEAGE_FILE)
    try:
        raw = with_retries(lambda: fs.cat_file(path), f"reading {directory}/{LINEAGE_FILE}", retries)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return Lineage.of({"lineage": json.loads(raw)})
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory}/{LINEAGE_FILE} is unreadable ({err}); remove it and name the checkpoint "
                              "to continue from with checkpoint.resume=PATH") from None


def write_lineage(directory: str, lineage: Lineage, storage_options: dict[str, Any] | None = None,
                  retries: int = 3) -> None:
    fs, root = filesystem(directory, storage_options)
    path = join(root, LINEAGE_FILE)
    data = json.dumps(lineage.record(), indent=1).encode()
    with_retries(lambda: write_bytes(fs, path, data), f"writing {directory}/{LINEAGE_FILE}", retries)
