"""Configuration: OmegaConf structured configs, loaded from YAML plus `key=value` overrides.

Every section is a dataclass, so a typo in a key or a value of the wrong type is caught
before any work starts, with a message that names the key and what would have been valid.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from gpt2.errors import ConfigError, exit_code

log = logging.getLogger(__name__)



# The four OpenAI sizes (block_size 1024, vocab 50257 for all of them).
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@dataclass
class ModelConfig:
    """The model's shape (what `gpt2.model.GPT` is built from) and where its weights start."""

    # A preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) fills the sizes below; null keeps them.
    preset: str | None = None
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    # Round the embedding table up to a multiple of this (128 gives 50304 for GPT-2) for faster
    # matmuls; the padded ids are never sampled or scored.
    pad_vocab_to: int = 1
    # Start from pretrained weights: a hub name (gpt2, ...) or a local Hugging Face directory.
    init_from: str | None = None

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to
        return (self.vocab_size + m - 1) // m * m


@dataclass
class TokenizerConfig:
    # "gpt2" (tiktoken's GPT-2 BPE) or "bytes" (UTF-8 bytes + an end-of-text id, no files needed).
    name: str = "gpt2"
    # Directory holding encoder.json + vocab.bpe for offline use; the GPT2_TOKENIZER_DIR
    # environment variable is used when this is null.
    files_dir: str | None = None


@dataclass
class DataConfig:
    # Where the token shards live: a local directory or an fsspec URL (s3://bucket/prefix).
    dir: str = "data/edu_fineweb10B"
    # What `gpt2.prepare` reads: "hf:HuggingFaceFW/fineweb-edu:sample-10BT", "builtin:pydoc",
    # or files (.txt, .jsonl, .parquet) by path, glob or fsspec URL.
    source: str = "hf:HuggingFaceFW/fineweb-edu:sample-10BT"
    text_field: str = "text"
    shard_tokens: int = 100_000_000
    # Tokens that go to the validation split (taken first, as build-nanogpt does: shard 0 is val).
    val_tokens: int = 100_000_000
    # How .txt inputs become documents: "file" (one per file) or "paragraph" (split at blank lines).
    txt_split: str = "file"
    # Prepare the shards on the first run when they are missing (the demo uses this).
    auto_prepare: bool = False
    # Seconds every rank waits for a complete manifest before training (0: fail at once when the
    # data is missing). For a preparation job started alongside, e.g. `kubectl apply -k k8s/`.
    wait_for_data_s: int = 0
    # Tokenization workers for `gpt2.prepare`; 0 means one per CPU core.
    workers: int = 0
    # "process" (measured 2.2x build-nanogpt's loop on 2 cores, threads 1.5x: docs/benchmarks.md)
    # or "thread" (tiktoken encodes without the GIL, but the per-document Python work does not).
    executor: str = "process"
    # Where remote shards are cached locally (default: ~/.cache/gpt2/shards).
    cache_dir: str | None = None
    # Shuffle fixed-length blocks of the train stream per epoch, from train.seed (same on every rank).
    shuffle: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    betas: list[float] = field(default_factory=lambda: [0.9, 0.96])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Fused AdamW kernel where the device supports it.
    fused: bool = True
    # When a resume finds another schedule (max_steps, warmup_steps, lr, min_lr) than the checkpoint's:
    # "redraw" follows the new schedule from the resume step (the lr may jump; a warning gives both),
    # "continue" starts a new cosine decay from the lr the run had at the resume step down to min_lr at
    # max_steps (no jump; e.g. to train a finished run on to more steps).
    on_schedule_change: str = "redraw"
    # Updates with a NaN/inf gradient norm are skipped; this many in a row stop the run (exit 3).
    max_skipped_steps: int = 3


