"""What every launcher shares: the torchrun command, its environment, and input checks."""

from __future__ import annotations

import importlib
import re
from types import ModuleType

from gpt2.config import (
    PUBLIC_STORAGE_OPTIONS,
    Config,
    ConfigError,
    exact_micro_batches,
    grad_accum_steps,
    load_config,
    redact_url,
)
from gpt2.errors import LaunchError

# After forwarding a stop signal (a preemption), torchrun waits this long for the trainers' last
# checkpoint before SIGKILL. torch's own default, 30 s, cuts a slow save short (a 1.6 GB state over a
# congested link); this stays below the 120 s that SLURM's warning (launch.signal_delay_s) and the
# pod's grace period (k8s_manifests.GRACE_SECONDS) give.
SAVE_ON_STOP_S = 100

# Environment for torchrun and the trainer, the same on SLURM, Kubernetes and in the image.
TRAINER_ENV: dict[str, str] = {
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SAVE_ON_STOP_S),
    # a fresh rendezvous TCP store per round, so restarted workers never read dead peers' keys
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    # torchrun forwards these to the workers; SIGUSR2 is SLURM's preemption/time-limit warning
    "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2",
    "PYTHONUNBUFFERED": "1",
    # a collective that fails or passes the process-group timeout (2 x train.hang_timeout_s) aborts
    # the process, so torchrun restarts the group; our watchdog, with its phase and stacks, acts first
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}

RDZV_PORT = 29400
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*[a-z0-9](:[\w][\w.-]{0,127}|@sha256:[a-f0-9]{64})$")



def require(module: str, extra: str) -> ModuleType:
    """Import a launcher-only dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LaunchError(f"this launcher needs the '{module}' package: pip install 'gpt2[{extra}]'") from None


def load_trainer_config(config_path: str, overrides: list[str]) -> Config:
    try:
        return load_config(config_path, overrides)
    except ConfigError as err:
        raise LaunchError(f"config error: {err}") from None


def fit_micro_batch(cfg: Config, overrides: list[str], world_sizes: list[int], what: str = ""
                    ) -> tuple[list[str], str | None]:
    """Overrides that keep the global batch exact at every world size in `world_sizes`, and a note.

    `auto` is left to the trainer (which probes memory at the world size it runs at), once some
    micro-batch is known to serve every world size. A number from the config that does not divide
    the batch at some world size (the seed's 4 at 16 GPUs) becomes the largest exact one below it
    (`exact_micro_batches`, the trainer's function), added as a visible override. A number given on
    the command line is checked as given. LaunchError when nothing fits.
    """
    t = cfg.train
    explicit = any(o.startswith("train.micro_batch=") for o in overrides)
    cap = t.max_micro_batch if t.micro_batch == "auto" else t.micro_batch
    exact = exact_micro_batches(t.total_batch_tokens, t.seq_len, world_sizes, cap)
    if t.micro_batch == "auto" and exact:
        return overrides, None
    if t.micro_batch in exact:
        return overrides, None
    if exact and not explicit:
        return [f"train.micro_batch={exact[0]}", *overrides], (
            f"note: train.micro_batch={exact[0]} (not {t.micro_batch}) keeps train.total_batch_tokens="
            f"{t.total_batch_tokens} exact at world size(s) {world_sizes}")
    mb = t.micro_batch if t.micro_batch != "auto" else 1
    bad = next((w for w in world_sizes if t.total_batch_tokens % (mb * t.seq_len * w)), world_sizes[0])
    try:
        grad_accum_steps(t.total_batch_tokens, mb, t.seq_len, bad)
    except ConfigError as err:
        raise LaunchError(f"{what}world size {bad} cannot keep the global batch: {err}") from None
    raise LaunchError(f"{what}no micro-batch up to {cap} keeps the global batch exact at world sizes {world_sizes}")


def check_image(image: str) -> None:
    name = image.split("@")[0].rsplit("/", 1)[-1]
    if "@sha256:" not in image and ":" not in name:
        raise LaunchError(f"image '{image}' has no tag or digest; pin one (e.g. {image}:0.1.0 or {image}@sha256:...)")
    if not _IMAGE.match(image):
        raise LaunchError(f"'{image}' is not a valid image reference")
    if "@sha256:" not in image and name.endswith(":latest"):
        raise LaunchError(f"image '{image}' uses the moving tag 'latest': restarted pods could run other code "
                          "than the job started with; pin a version tag or a digest")


def torchrun_command(config_path: str, overrides: list[str], *, nproc_per_node: int | str | None,
                     nnodes: str | None = None, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
                     max_restarts: int | None = None) -> list[str]:
    """`torchrun ... -m gpt2.train CONFIG overrides`; arguments left None come from torchrun's PET_* env."""
    cmd = ["torchrun"]
    if nnodes is not None:
        cmd.append(f"--nnodes={nnodes}")
    if nproc_per_node is not None:
        cmd.append(f"--nproc-per-node={nproc_per_node}")
    if rdzv_endpoint is not None:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    if rdzv_id is not None:
        cmd.append(f"--rdzv-id={rdzv_id}")
    if max_restarts is not None:
        cmd.append(f"--max-restarts={max_restarts}")
    return [*cmd, "-m", "gpt2.train", config_path, *overrides]


def check_overrides(args: list[str]) -> list[str]:
    """Trainer overrides are passed through unchanged; LaunchError unless each looks like key=value
    and carries no credentials (the job's command line is visible in the job spec, logs and `ps`)."""
    for a in args:
        if "=" not in a or a.startswith("-"):
            raise LaunchError(f"unexpected argument '{a}': trainer overrides are key=value (e.g. train.max_steps=100)")
        key, value = a.split("=", 1)
        parts = key.split(".")
        if "storage_options" in parts:
            rest = parts[parts.index("storage_options") + 1:]
            if not rest or rest[0] not in PUBLIC_STORAGE_OPTIONS:
                raise LaunchError(
                    f"'{key}=...' would put storage credentials on the job's command line, where the job spec, "
                    "logs and `ps` show them. Give them to the job as environment variables instead "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL; on Kubernetes the gpt2-s3 Secret)")
        if redact_url(value) != value:
            raise LaunchError(f"'{key}' holds a URL with a password; pass credentials as environment variables")
    return list(args)
