"""torch.compile's artifacts kept with the run, so that a restarted or rescheduled rank does not
compile from scratch.

PyTorch's caches (inductor's FX graph cache, AOTAutograd's cache) live on the node's local disk:
a rank restarted on the same node finds them, one rescheduled to another node (a new pod, a
requeued job) does not. So after the first compilation of an attempt that found nothing, rank 0
stores them, serialized by PyTorch itself (`torch.compiler.save_cache_artifacts`), as one file
under the checkpoint directory:

    CHECKPOINT_DIR/compile-cache/<torch version>-<device>-<key>.bin

and every rank of a later attempt loads it before compiling. The key names what changes the
compiled code (the model's shape, the micro-batch, the dtype, the mode); PyTorch checks the rest.
Both sides are best effort: a missing, unreadable or stale file means an ordinary compilation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import torch

from gpt2.storage import filesystem, join, with_retries, write_bytes

log = logging.getLogger(__name__)

DIR = "compile-cache"


def cache_counts() -> tuple[int, int]:
    """(hits, misses) of PyTorch's compile caches in this process so far (AOTAutograd's and inductor's)."""
    from torch._dynamo.utils import counters

    aot, inductor = counters["aot_autograd"], counters["inductor"]
    return (aot["autograd_cache_hit"] + inductor["fxgraph_cache_hit"],
            aot["autograd_cache_miss"] + inductor["fxgraph_cache_miss"])


class CompileCache:
    """The compile artifacts of one run configuration under `url` (the checkpoint directory)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, device: str, shape: dict[str, Any]):
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.name = f"{torch.__version__.replace('+', '_')}-{device}-{digest}.bin"
        self.fs, root = filesystem(url, storage_options)
        self.path = join(root, DIR, self.name)
        self.url = f"{url.rstrip('/')}/{DIR}/{self.name}"
        self.loaded = False

    def load(self) -> bool:
        """Fill PyTorch's caches from the stored artifacts; False (and compile cold) when there are none."""
        t0 = time.monotonic()
        try:
            if not with_retries(lambda: self.fs.exists(self.path), f"looking for {self.url}", retries=2):
                return False
            data = with_retries(lambda: self.fs.cat_file(self.path), f"reading {self.url}", retries=2)
            self.loaded = torch.compiler.load_cache_artifacts(data) is not None
        except Exception as err:  # a cache: any failure only means compiling from scratch
            log.warning(f"could not use the compile cache {self.url} ({type(err).__name__}: {err}); compiling "
                        "from scratch")
            return False
        log.info(f"loaded compile artifacts from {self.url} ({len(data) / 2**20:.1f} MB, "
                 f"{time.monotonic() - t0:.1f} s)")
        return self.loaded

    def save(self) -> None:
        """Store what this process compiled (after a compilation that found no stored artifacts)."""
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                return
            with_retries(lambda: write_bytes(self.fs, self.path, saved[0]), f"writing {self.url}", retries=2)
        except Exception as err:
            log.warning(f"could not store the compile artifacts at {self.url} ({type(err).__name__}: {err}); "
                        "a restart elsewhere compiles from scratch")
            return
        log.info(f"stored compile artifacts at {self.url} ({len(saved[0]) / 2**20:.1f} MB) for restarts")