@dataclass
class TrainConfig:
    total_batch_tokens: int = 491_520
    # Rows per forward pass: a number, or auto: the largest micro-batch that divides the rows each
    # rank reads per step (so the global batch stays exact), up to max_micro_batch, and that fits in
    # GPU memory (a short probe at start-up); reused from the checkpoint at an unchanged world size.
    # The seed (build-nanogpt) used 4; only throughput depends on it, never the hyper-parameters.
    micro_batch: Any = 4
    max_micro_batch: int = 64
    seq_len: int = 1024
    max_steps: int = 19_073
    # Stop this run (with a checkpoint) once this step is reached, keeping the schedule of
    # max_steps; 0 = run to max_steps. For time-boxed jobs and tests.
    stop_at_step: int = 0
    seed: int = 1337
    # auto: cuda if available, else cpu. Or cpu / cuda.
    device: str = "auto"
    # auto: bfloat16 autocast on CUDA, float32 on CPU. Or float32 / bfloat16.
    dtype: str = "auto"
    # TF32 tensor cores for the fp32 matmuls that remain under bf16 autocast (CUDA only).
    tf32: bool = True
    compile: bool = False
    compile_mode: str | None = None
    log_every: int = 1
    # A rank that makes no progress (a hung collective, a frozen peer, a stuck read) for this many
    # seconds exits with EXIT_HUNG, so torchrun or the cluster restarts the job from its last
    # checkpoint; also the process-group timeout. 0 disables both (then torch's 30 min default).
    hang_timeout_s: int = 600
    # A crash loop stops: a start of a scheduler job (SLURM requeue, torchrun or pod restart) whose
    # last this-many attempts each failed (an exit other than 0 or 200, or killed) from the checkpoint
    # it would resume from exits with EXIT_CRASH_LOOP, which no launcher restarts. 0: no limit.
    max_failed_restarts: int = 3
    # Resume with another train.total_batch_tokens than the checkpoint's: the data position then
    # continues by tokens seen (no row skipped or read twice). Without it such a resume is refused.
    allow_batch_change: bool = False
    # DDP tuning (issue: performance).
    ddp_bucket_cap_mb: int = 25
    ddp_static_graph: bool = False


@dataclass
class EvalConfig:
    val_every: int = 250
    val_batches: int = 20
    hellaswag_every: int = 200
    # Local path to hellaswag_val.jsonl; null downloads it (needs network) into the cache.
    hellaswag_path: str | None = None
    # Evaluate only the first N examples (0: all 10,042).
    hellaswag_limit: int = 0
    sample_every: int = 50
    sample_prompt: str = "Hello this is AI model,"
    num_samples: int = 4
    sample_tokens: int = 32
    top_k: int = 50


@dataclass
class CheckpointConfig:
    # A local path or an fsspec URL (s3://..., gs://...).
    dir: str = "runs/gpt2-124m/checkpoints"
    every: int = 1000
    keep: int = 2
    # auto: newest complete checkpoint under dir; never; or a path to one checkpoint.
    resume: str = "auto"
    async_save: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Transient storage errors are retried this many times with exponential backoff (0.5 s, doubling, at most 30 s).
    retries: int = 5
    # The run's lease (one writer per checkpoint.dir, gpt2/checkpoint/lease.py): renewed every
    # ttl/4 s; a lease that another start watches unchanged for this long (by its own clock) is
    # stale and taken over. 0: no lease.
    lease_ttl_s: int = 60
    # How long a start waits for a live holder of the same job (an earlier attempt still ending)
    # or a holder that is stopping, before it gives up.
    lease_wait_s: int = 600
    # Take the lease even from a live holder (after making sure the other trainer is gone).
    take_over: bool = False
    # While checkpoint.dir cannot be reached, training goes on without writing (saves and renewals
    # retry); an outage longer than this ends the attempt with exit 202, which the launchers restart.
    outage_s: int = 600


@dataclass
class LoggingConfig:
    # TensorBoard event directory (rank 0 writes it); the same directory across restarts.
    dir: str = "runs/gpt2-124m/tensorboard"


@dataclass
class LaunchConfig:
    """Settings shared by the SLURM and Kubernetes launchers."""

    # torchrun --max-restarts: worker failures survived in place before the job fails.
    max_restarts: int = 3
    # Requeues of a SLURM job (preemption or time limit) before we give up.
    max_requeues: int = 20
    # Seconds before the time limit at which SLURM sends the warning signal.
    signal_delay_s: int = 120
    # The image `launch/k8s.py` runs unless --image is given.
    image: str = "ghcr.io/gpt2-cluster/gpt2:0.1.0"
    run_dir: str = "runs"


@dataclass
class Config:
    name: str = "gpt2-124m"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


_CHOICES = {
    "tokenizer.name": ("gpt2", "bytes"),
    "data.txt_split": ("file", "paragraph"),
    "data.executor": ("thread", "process"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "float32", "bfloat16"),
    "optim.on_schedule_change": ("redraw", "continue"),
}

# Inside storage_options every value is treated as a secret except these settings, known to hold
# none (fsspec/s3fs/gcsfs names); anything else (key, secret, sas, auth, headers, ...) is redacted.
PUBLIC_STORAGE_OPTIONS = frozenset({
    "anon", "endpoint_url", "region_name", "use_ssl", "verify", "requester_pays", "version_aware",
    "default_block_size", "default_cache_type", "default_fill_cache", "cache_regions", "max_concurrency",
    "client_kwargs", "config_kwargs", "connect_timeout", "read_timeout", "retries", "project", "account_name",
})
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*):[^/@\s]*@")


def all_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema (used to suggest the nearest one on a typo)."""
    node = OmegaConf.structured(Config) if node is None else node
    keys: list[str] = []
    for k in node.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        child = node._get_node(k)
        if isinstance(child, DictConfig) and child._metadata.object_type not in (None, dict):
            keys.extend(all_keys(child, full + "."))
    return keys


def _unknown_key_message(key: str, where: str) -> str:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else "; see gpt2/config.py for the valid keys"
    return f"unknown config key '{key}' in {where}{hint}"


def _full_key(err: OmegaConfBaseException) -> str:
    return str(getattr(err, "full_key", None) or getattr(err, "key", None) or "?")


def _merge(base: DictConfig, other: DictConfig, where: str) -> DictConfig:
    for key in other:
        if key in base and isinstance(base[key], DictConfig) and not isinstance(other._get_node(key), DictConfig):
            raise ConfigError(f"config key '{key}' in {where} is a section (e.g. {key}.{next(iter(base[key]))}=...), "
                              f"not a value")
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(_full_key(err), where)) from None
    except ValidationError as err:
        raise ConfigError(_type_message(err, where)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad config in {where}: {str(err).splitlines()[0]}") from None


def _type_message(err: ValidationError, where: str) -> str:
    key = _full_key(err)
    value = getattr(err, "msg", str(err)).split("\n")[0]
    return f"bad value for config key '{key}' in {where}: {value} (expected {_expected_type(key)})"


def _expected_type(key: str) -> str:
    """The annotated type of a dotted key in the schema, e.g. 'int' for train.max_steps."""
    import dataclasses

    cls: Any = Config
    annotation = "?"
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return annotation
        annotation = str(fields[part].type)
        cls = fields[part].default_factory() if callable(fields[part].default_factory) else None
        cls = type(cls) if dataclasses.is_dataclass(cls) else None
    return annotation


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply `key=value` overrides.

    Raises ConfigError with a precise message on an unknown key, a wrong type or a bad value.
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found (try configs/demo.yaml or configs/gpt2-124m.yaml)")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"cannot parse config file '{path}': {err}") from None
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"config file '{path}' must be a mapping of sections (model:, train:, ...), "
                              f"not a {type(file_cfg).__name__.removesuffix('Config').lower()}")
        if not file_cfg:
            raise ConfigError(f"config file '{path}' is empty; start from configs/demo.yaml or configs/gpt2-124m.yaml")
        cfg = _merge(cfg, file_cfg, f"'{path}'")
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), "the command line")
    try:
        config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as err:  # interpolations such as ${oc.env:VAR} resolve here
        raise ConfigError(f"config key '{_full_key(err)}': {str(err).splitlines()[0]}") from None
    apply_preset(config)
    validate(config)
    return config


def apply_preset(config: Config) -> None:
    """Fill the model sizes from `model.preset` (the four OpenAI GPT-2 sizes)."""
    if config.model.preset is None:
        return
    if config.model.preset not in PRESETS:
        raise ConfigError(
            f"unknown model.preset '{config.model.preset}'; choose one of {', '.join(PRESETS)} or null"
        )
    for k, v in PRESETS[config.model.preset].items():
        setattr(config.model, k, v)


def validate(config: Config) -> None:
    """Checks that need more than types: choices, positive sizes, consistent batch shapes."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise ConfigError(f"config key '{key}' is '{value}'; choose one of {', '.join(choices)}")
    m, t, o, e, d, c = config.model, config.train, config.optim, config.eval, config.data, config.checkpoint
    positives = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
        "model.block_size": m.block_size, "model.vocab_size": m.vocab_size, "model.pad_vocab_to": m.pad_vocab_to,
        "train.total_batch_tokens": t.total_batch_tokens, "train.max_micro_batch": t.max_micro_batch,
        "train.seq_len": t.seq_len, "train.max_steps": t.max_steps, "train.log_every": t.log_every,
        "optim.lr": o.lr, "optim.eps": o.eps, "optim.grad_clip": o.grad_clip,
        "optim.max_skipped_steps": o.max_skipped_steps, "data.shard_tokens": d.shard_tokens,
        "checkpoint.every": c.every,
    }
    if e.sample_every:
        positives.update({"eval.num_samples": e.num_samples, "eval.sample_tokens": e.sample_tokens,
                          "eval.top_k": e.top_k})
    for key, value in positives.items():
        if not value > 0:  # also catches NaN
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    non_negatives = {
        "optim.min_lr": o.min_lr, "optim.weight_decay": o.weight_decay, "optim.warmup_steps": o.warmup_steps,
        "train.stop_at_step": t.stop_at_step, "train.hang_timeout_s": t.hang_timeout_s,
        "train.max_failed_restarts": t.max_failed_restarts,
        "eval.val_every": e.val_every, "eval.val_batches": e.val_batches, "eval.hellaswag_every": e.hellaswag_every,
        "eval.hellaswag_limit": e.hellaswag_limit, "eval.sample_every": e.sample_every,
        "data.workers": d.workers, "data.val_tokens": d.val_tokens, "data.wait_for_data_s": d.wait_for_data_s,
        "checkpoint.retries": c.retries, "checkpoint.lease_ttl_s": c.lease_ttl_s,
        "checkpoint.lease_wait_s": c.lease_wait_s, "checkpoint.outage_s": c.outage_s,
        "launch.max_restarts": config.launch.max_restarts, "launch.max_requeues": config.launch.max_requeues,
        "launch.signal_delay_s": config.launch.signal_delay_s,
    }
    for key, value in non_negatives.items():
        if not value >= 0:
            raise ConfigError(f"config key '{key}' must be 0 or more, got {value}")
    if c.lease_ttl_s and c.outage_s < c.lease_ttl_s:
        raise ConfigError(f"checkpoint.outage_s ({c.outage_s}) is shorter than checkpoint.lease_ttl_s "
                          f"({c.lease_ttl_s}): a blip shorter than the lease's own tolerance would end the run")
    if 0 < c.lease_ttl_s < 10:
        raise ConfigError(f"checkpoint.lease_ttl_s must be 0 (no lease) or at least 10 s, got {c.lease_ttl_s}: a "
                          "holder renews every ttl/4 s and stops writing when a renewal is ttl/2 s late")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr ({o.min_lr}) is above optim.lr ({o.lr}); the schedule decays lr to min_lr")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must lie in [0, 1), got {list(o.betas)}")
    if t.stop_at_step > t.max_steps:
        raise ConfigError(f"train.stop_at_step ({t.stop_at_step}) is after train.max_steps ({t.max_steps}); "
                          "use 0 to run to max_steps")
    if o.warmup_steps > t.max_steps:
        log.warning("optim.warmup_steps (%d) is longer than train.max_steps (%d): the learning rate never reaches "
                    "optim.lr (%g) in this run", o.warmup_steps, t.max_steps, o.lr)
    if config.model.n_embd % config.model.n_head:
        raise ConfigError(
            f"model.n_embd ({config.model.n_embd}) must be divisible by model.n_head ({config.model.n_head})"
        )
    if config.train.seq_len > config.model.block_size:
        raise ConfigError(
            f"train.seq_len ({config.train.seq_len}) exceeds model.block_size ({config.model.block_size})"
        )
    if config.checkpoint.keep < 2:
        raise ConfigError(f"checkpoint.keep must be at least 2 (got {config.checkpoint.keep}): "
                          "the previous checkpoint is what survives a crash during a save")
    if len(config.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {list(config.optim.betas)}")
    if config.tokenizer.name == "bytes" and config.model.vocab_size < 257:
        raise ConfigError("tokenizer 'bytes' needs model.vocab_size >= 257 (256 bytes + end-of-text)")
    t = config.train
    if t.micro_batch == "auto":
        if not exact_micro_batches(t.total_batch_tokens, t.seq_len, [1], t.max_micro_batch):
            raise ConfigError(f"train.total_batch_tokens ({t.total_batch_tokens}) is not a whole number of "
                              f"train.seq_len ({t.seq_len}) rows: no micro-batch keeps it exact")
    elif isinstance(t.micro_batch, bool) or not isinstance(t.micro_batch, int) or t.micro_batch < 1:
        raise ConfigError(f"train.micro_batch must be a positive number or auto, got {t.micro_batch!r}")
    else:
        grad_accum_steps(t.total_batch_tokens, t.micro_batch, t.seq_len, world_size=1)


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that the global batch is exactly `total_batch_tokens`
    (the one place this is computed); ConfigError when it cannot be split evenly."""
    per_step = micro_batch * seq_len * world_size
    if total_batch_tokens % per_step:
        raise ConfigError(
            f"train.total_batch_tokens ({total_batch_tokens}) is not divisible by "
            f"train.micro_batch ({micro_batch}) x train.seq_len ({seq_len}) x world size ({world_size}) "
            f"= {per_step}; change one of them so the global batch stays exact"
        )
    return total_batch_tokens // per_step


def exact_micro_batches(total_batch_tokens: int, seq_len: int, world_sizes: list[int], cap: int) -> list[int]:
    """Every micro-batch up to `cap` that keeps the global batch exact at each of `world_sizes`,
    largest first: the divisors of the rows each rank reads per step (480 rows for 491,520 tokens
    of 1024: 60 per rank at 8 GPUs and 30 at 16, so 30, 15, 10, 6, 5, 3, 2, 1 serve both)."""
    if total_batch_tokens % seq_len:
        return []
    rows = total_batch_tokens // seq_len
    return [mb for mb in range(min(cap, rows), 0, -1) if all(rows % (mb * w) == 0 for w in world_sizes)]


def to_dict(config: Config, redact: bool = True) -> dict[str, Any]:
    """The resolved config as plain data, with secrets in storage options replaced by '***'."""
    data = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    return _redact(data) if redact else data  # type: ignore[return-value]


def to_yaml(config: Config, redact: bool = True) -> str:
    """The resolved config as YAML, with secrets in storage options replaced by '***'."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(config, redact)))


def from_dict(data: dict[str, Any]) -> Config:
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def redact_url(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def _redact(value: Any, inside_storage_options: bool = False, key: str = "") -> Any:
    secret = inside_storage_options and key not in PUBLIC_STORAGE_OPTIONS
    if isinstance(value, dict):
        inside = inside_storage_options or key == "storage_options"
        return {k: _redact(v, inside, str(k) if not secret else "") for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, inside_storage_options, key) for v in value]
    if secret and value not in (None, ""):
        return "***"
    return redact_url(value) if isinstance(value, str) else value


def cli_config(argv: list[str], usage: str) -> Config:
    """Parse `CONFIG [key=value ...]` for the command-line entry points; exits 2 on a bad config."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0 if argv else 2)
    path, overrides = argv[0], argv[1:]
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        log.error("%s", err)
        sys.exit(exit_code(err))
